"""Decoding from scratch: a Gemma 3 forward pass with our own preallocated KV cache, an int8 KV cache,
and the generation loops. Early exit (`cookbook.early_exit`) and speculative decoding (`cookbook.speculative`) run
these layers too.

Everything here reuses the weights of a transformers `Gemma3ForCausalLM` (embedding, norms, projections,
MLP, tied head) but owns the parts that decoding is about: rotary positions, the attention masks (causal
and sliding window), the cache, and the loops. Shapes: b batch, t new tokens, s cached + new tokens,
h query heads, g KV heads, d head_dim, D hidden size, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- the caches


def _cache_shape(config, max_len: int, batch: int) -> tuple[int, int, int, int]:
    """Shape of one layer's K (or V) buffer, (batch, kv_heads, max_len, head_dim), after checking the sizes."""
    if max_len < 1 or batch < 1:
        raise ValueError(f"KVCache needs max_len >= 1 and batch >= 1, got max_len={max_len}, batch={batch}.")
    return (batch, config.num_key_value_heads, max_len, config.head_dim)


@dataclass
class KVCache:
    """A preallocated float KV cache: one (b, g, max_len, d) buffer for K and one for V per layer.

    `length` tokens are valid. A forward pass writes its t new tokens at [length, length + t) in every
    layer, then calls `advance(t)`; `crop(n)` forgets everything after the first n tokens (a rejected
    speculative draft), which costs nothing because the buffers stay allocated.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config, max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> KVCache:
        """Buffers for `max_len` tokens in each of the config's layers."""
        shape = _cache_shape(config, max_len, batch)  # (b, g, max_len, d)
        n = config.num_hidden_layers
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)])

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, g, t, d) after the valid tokens; return all keys and values (b, g, length + t, d)."""
        end = self._check_room(k.shape[2])
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (b, g, t, d) at positions pos (t,) and return the whole buffers (b, g, max_len, d): the
        static-shape write a compiled step needs (`fast_decoding`); the caller masks the positions not yet valid."""
        self.keys[layer].index_copy_(2, pos, k)
        self.values[layer].index_copy_(2, pos, v)
        return self.keys[layer], self.values[layer]

    def _check_room(self, t: int) -> int:
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: it holds {self.max_len} tokens, {self.length} are used and "
                             f"{t} more were written. Allocate it with a larger max_len.")
        return end

    def advance(self, t: int) -> None:
        self.length += t

    def crop(self, n: int) -> None:
        """Keep only the first n tokens (n <= length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"crop({n}) needs 0 <= n <= length={self.length}.")
        self.length = n

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated for max_len, whatever `length` is)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def quantize_int8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 with one scale per (batch, head, token): x (b, g, t, d) -> q int8, scale (b, g, t, 1)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0  # (b, g, t, 1)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)  # (b, g, t, d)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 (..., d) times its scale (..., 1) back to `dtype`."""
    return q.to(dtype) * scale.to(dtype)


