"""NF4 linears that decode without rebuilding the float weight.

`quantization.NF4Linear` is the readable reference, as bitsandbytes' `Linear4bit` does it on CPU: every call
unpacks all codes, looks them up in the 16-value codebook, scales each block by its absmax and multiplies by the
float32 matrix it just wrote, so one decode token moves several times the bytes the NF4 weight holds. PyTorch has
no packed kernel for NF4's non-uniform levels (its int4 kernel assumes evenly spaced ones), so `PackedNF4Linear`
runs ours for decode steps (`csrc/nf4_matvec.cpp` through `cookbook.matvec`): the same codes, absmaxes and
double-quantization codes, the same bytes, read once per token; the codebook lookup happens in a register.

Prefill-sized inputs (more than `matvec.MAX_ROWS` rows), inputs that need a gradient (QLoRA training through a
frozen base) and devices other than the CPU take the reference path on the same buffers, so the module is a
drop-in swap for inference. `tests/test_nf4_kernel.py` checks the kernel against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import matvec
from .quantization import NF4Linear
from .quantization.formats import swap_where_possible, unpack_int4
from .quantization.nf4 import NF4_CODEBOOK, dequantize_absmax_int8

CHUNK = 32  # inputs per 16 bytes of the kernel's layout: the block size must be a multiple of it


def pack_nf4_rows(codes: torch.Tensor) -> torch.Tensor:
    """(n, k) codes in [0, 15] -> (n, k // 2) uint8 in the kernel's layout: per chunk of 32 inputs, byte j holds
    input j in its low nibble and input 16 + j in its high one, so a vector of bytes unpacks to consecutive inputs."""
    n, k = codes.shape
    chunks = codes.to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)  # (n, k / 32, low / high, 16)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_nf4_rows(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nf4_rows`: (n, k // 2) uint8 -> (n, k) codes."""
    n, half = packed.shape
    chunks = packed.reshape(n, half // (CHUNK // 2), CHUNK // 2)  # (n, k / 32, 16)
    return torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(n, 2 * half)  # (n, k)


def why_not_nf4_kernel(module: NF4Linear) -> str | None:
    """None when our NF4 kernel takes `module`'s weight here, else what rules it out (and what would work)."""
    if module.packed.device.type != "cpu":
        return f"the NF4 kernel is a CPU kernel; this weight is on {module.packed.device.type}"
    if module.block_size % CHUNK or module.in_features % module.block_size:
        return (f"the NF4 kernel takes blocks of a multiple of {CHUNK} inputs that divide in_features; got "
                f"block_size={module.block_size} for in_features={module.in_features} (quantize with block_size=64)")
    if not matvec.available():
        return f"our kernels did not build here: {matvec.status()}"
    return None


class PackedNF4Linear(nn.Module):
    """An NF4Linear's codes in the NF4 kernel's layout, with the same absmaxes (double-quantized or not)."""

    def __init__(self, module: NF4Linear) -> None:
        super().__init__()
        reason = why_not_nf4_kernel(module)
        if reason is not None:
            raise ValueError(f"PackedNF4Linear cannot take this NF4Linear: {reason}.")
        self.out_features, self.in_features = module.out_features, module.in_features
        self.block_size = module.block_size
        codes = unpack_int4(module.packed).view(self.out_features, self.in_features)  # (out, in) in [0, 15]
        self.register_buffer("packed", pack_nf4_rows(codes))  # (out, in / 2)
        self.double_quant = module.absmax is None
        empty = torch.zeros(0)
        self.register_buffer("absmax", module.absmax_codes if self.double_quant else module.absmax)  # (blocks,)
        self.register_buffer("absmax_scale", module.absmax_scale if self.double_quant else empty)  # (blocks / 256,)
        self.register_buffer("absmax_offset", module.absmax_offset if self.double_quant else empty)  # (1,)
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        self.ours = True  # our kernel for decode steps; False sends every call down the reference path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if matvec.use_for(self.ours, rows, x.device) and not (x.requires_grad and torch.is_grad_enabled()):
            y = matvec.nf4_matvec(x.reshape(rows, self.in_features).float(), self.packed, self.absmax,
                                  self.absmax_scale, self.absmax_offset, NF4_CODEBOOK, self.block_size)  # (m, out)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def absmaxes(self) -> torch.Tensor:
        """One float32 absmax per block, as the reference computes them."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax_int8(self.absmax, self.absmax_scale, self.absmax_offset)  # (blocks,)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) both paths multiply by: codebook[q] * absmax, the reference's formula."""
        values = NF4_CODEBOOK.to(self.packed.device)[unpack_nf4_rows(self.packed).long()]  # (out, in)
        blocks = values.view(-1, self.block_size) * self.absmaxes().unsqueeze(1)  # (blocks, block_size)
        return blocks.view(self.out_features, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, kernel=nf4_matvec")


def pack_nf4_linears(model: nn.Module, fallback: bool = False) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap every NF4Linear in `model` for a PackedNF4Linear, in place.

    Returns (originals for `restore_modules`, {name: reason} of the modules left on the reference path). With
    fallback=False (the default) a module the kernel cannot take raises instead, naming it and why.
    """
    return swap_where_possible(model, NF4Linear, why_not_nf4_kernel, PackedNF4Linear, fallback,
                               "The model holds no NF4Linear: quantize it first (quantization.quantize_linears_nf4).")
