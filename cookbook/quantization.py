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

from .core import LINEAR_NAMES, capture_layer_inputs, decoder_layers, decoder_linears
from .measure import single_thread

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


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


# A b-bit code is split into bit planes of width 8, 4, 2 or 1 (e.g. 3 = 2 + 1, 6 = 4 + 2); each plane
# is packed 8 // width codes per byte. Unpacking is then a few shifts and masks on uint8 tensors.
_PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """(n,) uint8 codes < 2**width -> (n * width / 8,) bytes, the first code in the highest bits."""
    per = 8 // width
    v = codes.view(-1, per)  # (n/per, per)
    out = torch.zeros(v.shape[0], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= v[:, j] << (8 - width * (j + 1))
    return out


def _unpack_plane(packed: torch.Tensor, width: int) -> torch.Tensor:
    per, mask = 8 // width, (1 << width) - 1
    parts = [(packed >> (8 - width * (j + 1))) & mask for j in range(per)]  # per x (n/per,)
    return torch.stack(parts, dim=1).reshape(-1)  # (n,)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes (any shape, numel divisible by 8) into a flat uint8 tensor of
    exactly numel * bits / 8 bytes. For 4 bits that is two codes per byte, the first code in the high
    nibble (the order bitsandbytes uses); other widths are stored as bit planes (3 bits = 2 + 1)."""
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() % 8:
        raise ValueError(f"pack_bits needs a multiple of 8 codes, got {flat.numel()}.")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to be packed into {bits} bits.")
    flat = flat.to(torch.uint8)
    planes, shift = [], bits
    for width in _PLANES[bits]:  # high bits first
        shift -= width
        planes.append(_pack_plane((flat >> shift) & ((1 << width) - 1), width))
    return torch.cat(planes)  # (n * bits / 8,)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the `numel` codes as a flat uint8 tensor."""
    check_bits(bits)
    if numel % 8 or packed.numel() * 8 != numel * bits:
        raise ValueError(f"{packed.numel()} bytes do not hold exactly {numel} codes of {bits} bits.")
    codes, start = torch.zeros(numel, dtype=torch.uint8, device=packed.device), 0
    for width in _PLANES[bits]:
        size = numel * width // 8
        codes = (codes << width) | _unpack_plane(packed[start:start + size], width)  # (n,)
        start += size
    return codes


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


class Int8TiedEmbedding(nn.Module):
    """The tied embedding / lm_head matrix (vocab, d) stored once as int8 with one fp16 scale per row.

    `embed(ids)` looks rows up (times the model's embedding scale, sqrt(d) for Gemma) and `logits(h)`
    multiplies by the dequantized matrix in vocabulary chunks, so no float copy of it is ever whole.
    """

    def __init__(self, weight: torch.Tensor, embed_scale: float = 1.0, chunk: int = 32768) -> None:
        super().__init__()
        weight = weight.detach()  # (V, d)
        codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)  # (V, d)
        scale = torch.empty(weight.shape[0], 1, dtype=torch.float16, device=weight.device)  # (V, 1)
        for i in range(0, weight.shape[0], chunk):  # row by row is the same result; chunks keep the
            # float temporaries of int8_rowwise at (chunk, d) instead of four (V, d) copies (0.7 GB each)
            codes[i:i + chunk], s = int8_rowwise(weight[i:i + chunk].float())
            scale[i:i + chunk] = s.half()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.embed_scale, self.chunk = float(embed_scale), chunk

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.scale[ids].float() * self.embed_scale  # (..., d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        chunks = range(0, self.codes.shape[0], self.chunk)
        rows = lambda i: self.codes[i:i + self.chunk].float() * self.scale[i:i + self.chunk].float()  # (chunk, d)
        if torch.is_grad_enabled() and h.requires_grad:  # autograd cannot write into a preallocated output
            return torch.cat([h.float() @ rows(i).T for i in chunks], dim=-1).to(h.dtype)  # (..., V)
        out = torch.empty(*h.shape[:-1], self.codes.shape[0], dtype=torch.float32, device=h.device)  # (..., V)
        for i in chunks:
            torch.matmul(h.float(), rows(i).T, out=out[..., i:i + self.chunk])  # no second copy of the logits
        return out.to(h.dtype)


