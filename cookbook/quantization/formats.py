"""Number formats and integer quantization: bit-packing, round-to-nearest codes with per-group scales and
zero-points, `QuantLinear` and the module swaps, the int8 tied embedding table.

Conventions: a linear weight is `(out_features, in_features)`; a "group" is a run of `group_size`
consecutive input columns of one output row that share a scale (and zero-point). Packed codes are
uint8 buffers, so `cookbook.model_bytes` counts what a quantized model really holds."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import decoder_linears

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


class EmbedView(nn.Module):
    """The model's `embed_tokens` over a shared table (int8 or int4 codes): `forward(ids)` is `table.embed(ids)`."""

    def __init__(self, table: Int8TiedEmbedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.embed(ids)


class HeadView(nn.Module):
    """The model's `lm_head` over the same table: `forward(h)` is `table.logits(h)`; the codes are stored once."""

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
    return swap_modules(model, {"model.embed_tokens": EmbedView(table), "lm_head": HeadView(table)})


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


def swap_where_possible(model: nn.Module, kind: type, why_not, make, fallback: bool,
                        none_found: str) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap every `kind` module m in `model` for make(m) where why_not(m) is None (the fast twin of a reference
    module), in place. Returns (originals for `restore_modules`, {name: reason} of the modules left as they are);
    with fallback=False a module that cannot be swapped raises instead, naming it and why. `none_found` is the
    error when the model holds no `kind` module at all."""
    new, kept = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, kind):
            reason = why_not(module)
            if reason is None:
                new[name] = make(module)
            elif fallback:
                kept[name] = reason
            else:
                raise ValueError(f"{name} has no packed kernel: {reason}. Pass fallback=True to keep it on "
                                 "the reference (dequantize-then-matmul) path.")
    if not new and not kept:
        raise ValueError(none_found)
    return swap_modules(model, new), kept


def quantize_linears_rtn(model: nn.Module, bits: int, group_size: int | None = None,
                         symmetric: bool = True) -> dict[str, nn.Module]:
    """Swap every decoder nn.Linear for an RTN QuantLinear; returns the originals."""
    new = {n: QuantLinear.from_linear(m, bits, group_size, symmetric) for n, m in decoder_linears(model).items()}
    return swap_modules(model, new)


# ---------------------------------------------------------------- outliers: LLM.int8 and SmoothQuant


def int8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one absmax scale per row: x (rows, n) -> (codes int8, scale (rows, 1))."""
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)  # (rows, 1)
    codes = torch.round(x * (127.0 / absmax)).clamp(-127, 127).to(torch.int8)  # the bitsandbytes formula
    return codes, absmax / 127
