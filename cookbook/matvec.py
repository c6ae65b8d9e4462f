"""Our own matrix-vector kernels for decode steps, checked against PyTorch's kernels and the float reference in
tests/test_matvec.py:

- `csrc/int8_matvec.cpp`: the packed int8 linears and the int8 head. PyTorch's int8 kernel reads int8 weights at
  about half the bytes/s a float32 matrix-vector product reaches on a 2-core Xeon (13 against 29 GB/s for the
  262k x 640 head, cache cold); this loop streams each thread's rows with a software prefetch a few rows ahead.
- `csrc/int4_matvec.cpp`: the packed int4 linears and the int4 tied table, reading the codes in the layout
  PyTorch's int4 kernel packs them in (so one copy serves both kernels). It is about 20% faster than PyTorch's
  vector kernel on an AMD EPYC (AVX-512; 1.19-1.22x at one row of x, on the 262k x 640 head and on 2048 x 640 and
  640 x 2048 linears), 30x faster than its scalar build (ATEN_CPU_CAPABILITY=default, or a CPU torch has no vector
  code for), and sums float32 activations where PyTorch's casts them to bf16.
- `csrc/nf4_matvec.cpp`: NF4 linears (`nf4_kernel.PackedNF4Linear`). PyTorch has no kernel for NF4's non-uniform
  levels; this one looks each code up in the 16-value codebook held in a register (one permute per vector of codes)
  and applies each block's absmax (double-quantized or not) once per block.

All sum in float32. They are compiled once per machine on first use (`torch.utils.cpp_extension`, about 30 s,
cached), for that CPU's vector instructions, and registered with PyTorch's dispatcher as the ops
`cookbook::int8_matvec`, `cookbook::int4_matvec` and `cookbook::nf4_matvec` (in C++, so a call costs no Python),
with shape functions here, so `torch.compile` keeps them inside a fullgraph decode step. Without a C++ compiler, or with
`COOKBOOK_KERNELS=aten`, `status()` says why and the packed modules keep PyTorch's kernels (NF4, which has none,
its dequantize-then-matmul reference).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from functools import cache
from pathlib import Path

import torch

from .measure import _cpu_flags

SOURCES = [Path(__file__).parent / "csrc" / f"{name}.cpp" for name in ("int8_matvec", "int4_matvec", "nf4_matvec")]
MAX_ROWS = 8  # decode steps and short drafts; longer inputs (prefill) keep PyTorch's batched kernels
INT4_BLOCKS = (32, 64)  # the int4 layouts' row blocks the int4 kernel reads (kernels.INT4_LAYOUTS)


def _build_name() -> str:
    """One build per sources, torch and CPU: the binary is compiled for this CPU's instructions (-march=native)."""
    flags = " ".join(sorted(_cpu_flags()))
    sources = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha1(sources + torch.__version__.encode() + flags.encode()).hexdigest()[:12]
    return f"cookbook_matvec_{key}"


@cache
def _extension():
    """(the compiled module, None) or (None, why it is not used)."""
    if os.environ.get("COOKBOOK_KERNELS", "ours") == "aten":
        return None, "COOKBOOK_KERNELS=aten asks for PyTorch's kernels"
    try:
        from torch.utils.cpp_extension import load

        module = load(_build_name(), [str(path) for path in SOURCES], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as err:  # no compiler, no ninja,
        # a compile error: say so and keep the aten kernel
        return None, f"building csrc/*_matvec.cpp failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    torch.library.register_fake("cookbook::int8_matvec")(_int8_shape)  # loading the binary defined the ops
    torch.library.register_fake("cookbook::int4_matvec")(_int4_shape)
    torch.library.register_fake("cookbook::nf4_matvec")(_nf4_shape)
    return module, None


def _int8_shape(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the op returns, for tracing (`torch.compile`): x (m, k), codes (n, k) -> (m, n) float32."""
    return x.new_empty((x.shape[0], codes.shape[0]))


def _int4_shape(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                block_n: int, half: bool) -> torch.Tensor:
    """x (m, k), scales_and_zeros (k // group, n, 2) -> (m, n) float32."""
    return x.new_empty((x.shape[0], scales_and_zeros.shape[1]))


def _nf4_shape(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor, codebook: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (m, k), packed (n, k // 2) -> (m, n) float32."""
    return x.new_empty((x.shape[0], packed.shape[0]))


def status() -> str:
    """Which kernels the packed int8 and int4 decode steps use here, and why."""
    module, why_not = _extension()
    return ("ours (cookbook/csrc/int8_matvec.cpp, int4_matvec.cpp, nf4_matvec.cpp)" if module is not None
            else f"aten._weight_int8pack_mm and _weight_int4pack_mm_for_cpu, NF4 on its reference path: {why_not}")


def available() -> bool:
    return _extension()[0] is not None


def int8_matvec(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (m, k) float32 @ (codes (n, k) int8 * scale (n,) bf16 per row).T -> (m, n) float32. Only where
    `available()`: callers check it once (a packed module at construction) and keep PyTorch's kernel otherwise."""
    return torch.ops.cookbook.int8_matvec(x.contiguous(), codes, scale)


def int4_reads(layout: tuple[int, str] | None) -> bool:
    """Whether the int4 kernel reads codes packed in `layout` (`kernels.int4_layout()`: row block, pairing)."""
    return available() and layout is not None and layout[0] in INT4_BLOCKS


def int4_matvec(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                layout: tuple[int, str]) -> torch.Tensor:
    """x (m, k) float32 @ W.T -> (m, n) float32, for W held as `aten._convert_weight_to_int4pack_for_cpu` packs it
    (`packed`, in `layout`) with the int4 kernel's (k // group, n, 2) bf16 table of scale and (8 - zero) * scale.
    Only where `int4_reads(layout)`: callers check it once and keep PyTorch's kernel otherwise."""
    return torch.ops.cookbook.int4_matvec(x.contiguous(), packed, scales_and_zeros, group_size, layout[0],
                                          layout[1] == "half")


def nf4_matvec(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor, codebook: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (m, k) float32 @ W.T -> (m, n) float32, for W = codebook[q] * absmax per block of `block_size` inputs, the
    codes `packed` (n, k // 2) as `nf4_kernel.pack_nf4_rows` lays them out; `absmax` float32 per block, or int8
    double-quantization codes with `absmax_scale` (one per 256 blocks) and `absmax_offset` (1,). Only where
    `available()`: callers check it once and keep the reference path otherwise."""
    return torch.ops.cookbook.nf4_matvec(x.contiguous(), packed, absmax, absmax_scale, absmax_offset, codebook,
                                         block_size)


def use_for(on: bool, rows: int, device: torch.device) -> bool:
    """Whether a packed module switched `on` (built where our kernel reads it) runs our kernel for an input of `rows`
    rows on `device`: CPU decode steps and short drafts."""
    return on and rows <= MAX_ROWS and device.type == "cpu"
