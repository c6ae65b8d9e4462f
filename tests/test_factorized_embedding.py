"""The factorized (low-rank) tied embedding: exact at full rank, the truncated SVD's and the activation-aware
factors' optimality, the tied output layer, and the errors users see."""

import pytest
import torch

from cookbook import count_parameters
from cookbook import factorized_embedding as FE
from cookbook.models import tiny_model


def _matrix(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_low_rank_factors_match_a_truncated_svd():
    w = _matrix(300, 16, seed=12)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (1, 4, 16):
        a, b = FE.low_rank_embedding_factors(w, rank)
        assert a.shape == (300, rank) and b.shape == (rank, 16)
        reference = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert torch.allclose(a @ b, reference, atol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        FE.low_rank_embedding_factors(w, 17)


def test_full_rank_factorized_embedding_keeps_the_model_and_ties_the_output():
    model = tiny_model(num_layers=2)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        FE.factorize_embedding(model, rank=64)
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-3)
    assert model.lm_head.a is model.model.embed_tokens.a  # tied: one storage
    small = FE.factorize_embedding(tiny_model(num_layers=2), rank=8)
    assert count_parameters(small) == count_parameters(tiny_model(num_layers=2)) - 512 * 64 + 512 * 8 + 8 * 64


def test_spectrum_slices_give_every_rank_and_its_error():
    w = _matrix(200, 12, seed=13)
    spectrum = FE.embedding_spectrum(w)
    s = torch.linalg.svdvals(w)
    assert torch.allclose(spectrum.singular_values, s, rtol=1e-4)
    for rank in (1, 5, 12):
        a, b = spectrum.factors(rank)
        error = torch.linalg.norm(w - a @ b) / torch.linalg.norm(w)
        assert spectrum.relative_error(rank) == pytest.approx(error.item(), abs=1e-4)
        a1, b1 = FE.low_rank_embedding_factors(w, rank)  # the one-rank entry point agrees
        assert torch.allclose(a @ b, a1 @ b1, atol=1e-4)
    assert spectrum.energy(12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank"):
        spectrum.factors(0)
    assert FE.factorized_parameter_count(262_144, 640, 64) == 262_144 * 64 + 64 * 640


def test_factorized_embedding_context_restores_the_model():
    model = tiny_model(num_layers=2)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(8))
    spectrum = FE.embedding_spectrum(model.model.embed_tokens.weight)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with FE.factorized_embedding(model, 4, spectrum) as small:
            assert count_parameters(small) == count_parameters(tiny_model(num_layers=2)) - 512 * 64 + 512 * 4 + 4 * 64
            low = small(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(low, before, atol=1e-3)
    assert torch.equal(before, after)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="spectrum"):
        FE.factorize_embedding(tiny_model(vocab_size=256), 4, spectrum)


def test_factorized_embedding_takes_the_model_dtype():
    model = tiny_model(num_layers=2).to(torch.bfloat16)
    FE.factorize_embedding(model, rank=16)
    assert model.model.embed_tokens.a.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, 512) and bool(torch.isfinite(logits).all())


def _anisotropic_hidden(n: int, h: int, seed: int = 0) -> torch.Tensor:
    """Hidden states whose second moment is far from isotropic (a few large directions), like Gemma's."""
    scales = torch.logspace(1, -1, h)  # (h,) from 10 down to 0.1
    return _matrix(n, h, seed=seed) * scales  # (n, h)


def _logit_error(w: torch.Tensor, approx: torch.Tensor, hidden: torch.Tensor) -> float:
    """||h (W - W~)^T||_F / ||h W^T||_F over the rows of hidden: the relative error of the logits."""
    return float(torch.linalg.norm(hidden @ (w - approx).T) / torch.linalg.norm(hidden @ w.T))


def test_activation_aware_factors_are_exact_at_full_rank():
    w, hidden = _matrix(300, 16, seed=1), _anisotropic_hidden(500, 16, seed=2)
    spectrum = FE.activation_aware_spectrum(w, hidden)
    a, b = spectrum.factors(16)
    assert torch.allclose(a @ b, w, atol=1e-4)
    assert spectrum.energy(16) == pytest.approx(1.0)


def test_activation_aware_factors_minimise_the_logit_error_and_report_it():
    w, hidden = _matrix(300, 16, seed=3), _anisotropic_hidden(2000, 16, seed=4)
    aware = FE.activation_aware_spectrum(w, hidden, damp=1e-9)  # ~undamped: the optimum for these hidden states
    plain = FE.embedding_spectrum(w)
    root = torch.linalg.cholesky(hidden.double().T @ hidden.double() / len(hidden)).float()  # (H, H) C = L L^T
    for rank in (2, 6, 12):
        a, b = aware.factors(rank)
        error = _logit_error(w, a @ b, hidden)
        assert aware.relative_error(rank) == pytest.approx(error, abs=1e-3)  # the spectrum measures the logits
        assert aware.logit_error(rank, hidden) == pytest.approx(error, rel=1e-4)  # no (n, V) logits formed
        assert aware.weight_error(rank) == pytest.approx(float(torch.linalg.norm(w - a @ b) / torch.linalg.norm(w)),
                                                         rel=1e-4)
        pa, pb = plain.factors(rank)
        assert error < _logit_error(w, pa @ pb, hidden)  # closer logits than the truncated SVD
        assert plain.logit_error(rank, hidden) == pytest.approx(_logit_error(w, pa @ pb, hidden), rel=1e-4)
        assert plain.weight_error(rank) == pytest.approx(plain.relative_error(rank), rel=1e-4)
        best = torch.linalg.svdvals(w @ root)  # Eckart-Young on W L: no rank-r matrix does better
        assert error == pytest.approx(float(best[rank:].square().sum().sqrt() / best.square().sum().sqrt()), abs=1e-3)


def test_activation_aware_factors_on_isotropic_hidden_states_are_the_svd():
    w = _matrix(200, 12, seed=5)
    hidden = torch.linalg.qr(_matrix(12, 12, seed=6))[0] * 12**0.5  # (12, 12) C = I exactly
    aware, plain = FE.activation_aware_spectrum(w, hidden), FE.embedding_spectrum(w)
    for rank in (1, 5):
        assert torch.allclose(aware.factors(rank)[0] @ aware.factors(rank)[1],
                              plain.factors(rank)[0] @ plain.factors(rank)[1], atol=1e-4)


def test_activation_aware_spectrum_rejects_bad_input():
    w = _matrix(50, 8)
    with pytest.raises(ValueError, match="final hidden states"):
        FE.activation_aware_spectrum(w, _matrix(10, 9))
    with pytest.raises(ValueError, match="damp"):
        FE.activation_aware_spectrum(w, _matrix(10, 8), damp=0.0)


def test_saved_factors_go_back_in_without_a_decomposition():
    model, ids = tiny_model(num_layers=2), torch.tensor([[3, 4, 5, 6]])
    a, b = FE.embedding_spectrum(model.model.embed_tokens.weight).factors(8)
    with torch.no_grad():
        expected = FE.factorize_embedding(tiny_model(num_layers=2), 8)(input_ids=ids).logits
        got = FE.set_factors(model, a, b)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5) and model.lm_head.a is model.model.embed_tokens.a
    with pytest.raises(ValueError, match="already factorized"):
        FE.set_factors(model, a, b)
    with pytest.raises(ValueError, match=r"\(V, r\) and \(r, H\)"):
        FE.set_factors(tiny_model(num_layers=2), a, b[:, :10])
