"""ALBERT's factorized embedding on a trained, tied embedding: the V x H table (also the output layer) becomes
A (V x r) times B (r x H), V*r + r*H parameters instead of V*H.

Two ways to choose the rank-r factors, both from one decomposition that serves every rank (`EmbeddingSpectrum`):

* `embedding_spectrum`: the truncated SVD of the table, the factors closest to the weights (Eckart-Young).
* `activation_aware_spectrum`: the factors closest to the *logits* the output layer computes from the final hidden
  states h it actually receives: minimise E||h (W - A B)^T||^2 instead of ||W - A B||^2. Whitening by the hidden
  states' second moment C = E[h h^T] turns that into an SVD of W C^(1/2), the idea GPTQ and AWQ apply to the linear
  layers (notebook 04). Gemma 3's final hidden states are far from isotropic, so the two choices differ by an
  order of magnitude in perplexity (notebook 07).

`FactorizedEmbedding` / `FactorizedLMHead` hold the factors (tied); `factorize_embedding` swaps them into a model and
`factorized_embedding` does so for the length of a `with` block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .core.layout import decoder as _decoder


@dataclass
class EmbeddingSpectrum:
    """An embedding W (V, H) decomposed once for every rank: W = coords @ basis, columns of coords ordered by
    singular value, largest first.

    coords: (V, H); basis: (H, H); singular_values: (H,). Rank-r factors are slices: coords[:, :r] and basis[:r].
    From `embedding_spectrum`, basis holds W's right singular vectors as rows and the slices are the truncated SVD
    (the Eckart-Young optimum for the weights); from `activation_aware_spectrum`, the optimum for the logits, and
    `energy` / `relative_error` measure the logits.
    """

    coords: torch.Tensor
    basis: torch.Tensor
    singular_values: torch.Tensor

    @property
    def hidden_size(self) -> int:
        return self.basis.shape[0]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (V, r) and B (r, H): A @ B is the best rank-r approximation of the embedding in this spectrum's
        sense (weights or logits)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.hidden_size:
            raise ValueError(f"rank must be an integer between 1 and the hidden size {self.hidden_size}, got {rank!r}.")
        return self.coords[:, :rank].contiguous(), self.basis[:rank].contiguous()

    def energy(self, rank: int) -> float:
        """Share of the squared Frobenius norm (of the embedding, or of its logits) that rank-r factors keep."""
        power = self.singular_values.double() ** 2
        return float(power[:rank].sum() / power.sum())

    def weight_error(self, rank: int) -> float:
        """||W - A @ B||_F / ||W||_F of the rank-r factors, whatever the spectrum minimises.

        coords has orthogonal columns (of norms singular_values) in both spectra, so the error is a sum over the
        dropped directions i >= r of sigma_i^2 ||basis_i||^2: no (V, H) product is formed."""
        return self._dropped_share(rank, self.basis.double().square().sum(1))

    def logit_error(self, rank: int, hidden: torch.Tensor) -> float:
        """||h (W - A @ B)^T||_F / ||h W^T||_F of the rank-r factors over the hidden states (..., H): how far the
        logits the output layer computes from the factors are from the unfactorized ones. As `weight_error`, with
        each direction weighted by the hidden states' energy along it, basis_i C basis_i^T (C = h^T h)."""
        h = hidden.detach().reshape(-1, hidden.shape[-1]).double()  # (n, H)
        along = (self.basis.double() @ h.T).square().sum(1)  # (H,) basis_i C basis_i^T
        return self._dropped_share(rank, along)

    def _dropped_share(self, rank: int, weights: torch.Tensor) -> float:
        self.factors(rank)  # validates the rank
        terms = self.singular_values.double().square() * weights  # (H,) each direction's share of the total
        return math.sqrt(float(terms[rank:].sum() / terms.sum()))

    def relative_error(self, rank: int) -> float:
        """||W - A @ B||_F / ||W||_F of the rank-r factors (of the logits for an activation-aware spectrum):
        sqrt(1 - energy)."""
        return math.sqrt(max(1.0 - self.energy(rank), 0.0))


def embedding_spectrum(weight: torch.Tensor) -> EmbeddingSpectrum:
    """Decompose an embedding (V, H) once, so factors of any rank are slices (see `EmbeddingSpectrum`).

    Uses the eigenvectors of the small (H, H) Gram matrix weight^T weight instead of an SVD of the
    (V, H) matrix: the same singular vectors, far cheaper when V >> H. Costs two (V, H) x (H, H)
    matmuls and holds a (V, H) float32 copy.
    """
    w = weight.detach().float()  # (V, H)
    gram = (w.T @ w).double()  # (H, H)
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    basis = eigvecs.flip(-1).T.float().contiguous()  # (H, H) rows = right singular vectors, largest first
    singular_values = eigvals.flip(-1).clamp_min(0).sqrt().float()  # (H,)
    return EmbeddingSpectrum(w @ basis.T, basis, singular_values)  # coords (V, H)


