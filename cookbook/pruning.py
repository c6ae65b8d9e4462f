"""Pruning from scratch: magnitude, Wanda, SparseGPT and N:M masks.

Unstructured and N:M pruning zero weights of the decoder's linear layers (q/k/v/o projections and
the gate/up/down MLP) and keep the tensors' shapes: the model gets no smaller or faster on its own,
it only becomes *compressible* (sparse formats, 2:4 tensor cores). Structured pruning
(`cookbook.structured_pruning`) removes whole MLP channels, attention heads or decoder layers and rebuilds
smaller `nn.Linear` modules, so the parameter count, bytes and latency really drop.

The tied embedding / LM head is never pruned: it is a lookup table shared by input and output, and
each of its rows is one token, so zeroing entries corrupts individual tokens instead of spreading
the error over a layer's computation (and it is 63% of Gemma 3 270M's parameters, see
`bytes_breakdown`).

Scores (lower = pruned first):
- magnitude  |W_ij|                            (no data)
- Wanda      |W_ij| * ||X_j||_2                 (calibration activations, Sun et al. 2023)
- SparseGPT  W_ij^2 / [H^-1]_jj^2, then the kept weights are updated to cancel the error
             (OBS with H = X^T X, Frantar & Alistarh 2023)
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core import (
    LINEAR_NAMES,
    capture_layer_inputs,
    decoder_layers,
    decoder_linears,
    run_layer,
)
from .errors import require_cuda
from .measure import model_bytes, single_thread, tensor_bytes
from .quantization import inverse_hessian_factor

METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


# ---------------------------------------------------------------- the layers we prune


def sparsity_of(model: nn.Module, layers: Iterable[int] | None = None) -> float:
    """Fraction of exactly-zero weights over the decoder linears."""
    weights = [lin.weight for lin in decoder_linears(model, layers).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def bytes_breakdown(model: nn.Module) -> dict[str, int]:
    """Bytes held by the (tied) embedding, the prunable decoder linears, and everything else."""
    embed = tensor_bytes(model.get_input_embeddings().weight)
    linears = sum(tensor_bytes(lin.weight) + (tensor_bytes(lin.bias) if lin.bias is not None else 0)
                  for lin in decoder_linears(model).values())
    total = model_bytes(model)
    return {"embedding": embed, "decoder_linears": linears, "other": total - embed - linears, "total": total}


# ---------------------------------------------------------------- masks


def check_sparsity(sparsity: float) -> float:
    """Reject ratios that cannot be pruned to: sparsity must lie in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}.")
    if not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity={sparsity} is impossible: it is the fraction of weights removed and must lie in "
            "[0, 1) (0.5 removes half; 1.0 would remove every weight)."
        )
    return float(sparsity)


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Reject N:M patterns that cannot be built: 0 < n <= m, and m must divide the input width."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n <= m:
        raise ValueError(f"N:M needs integers 0 < N <= M (keep N of every M weights), got {n}:{m}.")
    if in_features is not None and in_features % m:
        raise ValueError(f"N:M with M={m} needs the input width to be a multiple of M; got {in_features}.")


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask (True = kept) removing exactly round(sparsity * group) lowest scores per group.

    The group is the whole tensor, or each output row when `per_row` (Wanda's comparison group).
    Ties are broken by position, so the count is exact even for constant scores.
    """
    check_sparsity(sparsity)
    if scores.dim() != 2:
        raise ValueError(f"Expected a 2-D weight score matrix (out, in), got shape {tuple(scores.shape)}.")
    flat = scores if per_row else scores.reshape(1, -1)  # (groups, group_size)
    k = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        pruned = torch.topk(flat, k, dim=1, largest=False, sorted=False).indices  # (groups, k)
        keep.scatter_(1, pruned, False)
    return keep.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the N highest scores in every M consecutive inputs of each row (2:4, 4:8)."""
    if scores.dim() != 2:
        raise ValueError(f"Expected a 2-D weight score matrix (out, in), got shape {tuple(scores.shape)}.")
    check_nm(n, m, scores.shape[1])
    groups = scores.reshape(scores.shape[0], -1, m)  # (out, in/m, m)
    kept = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return keep.reshape(scores.shape)  # (out, in)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every M consecutive inputs of every row hold at most N non-zeros."""
    check_nm(n, m, weight.shape[-1])
    nonzero = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)  # (out, in/m)
    return bool((nonzero <= n).all())


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: (out, in)."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: (out, in) * (in,) -> (out, in)."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},), got {tuple(input_norm.shape)}.")
    return weight.abs() * input_norm.to(weight.dtype).unsqueeze(0)


