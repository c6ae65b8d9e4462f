"""Efficient attention from scratch: masks, kernels, memory accounting and a model swap.

Shapes follow the model: queries `q` are (b, h, t, d), keys and values `k`, `v` are (b, h_kv, s, d)
with `h % h_kv == 0` (MHA: h_kv == h, GQA: 1 < h_kv < h, MQA: h_kv == 1). Masks are boolean,
True = "may attend", shape (t, s), with the t queries aligned to the *last* t keys (a decode step
or a chunk of a prefill sees every earlier key).

Kernels, all returning (b, h, t, d):
- `naive_attention`: softmax(q k^T * scale + mask) v, materialising the (t, s) scores: O(t*s) memory.
- `sdpa_attention`: the same through `torch.nn.functional.scaled_dot_product_attention`.
- `tiled_attention`: FlashAttention-style tiles with an online softmax, O(t*d) memory; it skips tiles
  that the causal / sliding-window pattern masks out entirely.
- `sliding_window_attention`: queries in chunks of `window`, each attending to its own and the
  previous chunk: O(t*w) time and memory instead of O(t^2).
- `block_sparse_attention`: only the (query block, key block) pairs a block layout keeps.

Model swap: `patterned_attention(model, windows)` registers a transformers attention function that
applies our own mask (a per-layer window) and runs one of the kernels above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .core import decoder_layers, kv_cache_bytes_per_token, layer_windows
from .core import attention_mask as visible_keys  # the core's rule; `attention_mask` below is a model's mask
from .errors import require_cuda

ATTENTION_NAME = "cookbook_pattern"
KERNELS = ("sdpa", "naive", "tiled")

# ---------------------------------------------------------------- checks


def check_window(window: int | None, name: str = "window") -> None:
    """A window is None (no window) or a positive int: the number of keys a query sees, itself included."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"{name} must be a positive int (keys each query may see, itself included) or None for full "
            f"causal attention; got {window!r}."
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate (b, h, t, d) queries against (b, h_kv, s, d) keys/values; return the group size h // h_kv."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim); got shape {tuple(x.shape)}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch size and head_dim."
        )
    h, h_kv = q.shape[1], k.shape[1]
    if h_kv < 1 or h % h_kv != 0:
        raise ValueError(
            f"The number of query heads ({h}) must be a multiple of the number of key/value heads ({h_kv}): "
            "each KV head serves a whole group of query heads (MHA: equal, GQA: a divisor, MQA: 1)."
        )
    return h // h_kv


def _check_self_attention(q: torch.Tensor, k: torch.Tensor, kernel: str) -> None:
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{kernel} handles self-attention over one sequence (t == s); got t={q.shape[2]} queries and "
            f"s={k.shape[2]} keys. Use tiled_attention or naive_attention for a query chunk against a cache."
        )


def _check_causal_lengths(t: int, s: int) -> None:
    if t > s:
        raise ValueError(f"Causal patterns align the {t} queries with the last keys, so need t <= s; got s={s}.")


def _grouped(q: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, h, t, d) -> (b, h_kv, g, t, d): query heads grouped under the KV head they share (no copy)."""
    b, h, t, d = q.shape
    return q.view(b, h // groups, groups, t, d)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """(b, h_kv, g, t, d) -> (b, h, t, d)."""
    b, h_kv, g, t, d = x.shape
    return x.reshape(b, h_kv * g, t, d)


# ---------------------------------------------------------------- masks


def causal_mask(t: int, s: int | None = None, device=None) -> torch.Tensor:
    """(t, s) bool: query i (at position s - t + i) sees keys at positions <= its own. The rule itself is
    the model core's (`core.attention_mask`, imported here as `visible_keys`), which every forward pass uses."""
    s = t if s is None else s
    _check_causal_lengths(t, s)
    return visible_keys(torch.arange(s - t, s, device=device), torch.arange(s, device=device), None)  # (t, s)


def sliding_window_mask(t: int, window: int, s: int | None = None, device=None) -> torch.Tensor:
    """(t, s) bool: causal, and each query sees only its last `window` keys (itself included)."""
    check_window(window)
    s = t if s is None else s
    _check_causal_lengths(t, s)
    return visible_keys(torch.arange(s - t, s, device=device), torch.arange(s, device=device), window)  # (t, s)


