"""Quantization from scratch: number formats, integer quantization with real bit-packing, NF4 with
double quantization, outlier handling (LLM.int8, SmoothQuant), GPTQ and AWQ.

Conventions: a linear weight is `(out_features, in_features)`; a "group" is a run of `group_size`
consecutive input columns of one output row that share a scale (and zero-point). Packed codes are
uint8 buffers, so `cookbook.model_bytes` counts what a quantized model really holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- number formats


def dtype_summary(dtype: torch.dtype) -> dict:
    """Bits, largest finite value, smallest normal value and machine epsilon of a float dtype."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype_summary needs a floating-point dtype, got {dtype}.")
    info = torch.finfo(dtype)
    return {"dtype": str(dtype).replace("torch.", ""), "bits": info.bits, "max": float(info.max),
            "smallest normal": float(info.tiny), "eps (precision)": float(info.eps)}


# ---------------------------------------------------------------- checks


def check_bits(bits: int) -> None:
    """Raise a ValueError that lists the supported widths if `bits` is not one of them."""
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}.")


def check_group_size(in_features: int, group_size: int | None) -> int:
    """The effective group size (None means one group per output row) after checking it divides the row."""
    if group_size is None:
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None (per-channel), got {group_size!r}.")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; pick a divisor "
            f"(e.g. {math.gcd(in_features, 128)}) or None for one scale per output channel."
        )
    return group_size