def choose_mask(scores: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None,
                per_row: bool) -> torch.Tensor:
    """An unstructured mask for `sparsity`, or an N:M mask for `nm` (exactly one of them)."""
    if (sparsity is None) == (nm is None):
        raise ValueError("Give exactly one of sparsity=... (unstructured) or nm=(N, M) (semi-structured).")
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, per_row)


# ---------------------------------------------------------------- calibration: layer inputs, statistics


class InputStatistics:
    """Forward hooks that accumulate, per linear, the squared input norm per column (Wanda) and,
    if asked, the Gram matrix X^T X (SparseGPT's Hessian, up to a factor 2)."""

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool = False):
        self.sq_norm = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
        self.gram = ({name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
                      for name, lin in linears.items()} if hessian else {})
        self.tokens = {name: 0 for name in linears}
        self._last: tuple[torch.Tensor, tuple] | None = None  # the latest input and its sums
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _sums(self, x: torch.Tensor) -> tuple:
        """(sum of x^2 per column (in,), X^T X (in, in) or None, tokens) of one batch of inputs, computed once
        per input tensor: q/k/v read the same normed hidden states, gate/up the same MLP input."""
        if self._last is None or self._last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            gram = (flat.T @ flat).cpu() if self.gram else None  # (in, in): one batch in float32
            self._last = (x, ((flat.double() ** 2).sum(0).cpu(), gram, flat.shape[0]))
        return self._last[1]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, output):
            sq_norm, gram, tokens = self._sums(args[0])
            self.sq_norm[name] += sq_norm  # (in,)
            if self.gram:
                self.gram[name] += gram  # (in, in): the sum over batches in float64
            self.tokens[name] += tokens
        return hook

    def input_norm(self, name: str) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens: (in,)."""
        return self.sq_norm[name].sqrt().float()

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2 X^T X / tokens: (in, in)."""
        return 2 * self.gram[name] / max(self.tokens[name], 1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None


@torch.no_grad()
def collect_input_norms(model: nn.Module, input_ids: torch.Tensor, chunk: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 for the input of every decoder linear, from one dense pass (embedding + layers only)."""
    stats = InputStatistics(decoder_linears(model))
    try:
        for s in range(0, input_ids.shape[0], chunk):
            model.model(input_ids=input_ids[s : s + chunk].to(model.device), use_cache=False)
    finally:
        stats.remove()
    return {name: stats.input_norm(name) for name in stats.sq_norm}


# ---------------------------------------------------------------- unstructured / N:M pruning


@torch.no_grad()
def apply_mask(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Zero the weights where `keep` is False, in place."""
    linear.weight.mul_(keep.to(linear.weight.dtype))


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    per_row: bool = False, layers: Iterable[int] | None = None) -> None:
    """Zero the smallest |W| of every decoder linear (per tensor, or per row with `per_row`)."""
    for lin in decoder_linears(model, layers).values():
        apply_mask(lin, choose_mask(magnitude_scores(lin.weight), sparsity, nm, per_row))


@torch.no_grad()
def prune_wanda(model: nn.Module, input_norms: dict[str, torch.Tensor], sparsity: float | None = None,
                nm: tuple[int, int] | None = None, layers: Iterable[int] | None = None) -> None:
    """Zero the lowest |W_ij| * ||X_j|| per output row (Wanda), with norms from `collect_input_norms`."""
    for name, lin in decoder_linears(model, layers).items():
        if name not in input_norms:
            raise ValueError(f"No calibration norm for {name}; run collect_input_norms on this model first.")
        apply_mask(lin, choose_mask(wanda_scores(lin.weight, input_norms[name]), sparsity, nm, per_row=True))


@torch.no_grad()
def sparsegpt_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                     nm: tuple[int, int] | None = None, blocksize: int = 128,
                     percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one weight matrix: prune column by column and update the later columns (OBS).

    weight (out, in), hessian (in, in) = 2 X^T X / n. Within each block of `blocksize` columns the mask
    keeps the highest w^2 / [H^-1]_jj^2 (adaptive mask selection); each pruned column's error is spread
    over the not-yet-processed columns through the Cholesky factor of H^-1. Returns the new weight.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("Give exactly one of sparsity=... or nm=(N, M).")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}), got {tuple(hessian.shape)}.")
    if sparsity is not None:
        check_sparsity(sparsity)
    else:
        check_nm(*nm, cols)
        if blocksize % nm[1]:
            raise ValueError(f"blocksize={blocksize} must be a multiple of M={nm[1]}.")
    W = weight.detach().double().clone()  # (out, in)
    Hinv, dead = inverse_hessian_factor(hessian, percdamp)  # (in, in) float64, (in,)
    W[:, dead] = 0  # inputs never active: their weights cannot matter
    with single_thread():  # thousands of tiny column ops: thread hand-offs would cost more than the math
        _sparsegpt_columns(W, Hinv, sparsity, nm, blocksize)
    return W.to(weight.dtype)


