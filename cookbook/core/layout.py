"""The layout the core supports, and how to find its parts: decoder layers, their linears, layer types.

Supported: a Hugging Face decoder-only causal LM laid out as `model.model.{embed_tokens, layers, norm}` plus
`model.lm_head`, each layer holding `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` (Gemma 2/3, Llama,
Mistral, Qwen 2/3 and their fine-tunes). Anything else gets a `LayoutError` that says so.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

SUPPORTED = ("a Hugging Face decoder-only causal LM with model.model.embed_tokens, model.model.layers, "
             "model.model.norm and model.lm_head, and self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj in "
             "every layer (Gemma 2/3, Llama, Mistral, Qwen 2/3)")

# The linears of one decoder layer, as paths inside the layer (`layer.get_submodule(path)`).
LINEAR_NAMES: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


class LayoutError(TypeError):
    """A model the core cannot read: the message names what it found and what is supported."""


@dataclass(frozen=True)
class Layout:
    """What differs between the supported families, read once from the model.

    sandwich_norms: Gemma's extra norms after attention and after the MLP (Llama-style layers have only the two
    pre-norms); qk_norm: RMSNorm on each query and key head (Gemma 3, Qwen 3); windows: each layer's sliding
    window (None = global); the two soft-caps are None where the family has none."""

    sandwich_norms: bool
    qk_norm: bool
    layer_types: tuple[str, ...]
    windows: tuple[int | None, ...]
    attn_softcap: float | None
    final_softcap: float | None


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack `model.model`, after checking the layout around it."""
    inner = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm") if not hasattr(inner, a)]
    if inner is None or missing or not hasattr(model, "lm_head"):
        raise LayoutError(f"{type(model).__name__} is not laid out as the cookbook expects: need {SUPPORTED}.")
    if not isinstance(inner.layers, nn.ModuleList) or len(inner.layers) == 0:
        raise LayoutError(f"{type(model).__name__}.model.layers must be a non-empty nn.ModuleList; need {SUPPORTED}.")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (`model.model.layers`)."""
    return decoder(model).layers


def check_model(model: nn.Module) -> Layout:
    """The model's `Layout`, or a `LayoutError` naming the part that does not fit."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        for path in ("input_layernorm", "post_attention_layernorm", *LINEAR_NAMES):
            try:
                layer.get_submodule(path)
            except AttributeError:
                raise LayoutError(f"Layer {i} of {type(model).__name__} has no `{path}`; need {SUPPORTED}.") from None
    config = model.config
    first = layers[0]
    return Layout(sandwich_norms=hasattr(first, "pre_feedforward_layernorm"),
                  qk_norm=hasattr(first.self_attn, "q_norm"),
                  layer_types=tuple(layer_types(config)), windows=tuple(layer_windows(config)),
                  attn_softcap=getattr(config, "attn_logit_softcapping", None),
                  final_softcap=getattr(config, "final_logit_softcapping", None))


def cached_layout(model: nn.Module) -> Layout:
    """`check_model` once per decoder stack: the forward passes call this every step, so the full walk over
    every layer's parts (~0.7 ms for Gemma 3 270M) runs again only when the layer list itself is replaced."""
    key = (id(decoder_layers(model)), len(decoder_layers(model)))
    cached = model.__dict__.get("_cookbook_layout")  # not a submodule or buffer: stored beside them
    if cached is None or cached[0] != key:
        cached = model.__dict__["_cookbook_layout"] = (key, check_model(model))
    return cached[1]


def layer_types(config) -> list[str]:
    """Each layer's attention type: the config's `layer_types`, or one type for all layers (sliding where the
    config sets a window for every layer, as Mistral does)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    everywhere = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [everywhere] * config.num_hidden_layers


def layer_window(config, layer_type: str) -> int | None:
    """How many recent tokens a layer of this type attends to: the sliding window, or None (global)."""
    return config.sliding_window if layer_type == "sliding_attention" else None


def layer_windows(config) -> list[int | None]:
    """Each layer's window: `sliding_window` on sliding layers, None on global ones."""
    return [layer_window(config, t) for t in layer_types(config)]


def linear_key(layer: int, path: str) -> str:
    """The dotted name of a decoder linear from the model's root, as `model.get_submodule` takes it."""
    return f"model.layers.{layer}.{path}"


def split_linear_key(name: str) -> tuple[int, str]:
    """The inverse of `linear_key`: 'model.layers.3.mlp.up_proj' -> (3, 'mlp.up_proj')."""
    _, _, layer, path = name.split(".", 3)
    return int(layer), path


def decoder_linears(model: nn.Module, layers: Iterable[int] | None = None) -> dict[str, nn.Linear]:
    """Every decoder linear the techniques act on (no embedding, no LM head), keyed by `linear_key`.

    Only real `nn.Linear`s are returned: a layer already swapped for a quantized module is left out."""
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else list(layers)
    out = {}
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"Layer index {i} out of range: the model has {len(blocks)} decoder layers.")
        for path in LINEAR_NAMES:
            try:
                module = blocks[i].get_submodule(path)
            except AttributeError:
                raise LayoutError(f"Layer {i} has no `{path}`; need {SUPPORTED}.") from None
            if isinstance(module, nn.Linear):
                out[linear_key(i, path)] = module
    return out


def renumber(layer: nn.Module, index: int) -> nn.Module:
    """Give a decoder layer its new position (the caches are indexed by `layer_idx`). Returns the layer."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index
    return layer


def set_layers(model: nn.Module, layers: Sequence[nn.Module], types: Sequence[str]) -> None:
    """Install `layers` (with their attention `types`) as the model's decoder: renumbered, and the config's
    layer count and layer types kept in step (the decoder's own config too, where it has a separate one)."""
    if len(layers) != len(types) or not layers:
        raise ValueError(f"Need one attention type per layer and at least one layer; got {len(layers)} layers "
                         f"and {len(types)} types.")
    inner = decoder(model)
    inner.layers = nn.ModuleList(renumber(layer, i) for i, layer in enumerate(layers))
    for config in {id(c): c for c in (model.config, getattr(inner, "config", model.config))}.values():
        config.num_hidden_layers = len(layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(types)


def subset_config(config, keep: Sequence[int]):
    """A copy of `config` for a model made of layers `keep` (in that order): layer count and types follow."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        out.layer_types = [config.layer_types[i] for i in keep]
    return out