def activation_aware_spectrum(weight: torch.Tensor, hidden: torch.Tensor, damp: float = 0.01) -> EmbeddingSpectrum:
    """The tied embedding (V, H) decomposed for the error in the logits, not in the weights.

    hidden: (..., H) final normed hidden states the output layer reads, from calibration text. With
    C = E[h h^T] + damp * mean eigenvalue * I (damping as in GPTQ: keeps C^(-1/2) finite in directions the text
    never uses), the spectrum is that of W C^(1/2), mapped back: coords = W C^(1/2) R^T, basis = R C^(-1/2), with R
    the right singular vectors of W C^(1/2). Rank-r slices minimise E||h (W - A B)^T||^2, and `energy` /
    `relative_error` are the logits', not the weights'. Full rank reproduces W exactly.
    """
    w = weight.detach().float()  # (V, H)
    h = hidden.detach().reshape(-1, hidden.shape[-1]).double()  # (n, H)
    if h.shape[1] != w.shape[1] or len(h) < 1:
        raise ValueError(f"hidden must be (..., {w.shape[1]}) final hidden states of the model whose embedding is "
                         f"{tuple(w.shape)}, with at least one row; got {tuple(hidden.shape)}.")
    if not damp > 0:
        raise ValueError(f"damp must be > 0 (a share of the mean eigenvalue added to C, e.g. 0.01); got {damp}.")
    eigvals, eigvecs = torch.linalg.eigh(h.T @ h / len(h))  # C = E[h h^T]: (H,), (H, H)
    eigvals = eigvals.clamp_min(0) + damp * eigvals.mean()
    root = (eigvecs * eigvals.sqrt()) @ eigvecs.T  # (H, H) C^(1/2)
    inverse_root = (eigvecs * eigvals.rsqrt()) @ eigvecs.T  # (H, H) C^(-1/2)
    whitened = embedding_spectrum(w @ root.float())  # of W C^(1/2): coords (V, H), basis R (H, H)
    basis = (whitened.basis.double() @ inverse_root).float().contiguous()  # (H, H) R C^(-1/2)
    return EmbeddingSpectrum(whitened.coords, basis, whitened.singular_values)



def low_rank_embedding_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of an embedding (V, H): A (V, r) and B (r, H) with A @ B ~ weight.

    The Eckart-Young optimum, the same result as a truncated SVD (see `embedding_spectrum`; use it
    directly to try several ranks on one decomposition).
    """
    hidden = weight.shape[1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= hidden:
        raise ValueError(f"rank must be an integer between 1 and the hidden size {hidden}, got {rank!r}.")
    return embedding_spectrum(weight).factors(rank)


def factorized_parameter_count(vocab_size: int, hidden_size: int, rank: int) -> int:
    """Parameters of a rank-r factorized (tied) embedding: V*r + r*H, against V*H unfactorized."""
    return vocab_size * rank + rank * hidden_size


class FactorizedEmbedding(nn.Module):
    """Token embedding as A[ids] @ B (ALBERT): V*r + r*H parameters instead of V*H."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.a = nn.Parameter(a)  # (V, r)
        self.b = nn.Parameter(b)  # (r, H)
        self.scale = scale  # Gemma multiplies embeddings by sqrt(H)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.a) @ self.b * self.scale  # (b, t, r) @ (r, H) -> (b, t, H)

    def macs_per_token(self) -> int:
        """Multiply-adds per token: the lookup is free, then one (r) x (r, H) product."""
        return self.b.numel()


class FactorizedLMHead(nn.Module):
    """The tied output layer of a factorized embedding: logits = (h @ B^T) @ A^T, two thin matmuls."""

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        self.a, self.b = embedding.a, embedding.b  # the same Parameters: tied

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.b.T) @ self.a.T  # (b, t, H) -> (b, t, r) -> (b, t, V)

    def macs_per_token(self) -> int:
        """Multiply-adds per token: H*r then r*V (against H*V for the unfactorized output layer)."""
        return self.b.numel() + self.a.numel()


def factorize_embedding(model: nn.Module, rank: int, spectrum: EmbeddingSpectrum | None = None) -> nn.Module:
    """Swap the model's tied embedding/output layer for rank-`rank` factors (in place; returns model).

    Pass the `embedding_spectrum` of the model's embedding to try several ranks on one decomposition.
    The factors take the embedding's dtype and device.
    """
    decoder = _decoder(model)
    old = decoder.embed_tokens
    if spectrum is None:
        spectrum = embedding_spectrum(old.weight)
    elif spectrum.coords.shape != old.weight.shape:
        raise ValueError(f"The spectrum is of a {tuple(spectrum.coords.shape)} embedding but the model's is "
                         f"{tuple(old.weight.shape)}: compute it with embedding_spectrum(model's embedding weight).")
    return set_factors(model, *spectrum.factors(rank))


def set_factors(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Swap the model's tied embedding/output layer for the factors a (V, r) and b (r, H), in the embedding's dtype
    and device (in place; returns model): saved factors go back in without a decomposition."""
    decoder = _decoder(model)
    old = decoder.embed_tokens
    if isinstance(old, FactorizedEmbedding):
        raise ValueError("The model's embedding is already factorized: set factors on the unfactorized model.")
    if a.shape[0] != old.weight.shape[0] or b.shape[1] != old.weight.shape[1] or a.shape[1] != b.shape[0]:
        raise ValueError(f"Factors {tuple(a.shape)} x {tuple(b.shape)} do not fit this model's "
                         f"{tuple(old.weight.shape)} embedding: they must be (V, r) and (r, H).")
    scale = float(getattr(old, "scalar_embed_scale", 1.0))
    like = {"device": old.weight.device, "dtype": old.weight.dtype}
    embedding = FactorizedEmbedding(a.detach().to(**like), b.detach().to(**like), scale)
    decoder.embed_tokens = embedding
    model.lm_head = FactorizedLMHead(embedding)
    return model


@contextmanager
def factorized_embedding(model: nn.Module, rank: int, spectrum: EmbeddingSpectrum | None = None) -> Iterator[nn.Module]:
    """`with factorized_embedding(model, 64): ...` runs the block on rank-64 factors, then puts the model's
    own embedding and output layer back (no copy of the rest of the model)."""
    decoder = _decoder(model)
    embedding, head = decoder.embed_tokens, model.lm_head
    try:
        yield factorize_embedding(model, rank, spectrum)
    finally:
        decoder.embed_tokens, model.lm_head = embedding, head
