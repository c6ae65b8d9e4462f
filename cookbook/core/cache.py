"""The KV cache: one design for generation, speculative decoding, early exit, compiled decoding and serving.

`KVCache` keeps one (b, g, capacity, d) buffer for K and one for V per layer, `length` valid tokens in each.
It is used two ways, both on the same buffers:

- batched decoding appends t new tokens to every row at once (`update`), or writes them at fixed slots of a
  buffer whose shape never changes (`write_at`, for compiled steps); `crop` forgets a rejected draft for free;
- serving gives each sequence its own cache (batch 1) and reaches it through the protocol that
  `paged.PagedCache` offers too: `length`, `reserve` (grow), `write` at a position and `read` a prefix.

`Int8KVCache` stores K and V as int8 with one scale per head and token. Shapes: b batch, g KV heads, t new
tokens, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def kv_cache_bytes_per_token(config, dtype: torch.dtype = torch.float32, kv_heads: int | None = None) -> int:
    """K and V for one token across all layers: 2 * layers * kv_heads * head_dim * element size.
    `kv_heads` None = the config's own; pass num_attention_heads for MHA, 1 for MQA."""
    heads = config.num_attention_heads
    if kv_heads is None:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads must be a positive divisor of num_attention_heads={heads}; got {kv_heads!r}.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


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

    @classmethod
    def for_model(cls, model, max_len: int, batch: int = 1) -> KVCache:
        """A cache in the dtype and on the device of the model's weights."""
        p = next(model.parameters())
        return cls.allocate(model.config, max_len, batch, p.dtype, p.device)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
                             f"{t} more were written. Allocate it with a larger max_len (or call reserve).")
        return end

    def advance(self, t: int) -> None:
        self.length += t

    def crop(self, n: int) -> None:
        """Keep only the first n tokens (n <= length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"crop({n}) needs 0 <= n <= length={self.length}.")
        self.length = n

    # -------- the per-sequence protocol of serving (shared with paged.PagedCache)

    def reserve(self, total: int) -> None:
        """Make room for `total` tokens, doubling the capacity so that appends stay cheap."""
        if total > self.max_len:
            pad = (0, 0, 0, max(total, 2 * self.max_len) - self.max_len)  # the token axis (dim 2), on the right
            self._grow(pad)

    def _grow(self, pad: tuple[int, ...]) -> None:
        self.keys = [F.pad(t, pad) for t in self.keys]
        self.values = [F.pad(t, pad) for t in self.values]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one sequence's keys and values (g, t, d) at token positions [start, start + t)."""
        self._one_sequence()
        self.keys[layer][0, :, start:start + k.shape[1]] = k
        self.values[layer][0, :, start:start + v.shape[1]] = v

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values of tokens [0, end): two (g, end, d) views."""
        self._one_sequence()
        return self.keys[layer][0, :, :end], self.values[layer][0, :, :end]

    def _one_sequence(self) -> None:
        if self.keys[0].shape[0] != 1:
            raise ValueError(f"write/read address one sequence; this cache holds a batch of {self.keys[0].shape[0]}."
                             " Give each sequence its own cache (KVCache.for_model(model, n)).")

    # -------- memory

    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated for max_len, whatever `length` is)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def used_nbytes(self) -> int:
        """Bytes of the `length` cached tokens: what a paged cache would hold for them."""
        return sum(t[:, :, : self.length].numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]


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

    def _store(self, layer: int, rows: slice, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v (b', g, t, d) into batch rows `rows` at positions [start, start + t)."""
        end = start + k.shape[2]
        for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            q, scale = quantize_int8_per_head(x)
            store[layer][rows, :, start:end] = q
            scales[layer][rows, :, start:end] = scale.to(torch.float16)

    def _load(self, layer: int, rows: slice, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = dequantize_int8(self.keys[layer][rows, :, :end], self.key_scales[layer][rows, :, :end], self.compute_dtype)
        v = dequantize_int8(self.values[layer][rows, :, :end], self.value_scales[layer][rows, :, :end],
                            self.compute_dtype)
        return k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize and store k, v (b, g, t, d); return the dequantized keys and values (b, g, length + t, d)."""
        end = self._check_room(k.shape[2])
        self._store(layer, slice(None), self.length, k, v)
        return self._load(layer, slice(None), end)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise ValueError("The int8 cache has no static-shape write (its reads dequantize the valid prefix); "
                         "compiled decoding (fast_decoding.StaticDecoder) uses the float KVCache.")

    def _grow(self, pad: tuple[int, ...]) -> None:
        super()._grow(pad)
        self.key_scales = [F.pad(t, pad) for t in self.key_scales]
        self.value_scales = [F.pad(t, pad) for t in self.value_scales]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store one sequence's keys and values (g, t, d) at [start, start + t)."""
        self._one_sequence()
        self._store(layer, slice(0, 1), start, k[None], v[None])

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's dequantized keys and values of tokens [0, end): (g, end, d) each."""
        self._one_sequence()
        k, v = self._load(layer, slice(0, 1), end)
        return k[0], v[0]

    def _tensors(self) -> list[torch.Tensor]:
        return [*super()._tensors(), *self.key_scales, *self.value_scales]


def dynamic_cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a transformers `DynamicCache` holds (v5 API: `cache.layers[i].keys/values`)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
