"""Decoding from scratch: a Gemma 3 forward pass with our own preallocated KV cache, an int8 KV cache,
confidence-based early exit, and speculative decoding (greedy and rejection sampling).

Everything here reuses the weights of a transformers `Gemma3ForCausalLM` (embedding, norms, projections,
MLP, tied head) but owns the parts that decoding is about: rotary positions, the attention masks (causal
and sliding window), the cache, and the loops. Shapes: b batch, t new tokens, s cached + new tokens,
h query heads, g KV heads, d head_dim, D hidden size, V vocabulary.
"""

from __future__ import annotations

import copy
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


# ---------------------------------------------------------------- early exit


@dataclass
class EarlyExitResult:
    """Per token: the layer whose output produced it (num_layers = no early exit) and its logits' argmax."""

    exit_layers: list[int]
    tokens: list[int]
    nll: list[float]
    times_s: list[float]


def _check_exit_layers(exit_layers: list[int], num_layers: int, threshold: float) -> None:
    if any(not 1 <= e < num_layers for e in exit_layers):
        raise ValueError(f"exit_layers must be layer counts in [1, {num_layers - 1}] (exit after that many "
                         f"layers; [] = never exit), got {exit_layers}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a max softmax probability in (0, 1], got {threshold}.")


@torch.no_grad()
def early_exit_step(model, token: torch.Tensor, cache: KVCache, exit_layers: list[int],
                    threshold: float) -> tuple[torch.Tensor, int]:
    """One decoding step that may stop after any layer count in `exit_layers`: token (1, 1) -> logits (V,), layers run.

    After each exit point the hidden state goes through the shared final norm and tied head; if the top
    probability reaches `threshold`, the token exits. The layers it skipped still need its K and V for later
    tokens: we compute them from the exited hidden state (state copying, as in CALM), which costs only the
    K/V projections of the skipped layers.
    """
    layers, types = model.model.layers, _layer_types(model.config)
    _check_exit_layers(exit_layers, len(layers), threshold)
    x = model.model.embed_tokens(token)  # (1, 1, D)
    ctx = step_context(model.config, cache.length, 1, x.device, x.dtype)
    for i, layer in enumerate(layers):
        x = decoder_layer(layer, x, ctx, types[i], cache, i)
        if i + 1 in exit_layers:
            logits = _final_logits(model, model.model.norm(x))[0, -1]  # (V,)
            if torch.softmax(logits.float(), dim=-1).max() >= threshold:
                for j in range(i + 1, len(layers)):  # fill the skipped layers' cache from the exited state
                    cos, sin = ctx.rope[types[j]]
                    k, v = project_kv(layers[j].self_attn, layers[j].input_layernorm(x), cos, sin)
                    cache.write(j, k, v)
                cache.advance(1)
                return logits, i + 1
    cache.advance(1)
    return _final_logits(model, model.model.norm(x))[0, -1], len(layers)


@torch.no_grad()
def early_exit_teacher_forced(model, ids: torch.Tensor, exit_layers: list[int], threshold: float,
                              prefix: int = 1) -> EarlyExitResult:
    """Score ids (1, t) token by token with early exit: the first `prefix` tokens are prefilled in full,
    then each step feeds the true next token, records its exit layer, NLL of the following true token, and time."""
    _check_prompt(ids, 1)
    if not 1 <= prefix < ids.shape[1]:
        raise ValueError(f"prefix must be in [1, {ids.shape[1] - 1}], got {prefix}.")
    cache = KVCache.allocate(model.config, ids.shape[1], dtype=model.dtype, device=ids.device)
    if prefix > 1:
        forward(model, ids[:, : prefix - 1], cache)
    result, start = EarlyExitResult([], [], [], []), time.perf_counter()
    for pos in range(prefix - 1, ids.shape[1] - 1):
        logits, used = early_exit_step(model, ids[:, pos:pos + 1], cache, exit_layers, threshold)
        result.exit_layers.append(used)
        result.tokens.append(int(logits.argmax()))
        result.nll.append(F.cross_entropy(logits.float()[None], ids[0, pos + 1:pos + 2]).item())
        result.times_s.append(time.perf_counter() - start)
    return result


# ---------------------------------------------------------------- speculative decoding


def truncated_draft(model, num_layers: int):
    """A draft model made of the first `num_layers` blocks of `model` plus its final norm and tied head.

    Nothing is copied: the draft shares every weight with the target, so it costs no memory. It is a
    real `Gemma3ForCausalLM`-class object, so transformers' assisted generation accepts it too.
    """
    _check_model(model)
    total = len(model.model.layers)
    if not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be in [1, {total - 1}] for a {total}-layer model, got {num_layers}.")
    return layer_subset_draft(model, list(range(num_layers)))


def layer_subset_draft(model, keep: list[int]):
    """A draft that runs only the blocks listed in `keep` (in order), sharing all weights with `model`.

    Skipping middle layers (self-speculative decoding, Zhang et al. 2023) keeps the last layers that map the
    residual stream onto the head. Only a prefix (`truncated_draft`) also works in transformers' assisted
    generation, whose cache indexes layers by their original number; our loops index by position.
    """
    _check_model(model)
    total = len(model.model.layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= total or len(keep) == total:
        raise ValueError(f"keep must be a strictly increasing, proper subset of range({total}), got {keep}.")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    draft = copy.copy(model)  # shallow: shares every submodule, then we swap the few that differ
    draft._modules = dict(model._modules)
    draft.model = copy.copy(model.model)
    draft.model._modules = dict(model.model._modules)
    draft.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    draft.config = draft.model.config = config
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft


def check_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ValueError unless draft and target share a vocabulary (and, if given, the same tokenizer)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"Draft and target vocabularies differ ({dv} vs {tv} tokens): speculative decoding "
                         "here needs a draft with the target's tokenizer (token ids must mean the same text).")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise ValueError("Pass both tokenizers (target_tokenizer and draft_tokenizer) or neither.")
    if target_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("Draft and target tokenizers map tokens to different ids: use a draft trained with the "
                         "target's tokenizer (or transformers' universal assisted generation for different ones).")


@dataclass
class SpeculativeResult:
    """Generated tokens, how many draft tokens were proposed and accepted, target passes, and the time."""

    tokens: list[int]
    proposed: int
    accepted: int
    target_passes: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_pass(self) -> float:
        return len(self.tokens) / max(self.target_passes, 1)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling's accept/reject rule (Leviathan et al. 2023; Chen et al. 2023).

    p (k + 1, V): target probabilities at each draft position plus one more; q (k, V): the draft's;
    draft_tokens (k,) sampled from q. Draft token i is kept with probability min(1, p_i(x) / q_i(x)); at the
    first rejection we sample from the residual max(p_i - q_i, 0) (normalized) and stop; if all k are kept we
    add a token sampled from p_k. The returned tokens are distributed exactly as sampling from p directly.
    """
    k = draft_tokens.shape[0]
    if p.shape[0] != k + 1 or q.shape[0] != k or p.shape[1] != q.shape[1]:
        raise ValueError(f"Need p (k+1, V) and q (k, V) for k={k} draft tokens, got {tuple(p.shape)}, {tuple(q.shape)}.")
    out: list[int] = []
    for i in range(k):
        x = int(draft_tokens[i])
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, x] <= p[i, x]:  # accept with probability min(1, p/q)
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # (V,)
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(target, draft, prompt_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, generator: torch.Generator | None = None,
                         target_tokenizer=None, draft_tokenizer=None,
                         stop_token_id: int | None = None) -> SpeculativeResult:
    """Speculative decoding with any draft that shares the target's tokenizer.

    Each round the draft proposes k tokens one by one (its own cache), the target scores the last accepted
    token plus all k proposals in ONE pass, and we keep the longest agreeing prefix plus one target token.
    temperature 0 is greedy: the output is token for token the target's greedy output. temperature > 0
    uses `rejection_sample`, so the output follows the target's sampling distribution.
    """
    _check_prompt(prompt_ids, max_new_tokens)
    _check_model(target)
    _check_model(draft)
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    check_compatible(target, draft, target_tokenizer, draft_tokenizer)
    start = time.perf_counter()
    capacity = prompt_ids.shape[1] + max_new_tokens + k + 1
    t_cache = KVCache.allocate(target.config, capacity, dtype=target.dtype, device=prompt_ids.device)
    d_cache = KVCache.allocate(draft.config, capacity, dtype=draft.dtype, device=prompt_ids.device)
    seq = prompt_ids[0].tolist()
    # invariant: both caches hold seq[:-1] (the draft may lag behind; it catches up from `seq`)
    if len(seq) > 1:
        forward(target, prompt_ids[:, :-1], t_cache)
    new: list[int] = []
    proposed = accepted = passes = 0
    while len(new) < max_new_tokens:
        drafted, q_rows = [], []
        pending = prompt_ids.new_tensor([seq[d_cache.length:]])  # (1, p): tokens the draft has not seen
        for _ in range(k):
            d_logits = forward(draft, pending, d_cache, last_only=True)[0, -1]  # (V,)
            tok = _pick(d_logits, temperature, q_rows, generator)
            drafted.append(tok)
            pending = prompt_ids.new_tensor([[tok]])
        block = prompt_ids.new_tensor([[seq[-1], *drafted]])  # (1, k + 1)
        base = t_cache.length
        t_logits = forward(target, block, t_cache)[0]  # (k + 1, V): one verification pass
        passes += 1
        kept = _verify(t_logits, drafted, q_rows, temperature, generator)
        n_ok = len(kept) - 1  # every kept token but the last is an accepted draft
        proposed, accepted = proposed + k, accepted + n_ok
        seq += kept
        new += kept
        t_cache.crop(base + 1 + n_ok)  # keep seq[-1] and the accepted drafts
        d_cache.crop(min(d_cache.length, len(seq) - 1))
        if stop_token_id is not None and stop_token_id in kept:
            new = new[: new.index(stop_token_id) + 1]
            break
    return SpeculativeResult(new[:max_new_tokens], proposed, accepted, passes, time.perf_counter() - start)


def _pick(logits: torch.Tensor, temperature: float, q_rows: list[torch.Tensor],
          generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    q = _probs(logits, temperature)  # (V,)
    q_rows.append(q)
    return int(torch.multinomial(q, 1, generator=generator))


def _verify(t_logits: torch.Tensor, drafted: list[int], q_rows: list[torch.Tensor], temperature: float,
            generator: torch.Generator | None) -> list[int]:
    """The tokens this round adds: accepted drafts, then the target's correction or bonus token."""
    if temperature == 0:
        greedy = t_logits.argmax(dim=-1).tolist()  # (k + 1,)
        out = []
        for i, tok in enumerate(drafted):
            if tok != greedy[i]:
                return out + [greedy[i]]
            out.append(tok)
        return out + [greedy[len(drafted)]]
    p = _probs(t_logits, temperature)  # (k + 1, V)
    return rejection_sample(p, torch.stack(q_rows), torch.tensor(drafted), generator)


def expected_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected speedup: tokens per round (1 - a^(k+1)) / (1 - a) over cost (k c + 1).

    acceptance a: chance each draft token is accepted (assumed independent); cost_ratio c: one draft pass
    over one target pass. The target's verification pass is assumed to cost one decoding step.
    """
    if not 0 <= acceptance <= 1 or k < 1 or cost_ratio < 0:
        raise ValueError("Need 0 <= acceptance <= 1, k >= 1 and cost_ratio >= 0.")
    tokens = k + 1 if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (k * cost_ratio + 1)
