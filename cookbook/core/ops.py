"""The model's arithmetic that is not a weight: rotary positions, attention masks, attention, soft-capping.

Shapes: b batch, t query tokens, s key tokens, h query heads, g KV heads, d head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import SUPPORTED, LayoutError

# ---------------------------------------------------------------- rotary positions


def rope_parameters(config, layer_type: str) -> dict:
    """The RoPE settings of a layer type: Gemma 3 keys them by layer type (theta 10k local, 1M global),
    other families have one set."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params = dict(params.get(layer_type, params))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def rope_frequencies(config, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d/2,) and the output scaling of a layer type's rotary embedding, in float32.

    The original RoPE is computed here; a scaled variant (linear, llama3, yarn) comes from the function
    transformers defines for it, so a Llama 3 or a long-context Gemma gets its own frequencies. The model's
    rotary buffers are not read: `model.to(torch.bfloat16)` rounds them."""
    params = rope_parameters(config, layer_type)
    kind = params["rope_type"]
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise LayoutError("This model rotates only part of each head (partial_rotary_factor); the core's RoPE "
                          f"rotates whole heads. Supported: {SUPPORTED}.")
    if kind == "default":
        d = config.head_dim
        return 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
    if kind in ("dynamic", "longrope"):
        raise LayoutError(f"RoPE type {kind!r} changes with the sequence length; the core supports the fixed "
                          "types (default, linear, llama3, yarn).")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    layer_key = layer_type if layer_type in (getattr(config, "rope_parameters", None) or {}) else None
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, None, layer_type=layer_key)
    return inv_freq.float(), float(scaling)


def rope_cos_sin(config, layer_type: str, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and sin for `positions` (..., t): each (..., t, d)."""
    inv_freq, scaling = rope_frequencies(config, layer_type)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (..., t, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., t, d)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, heads, t, d) by position: the 'rotate half' convention of Gemma, Llama, Mistral and Qwen."""
    x1, x2 = x.chunk(2, dim=-1)  # (b, heads, t, d/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---------------------------------------------------------------- masks


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query may see a key: causal, within `window` tokens on sliding layers, never padding.

    q_pos (t,) and k_pos (s,) give a (t, s) mask; batched positions (b, t) and (b, s) give (b, t, s).
    A position of -1 marks padding (left-padded batches): nothing sees it. Built from comparisons of broadcast
    positions, so it holds at most two (t, s) bool tensors at once (no (t, s) integer difference)."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]  # (..., t, 1), (..., 1, s)
    allowed = k <= q  # (..., t, s)
    allowed &= k >= 0  # padding keys: (..., 1, s), applied in place
    if window is not None:
        allowed &= k > q - window  # within the window: key > query - window
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one: 0 where allowed, the dtype's most negative number elsewhere. Unlike
    -inf, this keeps a fully masked row (a padding query) finite; its output is discarded anyway."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------- attention and soft-caps


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): bounds logits smoothly to (-cap, cap); the identity when cap is None."""
    return torch.tanh(x / cap) * cap if cap is not None else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              cap: float | None = None, fused: bool = True) -> torch.Tensor:
    """Grouped-query attention: q (b, h, t, d), k/v (b, g, s, d) -> (b, h, t, d).

    `mask` broadcasts to (b, h, t, s): bool (True = may attend) or additive float. The fused path is PyTorch's
    scaled_dot_product_attention; the manual path beside it does the same math step by step (and is the
    only one that supports logit soft-capping, which Gemma 2 uses).
    """
    if fused and cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (b, h, s, d)
    v = v.repeat_interleave(rep, dim=1)  # (b, h, s, d)
    scores = softcap((q @ k.transpose(-2, -1)) * scale, cap)  # (b, h, t, s)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (b, h, t, s)
    return probs @ v  # (b, h, t, d)
