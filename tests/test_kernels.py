import pytest
import torch
from torch import nn

from cookbook import kernels as K
from cookbook import quantization as Q
from cookbook.models import tiny_model

pytestmark = pytest.mark.skipif(not (K.packed_support()["int4"] and K.packed_support()["int8"]),
                                reason="this torch has no packed int4/int8 CPU kernels")


def _linear(out=64, inp=256, bias=True):
    torch.manual_seed(0)
    return nn.Linear(inp, out, bias=bias)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bits,group,symmetric", [(4, 64, False), (4, 128, True), (4, 32, False),
                                                  (8, None, True), (8, None, False)])
def test_packed_matches_the_dequantize_then_matmul_reference(bits, group, symmetric):
    ref = Q.QuantLinear.from_linear(_linear(), bits, group, symmetric)
    fast = K.packed_linear(ref)
    x = torch.randn(3, 5, 256)  # (b, t, in)
    with torch.no_grad():
        # the kernels take bf16 activations: about 3 significant digits, so ~0.5% relative error
        assert _rel_err(fast(x), ref(x)) < 1e-2
        assert fast(x).shape == (3, 5, 64) and fast(x).dtype == x.dtype


def test_awq_input_scale_is_applied():
    lin = _linear(bias=False)
    s = torch.rand(256) + 0.5
    ref = Q.QuantLinear(Q.quantize_weight(lin.weight.detach() * s, 4, 64, False), None, input_scale=s)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert _rel_err(K.packed_linear(ref)(x), ref(x)) < 1e-2


def test_packed_stores_half_a_byte_per_int4_weight():
    fast = K.packed_linear(Q.QuantLinear.from_linear(_linear(), 4, 64, False))
    assert fast.packed.numel() == 64 * 256 // 2 and fast.packed.dtype == torch.uint8


@pytest.mark.parametrize("bits,group,inp,out,needle", [
    (4, 96, 192, 64, "groups of"), (4, 64, 256, 24, "divisible by 16"), (8, 64, 256, 64, "per output channel"),
    (3, 64, 256, 64, "no packed kernel for 3-bit"),
])
def test_unsupported_formats_say_why(bits, group, inp, out, needle):
    ref = Q.QuantLinear.from_linear(_linear(out, inp), bits, group, False)
    with pytest.raises(ValueError, match=needle):
        K.packed_linear(ref)


def test_whole_model_swap_reports_or_refuses_what_cannot_be_packed():
    model = tiny_model()
    with pytest.raises(ValueError, match="quantize it first"):
        K.pack_quantized_linears(model)
    Q.quantize_linears_rtn(model, 4, 32, symmetric=False)
    name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, Q.QuantLinear))
    three_bit = Q.QuantLinear(Q.quantize_weight(first.dequantized_weight(), 3, 32, False))
    Q.swap_modules(model, {name: three_bit})
    with pytest.raises(ValueError, match=f"{name} has no packed kernel.*fallback=True"):
        K.pack_quantized_linears(model)
    originals, kept = K.pack_quantized_linears(model, fallback=True)
    assert list(kept) == [name] and "3-bit" in kept[name]
    assert sum(isinstance(m, Q.QuantLinear) for m in model.modules()) == 1  # only the 3-bit one stays
    Q.restore_modules(model, originals)
    assert not any(isinstance(m, (K.PackedInt4Linear, K.PackedInt8Linear)) for m in model.modules())


def test_packed_tiny_model_logits_match_the_reference():
    model = tiny_model().eval()
    Q.quantize_linears_rtn(model, 4, 32, symmetric=False)
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        K.pack_quantized_linears(model)
        assert _rel_err(model(input_ids=ids).logits, ref) < 2e-2


def _dequantized_twin(module: Q.QuantLinear) -> nn.Linear:
    # the reference computation (dequantize, then a float matmul) with the weight rebuilt once, not per call
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    lin.weight.data = module.dequantized_weight()
    if module.bias is not None:
        lin.bias.data = module.bias.float()
    return lin


@pytest.mark.parametrize("bits,group", [(4, 128), (8, None)])
def test_packed_real_model_gives_the_reference_greedy_tokens(real_model, bits, group):
    # a random tiny model has near-tied logits; the real one is where "same greedy text" means something.
    # The whole fast form: packed linears AND the packed int8 head, against dequantize-then-matmul.
    # The kernels take bf16 activations, so logits differ at bf16 precision and the CPU's kernel decides the
    # rounding: greedy text is the same up to near ties (seen: identical on an AMD EPYC, one tie flipped on an
    # Intel Xeon with AMX at token 10). Teacher-forced along the reference text, every step must pick the
    # reference token, or a token the reference itself scores within that precision of it.
    model, tok = real_model
    ids = tok("The capital of France is", return_tensors="pt").input_ids  # (1, t)
    originals = Q.quantize_linears_rtn(model, bits, group, symmetric=False)
    originals |= Q.quantize_tied_embedding_int8(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Q.QuantLinear)}
    try:
        with torch.no_grad():
            Q.swap_modules(model, {n: _dequantized_twin(m) for n, m in quantized.items()})
            ref = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)  # (1, t + 16)
            ref_logits = model(input_ids=ref).logits[0, ids.shape[1] - 1:-1]  # (16, V): the steps that chose ref
            Q.swap_modules(model, quantized)
            K.pack_model(model)
            assert isinstance(model.lm_head, K.PackedInt8Head)
            fast_logits = model(input_ids=ref).logits[0, ids.shape[1] - 1:-1]  # (16, V)
    finally:
        Q.restore_modules(model, originals)
    assert _rel_err(fast_logits, ref_logits) < 2e-2
    chosen, picked = ref[0, ids.shape[1]:], fast_logits.argmax(-1)  # (16,), (16,)
    gap = ref_logits.gather(-1, chosen[:, None]) - ref_logits.gather(-1, picked[:, None])  # (16, 1) >= 0
    near_tie = gap[:, 0] < 2e-2 * ref_logits.abs().amax(-1)  # within the kernels' bf16 error of the logit scale
    assert (picked == chosen).float().mean() >= 0.75, (tok.decode(picked), tok.decode(chosen))
    assert bool(((picked == chosen) | near_tie).all()), (gap[:, 0].tolist(), tok.decode(picked), tok.decode(chosen))