class _EmbedView(nn.Module):
    def __init__(self, table: Int8TiedEmbedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.embed(ids)


class _HeadView(nn.Module):
    def __init__(self, table: Int8TiedEmbedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.table.logits(h)


def replace_tied_table(model: nn.Module, make_table: Callable[[torch.Tensor, float], nn.Module],
                       caller: str) -> dict[str, nn.Module]:
    """Replace a float model's tied embedding and lm_head by views of ONE table, `make_table(weight, embed_scale)`
    (the embedding's scale, sqrt(d) for Gemma); returns the originals for `restore_modules`."""
    emb = model.model.embed_tokens
    if getattr(model.lm_head, "weight", None) is None or model.lm_head.weight.data_ptr() != emb.weight.data_ptr():
        raise ValueError(f"{caller} needs a float model whose lm_head is tied to its embedding.")
    scale = getattr(emb, "embed_scale", torch.tensor(1.0))
    table = make_table(emb.weight, float(scale))
    return swap_modules(model, {"model.embed_tokens": _EmbedView(table), "lm_head": _HeadView(table)})


def quantize_tied_embedding_int8(model: nn.Module) -> dict[str, nn.Module]:
    """Replace the tied embedding and lm_head by views of ONE Int8TiedEmbedding; returns the originals."""
    return replace_tied_table(model, Int8TiedEmbedding, "quantize_tied_embedding_int8")


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
    new = {n: QuantLinear.from_linear(m, bits, group_size, symmetric) for n, m in decoder_linears(model).items()}
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
    new = {n: NF4Linear.from_linear(m, block_size, double_quant) for n, m in decoder_linears(model).items()}
    return swap_modules(model, new)


# ---------------------------------------------------------------- calibration: layer by layer


@torch.no_grad()
def collect_linear_inputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                          max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Run one decoder layer and record the input rows (tokens, in) of each of its linears."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in layer.named_modules():
        if name in LINEAR_NAMES:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {k: torch.cat(v).float() for k, v in inputs.items()}  # name -> (n * t, in)
    if max_rows is not None:
        out = {k: v[:: max(1, v.shape[0] // max_rows)][:max_rows] for k, v in out.items()}
    return out


def hessian(x: torch.Tensor) -> torch.Tensor:
    """The layer-wise proxy Hessian of GPTQ, H = 2 X^T X / n, from inputs x (n, in): (in, in), float64.

    The product runs in float32, as in the GPTQ reference code (a float64 GEMM costs twice as much and
    buys nothing: x itself carries float32 rounding); the Cholesky factorisations then run in float64.
    """
    x = x.float()
    return ((2.0 / x.shape[0]) * (x.T @ x)).double()


def shared_hessians(xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`hessian` of each linear's inputs, computed once per distinct input: q/k/v read the same normed
    hidden states and gate/up the same MLP input, so a decoder layer needs 4 products, not 7."""
    out: dict[str, torch.Tensor] = {}
    for name, x in xs.items():
        twin = next((n for n in out if xs[n].shape == x.shape and torch.equal(xs[n], x)), None)
        out[name] = out[twin] if twin is not None else hessian(x)
    return out


# ---------------------------------------------------------------- GPTQ


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the dampened inverse Hessian (in, in), in float64, and the mask of dead
    inputs (in,) (always zero in calibration: their weights do not matter). GPTQ and SparseGPT both use it."""
    h = h.detach().double().clone()  # (in, in)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)  # keeps H invertible
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = False, block_size: int = 128, damp: float = 0.01,
                  factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) for one weight (out, in) given the Hessian h (in, in).

    Columns are quantized left to right; each column's rounding error is spread over the columns not
    yet quantized through the inverse Hessian (its upper Cholesky factor). Updates inside a block of
    `block_size` columns are immediate; the rest of the matrix is updated once per block ("lazy batch").
    Group scales are computed from the already-updated weights when a group starts. `factor`, from
    `inverse_hessian_factor(h, damp)`, saves the factorisation when several weights share one Hessian.
    """
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"h must have shape ({w.shape[1]}, {w.shape[1]}) for a weight {tuple(w.shape)}, "
                         f"got {tuple(h.shape)}.")
    h_inv, dead = factor if factor is not None else inverse_hessian_factor(h, damp)
    with single_thread():  # thousands of tiny per-column ops: one thread avoids synchronisation cost
        return _gptq(w, h_inv.float(), dead, bits, group_size, symmetric, block_size)


def _gptq(w: torch.Tensor, h_inv: torch.Tensor, dead: torch.Tensor, bits: int, group_size: int | None,
          symmetric: bool, block_size: int) -> QuantizedWeight:
    """The column loop of `gptq_quantize` on the transposed weight (in, out), so that column j of w is the
    contiguous row j here and each compensation is one rank-1 update (addr_): ~3x faster than on (out, in)."""
    check_bits(bits)
    out, inp = w.shape
    gs = check_group_size(inp, group_size)
    if block_size % gs and gs % block_size:
        raise ValueError(f"block_size={block_size} and group_size={gs} must divide one another.")
    wt = w.detach().float().T.contiguous()  # (in, out)
    wt[dead] = 0.0
    codes = torch.zeros(inp, out, dtype=torch.uint8)  # (in, out), transposed back at the end
    scales, zeros = torch.zeros(inp // gs, out), torch.zeros(inp // gs, out)
    scale = zero = None
    for b1 in range(0, inp, block_size):
        b2 = min(b1 + block_size, inp)
        blk = wt[b1:b2].clone()  # (B, out) working copy, updated column by column
        err_blk = torch.zeros_like(blk)  # (B, out) scaled errors, for the lazy update
        hinv_blk = h_inv[b1:b2, b1:b2]  # (B, B)
        for i in range(b2 - b1):
            col = b1 + i
            if col % gs == 0:  # a new group starts: its scale comes from the weights as updated so far
                grp = torch.cat([blk[i:], wt[b2:]])[:gs]  # (gs, out)
                scale, zero = quant_params(grp.T, bits, symmetric)  # (out,)
                scales[col // gs], zeros[col // gs] = scale, zero
            q = quantize_codes(blk[i], scale, zero, bits, symmetric)  # (out,)
            codes[col] = q.to(torch.uint8)
            err = (blk[i] - (q - zero) * scale) / hinv_blk[i, i]  # (out,) the rounding error, scaled
            blk[i + 1:].addr_(hinv_blk[i, i + 1:], err, alpha=-1.0)  # (B - i - 1, out) compensate the rest
            err_blk[i] = err
        wt[b2:].addmm_(h_inv[b1:b2, b2:].T, err_blk, alpha=-1.0)  # (in - b2, out) the lazy batch update
    return QuantizedWeight(codes.T.contiguous(), scales.T.contiguous().half(), zeros.T.contiguous().to(torch.uint8),
                           bits, gs, symmetric)


# ---------------------------------------------------------------- AWQ


def awq_search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None = None,
                     symmetric: bool = False, grid: int = 10) -> tuple[torch.Tensor, float, float]:
    """AWQ (Lin et al. 2023) scale search for one linear: s = mean|x|^alpha per input channel, alpha on a
    grid in [0, 1); pick the alpha whose quantized Q(W * s) / s gives the smallest output error on x.

    w: (out, in), x: (n, in) calibration inputs. Returns (s (in,), best alpha, best mse).
    """
    w, x = w.detach().float(), x.float()
    act = x.abs().mean(dim=0).clamp(min=1e-6)  # (in,) how large each input channel is on average
    ref = x @ w.T  # (n, out)
    best = (torch.ones_like(act), 0.0, float("inf"))
    for alpha in [i / grid for i in range(grid)]:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        w_q = fake_quantize(w * s, bits, group_size, symmetric) / s  # (out, in)
        mse = (x @ w_q.T - ref).pow(2).mean().item()
        if mse < best[2]:
            best = (s, alpha, mse)
    return best


# ---------------------------------------------------------------- the layer-wise driver


@torch.no_grad()
def quantize_model_layerwise(model: nn.Module, calib_ids: torch.Tensor, method: str, bits: int,
                             group_size: int | None = 128, symmetric: bool = False,
                             layers: Iterable[int] | None = None, awq_rows: int = 1024,
                             log: Callable[[str], None] | None = None) -> dict[str, nn.Module]:
    """Quantize the decoder linears with 'gptq' or 'awq', one layer at a time, in place.

    Each layer sees the calibration activations produced by the layers before it, already quantized
    (as in the GPTQ paper). Returns the original modules, for `restore_modules`.
    """
    if method not in ("gptq", "awq"):
        raise ValueError(f"method must be 'gptq' or 'awq', got {method!r}.")
    check_bits(bits)
    decoder = decoder_layers(model)
    chosen = set(range(len(decoder)) if layers is None else layers)
    if not chosen <= set(range(len(decoder))):
        raise ValueError(f"layers must be indices in [0, {len(decoder) - 1}], got {sorted(chosen)}.")
    inputs = capture_layer_inputs(model, calib_ids)
    hidden, kwargs = inputs.hidden, inputs.kwargs  # (n, t, d), one dict per layer
    originals: dict[str, nn.Module] = {}
    for i, layer in enumerate(decoder):
        if i in chosen:
            xs = collect_linear_inputs(layer, hidden, kwargs[i], max_rows=awq_rows if method == "awq" else None)
            new = {}
            hessians = shared_hessians(xs) if method == "gptq" else {}
            distinct = {id(h): h for h in hessians.values()}  # q/k/v and gate/up share theirs
            factors = {key: inverse_hessian_factor(h) for key, h in distinct.items()}  # one per distinct Hessian
            for name, x in xs.items():
                linear = layer.get_submodule(name)
                if method == "gptq":
                    h = hessians[name]
                    qw = gptq_quantize(linear.weight, h, bits, group_size, symmetric, factor=factors[id(h)])
                    new[name] = QuantLinear(qw, linear.bias)
                else:
                    s, _, _ = awq_search_scale(linear.weight, x, bits, group_size, symmetric)
                    qw = quantize_weight(linear.weight.float() * s, bits, group_size, symmetric)
                    new[name] = QuantLinear(qw, linear.bias, input_scale=s)
            prefix = f"model.layers.{i}."
            originals.update({prefix + k: v for k, v in swap_modules(layer, new).items()})
            if log:
                log(f"layer {i}: {len(new)} linears quantized with {method}")
        hidden = layer(hidden, **kwargs[i])  # (n, t, d) inputs of the next layer
    return originals


# ---------------------------------------------------------------- outliers: LLM.int8 and SmoothQuant


def int8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one absmax scale per row: x (rows, n) -> (codes int8, scale (rows, 1))."""
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)  # (rows, 1)
    codes = torch.round(x * (127.0 / absmax)).clamp(-127, 127).to(torch.int8)  # the bitsandbytes formula
    return codes, absmax / 127


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices of input features (columns of x (n, in)) whose magnitude reaches `threshold` anywhere."""
    return torch.nonzero(x.abs().amax(dim=0) >= threshold).flatten()


class Int8MixedLinear(nn.Module):
    """LLM.int8 (Dettmers et al. 2022): int8 weights (one scale per output row); at run time the input
    columns holding outliers (|x| > threshold) are multiplied in floating point, all the others as
    int8 x int8 with per-token and per-row scales. With threshold=inf it is plain W8A8 (vector-wise)."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        self.threshold = threshold
        codes, scale = int8_rowwise(linear.weight.detach().float())  # (out, in), (out, 1)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.half())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.last_outlier_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (tokens, in)
        w = self.weight_codes.float()  # (out, in) integer values
        w_scale = self.weight_scale.float()  # (out, 1)
        cols = outlier_columns(x2, self.threshold)
        self.last_outlier_count = cols.numel()
        regular = x2.clone()
        regular[:, cols] = 0.0
        xq, x_scale = int8_rowwise(regular)  # (tokens, in) int8, (tokens, 1)
        # int8 x int8 -> int32 in the library; here in float32, exact while sums stay below 2**24
        y = (xq.float() @ w.T) * x_scale * w_scale.T  # (tokens, out)
        if cols.numel():
            y = y + x2[:, cols] @ (w[:, cols] * w_scale).T  # the outlier part in floating point
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s = max|X_j|^alpha / max|W_j|^(1-alpha): (in,).
    Dividing X by s and multiplying W by s leaves X W^T unchanged but moves difficulty to the weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # (in,)
    return (act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


class W8A8Linear(nn.Module):
    """int8 weights (per output row) and int8 activations with ONE static scale per tensor, calibrated
    from `act_absmax` (the SmoothQuant 'O3' setting, the fastest and the hardest). With `smooth` the
    input is divided by the smoothing factor, which is folded into the weight before quantizing."""

    def __init__(self, linear: nn.Linear, act_absmax: torch.Tensor, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        if smooth is not None:
            w = w * smooth  # (out, in) W * s
            act_absmax = act_absmax / smooth
        codes, scale = int8_rowwise(w)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.half())
        self.register_buffer("act_scale", (act_absmax.max().clamp(min=1e-8) / 127).reshape(1))
        self.register_buffer("smooth", None if smooth is None else smooth.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        if self.smooth is not None:
            x2 = x2 / self.smooth  # in a deployed model this division is folded into the previous norm
        xq = torch.round(x2 / self.act_scale).clamp(-127, 127)  # (..., in) int8 values
        y = (xq @ self.weight_codes.float().T) * self.act_scale * self.weight_scale.float().T  # (..., out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


@torch.no_grad()
def activation_absmax(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by every decoder linear on `input_ids`: name -> (in,)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args, _o):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()  # (in,)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in decoder_linears(model).items()]
    try:  # the decoder stack only: the lm_head's logits (n, t, 262144) would cost 1 GiB per 1024 tokens
        model.model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats
