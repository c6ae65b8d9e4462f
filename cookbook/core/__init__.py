"""The model core: the one home of the decoder's internals that every technique module builds on.

- `layout`: the supported layout (Gemma 2/3, Llama, Mistral, Qwen 2/3), its one error type, layers, linears,
  layer types and windows, layer subsets;
- `ops`: rotary positions, attention masks, attention, soft-capping;
- `cache`: the KV cache (float and int8) and its sizes;
- `forward`: the decoder forward pass, for uniform, ragged (padded) and packed batches;
- `capture`: the inputs each decoder layer receives, for calibration and layer-by-layer work.
"""

from .cache import Int8KVCache, KVCache, dynamic_cache_bytes, kv_cache_bytes_per_token
from .capture import LayerInputs, capture_layer_inputs, run_layer
from .forward import (StepContext, decoder_layer, final_logits, forward, forward_packed, forward_tokens,
                      run_layers, softcap_logits, step_context)
from .layout import (LINEAR_NAMES, SUPPORTED, Layout, LayoutError, check_model, decoder, decoder_layers,
                     decoder_linears, layer_types, layer_window, layer_windows, linear_key,
                     split_linear_key)
from .ops import apply_rope, attention, attention_mask, rope_cos_sin, softcap

__all__ = [
    "Int8KVCache", "KVCache", "dynamic_cache_bytes", "kv_cache_bytes_per_token",
    "LayerInputs", "capture_layer_inputs", "run_layer",
    "StepContext", "decoder_layer", "final_logits", "forward", "forward_packed", "forward_tokens", "run_layers",
    "softcap_logits", "step_context",
    "LINEAR_NAMES", "SUPPORTED", "Layout", "LayoutError", "check_model", "decoder", "decoder_layers",
    "decoder_linears", "layer_types", "layer_window", "layer_windows", "linear_key", "split_linear_key",
    "apply_rope", "attention", "attention_mask", "rope_cos_sin", "softcap",
]
