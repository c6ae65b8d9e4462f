"""Packed-integer kernels for quantized decode: the weight is never rebuilt in float.

`QuantLinear.forward` (quantization.py) is the readable reference: unpack every code, dequantize the whole
weight to float32, matmul. For one decode token that reads the packed bytes, writes a float32 matrix and
reads it back: more memory traffic than the float32 layer it replaced. The modules here hand the SAME codes
to PyTorch's packed matmuls, which dequantize inside the kernel, tile by tile, in registers:

- int4, one scale and zero per group of 32/64/128/256 inputs: `aten._weight_int4pack_mm_for_cpu`, after
  `aten._convert_weight_to_int4pack_for_cpu` has laid the codes out for it (2 codes per byte);
- int8, one scale per output channel: `aten._weight_int8pack_mm` (1 byte per weight).

For decode steps (up to `matvec.MAX_ROWS` rows) both formats run our own kernels instead (`cookbook.matvec`,
compiled for this CPU on first use, reading the same buffers), wherever they build (`matvec.status()` says which
ran): the int8 one reads the codes about twice as fast as PyTorch's on our CPUs; the int4 one is about 20% faster
than PyTorch's vector kernel and does not depend on torch's build (see below). Both take float32 activations.
The packed heads, read whole for every token, hold their codes in 2 MiB pages (`cookbook.hugepages`).

PyTorch's kernels are fast with bfloat16 activations and fall back to slow scalar code with float32 ones, so the
activation is cast to bf16 around their call only; the rest of the model keeps its dtype. PyTorch has no kernel
for NF4's non-uniform levels: `pack_model` gives NF4 linears ours (`cookbook.nf4_kernel`). Where a format has no
kernel (int8 in groups, shapes the kernel rejects) `pack_quantized_linears` says so and raises, or, with
`fallback=True`, keeps the reference module and returns the reason: never a silent slowdown. CPU kernels only
for now: for a weight on a GPU `why_not_packed` says so.

Under torch's scalar build (ATEN_CPU_CAPABILITY=default, or a CPU it has no vector code for) PyTorch's kernels are
scalar loops: its int4 decode step is about 30x slower than ours (the decode steps run ours, compiled for the CPU
whatever torch dispatches to), and a 256-token window takes minutes. There, inputs
of `SCALAR_FLOAT_ROWS` rows or more (prefill, perplexity) dequantize the weight once per call and multiply in
float32 through BLAS, whose speed does not depend on that setting: the same codes, other rounding (float32
activations instead of bf16). `float_path` decides; a test checks that both paths agree.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from . import hugepages, matvec
from .measure import cpu_has_native_bf16, cpu_vector_kernels
from .nf4_kernel import PackedNF4Linear, pack_nf4_linears  # noqa: F401 (PackedNF4Linear: K's packed modules)
from .quantization import (HeadView, Int8TiedEmbedding, NF4Linear, QuantizedWeight, QuantLinear,
                           quantize_linears_rtn, quantize_weight, replace_tied_table, swap_modules)
from .quantization.formats import swap_where_possible

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
INT4_ROW_MULTIPLE = 16  # the CPU int4 layout packs 16 output rows together
KERNEL_DTYPE = torch.bfloat16  # the activation dtype the packed kernels are fast with
SCALAR_FLOAT_ROWS = 8  # under torch's scalar build, inputs of this many rows or more take the float path
SCALAR_BUILD = not cpu_vector_kernels()  # fixed for the process (read once: a compiled forward sees a constant)


def float_path(rows: int) -> bool:
    """True when an input of `rows` rows should be multiplied in float32 against the dequantized weight: under
    torch's scalar build only, and only for prefill-sized inputs (see the module docstring)."""
    return SCALAR_BUILD and rows >= SCALAR_FLOAT_ROWS


def packed_support() -> dict[str, bool]:
    """Which packed kernels this torch build has (CPU ops), and whether the CPU has native bf16 math."""
    ops = torch.ops.aten
    return {
        "int8": hasattr(ops, "_weight_int8pack_mm"),
        "int4": hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu"),
        "native bf16": cpu_has_native_bf16(),
    }