def block_sparse_layout(n_blocks: int, local_blocks: int = 1, global_blocks: int = 1) -> torch.Tensor:
    """(n_blocks, n_blocks) bool layout: query block i sees key block j <= i if it is one of the
    `local_blocks` nearest (its own included) or one of the first `global_blocks` (an attention sink)."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1; got {n_blocks}.")
    if local_blocks < 1:
        raise ValueError(f"local_blocks must be >= 1 so every query block sees its own block; got {local_blocks}.")
    if global_blocks < 0:
        raise ValueError(f"global_blocks must be >= 0; got {global_blocks}.")
    i = torch.arange(n_blocks)[:, None]  # (nb, 1)
    j = torch.arange(n_blocks)[None, :]  # (1, nb)
    return (j <= i) & ((i - j < local_blocks) | (j < global_blocks))  # (nb, nb)


def check_layout(layout: torch.Tensor, n_blocks: int) -> None:
    """A causal block layout must be (n_blocks, n_blocks) bool with every diagonal block kept."""
    if layout.dtype != torch.bool or layout.shape != (n_blocks, n_blocks):
        raise ValueError(
            f"layout must be a bool tensor of shape ({n_blocks}, {n_blocks}) for this sequence and block size; "
            f"got {layout.dtype} {tuple(layout.shape)}. Build one with block_sparse_layout()."
        )
    if not bool(layout.diagonal().all()):
        raise ValueError("Every query block must keep its own (diagonal) block, or its first query sees no key.")


def block_sparse_mask(t: int, block: int, layout: torch.Tensor) -> torch.Tensor:
    """(t, t) bool token mask of a block layout, intersected with the causal mask."""
    if block < 1:
        raise ValueError(f"block must be a positive int; got {block}.")
    n_blocks = math.ceil(t / block)
    check_layout(layout, n_blocks)
    tokens = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[:t, :t]  # (t, t)
    return tokens.to(causal_mask(t).device) & causal_mask(t)


def mask_density(mask: torch.Tensor) -> float:
    """Fraction of (query, key) pairs a mask keeps: the share of the dense work still needed."""
    return mask.float().mean().item()


# ---------------------------------------------------------------- kernels


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None) -> torch.Tensor:
    """Reference attention: materialises the full (b, h, t, s) score matrix. `mask`: bool, (t, s) or
    broadcastable to (b, 1, t, s), True = attend; None = no mask."""
    groups = check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qg = _grouped(q, groups)  # (b, hk, g, t, d)
    scores = qg @ k.unsqueeze(2).transpose(-1, -2) * scale  # (b, hk, g, t, s)
    if mask is not None:
        mask = mask if mask.dim() == 2 else mask.unsqueeze(2)  # (t, s) or (b, 1, 1, t, s)
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # (b, hk, g, t, s)
    return _ungrouped(weights @ v.unsqueeze(2))  # (b, h, t, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (GQA without copying K/V via enable_gqa)."""
    groups = check_qkv(q, k, v)
    if is_causal and mask is not None:
        raise ValueError("Pass either is_causal=True or an explicit mask, not both.")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=groups > 1
    )  # (b, h, t, d)


def _key_block_range(q_start: int, q_end: int, s: int, offset: int, causal: bool, window: int | None,
                     ) -> tuple[int, int]:
    """[lo, hi) key positions any query in [q_start, q_end) may see (queries sit at position + offset)."""
    hi = min(q_end + offset, s) if causal else s
    lo = max(q_start + offset - window + 1, 0) if window is not None else 0
    return lo, hi