@dataclass
class Int8KVCache(KVCache):
    """The same cache with K and V stored as int8, one float16 scale per head and token (per-head quantization).

    Each head vector of 256 values costs 256 bytes + a 2-byte scale instead of 1024 bytes in float32.
    Reads dequantize the valid prefix, so attention itself still runs in float.
    """

    key_scales: list[torch.Tensor] = field(default_factory=list)
    value_scales: list[torch.Tensor] = field(default_factory=list)
    compute_dtype: torch.dtype = torch.float32

    @classmethod
    def allocate(cls, config, max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Int8KVCache:
        """int8 buffers for `max_len` tokens; `dtype` is the dtype that reads return."""
        shape = _cache_shape(config, max_len, batch)  # (b, g, max_len, d)
        n = config.num_hidden_layers

        def buffers(dt: torch.dtype, last: int) -> list[torch.Tensor]:
            return [torch.zeros((*shape[:3], last), dtype=dt, device=device) for _ in range(n)]

        return cls(buffers(torch.int8, shape[3]), buffers(torch.int8, shape[3]), 0,
                   buffers(torch.float16, 1), buffers(torch.float16, 1), dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store k, v (b, g, t, d); return the dequantized keys and values (b, g, length + t, d)."""
        end = self._check_room(k.shape[2])
        for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            q, scale = quantize_int8_per_head(x)
            store[layer][:, :, self.length:end] = q
            scales[layer][:, :, self.length:end] = scale.to(torch.float16)
        k_all = dequantize_int8(self.keys[layer][:, :, :end], self.key_scales[layer][:, :, :end], self.compute_dtype)
        v_all = dequantize_int8(self.values[layer][:, :, :end], self.value_scales[layer][:, :, :end],
                                self.compute_dtype)
        return k_all, v_all  # (b, g, length + t, d) each

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise ValueError("The int8 cache has no static-shape write (its reads dequantize the valid prefix); "
                         "compiled decoding (fast_decoding.StaticDecoder) uses the float KVCache.")

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in (*self.key_scales, *self.value_scales))


def dynamic_cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a transformers `DynamicCache` holds (v5 API: `cache.layers[i].keys/values`)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- the forward pass


def _layer_types(config) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def _rope_theta(config, layer_type: str) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params)  # Gemma 3 keys them by layer type
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_cos_sin(config, layer_type: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rotary cos and sin for `positions` (t,): each (t, d). Gemma 3 uses theta 10k on local, 1M on global layers."""
    d = config.head_dim
    inv_freq = 1.0 / (_rope_theta(config, layer_type) ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (t, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (t, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, heads, t, d) by position: the 'rotate half' convention of Gemma/Llama."""
    x1, x2 = x.chunk(2, dim=-1)  # (b, heads, t, d/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where query i may see key j: causal, and within `window` tokens on sliding layers. (t, s) bool."""
    diff = q_pos[:, None] - k_pos[None, :]  # (t, s)
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              softcap: float | None = None, fused: bool = True) -> torch.Tensor:
    """Grouped-query attention: q (b, h, t, d), k/v (b, g, s, d) -> (b, h, t, d).

    `mask` broadcasts to (b, h, t, s): bool (True = may attend) or additive float (0 or a large negative
    number, which keeps fully-masked padding rows finite). The fused path is PyTorch's
    scaled_dot_product_attention; the manual path beside it does the same math step by step (and is the
    only one that supports logit soft-capping).
    """
    if fused and softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (b, h, s, d)
    v = v.repeat_interleave(rep, dim=1)  # (b, h, s, d)
    scores = (q @ k.transpose(-2, -1)) * scale  # (b, h, t, s)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (b, h, t, s)
    return probs @ v  # (b, h, t, d)


@dataclass
class StepContext:
    """What every layer of one forward pass shares: positions, rotary tables and masks per layer type."""

    positions: torch.Tensor  # (t,)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor | None]
    write_pos: torch.Tensor | None = None  # (t,): write K/V at these positions of a static cache (cache.write_at)


def layer_window(config, layer_type: str) -> int | None:
    """How many recent tokens a layer of this type attends to: the sliding window, or None (global)."""
    return config.sliding_window if layer_type == "sliding_attention" else None


def step_context(config, start: int, t: int, device: torch.device, dtype: torch.dtype) -> StepContext:
    """Rotary tables and masks for t new tokens at positions [start, start + t) over keys [0, start + t)."""
    q_pos = torch.arange(start, start + t, device=device)  # (t,)
    k_pos = torch.arange(start + t, device=device)  # (s,)
    rope, masks = {}, {}
    for layer_type in set(_layer_types(config)):
        rope[layer_type] = rope_cos_sin(config, layer_type, q_pos, dtype)
        window = layer_window(config, layer_type)
        needs_mask = t > 1 or (window is not None and start + t > window)
        masks[layer_type] = attention_mask(q_pos, k_pos, window) if needs_mask else None
    return StepContext(q_pos, rope, masks)


def project_kv(attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys and values of normalized hidden states h (b, t, D): each (b, g, t, d), keys normed and rotated."""
    b, t, _ = h.shape
    k = attn.k_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)  # (b, g, t, d)
    v = attn.v_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)  # (b, g, t, d)
    return apply_rope(attn.k_norm(k), cos, sin), v


def attention_block(attn: nn.Module, h: torch.Tensor, ctx: StepContext, layer_type: str,
                    cache: KVCache | None, layer: int, fused: bool = True) -> torch.Tensor:
    """Gemma 3 self-attention of h (b, t, D) with q/k RMSNorm, RoPE, GQA and our cache -> (b, t, D)."""
    b, t, _ = h.shape
    cos, sin = ctx.rope[layer_type]
    q = attn.q_proj(h).view(b, t, -1, attn.head_dim).transpose(1, 2)  # (b, h, t, d)
    q = apply_rope(attn.q_norm(q), cos, sin)
    k, v = project_kv(attn, h, cos, sin)  # (b, g, t, d)
    if cache is not None and ctx.write_pos is not None:
        k, v = cache.write_at(layer, ctx.write_pos, k, v)  # (b, g, max_len, d), masked by position
    elif cache is not None:
        k, v = cache.write(layer, k, v)  # (b, g, s, d)
    mask = ctx.masks[layer_type]
    if cache is None and mask is not None:
        mask = mask[:, -t:]  # no cache: the keys are only the t new tokens
    softcap = getattr(attn.config, "attn_logit_softcapping", None)
    out = attention(q, k, v, mask, attn.scaling, softcap, fused)  # (b, h, t, d)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (b, t, D)


def decoder_layer(layer: nn.Module, x: torch.Tensor, ctx: StepContext, layer_type: str,
                  cache: KVCache | None, index: int, fused: bool = True) -> torch.Tensor:
    """One Gemma 3 block: sandwich norms around attention and around the GELU-tanh MLP. (b, t, D) -> (b, t, D)."""
    h = attention_block(layer.self_attn, layer.input_layernorm(x), ctx, layer_type, cache, index, fused)
    return mlp_residual(layer, x + layer.post_attention_layernorm(h))


def mlp_residual(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second half of a Gemma 3 block: x + post_norm(MLP(pre_norm(x))). (b, t, D) -> (b, t, D)."""
    return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))


def _check_model(model) -> None:
    if not (hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head")):
        raise TypeError(f"Expected a Gemma 3 style causal LM (model.model.layers, model.lm_head), "
                        f"got {type(model).__name__}.")


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input ids must be a non-empty integer tensor of shape (batch, tokens), "
                         f"got shape {tuple(ids.shape)} and dtype {ids.dtype}.")


@torch.no_grad()
def forward(model, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
            fused: bool = True) -> torch.Tensor:
    """Logits of our own forward pass: ids (b, t) -> (b, t, V), or (b, 1, V) with `last_only`.

    With a cache, the t tokens sit at positions [cache.length, cache.length + t) and attend to the cached
    tokens; the cache then advances by t. Without one, the t tokens are the whole sequence.
    """
    _check_model(model)
    _check_ids(ids)
    config = model.config
    start = cache.length if cache is not None else 0
    x = model.model.embed_tokens(ids)  # (b, t, D), scaled by sqrt(D) inside Gemma's embedding
    ctx = step_context(config, start, ids.shape[1], x.device, x.dtype)
    for i, (layer, layer_type) in enumerate(zip(model.model.layers, _layer_types(config))):
        x = decoder_layer(layer, x, ctx, layer_type, cache, i, fused)
    if cache is not None:
        cache.advance(ids.shape[1])
    x = model.model.norm(x[:, -1:] if last_only else x)  # (b, t or 1, D)
    return _final_logits(model, x)


def _final_logits(model, x: torch.Tensor) -> torch.Tensor:
    return softcap_logits(model, model.lm_head(x))  # (b, t, V)


def softcap_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """The final logit soft-capping of the config (cap * tanh(logits / cap)), if it has one."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


# ---------------------------------------------------------------- generation loops


@dataclass
class Generation:
    """New token ids (n,) and the wall-clock time after each of them (seconds since the loop started)."""

    tokens: list[int]
    times_s: list[float]

    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.times_s[-1]

    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time they took: decode alone, without the prompt's pass."""
        if len(self.tokens) < 2:
            raise ValueError("decode speed needs at least 2 generated tokens (the first one comes from the prompt).")
        return (len(self.tokens) - 1) / (self.times_s[-1] - self.times_s[0])


def _check_prompt(prompt_ids: torch.Tensor, max_new_tokens: int) -> None:
    _check_ids(prompt_ids)
    if prompt_ids.shape[0] != 1:
        raise ValueError(f"These decoding loops handle one sequence (batch 1), got batch {prompt_ids.shape[0]}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")


def _stop(token: int, stop_token_id: int | None) -> bool:
    return stop_token_id is not None and token == stop_token_id


@torch.no_grad()
def generate_no_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                      stop_token_id: int | None = None) -> Generation:
    """Greedy decoding that re-runs the whole sequence for every new token (the cost a cache removes)."""
    _check_prompt(prompt_ids, max_new_tokens)
    ids, tokens, times, start = prompt_ids, [], [], time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = int(forward(model, ids, None, last_only=True)[0, -1].argmax())
        tokens.append(nxt)
        times.append(time.perf_counter() - start)
        if _stop(nxt, stop_token_id):
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)  # (1, t + 1)
    return Generation(tokens, times)