def why_not_packed(qw: QuantizedWeight) -> str | None:
    """None when `qw` has a packed kernel here, else what rules it out (and what would work)."""
    out, inp = qw.codes.shape
    support = packed_support()  # (cheap: attribute look-ups and a cached CPU-flag read)
    if qw.codes.device.type != "cpu":
        return f"the packed kernels here are CPU kernels; this weight is on {qw.codes.device.type}"
    if qw.bits == 4:
        if not support["int4"]:
            return f"this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu; upgrade torch"
        if qw.group_size not in INT4_GROUP_SIZES or inp % qw.group_size:
            return (f"the int4 kernel takes groups of {INT4_GROUP_SIZES} dividing in_features; got group "
                    f"{qw.group_size} for in_features={inp} (quantize with group_size=128 or 64)")
        if out % INT4_ROW_MULTIPLE:
            return f"the CPU int4 kernel needs out_features divisible by {INT4_ROW_MULTIPLE}; got {out}"
        return None
    if qw.bits == 8:
        if not support["int8"]:
            return f"this torch ({torch.__version__}) has no aten._weight_int8pack_mm; upgrade torch"
        if qw.group_size != inp:
            return (f"the int8 kernel takes one scale per output channel; got groups of {qw.group_size} "
                    "(quantize with group_size=None)")
        return None
    return f"no packed kernel for {qw.bits}-bit codes (int4 in groups and int8 per channel have one)"


class _PackedLinear(nn.Module):
    """What the packed linears share: AWQ's input scale, the bf16 cast around the kernel, the bias."""

    def __init__(self, qw: QuantizedWeight, bits: int, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None) -> None:
        super().__init__()
        reason = why_not_packed(qw) if qw.bits == bits else f"it holds {qw.bits}-bit codes, not {bits}-bit"
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot take this weight: {reason}.")
        self.out_features, self.in_features = qw.codes.shape
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _kernel_input(self, x: torch.Tensor, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)  # (..., in) AWQ: the activations carry 1/s
        return x.reshape(-1, self.in_features).to(dtype)  # (m, in)

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def int4_scales_and_zeros(qw: QuantizedWeight) -> torch.Tensor:
    """The int4 kernel's (in // group, out, 2) float32 table: scale and (8 - zero) * scale per group, so that
    (q - 8) * scale + (8 - zero) * scale = (q - zero) * scale, our dequantization."""
    scale = qw.scale.float()  # (out, in // group)
    return torch.stack([scale.T, ((8 - qw.zero.float()) * scale).T], dim=-1)  # (in // group, out, 2)