def tiles_visited(t: int, s: int, block_size: int, causal: bool = True, window: int | None = None,
                  skip_masked_tiles: bool = True) -> int:
    """How many (query tile, key tile) products `tiled_attention` computes for this pattern."""
    offset, n = s - t, 0
    for q_start in range(0, t, block_size):
        q_end = min(q_start + block_size, t)
        lo, hi = _key_block_range(q_start, q_end, s, offset, causal, window) if skip_masked_tiles else (0, s)
        n += len(range((lo // block_size) * block_size, hi, block_size))
    return n


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window: int | None = None, block_size: int = 64, scale: float | None = None,
                    skip_masked_tiles: bool = True) -> torch.Tensor:
    """FlashAttention-style attention in plain torch: loop over query and key tiles, keep a running max
    `m`, running denominator `l` and unnormalised output `acc` per query row (the online softmax), so no
    (t, s) matrix ever exists; the largest temporary is one (block, block) tile per head.

    With `skip_masked_tiles`, tiles the causal / window pattern masks out completely are never computed
    (the causal-mask optimisation: about half the tiles for causal, ~t*w/block^2 for a window)."""
    groups = check_qkv(q, k, v)
    check_window(window)
    if window is not None and not causal:
        raise ValueError("A sliding window here is causal; pass causal=True with a window.")
    if block_size < 1:
        raise ValueError(f"block_size must be a positive int; got {block_size}.")
    t, s = q.shape[2], k.shape[2]
    if causal:
        _check_causal_lengths(t, s)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    offset = s - t
    qg = _grouped(q, groups)  # (b, hk, g, t, d)
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # (b, hk, 1, s, d)
    out = torch.empty_like(qg)  # (b, hk, g, t, d)
    for q_start in range(0, t, block_size):
        q_end = min(q_start + block_size, t)
        q_tile = qg[..., q_start:q_end, :].float() * scale  # (b, hk, g, bq, d)
        q_pos = torch.arange(q_start, q_end, device=q.device)[:, None] + offset  # (bq, 1)
        m = torch.full((*q_tile.shape[:-1], 1), float("-inf"), device=q.device)  # (b, hk, g, bq, 1)
        l = torch.zeros_like(m)  # (b, hk, g, bq, 1)
        acc = torch.zeros_like(q_tile)  # (b, hk, g, bq, d)
        lo, hi = _key_block_range(q_start, q_end, s, offset, causal, window) if skip_masked_tiles else (0, s)
        for k_start in range((lo // block_size) * block_size, hi, block_size):
            k_end = min(k_start + block_size, s)
            scores = q_tile @ k[..., k_start:k_end, :].float().transpose(-1, -2)  # (b, hk, g, bq, bk)
            k_pos = torch.arange(k_start, k_end, device=q.device)[None, :]  # (1, bk)
            allowed = (k_pos <= q_pos) if causal else torch.ones_like(k_pos, dtype=torch.bool)  # (bq, bk)
            if window is not None:
                allowed = allowed & (q_pos - k_pos < window)
            scores = scores.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1, keepdim=True))  # (b, hk, g, bq, 1)
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
            p = torch.exp(scores - m_safe)  # (b, hk, g, bq, bk)
            correction = torch.exp(m - m_safe)  # (b, hk, g, bq, 1): rescale what was summed before
            l = l * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + p @ v[..., k_start:k_end, :].float()  # (b, hk, g, bq, d)
            m = m_new
        out[..., q_start:q_end, :] = (acc / l).to(q.dtype)
    return _ungrouped(out)  # (b, h, t, d)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None) -> torch.Tensor:
    """Causal sliding-window self-attention in O(t * window) time and memory, vectorised.

    Cut the sequence into chunks of c = min(window, t) queries; chunk n needs keys from chunk n-1 and n
    only, so scores are (n_chunks, c, 2c) instead of (t, t), then mask the exact band inside."""
    groups = check_qkv(q, k, v)
    check_window(window)
    _check_self_attention(q, k, "sliding_window_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h, t, d = q.shape
    c = min(window, t)
    n = math.ceil(t / c)
    pad = n * c - t
    qg = _grouped(F.pad(q, (0, 0, 0, pad)), groups)  # (b, hk, g, n*c, d)
    qc = qg.reshape(*qg.shape[:3], n, c, d)  # (b, hk, g, n, c, d)

    def two_chunks(x: torch.Tensor) -> torch.Tensor:
        xc = F.pad(x, (0, 0, c, pad)).reshape(b, x.shape[1], n + 1, c, d)  # (b, hk, n+1, c, d): a zero chunk first
        return torch.cat([xc[:, :, :-1], xc[:, :, 1:]], dim=-2).unsqueeze(2)  # (b, hk, 1, n, 2c, d)

    kc, vc = two_chunks(k), two_chunks(v)
    scores = qc @ kc.transpose(-1, -2) * scale  # (b, hk, g, n, c, 2c)
    chunk = torch.arange(n, device=q.device)[:, None, None] * c  # (n, 1, 1)
    q_pos = chunk + torch.arange(c, device=q.device)[None, :, None]  # (n, c, 1)
    k_pos = chunk - c + torch.arange(2 * c, device=q.device)[None, None, :]  # (n, 1, 2c)
    allowed = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window)  # (n, c, 2c)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # (b, hk, g, n, c, 2c)
    out = (weights @ vc).reshape(b, h // groups, groups, n * c, d)[..., :t, :]  # (b, hk, g, t, d)
    return _ungrouped(out)  # (b, h, t, d)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int,
                           layout: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal block-sparse self-attention: each query block attends only to the key blocks its row of
    `layout` keeps (gathered into one dense product), with the causal mask inside the diagonal block.
    Work and memory scale with the number of kept blocks, not with t^2."""
    groups = check_qkv(q, k, v)
    _check_self_attention(q, k, "block_sparse_attention")
    if block < 1:
        raise ValueError(f"block must be a positive int; got {block}.")
    t = q.shape[2]
    check_layout(layout, math.ceil(t / block))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qg = _grouped(q, groups)  # (b, hk, g, t, d)
    out = torch.empty_like(qg)
    for i, row in enumerate(layout.cpu()):
        q_start, q_end = i * block, min((i + 1) * block, t)
        keys = torch.cat([torch.arange(j * block, min((j + 1) * block, t)) for j in row.nonzero()[:, 0].tolist()])
        keys = keys.to(q.device)  # (n_keys,)
        scores = qg[..., q_start:q_end, :] @ k[:, :, keys].unsqueeze(2).transpose(-1, -2) * scale  # (b, hk, g, bq, n_keys)
        q_pos = torch.arange(q_start, q_end, device=q.device)[:, None]  # (bq, 1)
        scores = scores.masked_fill(keys[None, :] > q_pos, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out[..., q_start:q_end, :] = weights @ v[:, :, keys].unsqueeze(2)  # (b, hk, g, bq, d)
    return _ungrouped(out)  # (b, h, t, d)


# ---------------------------------------------------------------- measuring kernels


class TensorMemoryTracker(TorchDispatchMode):
    """Records every aten op run inside it and the peak bytes of tensors it allocated that were alive
    at once (storages freed are subtracted as soon as they die). Inputs created outside do not count,
    so this is the working memory of the call, independent of the allocator and of other processes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def _release_dead(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket.__name__))
        self._release_dead()
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                storage = x.untyped_storage()
                key = storage.data_ptr()
                if key not in self._live and storage.nbytes() > 0:
                    self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors `fn` allocates and holds at once (its output included)."""
    with TensorMemoryTracker() as tracker:
        result = fn()
    del result
    return tracker.peak_bytes


def sdpa_kernel_used(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> str:
    """The aten kernel torch's scaled_dot_product_attention dispatches to for these inputs."""
    with TensorMemoryTracker() as tracker:
        sdpa_attention(q, k, v, **kwargs)
    fused = [op for op in tracker.ops if op.startswith("_scaled_dot_product") or op.startswith("_flash")]
    return fused[0] if fused else "math (decomposed: " + ", ".join(dict.fromkeys(tracker.ops)) + ")"


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): ~2 for O(n^2), ~1 for O(n)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("Need at least two (x, y) points of equal count to fit a slope.")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("A log-log fit needs positive x and y values.")
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    lx_c = lx - lx.mean()
    return float((lx_c * (ly - ly.mean())).sum() / (lx_c**2).sum())


def time_sdpa_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True,
                       repeats: int = 10) -> dict[str, float | None]:
    """GPU only: median seconds of SDPA forced onto each backend (flash, memory-efficient, cuDNN, math);
    None where the backend refuses these inputs (dtype, head_dim, mask)."""
    require_cuda("Comparing scaled_dot_product_attention's flash / memory-efficient backends")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .measure import time_function

    results: dict[str, float | None] = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                timing = time_function(lambda: sdpa_attention(q, k, v, is_causal=is_causal), 2, repeats, q.device)
            results[backend.name.lower()] = timing.median_s
        except RuntimeError:
            results[backend.name.lower()] = None
    return results


