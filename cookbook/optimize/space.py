"""What the optimizer chooses from, and how a choice becomes a model.

A *plan* gives every decoder linear a weight format and the tied embedding / LM head one table format:
linears in GPTQ int8 (one scale per output channel), int4 or int3 (groups of `group_size` inputs), the head
in float32, int8 (one scale per row) or int4 (groups of 32). Each format is served the fastest way this
machine has: the packed int8 / int4 kernels (`cookbook.kernels`) where they exist, the dequantize-then-matmul
`QuantLinear` otherwise (int3: 3 bits a weight in memory, but no kernel, so it decodes slower).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels as K
from .. import quantization as Q
from ..core import decoder_linears

LINEAR_FORMATS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3}  # name -> bits
HEAD_FORMATS = ("float32", "int8", "int4")
HEAD = "lm_head"  # the plan's key for the tied embedding / LM head table


def check_formats(linear_formats, head_formats) -> None:
    bad = [f for f in linear_formats if f not in LINEAR_FORMATS] + [f for f in head_formats if f not in HEAD_FORMATS]
    if bad or not linear_formats or not head_formats:
        raise ValueError(f"Unknown or missing formats {bad}: linears take {list(LINEAR_FORMATS)}, the head "
                         f"{list(HEAD_FORMATS)}; give at least one of each.")


def gptq_option(fmt: str, group_size: int) -> Q.gptq_awq.Option:
    """(bits, group_size) of a linear format: int8 per output channel (the int8 kernel's layout), else groups."""
    bits = LINEAR_FORMATS[fmt]
    return (bits, None) if bits == 8 else (bits, group_size)


@dataclass(frozen=True)
class Plan:
    """One format per decoder linear (full names) and one for the head; `describe` counts them."""

    linears: Mapping[str, str]
    head: str

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fmt in self.linears.values():
            out[fmt] = out.get(fmt, 0) + 1
        return dict(sorted(out.items()))

    def describe(self) -> str:
        mix = ", ".join(f"{n} {fmt}" for fmt, n in self.counts().items())
        return f"linears: {mix}; head {self.head}"


def served_linear(qw: Q.QuantizedWeight, bias: torch.Tensor | None = None) -> nn.Module:
    """The module a quantized weight is served by: its packed kernel where one exists, else a QuantLinear."""
    module = Q.QuantLinear(qw, bias)
    return K.packed_linear(module) if K.why_not_packed(qw) is None else module


def apply_head(model: nn.Module, fmt: str) -> None:
    """Give a float model's tied embedding / head the table format `fmt`, in place (float32 changes nothing)."""
    if fmt == "int8":
        Q.quantize_tied_embedding_int8(model)
        if K.packed_support()["int8"]:
            K.pack_int8_head(model)
    elif fmt == "int4":
        K.quantize_tied_embedding_int4(model)
    elif fmt != "float32":
        raise ValueError(f"Unknown head format {fmt!r}; use one of {HEAD_FORMATS}.")


def apply_plan(model: nn.Module, plan: Plan, weights: Mapping, group_size: int) -> nn.Module:
    """Swap every decoder linear for its planned format (codes from `weights`, {(name, option): QuantizedWeight},
    e.g. `quantization.gptq_options`), then the head; in place, returns the model."""
    linears = decoder_linears(model)
    missing = sorted(set(linears) - set(plan.linears))
    if missing:
        raise ValueError(f"The plan has no format for {missing[:3]} ({len(missing)} linears); it was made for "
                         "another model.")
    Q.swap_modules(model, {name: served_linear(weights[name, gptq_option(plan.linears[name], group_size)],
                                               linears[name].bias) for name in linears})
    apply_head(model, plan.head)
    return model