def int4_dequantize(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 weights (n, in) from 4-bit codes (n, in) and the kernel's (in // group, n, 2) table."""
    sz = scales_and_zeros.float().repeat_interleave(group_size, dim=0)  # (in, n, 2)
    return (codes.float() - 8) * sz[..., 0].T + sz[..., 1].T  # (n, in): (q - 8) s + (8 - z) s = (q - z) s


class PackedInt4Linear(_PackedLinear):
    """A QuantLinear's 4-bit codes in the int4 kernel's layout; forward never builds the float weight.

    w = (code - zero) * scale per group is rewritten as (code - 8) * scale + (8 - zero) * scale, the
    kernel's form: `scales_and_zeros` (in // group, out, 2) holds scale and (8 - zero) * scale.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__(qw, 4, bias, input_scale)
        self.group_size = qw.group_size
        codes = qw.codes.to(torch.int32)  # (out, in) in [0, 15]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))  # (out, in/2)
        self.register_buffer("scales_and_zeros", int4_scales_and_zeros(qw).to(KERNEL_DTYPE))  # (in // g, out, 2)
        layout = int4_layout()  # to read the codes back: our kernel, the float path (None: both are off)
        self.layout = layout if layout is not None and self.out_features % layout[0] == 0 else None
        self.ours = matvec.int4_reads(self.layout)  # fixed here: a compiled forward sees a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if matvec.use_for(self.ours, rows, x.device):
            y = matvec.int4_matvec(self._kernel_input(x, torch.float32), self.packed, self.scales_and_zeros,
                                   self.group_size, self.layout)  # (m, out)
            return self._output(y, x)  # (..., out)
        if float_path(rows) and self.layout is not None:
            return self._output(self._kernel_input(x, x.dtype) @ self.dequantized().T.to(x.dtype), x)  # (..., out)
        x2 = self._kernel_input(x)  # (m, in) bf16
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return self._output(y, x)  # (..., out)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) the kernel multiplies by: (q - 8) s + (8 - z) s per group."""
        return int4pack_weight(self.packed, self.scales_and_zeros, self.group_size, self.in_features, self.layout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, kernel=int4pack"


class PackedInt8Linear(_PackedLinear):
    """A QuantLinear's 8-bit per-channel codes as int8 for `_weight_int8pack_mm`.

    Codes c in [0, 255] with zero z: w = (c - z) * s = (c - 128) * s - (z - 128) * s, so
    y = kernel(x, c - 128, s) - s * (z - 128) * sum(x): the zero point costs one extra sum per token.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None) -> None:
        super().__init__(qw, 8, bias, input_scale)
        self.register_buffer("codes", (qw.codes.to(torch.int16) - 128).to(torch.int8))  # (out, in)
        scale = qw.scale.float().flatten()  # (out,)
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        shift = (qw.zero.float().flatten() - 128) * scale  # (out,) zero for the symmetric grid
        self.register_buffer("zero_shift", None if qw.symmetric else shift)
        self.ours = matvec.available()  # fixed here: a compiled forward sees a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if matvec.use_for(self.ours, rows, x.device):
            x2 = self._kernel_input(x, torch.float32)  # (m, in)
            y = matvec.int8_matvec(x2, self.codes, self.scale)  # (m, out)
        elif float_path(rows):
            x2 = self._kernel_input(x, torch.float32)  # (m, in)
            y = x2 @ (self.codes.float() * self.scale.float()[:, None]).T  # (m, out)
        else:
            x2 = self._kernel_input(x)  # (m, in) bf16
            y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scale).float()  # (m, out)
        if self.zero_shift is not None:
            y = y - x2.float().sum(-1, keepdim=True) * self.zero_shift  # (m, out)
        return self._output(y, x)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel=int8pack"


def packed_linear(module: QuantLinear) -> nn.Module:
    """The packed-kernel twin of a QuantLinear (same codes, same scales); ValueError says why not."""
    qw = module.quantized_weight()
    reason = why_not_packed(qw)
    if reason is not None:
        raise ValueError(f"No packed kernel for {module.extra_repr()}: {reason}.")
    cls = PackedInt4Linear if qw.bits == 4 else PackedInt8Linear
    return cls(qw, module.bias, module.input_scale)


def pack_quantized_linears(model: nn.Module, fallback: bool = False) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap every QuantLinear in `model` for its packed twin, in place.

    Returns (originals for `restore_modules`, {name: reason} of the modules left on the reference path).
    With fallback=False (the default) any module without a kernel raises instead, naming it and why.
    """
    none_found = "The model holds no QuantLinear: quantize it first (e.g. quantize_linears_rtn)."
    return swap_where_possible(model, QuantLinear, lambda m: why_not_packed(m.quantized_weight()), packed_linear,
                               fallback, none_found)


class PackedInt8Head(nn.Module):
    """The int8 tied table's logits (quantization.Int8TiedEmbedding: int8 rows, one scale per row) through
    `_weight_int8pack_mm`: the 262k x 640 head is read as 1 byte per weight, never as a float copy."""

    def __init__(self, table: Int8TiedEmbedding) -> None:
        super().__init__()
        if not packed_support()["int8"]:
            raise ValueError(f"this torch ({torch.__version__}) has no aten._weight_int8pack_mm; upgrade torch.")
        table.codes = hugepages.in_huge_pages(table.codes)  # the same codes in 2 MiB pages: read faster per token
        self.table = table  # shared with the embedding lookup: the codes are stored once
        self.register_buffer("kernel_scale", table.scale.flatten().to(KERNEL_DTYPE))  # (V,) in the kernel dtype
        self.ours = matvec.available()  # fixed here: a compiled forward sees a constant

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h2 = h.reshape(-1, h.shape[-1])  # (m, d)
        if matvec.use_for(self.ours, len(h2), h.device):
            logits = matvec.int8_matvec(h2.float(), self.table.codes, self.kernel_scale)  # (m, V)
        elif float_path(len(h2)):
            weight = self.table.codes.float() * self.kernel_scale.float()[:, None]  # (V, d)
            logits = h2.float() @ weight.T  # (m, V)
        else:
            logits = torch.ops.aten._weight_int8pack_mm(h2.to(KERNEL_DTYPE), self.table.codes, self.kernel_scale)
        return logits.to(h.dtype).reshape(*h.shape[:-1], -1)  # (..., V)


def pack_int8_head(model: nn.Module) -> dict[str, nn.Module]:
    """Give a model whose tied table is already int8 (`quantize_tied_embedding_int8`) the packed head."""
    head = model.lm_head
    if not (isinstance(head, HeadView) and isinstance(head.table, Int8TiedEmbedding)):
        raise ValueError("pack_int8_head needs the int8 tied table first: call "
                         "quantization.quantize_tied_embedding_int8(model).")
    return swap_modules(model, {"lm_head": PackedInt8Head(head.table)})


def use_our_kernels(model: nn.Module, on: bool = True) -> int:
    """Send `model`'s packed decode steps (int8 and int4) through our kernels (on) or PyTorch's (off), to compare
    the two on the same codes (NF4, which PyTorch has no kernel for, through its reference path when off);
    returns how many modules it switched. A compiled decoder must be built again after
    a switch."""
    if on and not matvec.available():
        raise ValueError(f"Our kernels are not available here: {matvec.status()}.")
    switched = []
    for m in model.modules():
        if isinstance(m, (PackedInt8Linear, PackedInt8Head, PackedNF4Linear)) or (
                isinstance(m, (PackedInt4Linear, PackedInt4TiedTable)) and matvec.int4_reads(m.layout)):
            m.ours = on
            switched.append(m)
    return len(switched)


def pack_model(model: nn.Module, fallback: bool = False) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Every packed kernel a quantized model can take, in place: its QuantLinears (`pack_quantized_linears`), its
    NF4Linears (`nf4_kernel.pack_nf4_linears`) and, when its tied table is int8 (`quantize_tied_embedding_int8`),
    the head (`pack_int8_head`).

    Returns (originals for `restore_modules`, {name: reason} of what stays on the reference path); a float
    head stays float and is listed there, so a caller sees what the packed form does not cover.
    """
    has = {kind: any(isinstance(m, kind) for m in model.modules()) for kind in (NF4Linear, QuantLinear)}
    originals, kept = pack_nf4_linears(model, fallback) if has[NF4Linear] else ({}, {})
    if has[QuantLinear] or not has[NF4Linear]:  # (neither: pack_quantized_linears says what to do)
        more, more_kept = pack_quantized_linears(model, fallback)
        originals, kept = originals | more, kept | more_kept
    table = getattr(model.lm_head, "table", None)
    if isinstance(model.lm_head, HeadView) and isinstance(table, Int8TiedEmbedding):
        originals |= pack_int8_head(model)
    elif not isinstance(table, PackedInt4TiedTable):  # an int4 table is packed from the start

        kept["lm_head"] = "a float head (quantize_tied_embedding_int8 gives it an int8 table and a packed kernel)"
    return originals, kept


# ---------------------------------------------------------------- an int4 tied table: the head on the int4 kernel

# The CPU int4 kernel's weight layout depends on the vector ISA torch dispatches to: blocks of N rows stored
# K-major, two rows per byte. With AVX-512, blocks of 64 rows and row j sharing a byte with row j + 32; with AVX2,
# blocks of 32 and rows j, j + 16; with the generic kernel, blocks of 32 and rows 2i, 2i + 1. `int4_layout`
# finds which one this process uses by packing a probe, so a lookup never reads codes in the wrong order.
INT4_LAYOUTS = ((64, "half"), (32, "half"), (32, "adjacent"), (16, "half"), (16, "adjacent"))


@functools.cache
def int4_layout() -> tuple[int, str] | None:
    """(rows per block, how two rows share a byte) of `_convert_weight_to_int4pack_for_cpu` here, or None when
    the layout is none of `INT4_LAYOUTS` (then no int4 tied table: its lookup could not read the codes)."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    rows = torch.arange(128)
    for layout in INT4_LAYOUTS:
        if torch.equal(_read_rows(packed, rows, 64, layout).int(), probe):
            return layout
    return None


def _read_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int, layout: tuple[int, str]) -> torch.Tensor:
    block_n, pairing = layout
    blocks = packed.view(-1, in_features, block_n // 2)  # (N / block_n, in, block_n / 2)
    block, j = rows // block_n, rows % block_n  # (n,)
    if pairing == "half":  # row j and row j + block_n / 2 share a byte
        byte, high = j % (block_n // 2), j >= block_n // 2
    else:  # rows 2i and 2i + 1 share a byte
        byte, high = j // 2, j % 2 == 1
    data = blocks[block, :, byte]  # (n, in)
    return torch.where(high[:, None], data >> 4, data & 15)  # (n, in)


def pack_in_layout(codes: torch.Tensor, layout: tuple[int, str]) -> torch.Tensor:
    """codes (n, in) in [0, 15] laid out as `layout` (one of `INT4_LAYOUTS`) packs them, (n, in / 2) uint8: the
    readable statement of the layouts `_read_rows` and our int4 kernel read, so tests can build each one whichever
    layout this process's torch packs in."""
    block_n, pairing = layout
    n, k = codes.shape
    blocks = codes.reshape(n // block_n, block_n, k).permute(0, 2, 1)  # (N / block_n, in, block_n)
    if pairing == "half":  # rows j and j + block_n / 2 share a byte, low nibble first
        low, high = blocks[..., :block_n // 2], blocks[..., block_n // 2:]
    else:  # rows 2i and 2i + 1
        low, high = blocks[..., 0::2], blocks[..., 1::2]
    return (low | (high << 4)).to(torch.uint8).reshape(n, k // 2)  # (n, in / 2)


def int4pack_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int,
                  layout: tuple[int, str] | None = None) -> torch.Tensor:
    """The 4-bit codes (len(rows), in) of `rows` read back from `aten._convert_weight_to_int4pack_for_cpu`'s
    layout as this process packs it (`int4_layout`, unless the caller found it already)."""
    layout = layout or int4_layout()
    if layout is None:
        raise ValueError("This torch packs int4 weights in a layout the row reader does not know; use the int8 "
                         "tied table (quantization.quantize_tied_embedding_int8).")
    return _read_rows(packed, rows, in_features, layout)


def _all_rows(packed: torch.Tensor, in_features: int, layout: tuple[int, str]) -> torch.Tensor:
    """`_read_rows` of every row in order, without a gather: each block's two nibbles put side by side."""
    block_n, pairing = layout
    blocks = packed.view(-1, in_features, block_n // 2)  # (N / block_n, in, block_n / 2)
    low, high = blocks & 15, blocks >> 4  # each (N / block_n, in, block_n / 2)
    if pairing == "half":  # rows j < block_n / 2 in the low nibbles, j + block_n / 2 in the high ones
        rows = torch.cat([low, high], dim=-1)  # (N / block_n, in, block_n)
    else:  # rows 2i (low) and 2i + 1 (high)
        rows = torch.stack([low, high], dim=-1).view(blocks.shape[0], in_features, block_n)
    return rows.transpose(1, 2).reshape(-1, in_features)  # (N, in)


def int4pack_weight(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int,
                    layout: tuple[int, str] | None) -> torch.Tensor:
    """The whole float32 matrix (n, in) held in the int4 kernel's layout: `int4_dequantize` of every row read back
    (`int4pack_rows`), the same values in fewer passes over the matrix: the float path of the scalar build runs
    this on every linear of every prefill, and torch's scalar elementwise kernels make each pass count."""
    if layout is None:
        raise ValueError("This torch packs int4 weights in a layout the row reader does not know.")
    codes = _all_rows(packed, in_features, layout)  # (n, in) uint8
    n = codes.shape[0]
    sz = scales_and_zeros.float()  # (in // group, n, 2)
    w = codes.view(n, -1, group_size).float()  # (n, in // group, group)
    w.sub_(8).mul_(sz[..., 0].T[..., None]).add_(sz[..., 1].T[..., None])  # (q - 8) s + (8 - z) s, per group
    return w.view(n, in_features)  # (n, in)


class PackedInt4TiedTable(nn.Module):
    """The tied embedding / lm_head matrix (V, d) as 4-bit codes in groups, stored ONCE, in the int4 kernel's
    layout: the head is `_weight_int4pack_mm_for_cpu` (half the bytes of the int8 table per token), a lookup
    reads its rows back (`int4pack_rows`, in the layout `int4_layout` found at construction) and dequantizes them.
    The same `embed` / `logits` interface as `quantization.Int8TiedEmbedding`, so the same views serve both."""

    def __init__(self, weight: torch.Tensor, embed_scale: float = 1.0, group_size: int = 32,
                 chunk: int = 32768) -> None:
        super().__init__()
        vocab, d = weight.shape
        reason = int4_table_problem(vocab, d, group_size, weight.device)
        if reason:
            raise ValueError(f"No int4 tied table here: {reason}.")
        packed, scales = [], []
        for i in range(0, vocab, chunk):  # chunks of whole blocks (64 rows divide them): block by block
            qw = quantize_weight(weight[i:i + chunk].detach(), 4, group_size, symmetric=False)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32), 1))
            scales.append(int4_scales_and_zeros(qw))  # (d // g, chunk, 2)
        # both read whole for every token, so held in 2 MiB pages (cookbook.hugepages)
        self.register_buffer("packed", hugepages.in_huge_pages(torch.cat(packed)))  # (V, d / 2) uint8
        self.register_buffer("scales_and_zeros", hugepages.in_huge_pages(
            torch.cat(scales, dim=1).to(KERNEL_DTYPE)))  # (d // g, V, 2)
        self.embed_scale, self.group_size, self.in_features = float(embed_scale), group_size, d
        self.layout = int4_layout()  # found once here, so a compiled forward never runs the probe
        self.ours = matvec.int4_reads(self.layout)  # fixed here: a compiled forward sees a constant

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (n,)
        codes = int4pack_rows(self.packed, flat, self.in_features, self.layout)  # (n, d)
        rows = int4_dequantize(codes, self.scales_and_zeros[:, flat], self.group_size)  # (n, d)
        return (rows * self.embed_scale).reshape(*ids.shape, self.in_features)  # (..., d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h2 = h.reshape(-1, self.in_features)  # (m, d)
        if matvec.use_for(self.ours, len(h2), h.device):
            out = matvec.int4_matvec(h2.float(), self.packed, self.scales_and_zeros, self.group_size,
                                     self.layout)  # (m, V)
        elif float_path(len(h2)):
            weight = int4pack_weight(self.packed, self.scales_and_zeros, self.group_size, self.in_features,
                                     self.layout)  # (V, d)
            out = h2.float() @ weight.T  # (m, V)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(h2.to(KERNEL_DTYPE), self.packed, self.group_size,
                                                             self.scales_and_zeros)  # (m, V)
        return out.to(h.dtype).reshape(*h.shape[:-1], -1)  # (..., V)


def int4_table_problem(vocab: int, d: int, group_size: int, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the int4 kernel here is a CPU kernel; the table is on {device.type}"
    if not packed_support()["int4"]:
        return f"this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu; upgrade torch"
    if group_size not in INT4_GROUP_SIZES or d % group_size:
        return f"the int4 kernel takes groups of {INT4_GROUP_SIZES} dividing the width; got {group_size} for {d}"
    layout = int4_layout()
    if layout is None:
        return "this torch's int4 layout is not one the row lookup can read (use the int8 table)"
    if vocab % 64:
        return f"the row read-back needs a vocabulary divisible by 64; got {vocab} (use the int8 table)"
    return None


def quantize_tied_embedding_int4(model: nn.Module, group_size: int = 32) -> dict[str, nn.Module]:
    """Replace the tied embedding and lm_head by views of ONE PackedInt4TiedTable; returns the originals."""
    return replace_tied_table(model, lambda w, scale: PackedInt4TiedTable(w, scale, group_size),
                              "quantize_tied_embedding_int4")


def packed_int4_model(model: nn.Module, group_size: int = 32) -> nn.Module:
    """A copy of a float model entirely on the int4 kernel, the quickest int4 model to build (no calibration):
    every decoder linear RTN int4 in groups (asymmetric), packed, and the tied table as a `PackedInt4TiedTable`.
    Notebook 10 decodes it compiled and uses it as the float model's draft."""
    twin = copy.deepcopy(model)
    quantize_linears_rtn(twin, 4, group_size, symmetric=False)
    pack_quantized_linears(twin)
    quantize_tied_embedding_int4(twin, group_size)
    return twin
