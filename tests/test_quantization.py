"""Unit and property tests for cookbook.quantization (small tensors and the tiny random model only)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cookbook import count_parameters, model_bytes
from cookbook.models import tiny_model
from cookbook.quantization import (
    NF4_CODEBOOK, Int8MixedLinear, NF4Linear, QuantLinear, W8A8Linear, act_order, activation_absmax, awq_search_scale,
    capture_layer_inputs, shared_hessians,
    decoder_linears, dequantize_nf4, dtype_summary, fake_quantize, inverse_hessian_factor, gptq_quantize, hessian, pack_bits,
    obs_sweep_reference, pack_int4, quant_params, quantize_codes, quantize_linears_nf4, quantize_linears_rtn, quantize_model_layerwise, quantize_nf4,
    quantize_per_tensor, quantize_weight, restore_modules, smoothing_scale, unpack_bits, unpack_int4,
)

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- packing


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8]), n8=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n8, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (8 * n8,), generator=gen)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == n8 * bits  # bits/8 bytes per code, measured
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).long(), codes)


@SETTINGS
@given(n2=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_int4_two_per_byte_high_nibble_first(n2, seed):
    codes = torch.randint(0, 16, (2 * n2,), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(codes)
    assert packed.numel() == n2
    assert int(packed[0]) == int(codes[0]) * 16 + int(codes[1])
    assert torch.equal(unpack_int4(packed).long(), codes)
    if codes.numel() % 8 == 0:
        assert torch.equal(pack_bits(codes, 4), packed)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(7, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_bits(torch.full((8,), 16), 4)


# ---------------------------------------------------------------- integer quantization


@SETTINGS
@given(bits=st.sampled_from([3, 4, 6, 8]), gs=st.sampled_from([None, 8, 16, 32]), sym=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_rtn_error_is_at_most_half_a_step(bits, gs, sym, seed, scale):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(seed)) * scale
    qw = quantize_weight(w, bits, gs, sym)
    assert qw.codes.shape == w.shape and qw.codes.dtype == torch.uint8
    assert int(qw.codes.max()) < 2**bits
    n_groups = 32 // (gs or 32)
    assert qw.scale.shape == (6, n_groups)
    err = (qw.dequantize() - w).abs().view(6, n_groups, -1)  # (out, ng, gs)
    step = qw.scale.float().unsqueeze(-1)
    # half a step, plus slack for the fp16 rounding of the scale (which can clip the extreme value)
    assert bool((err <= 0.5 * step + 2e-3 * w.abs().max()).all())


def test_more_bits_and_smaller_groups_give_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[:, 3] *= 20  # an outlier input column, as real models have
    errs = {b: (fake_quantize(w, b, 32) - w).pow(2).mean().item() for b in (3, 4, 6, 8)}
    assert errs[8] < errs[6] < errs[4] < errs[3]
    tensor = (quantize_per_tensor(w, 4) - w).pow(2).mean().item()
    channel = (fake_quantize(w, 4, None) - w).pow(2).mean().item()
    assert errs[4] < channel < tensor


def test_clear_errors_for_unsupported_bits_and_groups():
    w = torch.randn(4, 48)
    with pytest.raises(ValueError, match="bits=1 is not supported"):
        quantize_weight(w, 1)
    with pytest.raises(ValueError, match="bits=16 is not supported"):
        QuantLinear.from_linear(nn.Linear(48, 4), 16)
    with pytest.raises(ValueError, match="does not divide in_features=48"):
        quantize_weight(w, 4, 32)
    with pytest.raises(ValueError, match="positive int"):
        quantize_weight(w, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(48), 4)


@pytest.mark.parametrize("bits,gs,sym", [(8, None, True), (4, 16, False), (3, 16, True), (6, 8, False)])
def test_quant_linear_matches_fake_quant_and_stores_packed_bytes(bits, gs, sym):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    ql = QuantLinear.from_linear(lin, bits, gs, sym)
    x = torch.randn(3, 5, 32)
    ref = x @ fake_quantize(lin.weight.detach(), bits, gs, sym).T + lin.bias
    assert torch.allclose(ql(x), ref, atol=1e-5)
    assert ql.packed.numel() == 32 * 16 * bits // 8
    assert count_parameters(ql) == 0


def test_rtn_swap_and_restore_on_tiny_model():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 12))
    ref = model(input_ids=ids).logits
    before = model_bytes(model)
    originals = quantize_linears_rtn(model, 4, 16)
    assert len(originals) == 7 * 2
    assert all(isinstance(m, QuantLinear) for _, m in
               [(n, model.get_submodule(n)) for n in originals])
    assert model_bytes(model) < before
    restore_modules(model, originals)
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_dtype_summary():
    assert dtype_summary(torch.float16)["max"] == 65504.0
    assert dtype_summary(torch.bfloat16)["eps (precision)"] == 2**-7
    with pytest.raises(ValueError, match="floating-point"):
        dtype_summary(torch.int8)


# ---------------------------------------------------------------- NF4


def test_nf4_codebook_matches_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    code = bnb_f.get_4bit_type("nf4", "cpu")
    assert NF4_CODEBOOK.shape == (16,) and float(NF4_CODEBOOK[7]) == 0.0
    assert torch.allclose(NF4_CODEBOOK, code, atol=2e-7)


def test_nf4_codes_bit_exact_with_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    ours = quantize_nf4(w, 64, double_quant=False)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.allclose(dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, state), atol=1e-6)


@SETTINGS
@given(rows=st.integers(1, 8), seed=st.integers(0, 2**16), dq=st.booleans())
def test_nf4_round_trip_error_bound(rows, seed, dq):
    w = torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed))
    t = quantize_nf4(w, 64, dq)
    back = dequantize_nf4(t)
    assert back.shape == w.shape
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()  # widest gap between neighbouring codes
    slack = 1.05 if dq else 1.0001  # double quantization perturbs each absmax slightly
    assert bool(((back - w).reshape(-1, 64).abs() <= slack * absmax * gap / 2 + 1e-3).all())


def test_nf4_double_quant_saves_bytes():
    w = torch.randn(256, 256)
    single, double = quantize_nf4(w, 64, False), quantize_nf4(w, 64, True)
    assert single.nbytes() == 256 * 256 // 2 + 4 * 256 * 256 // 64
    assert double.nbytes() < single.nbytes()


def test_nf4_linear_is_frozen_and_close():
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    nl = NF4Linear.from_linear(lin)
    assert list(nl.parameters()) == [] and nl.packed.dtype == torch.uint8 and nl.packed.numel() == 128 * 32 // 2
    x = torch.randn(4, 128)
    assert torch.allclose(nl(x), x @ nl.dequantized_weight().T + lin.bias, atol=1e-5)
    rel = (nl(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15


def test_nf4_clear_errors():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_nf4(torch.randn(3, 10), 64)
    with pytest.raises(ValueError, match="even int"):
        quantize_nf4(torch.randn(64), 7)
    with pytest.raises(TypeError, match="nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(2, 2, 1))


def test_nf4_swap_on_tiny_model():
    model = tiny_model()
    originals = quantize_linears_nf4(model)
    assert len(originals) == 14 and all(isinstance(model.get_submodule(n), NF4Linear) for n in originals)
    assert torch.isfinite(model(input_ids=torch.randint(0, 512, (1, 8))).logits).all()


# ---------------------------------------------------------------- GPTQ and AWQ


def _correlated_inputs(n=512, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, 8, generator=gen) @ torch.randn(8, d, generator=gen)  # correlated, as real activations
    scale = torch.logspace(-1, 1, d)  # uneven channels
    return (low_rank + 0.1 * torch.randn(n, d, generator=gen)) * scale  # (n, d)


@pytest.mark.parametrize("bits,gs", [(4, None), (3, 16)])
def test_gptq_beats_rtn_on_output_error(bits, gs):
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    qw = gptq_quantize(w, hessian(x), bits, gs, symmetric=False, block_size=16)
    assert qw.codes.shape == w.shape and int(qw.codes.max()) < 2**bits
    err_gptq = (x @ (qw.dequantize() - w).T).pow(2).mean()
    err_rtn = (x @ (fake_quantize(w, bits, gs, False) - w).T).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn


def test_gptq_with_a_shared_factor_is_the_same_as_alone():
    # q/k/v share one Hessian: the layer-wise driver factorises it once and hands the factor to each
    x, w = _correlated_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = hessian(x)
    alone = gptq_quantize(w, h, 4, 16, block_size=16)
    shared = gptq_quantize(w, h, 4, 16, block_size=16, factor=inverse_hessian_factor(h))
    assert torch.equal(alone.codes, shared.codes) and torch.equal(alone.scale, shared.scale)


@pytest.mark.parametrize("bits,gs,symmetric", [(3, 8, False), (4, 16, True), (4, None, False)])
def test_act_order_sweep_matches_the_obs_reference_with_static_groups(bits, gs, symmetric):
    # act-order: the OBS sweep on the columns permuted by decreasing H diagonal, each column rounded on the grid
    # of its stored group, fixed from the unchanged weights; the codes then return to input order
    x, w = _correlated_inputs(d=32), torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    x = x[:, torch.randperm(32, generator=torch.Generator().manual_seed(4))]  # energy not sorted by position
    h, group = hessian(x), gs or 32
    order = act_order(h)
    assert not torch.equal(order, torch.arange(32))
    scale, zero = quant_params(w.reshape(16, -1, group), bits, symmetric)  # (16, in / group) each

    def rounded(j, W):  # swept column j is input order[j]
        g = int(order[j]) // group
        q = quantize_codes(W[:, j].float(), scale[:, g], zero[:, g], bits, symmetric)
        return (q - zero[:, g]) * scale[:, g]

    reference = torch.empty(16, 32, dtype=torch.float64)
    reference[:, order] = obs_sweep_reference(w[:, order], h[order][:, order], rounded)
    fast = gptq_quantize(w, h, bits, gs, symmetric, block_size=16, order=order).dequantize()  # (16, 32)
    torch.testing.assert_close(fast, reference.float(), rtol=0, atol=1e-5)


def test_act_order_cuts_the_output_error_when_a_few_inputs_carry_the_energy():
    # correlated inputs of uneven size, the large ones scattered: in input order GPTQ meets them late, when
    # few columns are left to absorb their error (seeds 0-3: act order has 4-9% of the in-order error)
    gen = torch.Generator().manual_seed(5)
    x = _correlated_inputs(n=1024, d=128, seed=5)[:, torch.randperm(128, generator=gen)]  # (1024, 128)
    w, h = torch.randn(64, 128, generator=gen), hessian(x)
    err = {name: (x @ (gptq_quantize(w, h, 3, 32, order=order).dequantize() - w).T).pow(2).mean()
           for name, order in (("in order", None), ("act order", act_order(h)))}
    assert err["act order"] < 0.5 * err["in order"], err


def test_gptq_errors():
    with pytest.raises(ValueError, match="must have shape"):
        gptq_quantize(torch.randn(4, 48), torch.eye(32), 4)
    with pytest.raises(ValueError, match="divide one another"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), 4, 48, block_size=32)
    with pytest.raises(ValueError, match="not supported"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), 9)
    with pytest.raises(ValueError, match="permutation"):
        gptq_quantize(torch.randn(4, 48), torch.eye(48), 4, order=torch.zeros(48, dtype=torch.long))


def test_awq_scale_never_worse_than_plain_rtn():
    x = _correlated_inputs(seed=2)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    s, alpha, mse = awq_search_scale(w, x, 3, 16)
    rtn = (x @ fake_quantize(w, 3, 16, False).T - x @ w.T).pow(2).mean().item()
    assert s.shape == (64,) and 0.0 <= alpha < 1.0
    assert mse <= rtn * (1 + 1e-6)  # alpha = 0 is plain RTN, so the search cannot lose


@pytest.mark.parametrize("method,gptq_order", [("gptq", "input"), ("gptq", "act"), ("awq", "act")])
def test_layerwise_driver_on_tiny_model(method, gptq_order):
    model = tiny_model()
    calib = torch.randint(0, 512, (2, 16))
    ref = model(input_ids=calib).logits
    expected = sorted(n for n in decoder_linears(model) if ".layers.1." in n)
    originals = quantize_model_layerwise(model, calib, method, 4, group_size=16, layers=[1],
                                         gptq_order=gptq_order)
    assert sorted(originals) == expected and len(expected) == 7
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in expected)
    out = model(input_ids=calib).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    restore_modules(model, originals)
    assert torch.equal(model(input_ids=calib).logits, ref)


def test_layerwise_driver_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="'gptq' or 'awq'"):
        quantize_model_layerwise(model, torch.zeros(1, 4, dtype=torch.long), "rtn", 4)
    with pytest.raises(ValueError, match="layers must be indices"):
        quantize_model_layerwise(model, torch.zeros(1, 4, dtype=torch.long), "gptq", 4, layers=[5])
    with pytest.raises(ValueError, match="gptq_order must be one of"):
        quantize_model_layerwise(model, torch.zeros(1, 4, dtype=torch.long), "gptq", 4, gptq_order="desc")


# ---------------------------------------------------------------- LLM.int8 and SmoothQuant


def test_llm_int8_decomposition_rescues_outliers():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    x[:, 5] = 60.0  # one outlier feature in every token
    ref = lin(x)
    mixed, plain = Int8MixedLinear(lin, 6.0), Int8MixedLinear(lin, float("inf"))
    err_mixed = (mixed(x) - ref).norm() / ref.norm()
    err_plain = (plain(x) - ref).norm() / ref.norm()
    assert mixed.last_outlier_count == 1 and plain.last_outlier_count == 0
    assert err_mixed < 0.5 * err_plain


def test_smoothquant_keeps_the_product_and_helps_w8a8():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(64, 64)
    x[:, :2] *= 50.0  # outlier channels
    amax = x.abs().amax(dim=0)
    s = smoothing_scale(amax, lin.weight, 0.5)
    assert torch.allclose((x / s) @ (lin.weight * s).T, lin(x), rtol=1e-4, atol=1e-3)
    ref = lin(x)
    err = {k: ((m(x) - ref).norm() / ref.norm()).item()
           for k, m in {"plain": W8A8Linear(lin, amax), "smooth": W8A8Linear(lin, amax, s)}.items()}
    assert err["smooth"] < 0.7 * err["plain"]
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scale(amax, lin.weight, 1.5)


def test_activation_absmax_covers_every_linear():
    model = tiny_model()
    stats = activation_absmax(model, torch.randint(0, 512, (1, 10)))
    assert set(stats) == set(decoder_linears(model))
    assert stats["model.layers.0.mlp.down_proj"].shape == (256,)


def test_int8_tied_embedding_on_tiny_model():
    from cookbook.quantization import quantize_tied_embedding_int8
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 10))
    ref = model(input_ids=ids).logits
    before = model_bytes(model)
    originals = quantize_tied_embedding_int8(model)
    out = model(input_ids=ids).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # the int8 table is held once (embedding and head share it): 512 x 64 fp32 -> int8 + fp16 row scales
    assert before - model_bytes(model) == 512 * 64 * 4 - (512 * 64 + 512 * 2)
    restore_modules(model, originals)
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_captured_layer_inputs_replay_the_decoder_exactly():
    model = tiny_model().eval()
    ids = torch.randint(3, 500, (2, 12))
    captured = capture_layer_inputs(model, ids)
    hidden, kwargs = captured.hidden, captured.kwargs  # (2, 12, d), one kwargs dict per layer
    assert all(isinstance(layer, torch.nn.Module) and type(layer).__name__ != "_LayerRecorder"
               for layer in model.model.layers), "the real layers are back in place"
    with torch.no_grad():
        for layer, kw in zip(model.model.layers, kwargs):
            hidden = layer(hidden, **kw)
        reference = model.model(input_ids=ids, use_cache=False).last_hidden_state  # (2, 12, d)
    torch.testing.assert_close(model.model.norm(hidden), reference)


def test_shared_hessians_compute_one_product_per_distinct_input():
    a, b = torch.randn(64, 8), torch.randn(64, 16)
    hs = shared_hessians({"q": a, "k": a.clone(), "down": b})
    assert hs["q"] is hs["k"] and hs["q"].dtype == torch.float64
    torch.testing.assert_close(hs["down"], 2.0 / 64 * (b.double().T @ b.double()), rtol=1e-5, atol=1e-5)  # float32 GEMM


@pytest.mark.parametrize("bits,gs,symmetric", [(4, 8, False), (3, 16, True), (4, None, False)])
def test_gptq_sweep_matches_the_obs_reference(bits, gs, symmetric):
    # the fast sweep (one Cholesky factor, lazy block updates, float32) against the OBS formula written out
    x, w = _correlated_inputs(d=32), torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    h, group = hessian(x), gs or 32
    params = {}

    def rounded(j, W):  # column j rounded on its group's grid, the grid set from the weights as updated so far
        if j % group == 0:
            params["scale"], params["zero"] = quant_params(W[:, j:j + group].float(), bits, symmetric)
        q = quantize_codes(W[:, j].float(), params["scale"], params["zero"], bits, symmetric)
        return (q - params["zero"]) * params["scale"]

    reference = obs_sweep_reference(w, h, rounded)  # (16, 32) float64
    fast = gptq_quantize(w, h, bits, gs, symmetric, block_size=16).dequantize()  # (16, 32)
    torch.testing.assert_close(fast, reference.float(), rtol=0, atol=1e-5)
