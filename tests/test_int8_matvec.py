"""Our int8 matrix-vector kernel (cookbook/csrc/int8_matvec.cpp) against the float64 reference and PyTorch's
int8 kernel, inside the packed modules, and inside a fullgraph torch.compile."""

import os
import subprocess
import sys

import pytest
import torch

from cookbook import int8_matvec as I
from cookbook import kernels as K
from cookbook import quantization as Q

pytestmark = pytest.mark.skipif(not I.available(), reason=f"our int8 kernel did not build here: {I.status()}")


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
    code = "from cookbook import int8_matvec as I; print(I.status())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"COOKBOOK_INT8_KERNEL": "aten"}).stdout
    assert out.startswith("aten._weight_int8pack_mm") and "COOKBOOK_INT8_KERNEL=aten" in out, out