# ---------------------------------------------------------------- KV cache


def kv_cache_variants(config, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes per token for MHA, every GQA grouping and MQA that this config's head count allows."""
    heads = config.num_attention_heads
    out = {}
    for kv in sorted((d for d in range(1, heads + 1) if heads % d == 0), reverse=True):
        kind = "MHA" if kv == heads else "MQA" if kv == 1 else "GQA"
        out[f"{kind} ({kv} KV head{'s' if kv > 1 else ''})"] = kv_cache_bytes_per_token(config, dtype, kv_heads=kv)
    return out


def kv_cache_bytes(config, context: int, kv_heads: int | None = None, dtype: torch.dtype = torch.float32,
                   windows: Sequence[int | None] | None = None) -> int:
    """KV-cache bytes at `context` tokens when a layer with window w keeps only its last w tokens
    (`windows` None = the config's own pattern; pass [None] * layers for all-global)."""
    windows = layer_windows(config) if windows is None else list(windows)
    per_layer_token = kv_cache_bytes_per_token(config, dtype, kv_heads) // config.num_hidden_layers
    return sum(per_layer_token * (context if w is None else min(w, context)) for w in windows)


# ---------------------------------------------------------------- the model swap


def _pattern_mask(module, t: int, s: int, sliding_window: int | None, attention_mask, device) -> torch.Tensor:
    """Our (t, s) or (b, 1, t, s) bool mask for one layer: its window (override or the model's), causal,
    intersected with the model's own mask when it passes one (padding)."""
    window = getattr(module, "cookbook_window", None) or sliding_window
    mask = causal_mask(t, s, device) if window is None else sliding_window_mask(t, window, s, device)  # (t, s)
    if attention_mask is not None:
        model_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask & model_mask[..., -s:]  # (b, 1, t, s)
    return mask


def pattern_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, sliding_window: int | None = None, **kwargs,
                              ) -> tuple[torch.Tensor, None]:
    """A transformers attention function: q (b, h, t, d), k/v (b, h_kv, s, d) -> ((b, t, h, d), None).
    Reads `module.cookbook_window` (None = the model's own window) and `module.cookbook_kernel`."""
    if kwargs.get("softcap") is not None:
        raise ValueError("pattern attention does not implement logit soft-capping; this model uses it.")
    if dropout:
        raise ValueError("pattern attention is for inference: call model.eval() (dropout must be 0).")
    t, s = query.shape[2], key.shape[2]
    mask = _pattern_mask(module, t, s, sliding_window, attention_mask, query.device)
    kernel = getattr(module, "cookbook_kernel", "sdpa")
    if kernel == "sdpa":
        out = sdpa_attention(query, key, value, mask=mask, scale=scaling)
    elif kernel == "naive":
        out = naive_attention(query, key, value, mask=mask, scale=scaling)
    else:  # tiled applies only its own causal/window pattern, so refuse a model mask that removes more
        if attention_mask is not None and bool((mask != _pattern_mask(module, t, s, sliding_window, None,
                                                                      query.device)).any()):
            raise ValueError("kernel='tiled' cannot apply padding masks (or a model window narrower than ours); "
                             "use kernel='sdpa' or 'naive' here.")
        window = getattr(module, "cookbook_window", None) or sliding_window
        out = tiled_attention(query, key, value, causal=True, window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (b, t, h, d)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, in order."""
    return [layer.self_attn for layer in decoder_layers(model)]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, pattern_attention_forward)
    # So the model still builds (and passes us) its padding / causal mask as it does for sdpa.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def patterned_attention(model, windows: int | None | Sequence[int | None] = None, kernel: str = "sdpa",
                        ) -> Iterator[None]:
    """Run `model` with our attention inside the block, restoring its own afterwards.

    windows: None = every layer keeps the model's own pattern (local layers 512, global full);
    an int = that window on every layer; a list = one entry per layer (None = the layer's own)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}.")
    modules = attention_modules(model)
    per_layer = list(windows) if isinstance(windows, (list, tuple)) else [windows] * len(modules)
    if len(per_layer) != len(modules):
        raise ValueError(f"windows has {len(per_layer)} entries but the model has {len(modules)} layers.")
    for i, w in enumerate(per_layer):
        check_window(w, f"windows[{i}]")
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    for module, w in zip(modules, per_layer):
        module.cookbook_window, module.cookbook_kernel = w, kernel
    try:
        yield
    finally:
        for module in modules:
            del module.cookbook_window, module.cookbook_kernel
        model.set_attn_implementation(previous)


def windows_for(config, window: int, layers: str = "global") -> list[int | None]:
    """Per-layer windows for `patterned_attention`: `window` on the global layers only ("global"), or on
    every layer ("all"); other layers keep their own pattern (None)."""
    check_window(window)
    if layers not in ("global", "all"):
        raise ValueError(f"layers must be 'global' or 'all'; got {layers!r}.")
    own = layer_windows(config)
    return [window if (layers == "all" or w is None) else None for w in own]