@torch.no_grad()
def generate_with_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int, cache_cls: type[KVCache] = KVCache,
                        stop_token_id: int | None = None) -> tuple[Generation, KVCache]:
    """Greedy decoding with our preallocated cache: one prefill pass, then one token per pass."""
    _check_prompt(prompt_ids, max_new_tokens)
    start = time.perf_counter()
    cache = cache_cls.allocate(model.config, prompt_ids.shape[1] + max_new_tokens,
                               dtype=model.dtype, device=prompt_ids.device)
    logits = forward(model, prompt_ids, cache, last_only=True)  # (1, 1, V)
    tokens, times = [], []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        tokens.append(nxt)
        times.append(time.perf_counter() - start)
        if _stop(nxt, stop_token_id) or len(tokens) == max_new_tokens:
            break
        logits = forward(model, prompt_ids.new_tensor([[nxt]]), cache, last_only=True)
    return Generation(tokens, times), cache


@torch.no_grad()
def teacher_forced_logits(model, ids: torch.Tensor, cache_cls: type[KVCache] = KVCache) -> torch.Tensor:
    """Logits for every position of ids (1, t) computed in one pass through a fresh cache of `cache_cls`.

    With Int8KVCache each token's keys and values are quantized before any query reads them, so this
    scores a text exactly as decoding with that cache would see it.
    """
    cache = cache_cls.allocate(model.config, ids.shape[1], dtype=model.dtype, device=ids.device)
    return forward(model, ids, cache)  # (1, t, V)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def nll_of_logits(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean negative log-likelihood of ids[:, 1:] under logits[:, :-1]: logits (1, t, V), ids (1, t)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
