"""What each decoder layer receives, captured once so layers can be re-run alone (calibration for GPTQ, AWQ
and SparseGPT, layer scores, a frozen prefix for training the layers above it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layout import decoder

_DROPPED = ("hidden_states", "cache", "past_key_values", "past_key_value")  # nothing is cached while calibrating


@dataclass
class LayerInputs:
    """The hidden states entering decoder layer 0, and the keyword arguments every layer receives."""

    hidden: torch.Tensor  # (n, t, D)
    kwargs: list[dict] = field(default_factory=list)  # per layer: masks, rotary tables, position ids


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer `index` while `capture_layer_inputs` runs: records, passes through."""

    def __init__(self, layer: nn.Module, index: int, captured: LayerInputs) -> None:
        super().__init__()
        self.index, self.captured = index, captured
        if hasattr(layer, "attention_type"):  # some decoders pick the layer's mask by this attribute
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("capture_layer_inputs expects decoder layers called as layer(hidden, **kwargs).")
        if self.index == 0:
            self.captured.hidden = hidden_states.detach().clone()
        kw = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        self.captured.kwargs[self.index] = {**kw, "use_cache": False}
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> LayerInputs:
    """Run the decoder once with every layer replaced by a recorder that passes its input through.

    The masks and rotary tables (sliding vs full attention) are built before the layer loop, so no layer
    computes anything here; the LM head is not run either (its logits cost 1 GiB per 1024 tokens of Gemma 3).
    """
    inner = decoder(model)
    layers = inner.layers
    captured = LayerInputs(hidden=torch.empty(0), kwargs=[{}] * len(layers))
    inner.layers = nn.ModuleList(_LayerRecorder(layer, i, captured) for i, layer in enumerate(layers))
    try:
        inner(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        inner.layers = layers
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, chunk: int = 8) -> torch.Tensor:
    """One decoder layer on (n, t, D) hidden states, `chunk` sequences at a time: -> (n, t, D)."""
    outs = []
    for s in range(0, hidden.shape[0], chunk):
        kw = {k: (_slice_batch(v, s, chunk, hidden.shape[0])) for k, v in kwargs.items()}
        out = layer(hidden[s : s + chunk], **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def _slice_batch(value, start: int, chunk: int, batch: int):
    """Cut the batch dimension of a tensor kwarg (masks) to match a chunk; leave the rest alone."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch and batch > 1:
        return value[start : start + chunk]
    if isinstance(value, tuple):
        return tuple(_slice_batch(v, start, chunk, batch) for v in value)
    return value
