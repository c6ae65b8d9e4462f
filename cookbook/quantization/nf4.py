"""NF4 (QLoRA): a 4-bit codebook of normal quantiles, per-block absmax scales, and double quantization of
those scales to int8."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import decoder_linears
from .formats import pack_int4, swap_modules, unpack_int4

# ---------------------------------------------------------------- NF4 (QLoRA) with double quantization


def nf4_codebook_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values built as in QLoRA: quantiles of N(0, 1), 8 positive and 7 negative, plus an
    exact 0, normalised to [-1, 1]. `offset` is the outermost quantile probability, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()  # (16,) ascending, -1 ... 0 ... 1


NF4_CODEBOOK = nf4_codebook_from_normal()


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for each element (codebook ascending); ties go to the lower one."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2  # (k-1,) decision boundaries
    return torch.bucketize(x, midpoints.to(x.device)).to(torch.uint8)


@dataclass
class NF4Tensor:
    """A weight stored as NF4: packed 4-bit codes plus one absmax per block.

    Without double quantization `absmax` is float32 per block. With it, the absmaxes minus their mean
    are int8-quantized in blocks of 256 (`absmax_codes`, `absmax_scale`, `absmax_offset`).
    """

    packed: torch.Tensor
    shape: tuple[int, ...]
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    def nbytes(self) -> int:
        parts = [self.packed, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


DQ_BLOCK = 256


def quantize_absmax_int8(absmax: torch.Tensor, block: int = DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: subtract the mean, then int8 absmax-quantize in blocks of `block` (zero-padded)."""
    offset = absmax.mean()
    centred = absmax - offset  # (nb,)
    pad = (-centred.numel()) % block
    blocks = F.pad(centred, (0, pad)).view(-1, block)  # (nb2, block)
    scale = blocks.abs().amax(dim=1).clamp(min=1e-12) / 127  # (nb2,)
    codes = torch.round(blocks / scale.unsqueeze(1)).to(torch.int8).reshape(-1)[: absmax.numel()]
    return codes, scale, offset.reshape(1)


def dequantize_absmax_int8(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                           block: int = DQ_BLOCK) -> torch.Tensor:
    pad = (-codes.numel()) % block
    blocks = F.pad(codes.float(), (0, pad)).view(-1, block) * scale.unsqueeze(1)  # (nb2, block)
    return blocks.reshape(-1)[: codes.numel()] + offset


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4-quantize `w` (any shape): blocks of `block_size` consecutive values (row-major), each scaled by
    its absmax into [-1, 1] and rounded to the nearest NF4 value; codes packed two per byte."""
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even int >= 2, got {block_size!r}.")
    if w.numel() % block_size:
        raise ValueError(f"block_size={block_size} does not divide the tensor's {w.numel()} elements; "
                         "pick a block size that divides it (64 divides every Gemma linear).")
    blocks = w.detach().float().reshape(-1, block_size)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    normed = (blocks / absmax.clamp(min=1e-38).unsqueeze(1)).clamp(-1, 1)  # (nb, bs) in [-1, 1]
    packed = pack_int4(nearest_code(normed.reshape(-1), NF4_CODEBOOK))  # (n/2,) uint8
    if not double_quant:
        return NF4Tensor(packed, tuple(w.shape), block_size, absmax=absmax)
    codes, scale, offset = quantize_absmax_int8(absmax)
    return NF4Tensor(packed, tuple(w.shape), block_size, absmax_codes=codes, absmax_scale=scale, absmax_offset=offset)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor an NF4Tensor stands for, in `dtype`, with its original shape."""
    absmax = t.absmax if t.absmax is not None else dequantize_absmax_int8(t.absmax_codes, t.absmax_scale, t.absmax_offset)
    values = NF4_CODEBOOK.to(t.packed.device)[unpack_int4(t.packed).long()]  # (n,)
    return (values.view(-1, t.block_size) * absmax.unsqueeze(1)).reshape(t.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen NF4 linear: packed codes and (double-quantized) absmaxes as buffers, no parameters.
    forward dequantizes to the input's dtype on the fly and matmuls (as bitsandbytes' Linear4bit does)."""

    def __init__(self, t: NF4Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(t.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {t.shape}.")
        self.out_features, self.in_features = t.shape
        self.block_size = t.block_size
        self.register_buffer("packed", t.packed)
        self.register_buffer("absmax", t.absmax)
        self.register_buffer("absmax_codes", t.absmax_codes)
        self.register_buffer("absmax_scale", t.absmax_scale)
        self.register_buffer("absmax_offset", t.absmax_offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        return cls(quantize_nf4(linear.weight.detach(), block_size, double_quant), linear.bias)

    def nf4_tensor(self) -> NF4Tensor:
        return NF4Tensor(self.packed, (self.out_features, self.in_features), self.block_size, self.absmax,
                         self.absmax_codes, self.absmax_scale, self.absmax_offset)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.nf4_tensor(), dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)  # (out, in)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block_size={self.block_size}, " \
               f"double_quant={self.absmax is None}"


def quantize_linears_nf4(model: nn.Module, block_size: int = 64, double_quant: bool = True) -> dict[str, nn.Module]:
    """Swap every decoder nn.Linear for an NF4Linear; returns the originals."""
    new = {n: NF4Linear.from_linear(m, block_size, double_quant) for n, m in decoder_linears(model).items()}
    return swap_modules(model, new)
