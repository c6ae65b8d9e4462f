"""Our own int8 matrix-vector kernel (`csrc/int8_matvec.cpp`): the decode-time product of the packed int8 linears
and the int8 head, checked against `aten._weight_int8pack_mm` and the float reference in tests/test_int8_matvec.py.

PyTorch's int8 kernel reads int8 weights at about half the bytes/s a float32 matrix-vector product reaches on a
2-core Xeon (13 against 29 GB/s for the 262k x 640 head, cache cold), so the int8 rows sat far below their memory
roofline. The C++ loop here streams each thread's rows with a software prefetch a few rows ahead and sums in
float32; it is compiled once per machine on first use (`torch.utils.cpp_extension`, about 20 s, cached), for that
CPU's vector instructions, and registered with PyTorch's dispatcher as the op `cookbook::int8_matvec` (in C++, so
a call costs no Python), with a shape function here, so `torch.compile` keeps it inside a fullgraph decode step.
Without a C++ compiler, or with `COOKBOOK_INT8_KERNEL=aten`, `status()` says why and the linears keep PyTorch's
kernel.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import cache
from pathlib import Path

import torch

from .measure import _cpu_flags

SOURCE = Path(__file__).parent / "csrc" / "int8_matvec.cpp"
MAX_ROWS = 8  # decode steps and short drafts; longer inputs (prefill) keep PyTorch's batched kernel


def _build_name() -> str:
    """One build per source, torch and CPU: the binary is compiled for this CPU's instructions (-march=native)."""
    flags = " ".join(sorted(_cpu_flags()))
    key = hashlib.sha1(SOURCE.read_bytes() + torch.__version__.encode() + flags.encode()).hexdigest()[:12]
    return f"cookbook_int8_matvec_{key}"


@cache
def _extension():
    """(the compiled module, None) or (None, why it is not used)."""
    if os.environ.get("COOKBOOK_INT8_KERNEL", "ours") == "aten":
        return None, "COOKBOOK_INT8_KERNEL=aten asks for PyTorch's kernel"
    try:
        from torch.utils.cpp_extension import load

        module = load(_build_name(), [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:  # no compiler, no ninja,
        # a compile error: say so and keep the aten kernel
        return None, f"building {SOURCE.name} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    torch.library.register_fake("cookbook::int8_matvec")(_output_shape)  # loading the binary defined the op
    return module, None


def _output_shape(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the op returns, for tracing (`torch.compile`): x (m, k), codes (n, k) -> (m, n) float32."""
    return x.new_empty((x.shape[0], codes.shape[0]))


def status() -> str:
    """Which kernel the packed int8 decode steps use here, and why."""
    module, why_not = _extension()
    return "ours (cookbook/csrc/int8_matvec.cpp)" if module is not None else f"aten._weight_int8pack_mm: {why_not}"


def available() -> bool:
    return _extension()[0] is not None


def int8_matvec(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (m, k) float32 @ (codes (n, k) int8 * scale (n,) bf16 per row).T -> (m, n) float32. Only where
    `available()`: callers check it once (a packed module at construction) and keep PyTorch's kernel otherwise."""
    return torch.ops.cookbook.int8_matvec(x.contiguous(), codes, scale)


def use_for(on: bool, rows: int, device: torch.device) -> bool:
    """Whether a packed int8 module switched `on` (built where `available()`) runs our kernel for an input of `rows`
    rows on `device`: CPU decode steps and short drafts."""
    return on and rows <= MAX_ROWS and device.type == "cpu"