def _sparsegpt_columns(W: torch.Tensor, Hinv: torch.Tensor, sparsity: float | None,
                       nm: tuple[int, int] | None, blocksize: int) -> None:
    """SparseGPT's column loop, in place on W (out, in), with Hinv the upper Cholesky factor of H^-1.

    It runs on the transposed weight (in, out), where column j of W is the contiguous row j and each
    compensation is one rank-1 update (addr_): ~3x faster than on (out, in), same arithmetic."""
    Wt = W.T.contiguous()  # (in, out)
    cols = Wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2].clone()  # (b, out)
        Err1 = torch.zeros_like(W1)  # (b, out)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (b, b)
        d = torch.diag(Hinv1)  # (b,)
        if sparsity is not None:  # the mask is chosen on the (out, b) view: the same tie-breaking order
            prune = ~unstructured_mask((W1**2 / d.unsqueeze(1) ** 2).T, sparsity).T  # (b, out): True = pruned
        else:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = W1[i : i + nm[1]] ** 2 / d[i : i + nm[1]].unsqueeze(1) ** 2  # (m, out)
                low = torch.topk(score, nm[1] - nm[0], dim=0, largest=False).indices  # (m - n, out)
                prune[i : i + nm[1]].scatter_(0, low, True)
            w = W1[i]  # (out,)
            err = torch.where(prune[i], w, torch.zeros_like(w)) / Hinv1[i, i]  # (out,) what pruning removes, scaled
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1.0)  # (b - i - 1, out) compensate the rest
            W1[i].masked_fill_(prune[i], 0.0)
            Err1[i] = err
        Wt[i1:i2] = W1
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)  # lazy batch update of the remaining columns
    W.copy_(Wt.T)


@torch.no_grad()
def prune_sequential(model: nn.Module, input_ids: torch.Tensor, method: str, sparsity: float | None = None,
                     nm: tuple[int, int] | None = None, layers: Iterable[int] | None = None) -> None:
    """Prune layer by layer on calibration data, feeding each layer the *pruned* previous layers' output.

    method 'wanda' or 'sparsegpt'. For each chosen layer: run it with hooks to gather input
    statistics, prune its 7 linears, run it again to get the input of the next layer. Layers not in
    `layers` are run but left dense (SparseGPT on a subset of layers).
    """
    if method not in ("wanda", "sparsegpt"):
        raise ValueError(f"method must be 'wanda' or 'sparsegpt' for sequential pruning, got {method!r}.")
    if (sparsity is None) == (nm is None):
        raise ValueError("Give exactly one of sparsity=... or nm=(N, M).")
    blocks = decoder_layers(model)
    chosen = set(range(len(blocks)) if layers is None else layers)
    inputs = capture_layer_inputs(model, input_ids)
    hidden = inputs.hidden  # (n, t, d)
    for i, block in enumerate(blocks):
        if i in chosen:
            linears = {name: block.get_submodule(name) for name in LINEAR_NAMES}
            stats = InputStatistics(linears, hessian=method == "sparsegpt")
            try:
                run_layer(block, hidden, inputs.kwargs[i])
            finally:
                stats.remove()
            for name, lin in linears.items():
                if method == "wanda":
                    apply_mask(lin, choose_mask(wanda_scores(lin.weight, stats.input_norm(name)), sparsity, nm, True))
                else:
                    lin.weight.copy_(sparsegpt_weight(lin.weight, stats.hessian(name), sparsity, nm))
        if i < max(chosen, default=-1):
            hidden = run_layer(block, hidden, inputs.kwargs[i])  # (n, t, d) through the pruned layer
        else:
            break