def test_pack_model_lists_a_float_head_as_left_on_the_reference_path():
    model = tiny_model().eval()
    Q.quantize_linears_rtn(model, 4, 32, symmetric=False)
    originals, kept = K.pack_model(model)
    assert list(kept) == ["lm_head"] and "float head" in kept["lm_head"]
    assert not isinstance(model.lm_head, K.PackedInt8Head)
    Q.restore_modules(model, originals)
    assert sum(isinstance(m, Q.QuantLinear) for m in model.modules()) > 0


def test_packed_int8_head_matches_the_int8_table():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="int8 tied table first"):
        K.pack_int8_head(model)
    Q.quantize_tied_embedding_int8(model)
    h = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        ref = model.lm_head(h)
        K.pack_int8_head(model)
        assert _rel_err(model.lm_head(h), ref) < 1e-2


def test_int4pack_rows_reads_the_kernel_layout_back():
    # guards the one assumption about torch's internal CPU int4 layout: if a torch release changes it, this fails
    codes = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    rows = torch.tensor([0, 1, 31, 32, 63, 64, 100, 191])
    assert torch.equal(K.int4pack_rows(packed, rows, 96).int(), codes[rows])
    assert torch.equal(K.int4pack_rows(packed, torch.arange(192), 96).int(), codes)


@pytest.mark.parametrize("layout", K.INT4_LAYOUTS)
def test_every_known_int4_layout_reads_back(layout):
    # one process sees one layout (the ISA torch dispatches to); the reader must handle each of them
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32)
    packed = K.pack_in_layout(codes, layout)
    assert torch.equal(K._read_rows(packed, torch.arange(128), 64, layout).int(), codes)
    assert torch.equal(K._all_rows(packed, 64, layout).int(), codes)  # the whole-matrix reader of the float path
    sz = torch.randn(2, 128, 2).bfloat16()  # (in // 32, n, 2)
    assert torch.equal(K.int4pack_weight(packed, sz, 32, 64, layout), K.int4_dequantize(codes, sz, 32))


def test_int4_tied_table_looks_up_and_scores_with_the_same_codes():
    model = tiny_model().eval()
    table = model.model.embed_tokens.weight.detach().clone()  # (512, 64)
    reference = Q.quantize_weight(table, 4, 32, symmetric=False).dequantize()  # (512, 64)
    K.quantize_tied_embedding_int4(model, 32)
    ids = torch.tensor([[0, 5, 63, 64, 100, 511]])
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        scale = model.model.embed_tokens.table.embed_scale
        # the same codes; the kernel keeps its scales in bf16 (fp16 in QuantizedWeight): ~0.4% per scale
        assert _rel_err(model.model.embed_tokens(ids), reference[ids] * scale) < 1e-2
        assert _rel_err(model.lm_head(h), h @ reference.T) < 1e-2
        assert model(input_ids=ids).logits.shape == (1, 6, 512)


@pytest.mark.parametrize("vocab,group,needle", [(500, 32, "divisible by 64"), (512, 48, "groups of")])
def test_int4_tied_table_says_what_it_cannot_take(vocab, group, needle):
    with pytest.raises(ValueError, match=needle):
        K.PackedInt4TiedTable(torch.randn(vocab, 96), group_size=group)


def test_int4_table_needs_a_tied_float_model():
    model = tiny_model()
    Q.quantize_tied_embedding_int8(model)
    with pytest.raises(ValueError, match="tied to its embedding"):
        K.quantize_tied_embedding_int4(model)


@pytest.mark.parametrize("form", ["int4 linear", "int8 linear", "int8 head", "int4 table"])
def test_scalar_build_float_path_agrees_with_the_kernels(monkeypatch, form):
    # under torch's scalar build, prefill-sized inputs take the float path (kernels.float_path): force it here
    model = tiny_model().eval()
    if form in ("int4 linear", "int8 linear"):
        bits, group = (4, 32) if form == "int4 linear" else (8, None)
        layer = K.packed_linear(Q.QuantLinear.from_linear(_linear(), bits, group, symmetric=False))
        x = torch.randn(2, 8, 256)  # (b, t, in): 16 rows, over SCALAR_FLOAT_ROWS
    else:
        if form == "int8 head":
            Q.quantize_tied_embedding_int8(model)
            K.pack_int8_head(model)
        else:
            K.quantize_tied_embedding_int4(model, 32)
        layer, x = model.lm_head, torch.randn(2, 8, model.config.hidden_size)
    with torch.no_grad():
        monkeypatch.setattr(K, "SCALAR_BUILD", False)  # (whatever build this is)
        kernel = layer(x)
        monkeypatch.setattr(K, "SCALAR_BUILD", True)
        assert K.float_path(len(x.reshape(-1, x.shape[-1]))) and not K.float_path(1)
        floats = layer(x)
    assert floats.shape == kernel.shape and floats.dtype == kernel.dtype
    assert 0 < _rel_err(floats, kernel) < 1e-2  # the same codes; bf16 against float32 activations