# ---------------------------------------------------------------- bit-packing


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes (any shape, numel divisible by 8) into a flat uint8 tensor.

    Every 8 codes become `bits` bytes. For 4 bits that is two codes per byte, the first code in the
    high nibble (the order bitsandbytes uses).
    """
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)  # (n,)
    if flat.numel() % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 codes, got {flat.numel()}.")
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed into {bits} bits.")
    shifts = torch.arange(7, -1, -1, device=flat.device) * bits  # first code in the highest bits
    words = (flat.view(-1, 8) << shifts).sum(dim=1)  # (n/8,) one 8*bits-bit word each
    byte_shifts = torch.arange(bits - 1, -1, -1, device=flat.device) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (n/8 * bits,)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as a flat uint8 tensor."""
    check_bits(bits)
    if packed.numel() * 8 != numel * bits and packed.numel() * 8 < numel * bits:
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits.")
    byte_shifts = torch.arange(bits - 1, -1, -1, device=packed.device) * 8
    words = (packed.view(-1, bits).to(torch.int64) << byte_shifts).sum(dim=1)  # (n/8,)
    shifts = torch.arange(7, -1, -1, device=packed.device) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)  # (n/8, 8)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, first in the high nibble: (n,) -> (n/2,) uint8. The fast special case."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        raise ValueError("pack_int4 needs an even number of codes.")
    return (flat[0::2] << 4) | flat[1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(n/2,) uint8 -> (n,) uint8 codes in [0, 15]."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)


# ---------------------------------------------------------------- integer quantization


@dataclass
class QuantizedWeight:
    """Unsigned integer codes plus per-group scale (and zero-point): w ~ (codes - zero) * scale.

    codes: (out, in) uint8 in [0, 2**bits - 1]; scale and zero: (out, in // group_size).
    Symmetric (absmax) quantization uses the fixed zero 2**(bits-1); scales are stored in float16.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the codes stand for."""
        out, inp = self.codes.shape
        g = self.codes.view(out, inp // self.group_size, self.group_size).float()  # (out, ng, gs)
        w = (g - self.zero.float().unsqueeze(-1)) * self.scale.float().unsqueeze(-1)  # (out, ng, gs)
        return w.view(out, inp)


def quant_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point per row of `w` (rows, n): absmax if symmetric, min/max otherwise.

    Scales are rounded to float16 (how they are stored), zeros are integers in [0, 2**bits - 1].
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1  # e.g. 127 for int8, 7 for int4: the grid is symmetric around 0
        scale = w.abs().amax(dim=-1) / qmax  # (rows,)
        scale = scale.clamp(min=1e-8).half().float()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = w.amin(dim=-1).clamp(max=0)  # (rows,) the grid must contain 0 exactly
        hi = w.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8).half().float()
        zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """Round `w` (..., n) to integer codes with broadcastable scale/zero (..., 1)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (torch.round(w / scale).clamp(-qmax, qmax) + zero)  # codes in [1, 2**bits - 1]
    return torch.round(w / scale + zero).clamp(0, 2**bits - 1)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> QuantizedWeight:
    """Round-to-nearest (RTN) quantization of a (out, in) weight, one scale per group of inputs.

    group_size=None: one scale per output channel; group_size=in_features*out: see `quantize_per_tensor`.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D (out, in) weight, got shape {tuple(w.shape)}.")
    out, inp = w.shape
    gs = check_group_size(inp, group_size)
    groups = w.float().reshape(out, inp // gs, gs)  # (out, ng, gs)
    scale, zero = quant_params(groups, bits, symmetric)  # (out, ng)
    codes = quantize_codes(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, symmetric)
    return QuantizedWeight(codes.reshape(out, inp).to(torch.uint8), scale.half(), zero.to(torch.uint8),
                           bits, gs, symmetric)


def quantize_per_tensor(w: torch.Tensor, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Fake-quantize with ONE scale for the whole tensor (the naive baseline); returns the dequantized tensor."""
    check_bits(bits)
    flat = w.float().reshape(1, -1)  # (1, n)
    scale, zero = quant_params(flat, bits, symmetric)
    codes = quantize_codes(flat, scale.unsqueeze(-1), zero.unsqueeze(-1), bits, symmetric)
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(w.shape)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize (same shape and dtype as `w`): the error a quantized model would see."""
    return quantize_weight(w, bits, group_size, symmetric).dequantize().to(w.dtype)


# ---------------------------------------------------------------- QuantLinear and module swaps


class QuantLinear(nn.Module):
    """A frozen linear layer holding bit-packed integer weights; it dequantizes on the fly and matmuls.

    Buffers: `packed` (uint8, bits/8 bytes per weight), `scale` (fp16), `zero` (uint8, asymmetric only),
    optional `input_scale` (AWQ / SmoothQuant: x is divided by it first) and `bias`.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.codes.shape
        self.bits, self.group_size, self.symmetric = qw.bits, qw.group_size, qw.symmetric
        self.register_buffer("packed", pack_bits(qw.codes, qw.bits))
        self.register_buffer("scale", qw.scale.half())
        self.register_buffer("zero", None if qw.symmetric else qw.zero.to(torch.uint8))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    symmetric: bool = True) -> QuantLinear:
        """RTN-quantize an nn.Linear."""
        return cls(quantize_weight(linear.weight.detach(), bits, group_size, symmetric), linear.bias)

    def quantized_weight(self) -> QuantizedWeight:
        codes = unpack_bits(self.packed, self.bits, self.out_features * self.in_features)
        codes = codes.view(self.out_features, self.in_features)  # (out, in)
        zero = self.zero if self.zero is not None else torch.full_like(self.scale, 2 ** (self.bits - 1))
        return QuantizedWeight(codes, self.scale, zero, self.bits, self.group_size, self.symmetric)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize().to(dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)  # (..., in)
        w = self.dequantized_weight(x.dtype)  # (out, in), rebuilt every call: memory traded for compute
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))  # (..., out)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the decoder layers (the lm_head is left out)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}" and n.split(".")[-1] in LINEAR_NAMES]


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each replacement at its dotted name; return the modules taken out (for `restore_modules`)."""
    originals = {}
    for name, new in replacements.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = getattr(parent, leaf)
        setattr(parent, leaf, new)
    return originals


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Undo `swap_modules`."""
    swap_modules(model, originals)


def quantize_linears_rtn(model: nn.Module, bits: int, group_size: int | None = None,
                         symmetric: bool = True) -> dict[str, nn.Module]:
    """Swap every decoder nn.Linear for an RTN QuantLinear; returns the originals."""
    new = {n: QuantLinear.from_linear(m, bits, group_size, symmetric) for n, m in decoder_linears(model)}
    return swap_modules(model, new)


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
    new = {n: NF4Linear.from_linear(m, block_size, double_quant) for n, m in decoder_linears(model)}
    return swap_modules(model, new)