@torch.no_grad()
def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ||(W - W') X||^2 / ||W X||^2 computed through H = 2 X^T X / n."""
    h = hessian.double()  # (in, in)
    diff = (weight - pruned).double()  # (out, in)
    num = torch.einsum("oi,ij,oj->", diff, h, diff)
    den = torch.einsum("oi,ij,oj->", weight.double(), h, weight.double())
    return float(num / den)


# ---------------------------------------------------------------- keeping the dense weights


class WeightSnapshot:
    """The decoder linears' dense weights saved to a temporary safetensors file, to restore between runs.

    Kept on disk rather than in RAM: the 400 MB copy would push a perplexity run past the memory
    budget. `restore` reads one tensor at a time.
    """

    def __init__(self, model: nn.Module):
        from safetensors.torch import save_file

        self._dir = tempfile.TemporaryDirectory(prefix="cookbook-prune-")
        self.path = Path(self._dir.name) / "dense.safetensors"
        linears = decoder_linears(model)
        save_file({name: lin.weight.detach().cpu().contiguous() for name, lin in linears.items()}, str(self.path))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        from safetensors import safe_open

        linears = decoder_linears(model)
        with safe_open(str(self.path), framework="pt") as f:
            names = set(f.keys())
            if names != set(linears):
                raise ValueError("This snapshot was taken from a model with different layers; cannot restore.")
            for name in names:
                w = f.get_tensor(name)
                if w.shape != linears[name].weight.shape:
                    raise ValueError(f"{name}: snapshot shape {tuple(w.shape)} differs from the model's "
                                     f"{tuple(linears[name].weight.shape)} (structured pruning?); reload the model.")
                linears[name].weight.copy_(w)

    def close(self) -> None:
        self._dir.cleanup()


# ---------------------------------------------------------------- semi-structured 2:4 on a GPU


def semi_structured_linear_speed(out_features: int = 2048, in_features: int = 640, tokens: int = 4096,
                                 repeats: int = 20) -> dict[str, float]:
    """Time y = x W^T with W dense vs W in torch's 2:4 sparse format (fp16 on a CUDA GPU).

    Raises GPURequiredError on CPU: `torch.sparse.to_sparse_semi_structured` uses sparse tensor cores.
    """
    device = require_cuda("2:4 semi-structured sparse matmul (torch.sparse.to_sparse_semi_structured)")
    from torch.sparse import to_sparse_semi_structured

    from .measure import time_function

    w = torch.randn(out_features, in_features, dtype=torch.float16, device=device)  # (out, in)
    w = w * nm_mask(w.abs(), 2, 4).to(w.dtype)  # 2:4 pattern
    x = torch.randn(tokens, in_features, dtype=torch.float16, device=device)  # (tokens, in)
    w_sparse = to_sparse_semi_structured(w)
    max_diff = float((F.linear(x, w) - F.linear(x, w_sparse)).abs().max())
    dense = time_function(lambda: F.linear(x, w), warmup=3, repeats=repeats, device=device).median_s
    sparse = time_function(lambda: F.linear(x, w_sparse), warmup=3, repeats=repeats, device=device).median_s
    return {"dense_ms": dense * 1e3, "sparse_ms": sparse * 1e3, "speedup": dense / sparse, "max_abs_diff": max_diff}
