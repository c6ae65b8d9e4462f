"""Unit tests for cookbook.pruning on small random tensors and the tiny random Gemma 3."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import pruning as P
from cookbook import structured_pruning as SP
from cookbook.core import LayoutError
from cookbook.errors import GPURequiredError
from cookbook.models import tiny_model
from cookbook.quantization import obs_sweep_reference
from cookbook.quantization.gptq_awq import dampened_hessian


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def ids():
    torch.manual_seed(0)
    return torch.randint(3, 500, (4, 16))


def _all_linears_nm(model, n, m):
    return all(P.follows_nm(lin.weight, n, m) for lin in P.decoder_linears(model).values())


# ---------------------------------------------------------------- masks


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99), per_row=st.booleans(),
       seed=st.integers(0, 1000))
def test_unstructured_mask_sparsity_is_exact(rows, cols, sparsity, per_row, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = P.unstructured_mask(scores, sparsity, per_row=per_row)
    if per_row:
        assert ((~keep).sum(1) == round(sparsity * cols)).all()
    else:
        assert int((~keep).sum()) == round(sparsity * rows * cols)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 30), sparsity=st.floats(0.01, 0.99))
def test_unstructured_mask_prunes_the_lowest_scores(rows, cols, sparsity):
    scores = torch.randn(rows, cols)
    keep = P.unstructured_mask(scores, sparsity)
    if keep.any() and (~keep).any():
        assert scores[~keep].max() <= scores[keep].min()


def test_mask_count_exact_with_ties():
    keep = P.unstructured_mask(torch.ones(4, 10), 0.3, per_row=True)
    assert ((~keep).sum(1) == 3).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), groups=st.integers(1, 8), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]))
def test_nm_mask_pattern_holds(rows, groups, nm):
    n, m = nm
    scores = torch.rand(rows, groups * m)
    keep = P.nm_mask(scores, n, m)
    assert (keep.reshape(rows, groups, m).sum(-1) == n).all()
    assert P.follows_nm(scores * keep, n, m)
    # the kept ones are the largest of each group
    g = scores.reshape(rows, groups, m)
    k = keep.reshape(rows, groups, m)
    if n < m:
        assert (g.masked_fill(~k, float("inf")).amin(-1) >= g.masked_fill(k, float("-inf")).amax(-1)).all()


def test_follows_nm_detects_violations():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not P.follows_nm(w, 2, 4)
    assert P.follows_nm(w, 3, 4)


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), "0.5", True])
def test_impossible_sparsity_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        P.unstructured_mask(torch.rand(4, 4), bad)


@pytest.mark.parametrize("n,m,width", [(0, 4, 8), (5, 4, 8), (2, 4, 10), (-1, 2, 4), (2.0, 4, 8)])
def test_impossible_nm_raises(n, m, width):
    with pytest.raises(ValueError, match="N:M|M="):
        P.nm_mask(torch.rand(3, width), n, m)


def test_wanda_scores_weight_by_input_norm():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    s = P.wanda_scores(w, torch.tensor([10.0, 1.0]))
    assert torch.equal(s, torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    with pytest.raises(ValueError, match="input_norm"):
        P.wanda_scores(w, torch.ones(3))


def test_choose_mask_needs_exactly_one_pattern():
    with pytest.raises(ValueError, match="exactly one"):
        P.choose_mask(torch.rand(2, 4), 0.5, (2, 4), False)
    with pytest.raises(ValueError, match="exactly one"):
        P.choose_mask(torch.rand(2, 4), None, None, False)


# ---------------------------------------------------------------- SparseGPT on one matrix


def _layer_problem(out=16, inp=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(8, inp, generator=g)  # correlated inputs, as in an LLM: what OBS exploits
    x = torch.randn(tokens, 8, generator=g) @ mix + 0.3 * torch.randn(tokens, inp, generator=g)
    return w, x, 2 * x.T @ x / tokens


def test_sparsegpt_sparsity_exact_and_beats_masking_alone():
    w, x, h = _layer_problem()
    new = P.sparsegpt_weight(w, h, sparsity=0.5, blocksize=8)
    assert int((new == 0).sum()) == w.numel() // 2
    # same mask without the OBS update of the kept weights: SparseGPT's update must lower the error
    masked = w * (new != 0)
    assert P.reconstruction_error(w, new, h) < 0.8 * P.reconstruction_error(w, masked, h)
    # and it beats plain magnitude pruning at equal sparsity
    mag = w * P.unstructured_mask(w.abs(), 0.5)
    assert P.reconstruction_error(w, new, h) < P.reconstruction_error(w, mag, h)


def test_hooked_hessian_is_float64_and_feeds_the_solver():
    # InputStatistics sums the Gram matrix over batches in float64; the solver and the error take it as is
    w, x, h = _layer_problem()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    stats = P.InputStatistics({"lin": lin}, hessian=True)
    with torch.no_grad():
        for chunk in x.split(64):
            lin(chunk)
    stats.remove()
    hooked = stats.hessian("lin")
    assert hooked.dtype == torch.float64 and torch.allclose(hooked, h.double(), rtol=1e-4, atol=1e-4)
    new = P.sparsegpt_weight(w, hooked, sparsity=0.5, blocksize=8)
    assert new.dtype == w.dtype and P.reconstruction_error(w, new, hooked) < P.reconstruction_error(w, w * (new != 0), h)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (None, (2, 4))])
def test_sparsegpt_sweep_matches_the_obs_reference(sparsity, nm):
    # the fast sweep (one Cholesky factor, transposed weight, lazy block updates) against the OBS formula written
    # out; the mask of each block of 8 columns is chosen when the block starts, by the saliency w^2 / [H_F^-1]_jj
    w, _, h = _layer_problem()
    hd, _ = dampened_hessian(h)
    finv_jj = torch.stack([torch.linalg.inv(hd[j:, j:])[0, 0] for j in range(len(hd))])  # (in,)
    pruned = {}

    def prune(j, W):
        if j % 8 == 0 and sparsity is not None:  # a block starts: its mask, from the weights as updated so far
            pruned["block"] = ~P.unstructured_mask(W[:, j:j + 8] ** 2 / finv_jj[j:j + 8], sparsity)  # (out, 8)
        if j % 8 == 0 and nm is not None:
            pruned["block"] = torch.zeros(W.shape[0], 8, dtype=torch.bool)
        if nm is not None and j % nm[1] == 0:  # N:M: the M - N least salient of each M columns, per row
            score = W[:, j:j + nm[1]] ** 2 / finv_jj[j:j + nm[1]]  # (out, m)
            low = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices  # (out, m - n)
            pruned["block"][:, j % 8:j % 8 + nm[1]].scatter_(1, low, True)
        return W[:, j].masked_fill(pruned["block"][:, j % 8], 0.0)

    reference = obs_sweep_reference(w, h, prune)  # (16, 32) float64
    fast = P.sparsegpt_weight(w, h, sparsity, nm, blocksize=8)
    assert torch.equal(fast == 0, reference == 0), "the same weights pruned"
    torch.testing.assert_close(fast, reference.float(), rtol=0, atol=1e-5)


def test_sparsegpt_nm_pattern_and_zero_sparsity_is_identity():
    w, _, h = _layer_problem()
    new = P.sparsegpt_weight(w, h, nm=(2, 4), blocksize=16)
    assert P.follows_nm(new, 2, 4) and int((new == 0).sum()) == w.numel() // 2
    assert torch.allclose(P.sparsegpt_weight(w, h, sparsity=0.0), w, atol=1e-5)


def test_sparsegpt_bad_inputs():
    w, _, h = _layer_problem()
    with pytest.raises(ValueError, match="hessian"):
        P.sparsegpt_weight(w, h[:4, :4], sparsity=0.5)
    with pytest.raises(ValueError, match="blocksize"):
        P.sparsegpt_weight(w, h, nm=(2, 8), blocksize=4)
    with pytest.raises(ValueError, match="sparsity"):
        P.sparsegpt_weight(w, h, sparsity=1.0)


# ---------------------------------------------------------------- whole (tiny) model


def test_layer_inputs_reproduce_the_model(model, ids):
    inputs = P.capture_layer_inputs(model, ids)
    hidden = inputs.hidden
    for block, kw in zip(P.decoder_layers(model), inputs.kwargs):
        hidden = P.run_layer(block, hidden, kw, chunk=3)
    logits = model.lm_head(model.model.norm(hidden))
    assert torch.allclose(logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "wanda-seq"])
def test_pruned_model_exact_sparsity_shapes_and_generation(model, ids, method):
    embed_before = model.get_input_embeddings().weight.clone()
    if method == "magnitude":
        P.prune_magnitude(model, 0.5)
    elif method == "wanda":
        P.prune_wanda(model, P.collect_input_norms(model, ids), 0.5)
    else:
        P.prune_sequential(model, ids, method.split("-")[0], 0.5)
    assert P.sparsity_of(model) == pytest.approx(0.5, abs=1e-9)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)  # embedding untouched
    assert model(input_ids=ids).logits.shape == (4, 16, 512)
    out = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 21)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pruning_of_model(model, ids, method):
    if method == "magnitude":
        P.prune_magnitude(model, nm=(2, 4))
    elif method == "wanda":
        P.prune_wanda(model, P.collect_input_norms(model, ids), nm=(2, 4))
    else:
        P.prune_sequential(model, ids, "sparsegpt", nm=(2, 4))
    assert _all_linears_nm(model, 2, 4)


def test_magnitude_matches_torch_prune(model):
    from torch.nn.utils.prune import L1Unstructured

    w = P.decoder_linears(model)["model.layers.0.mlp.up_proj"].weight.detach()
    ref = L1Unstructured(0.3).compute_mask(w, torch.ones_like(w))  # torch's own magnitude pruning
    assert torch.equal(P.unstructured_mask(w.abs(), 0.3), ref.bool())


def test_subset_of_layers(model, ids):
    P.prune_sequential(model, ids, "sparsegpt", 0.5, layers=[1])
    assert P.sparsity_of(model, [1]) == pytest.approx(0.5)
    assert P.sparsity_of(model, [0]) == 0
    with pytest.raises(ValueError, match="out of range"):
        P.decoder_linears(model, [5])


def test_bad_method_and_not_a_decoder():
    with pytest.raises(ValueError, match="method"):
        P.prune_sequential(tiny_model(), torch.zeros(1, 4, dtype=torch.long), "magnitude", 0.5)
    with pytest.raises(LayoutError, match="model.model.layers"):  # the core's one layout error (a TypeError)
        P.decoder_linears(torch.nn.Linear(2, 2))


def test_snapshot_restores_dense_weights(model):
    before = {k: v.weight.clone() for k, v in P.decoder_linears(model).items()}
    snap = P.WeightSnapshot(model)
    P.prune_magnitude(model, 0.7)
    snap.restore(model)
    assert all(torch.equal(before[k], v.weight) for k, v in P.decoder_linears(model).items())
    snap.close()


# ---------------------------------------------------------------- structured


def test_structured_pruning_shrinks_and_still_generates(model, ids):
    params_before = sum(p.numel() for p in model.parameters())
    SP.prune_mlp_channels(model, P.collect_input_norms(model, ids), 0.5)
    block = P.decoder_layers(model)[0]
    assert block.mlp.gate_proj.weight.shape == (128, 64) and block.mlp.down_proj.weight.shape == (64, 128)
    SP.prune_heads(model, P.collect_input_norms(model, ids), 2)
    assert block.self_attn.q_proj.weight.shape == (32, 64) and block.self_attn.o_proj.weight.shape == (64, 32)
    kept = SP.drop_layers(model, [0])
    assert kept == [1] and len(P.decoder_layers(model)) == 1 and model.config.num_hidden_layers == 1
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert model(input_ids=ids).logits.shape == (4, 16, 512)
    assert model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False).shape == (1, 20)


def test_shrink_keeps_the_chosen_channels_exactly(model, ids):
    x = torch.randn(3, 64)
    mlp = P.decoder_layers(model)[0].mlp
    inter = mlp.down_proj.in_features
    norms = {f"model.layers.{i}.mlp.down_proj": torch.ones(inter) for i in range(2)}
    with torch.no_grad():
        mlp.down_proj.weight[:, inter // 2:] = 0  # half the channels contribute nothing
        before = mlp(x)
        SP.prune_mlp_channels(model, norms, 0.5)
        assert torch.allclose(P.decoder_layers(model)[0].mlp(x), before, atol=1e-6)


def test_layer_scores_and_structured_errors(model, ids):
    scores = SP.layer_scores(model, ids)
    assert scores.shape == (2,) and (scores >= 0).all()
    norms = P.collect_input_norms(model, ids)
    with pytest.raises(ValueError, match="n_remove"):
        SP.prune_heads(model, norms, 4)
    with pytest.raises(ValueError, match="sparsity"):
        SP.prune_mlp_channels(model, norms, 1.0)
    with pytest.raises(ValueError, match="every decoder layer"):
        SP.drop_layers(model, [0, 1])
    with pytest.raises(ValueError, match="Layer indices"):
        SP.drop_layers(model, [7])
    with pytest.raises(ValueError, match="calibration norm"):
        SP.prune_mlp_channels(model, {}, 0.5)


def test_recovery_finetune_lowers_loss_and_freezes_embedding(model, ids):
    embed = model.get_input_embeddings().weight.clone()
    losses = SP.recovery_finetune(model, ids[:2], steps=8, batch_size=2, lr=1e-2)
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="steps"):
        SP.recovery_finetune(model, ids, steps=0)
    with pytest.raises(ValueError, match="train_ids"):
        SP.recovery_finetune(model, ids[0], steps=1)


def test_semi_structured_speed_needs_gpu():
    if torch.cuda.is_available():
        res = P.semi_structured_linear_speed(repeats=3)
        assert res["max_abs_diff"] < 1.0
    else:
        with pytest.raises(GPURequiredError, match="GPU"):
            P.semi_structured_linear_speed()
