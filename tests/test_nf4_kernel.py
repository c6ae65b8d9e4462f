"""Our NF4 kernel (cookbook/csrc/nf4_matvec.cpp, cookbook.nf4_kernel) against the NF4Linear reference: the same
weight, the same outputs within float32 rounding, on random weights and on the real model."""

import pytest
import torch
from torch import nn

from cookbook import kernels as K
from cookbook import matvec
from cookbook import quantization as Q
from cookbook.models import tiny_model
from cookbook.nf4_kernel import PackedNF4Linear, pack_nf4_linears, pack_nf4_rows, unpack_nf4_rows

pytestmark = pytest.mark.skipif(not matvec.available(), reason=f"our kernels did not build here: {matvec.status()}")


def _nf4(out=96, inp=640, block=64, double_quant=True, bias=True, seed=0):
    torch.manual_seed(seed)
    return Q.NF4Linear.from_linear(nn.Linear(inp, out, bias=bias), block, double_quant)


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_the_layout_round_trips_and_puts_consecutive_inputs_in_consecutive_bytes():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_nf4_rows(codes)  # (5, 48)
    assert packed.shape == (5, 48) and torch.equal(unpack_nf4_rows(packed), codes)
    assert torch.equal(packed[:, :16] & 15, codes[:, :16]) and torch.equal(packed[:, :16] >> 4, codes[:, 16:32])


@pytest.mark.parametrize("block,double_quant", [(64, True), (32, False), (128, True), (64, False)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_matches_the_float64_product_of_the_reference_weight(block, double_quant, m):
    ref = _nf4(block=block, double_quant=double_quant)
    packed = PackedNF4Linear(ref)
    assert torch.equal(packed.dequantized(), ref.dequantized_weight())  # the very same weight
    x = torch.randn(m, ref.in_features)
    exact = x.double() @ ref.dequantized_weight().double().T + ref.bias.double()  # (m, out)
    assert _rel_err(packed(x), exact) < 1e-6  # float32 sums of the exact weight
    assert _rel_err(ref(x), exact) < 1e-6


def test_prefill_and_gradients_take_the_reference_path():
    ref = _nf4()
    packed = PackedNF4Linear(ref)
    x = torch.randn(2, 12, ref.in_features)  # 24 rows: more than a decode step
    torch.testing.assert_close(packed(x), ref(x), rtol=0, atol=0)  # the same dequantize-then-matmul
    x1 = torch.randn(1, ref.in_features, requires_grad=True)  # QLoRA trains through a frozen base
    packed(x1).sum().backward()
    torch.testing.assert_close(x1.grad[0], ref.dequantized_weight().sum(0))


def test_the_same_bytes_as_the_reference():
    ref = _nf4()
    packed = PackedNF4Linear(ref)
    held = sum(b.numel() * b.element_size() for b in packed.buffers())
    assert held == sum(b.numel() * b.element_size() for b in ref.buffers())


@pytest.mark.parametrize("inp,block,needle", [(96, 64, "multiple of 32"), (640, 48, "multiple of 32")])
def test_blocks_the_kernel_cannot_take_say_why(inp, block, needle):
    ref = _nf4(out=96, inp=inp, block=block)
    with pytest.raises(ValueError, match=f"{needle}.*block_size=64"):
        PackedNF4Linear(ref)


def test_bad_kernel_inputs_say_what_they_need():
    packed = PackedNF4Linear(_nf4())
    run = matvec._extension()[0]  # noqa: F841 (loads the ops)
    args = (packed.packed, packed.absmax, packed.absmax_scale, packed.absmax_offset, Q.NF4_CODEBOOK, 64)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.cookbook.nf4_matvec(torch.randn(1, 640).double(), *args)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.cookbook.nf4_matvec(torch.randn(9, 640), *args)
    with pytest.raises(RuntimeError, match="one float32 absmax"):
        torch.ops.cookbook.nf4_matvec(torch.randn(1, 640), packed.packed, packed.absmax[:-1], *args[2:])


def test_whole_model_packing_refuses_or_keeps_what_it_cannot_take():
    model = tiny_model()
    with pytest.raises(ValueError, match="quantize it first"):
        pack_nf4_linears(model)
    Q.quantize_linears_nf4(model, 64)
    name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, Q.NF4Linear))
    Q.swap_modules(model, {name: Q.NF4Linear(Q.quantize_nf4(first.dequantized_weight(), 16), first.bias)})
    with pytest.raises(ValueError, match=f"{name} has no packed kernel.*fallback=True"):
        pack_nf4_linears(model)
    originals, kept = K.pack_model(model, fallback=True)  # pack_model packs NF4 linears too
    assert list(kept) == [name, "lm_head"]
    assert sum(isinstance(m, Q.NF4Linear) for m in model.modules()) == 1
    Q.restore_modules(model, originals)
    assert not any(isinstance(m, PackedNF4Linear) for m in model.modules())


def test_switching_our_kernels_off_sends_decode_steps_to_the_reference():
    model = tiny_model().eval()
    Q.quantize_linears_nf4(model, 64)
    pack_nf4_linears(model)
    ids = torch.randint(3, 500, (1, 1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        assert K.use_our_kernels(model, on=False) == sum(isinstance(m, PackedNF4Linear) for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_a_fullgraph_compile_keeps_the_nf4_kernel():
    packed = PackedNF4Linear(_nf4())
    x = torch.randn(1, 640)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(packed, fullgraph=True)(x), packed(x))


def test_real_model_decodes_the_reference_greedy_tokens(real_model):
    # float32 sums on both paths: the step logits agree to float32 rounding, so the greedy text is the reference's
    # (a token may differ only where the reference's top two tie within that rounding)
    model, tok = real_model
    ids = tok("The capital of France is", return_tensors="pt").input_ids  # (1, 6): the prompt too is a decode step
    originals = Q.quantize_linears_nf4(model, 64)
    greedy = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_logits=True)
    try:
        with torch.no_grad():
            ref = model.generate(input_ids=ids, **greedy)
            _, kept = K.pack_model(model, fallback=True)
            assert list(kept) == ["lm_head"]  # every linear packed; the float head is listed
            fast = model.generate(input_ids=ids, **greedy)
    finally:
        Q.restore_modules(model, originals)
    ref_logits, fast_logits = torch.cat(ref.logits), torch.cat(fast.logits)  # (16, V) each
    same = int((ref.sequences == fast.sequences).long().cumprod(-1).sum()) - ids.shape[1]  # steps before any change
    assert _rel_err(fast_logits[:same + 1], ref_logits[:same + 1]) < 1e-5
    if same < 16:  # a flipped near tie
        top2 = ref_logits[same].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, (tok.decode(fast.sequences[0]), tok.decode(ref.sequences[0]))
