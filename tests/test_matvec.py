"""Our matrix-vector kernels (cookbook/csrc/int8_matvec.cpp, int4_matvec.cpp) against the float64 reference and
PyTorch's kernels, inside the packed modules, and inside a fullgraph torch.compile."""

import os
import subprocess
import sys

import pytest
import torch

from cookbook import matvec as I
from cookbook import kernels as K
from cookbook import quantization as Q

pytestmark = pytest.mark.skipif(not I.available(), reason=f"our kernels did not build here: {I.status()}")


def _case(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)  # (m, k)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)  # (n, k)
    scale = (torch.rand(n, generator=g) + 0.5).bfloat16()  # (n,)
    reference = x.double() @ (codes.double() * scale.double()[:, None]).T  # (m, n)
    return x, codes, scale, reference


@pytest.mark.parametrize("m,n,k", [(1, 300, 640), (3, 1000, 650), (8, 64, 2048), (1, 5, 7), (2, 257, 33)])
def test_matches_the_float64_reference(m, n, k):
    x, codes, scale, reference = _case(m, n, k)
    y = I.int8_matvec(x, codes, scale)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - reference).norm() / reference.norm()).item() < 1e-6  # float32 sums, exact codes and scales


def test_agrees_with_pytorchs_int8_kernel():
    x, codes, scale, reference = _case(4, 512, 640, seed=1)
    ours = I.int8_matvec(x, codes, scale)
    aten = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), codes, scale).float()  # bf16 activations
    assert ((ours - aten).norm() / aten.norm()).item() < 1e-2
    assert ((ours - reference).norm() / reference.norm()) < ((aten - reference).norm() / reference.norm())


def test_bad_inputs_say_what_they_need():
    x, codes, scale, _ = _case(1, 8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        I._extension()[0].int8_matvec(x.double(), codes, scale)
    with pytest.raises(RuntimeError, match="int8"):
        I._extension()[0].int8_matvec(x, codes.float(), scale)
    with pytest.raises(RuntimeError, match="bf16"):
        I._extension()[0].int8_matvec(x, codes, scale.float())


def test_packed_int8_linear_and_head_give_the_same_decode_either_way():
    torch.manual_seed(0)
    linear = torch.nn.Linear(640, 256)
    qw = Q.quantize_weight(linear.weight.detach(), 8, None, symmetric=False)
    packed = K.PackedInt8Linear(qw, linear.bias)
    x = torch.randn(1, 1, 640)  # (batch, step, in)
    packed.ours = True
    ours = packed(x)
    packed.ours = False
    aten = packed(x)
    assert ((ours - aten).norm() / aten.norm()).item() < 1e-2


def test_a_fullgraph_compile_keeps_it():
    torch.manual_seed(0)
    qw = Q.quantize_weight(torch.randn(96, 64), 8, None, symmetric=True)
    packed = K.PackedInt8Linear(qw)
    packed.ours = True
    x = torch.randn(1, 64)
    compiled = torch.compile(packed, fullgraph=True)
    torch.testing.assert_close(compiled(x), packed(x))


def test_the_environment_can_ask_for_pytorchs_kernel():
    code = "from cookbook import matvec as I; print(I.status(), I.int4_reads((64, 'half')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"COOKBOOK_KERNELS": "aten"}).stdout
    assert out.startswith("aten._weight_int8pack_mm") and "COOKBOOK_KERNELS=aten" in out, out
    assert out.strip().endswith("False"), out


# ---------------------------------------------------------------- int4, in PyTorch's CPU int4 layout


def _int4_case(m: int, n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)  # (m, k)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)  # (n, k)
    sz = torch.stack([torch.rand(k // group, n, generator=g) * 0.02 + 0.01,
                      torch.randn(k // group, n, generator=g) * 0.05], dim=-1).bfloat16()  # (k / group, n, 2)
    weight = K.int4_dequantize(codes, sz, group)  # (n, k) float32: (q - 8) s + z per group
    return x, codes, sz, x.double() @ weight.double().T  # ..., (m, n)


@pytest.mark.parametrize("layout", [(64, "half"), (32, "half"), (64, "adjacent"), (32, "adjacent")])
@pytest.mark.parametrize("m,n,k,group", [(1, 128, 64, 32), (3, 256, 640, 128), (8, 64, 256, 64), (5, 192, 512, 256)])
def test_int4_matches_the_float64_reference_in_every_layout(layout, m, n, k, group):
    x, codes, sz, reference = _int4_case(m, n, k, group)
    y = I.int4_matvec(x, K.pack_in_layout(codes, layout), sz, group, layout)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y - reference).norm() / reference.norm()).item() < 1e-5  # float32 sums of exact codes and scales


def test_int4_agrees_with_pytorchs_kernel_on_its_packing():
    x, codes, sz, reference = _int4_case(4, 512, 640, 128, seed=1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    layout = K.int4_layout()
    assert I.int4_reads(layout), f"this torch's int4 layout {layout} is one our kernel reads"
    ours = I.int4_matvec(x, packed, sz, 128, layout)
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 128, sz).float()  # bf16 activations
    assert ((ours - aten).norm() / aten.norm()).item() < 1e-2
    assert ((ours - reference).norm() / reference.norm()) < ((aten - reference).norm() / reference.norm())


def test_int4_bad_inputs_say_what_they_need():
    x, codes, sz, _ = _int4_case(1, 64, 64, 32)
    packed = K.pack_in_layout(codes, (64, "half"))
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        I.int4_matvec(torch.randn(9, 64), packed, sz, 32, (64, "half"))
    with pytest.raises(RuntimeError, match="float32"):
        I.int4_matvec(x.double(), packed, sz, 32, (64, "half"))
    with pytest.raises(RuntimeError, match="bf16"):
        I.int4_matvec(x, packed, sz.float(), 32, (64, "half"))
    with pytest.raises(RuntimeError, match="block_n"):
        I.int4_matvec(x, packed, sz, 32, (16, "half"))


def test_packed_int4_linear_and_table_give_the_same_decode_either_way():
    torch.manual_seed(0)
    linear = torch.nn.Linear(640, 256)
    packed = K.PackedInt4Linear(Q.quantize_weight(linear.weight.detach(), 4, 128, symmetric=False), linear.bias)
    table = K.PackedInt4TiedTable(torch.randn(512, 640) * 0.05, group_size=32)
    x = torch.randn(1, 2, 640)  # (batch, step, in)
    for module, run in ((packed, packed), (table, table.logits)):
        assert module.ours
        ours = run(x)
        module.ours = False
        aten = run(x)
        module.ours = True
        assert ((ours - aten).norm() / aten.norm()).item() < 1e-2


def test_a_fullgraph_compile_keeps_the_int4_kernel():
    torch.manual_seed(0)
    packed = K.PackedInt4Linear(Q.quantize_weight(torch.randn(128, 64), 4, 32, symmetric=False))
    x = torch.randn(1, 64)
    compiled = torch.compile(packed, fullgraph=True)
    torch.testing.assert_close(compiled(x), packed(x))
