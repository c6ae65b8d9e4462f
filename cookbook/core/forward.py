"""The decoder forward pass, written once: every technique that runs the model's layers runs these.

It reuses the weights of a Hugging Face decoder (embedding, norms, projections, MLP, tied head) and owns what
the cookbook is about: rotary positions, the attention masks (causal, sliding window, padding), the KV cache
and its reads. Three entry points share the layer functions:

- `forward(model, ids, cache)`: a (b, t) batch whose rows all sit at the same positions (decoding loops,
  speculative decoding, early exit, compiled decoding);
- `forward_tokens(model, tokens, caches)`: a ragged batch, each sequence with its own history and number of new
  tokens, left-padded and masked (serving);
- `forward_packed(model, tokens, caches)`: the same ragged batch without padding: every sequence's new tokens side
  by side in one row, each attending only to its own history (serving's mixed prefill + decode passes).

Shapes: b batch, t new tokens, s cached + new tokens, h query heads, g KV heads, d head_dim, D hidden size,
V vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .cache import KVCache
from .layout import cached_layout, decoder, layer_types, layer_window
from .ops import additive_mask, apply_rope, attention, attention_mask, rope_cos_sin, softcap


@dataclass
class StepContext:
    """What every layer of one forward pass shares: positions, rotary tables and masks per layer type."""

    positions: torch.Tensor  # (t,) or (b, t)
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # cos, sin: (t, d) or (b, 1, t, d)
    masks: dict[str, torch.Tensor | None]  # bool (t, s), additive (b, 1, t, s), or None (no mask needed)
    write_pos: torch.Tensor | None = None  # (t,): write K/V at these positions of a static cache (cache.write_at)


def step_context(config, start: int, t: int, device: torch.device, dtype: torch.dtype) -> StepContext:
    """Rotary tables and masks for t new tokens at positions [start, start + t) over keys [0, start + t)."""
    q_pos = torch.arange(start, start + t, device=device)  # (t,)
    k_pos = torch.arange(start + t, device=device)  # (s,)
    rope, masks = {}, {}
    for layer_type in set(layer_types(config)):
        rope[layer_type] = rope_cos_sin(config, layer_type, q_pos, dtype)
        window = layer_window(config, layer_type)
        needs_mask = t > 1 or (window is not None and start + t > window)
        masks[layer_type] = attention_mask(q_pos, k_pos, window) if needs_mask else None
    return StepContext(q_pos, rope, masks)


def ragged_positions(past: torch.Tensor, n_new: torch.Tensor, width: int,
                     total_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of left-padded queries (b, width) and keys (b, total_width); padding gets -1."""
    col = torch.arange(width)
    q_pos = col[None] - (width - n_new)[:, None] + past[:, None]  # (b, width)
    q_pos = torch.where(col[None] >= (width - n_new)[:, None], q_pos, -1)
    kcol = torch.arange(total_width)
    k_pos = kcol[None] - (total_width - (past + n_new))[:, None]  # (b, total_width)
    return q_pos, torch.where(k_pos >= 0, k_pos, -1)


def ragged_context(config, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> StepContext:
    """Rotary tables (b, 1, t, d) and additive masks (b, 1, t, s) for a left-padded batch."""
    rope, masks = {}, {}
    for layer_type in set(layer_types(config)):
        cos, sin = rope_cos_sin(config, layer_type, q_pos.clamp(min=0).to(device), dtype)  # (b, t, d)
        rope[layer_type] = cos[:, None], sin[:, None]  # (b, 1, t, d): one position per sequence and token
        allowed = attention_mask(q_pos, k_pos, layer_window(config, layer_type))  # (b, t, s)
        masks[layer_type] = additive_mask(allowed, dtype)[:, None].to(device)  # (b, 1, t, s)
    return StepContext(q_pos, rope, masks)


def _heads(proj: nn.Module, h: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """Project h (b, t, D) and split the heads: (b, heads, t, d), RMS-normed per head where the family does."""
    b, t, _ = h.shape
    x = proj(h).view(b, t, -1, head_dim).transpose(1, 2)  # (b, heads, t, d)
    return norm(x) if norm is not None else x


def project_kv(attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys and values of normalized hidden states h (b, t, D): each (b, g, t, d), keys normed and rotated."""
    k = _heads(attn.k_proj, h, attn.head_dim, getattr(attn, "k_norm", None))  # (b, g, t, d)
    v = _heads(attn.v_proj, h, attn.head_dim, None)  # (b, g, t, d)
    return apply_rope(k, cos, sin), v


def attention_block(attn: nn.Module, h: torch.Tensor, ctx: StepContext, layer_type: str,
                    cache, layer: int, fused: bool = True) -> torch.Tensor:
    """Self-attention of h (b, t, D) with RoPE, GQA, q/k norms where present, and the cache -> (b, t, D)."""
    b, t, _ = h.shape
    cos, sin = ctx.rope[layer_type]
    q = apply_rope(_heads(attn.q_proj, h, attn.head_dim, getattr(attn, "q_norm", None)), cos, sin)  # (b, h, t, d)
    k, v = project_kv(attn, h, cos, sin)  # (b, g, t, d)
    if cache is not None and ctx.write_pos is not None:
        k, v = cache.write_at(layer, ctx.write_pos, k, v)  # (b, g, max_len, d), masked by position
    elif cache is not None:
        k, v = cache.update(layer, k, v)  # (b, g, s, d)
    mask = ctx.masks[layer_type]
    if cache is None and mask is not None:
        mask = mask[..., -t:]  # no cache: the keys are only the t new tokens
    cap = getattr(attn.config, "attn_logit_softcapping", None)
    out = attention(q, k, v, mask, attn.scaling, cap, fused)  # (b, h, t, d)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (b, t, D)


def decoder_layer(layer: nn.Module, x: torch.Tensor, ctx: StepContext, layer_type: str,
                  cache, index: int, fused: bool = True) -> torch.Tensor:
    """One decoder block, (b, t, D) -> (b, t, D). Gemma wraps attention and MLP in sandwich norms (a norm
    before and after each); Llama, Mistral and Qwen norm only before them."""
    h = attention_block(layer.self_attn, layer.input_layernorm(x), ctx, layer_type, cache, index, fused)
    if hasattr(layer, "pre_feedforward_layernorm"):
        return mlp_residual(layer, x + layer.post_attention_layernorm(h))
    return mlp_residual(layer, x + h)


def mlp_residual(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second half of a block: x + MLP(norm(x)), with Gemma's post-norm on the MLP's output. (b, t, D)."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def run_layers(model: nn.Module, x: torch.Tensor, ctx: StepContext, cache=None, fused: bool = True) -> torch.Tensor:
    """Every decoder layer on hidden states x (b, t, D), writing K/V to `cache` if one is given."""
    for i, (layer, layer_type) in enumerate(zip(decoder(model).layers, layer_types(model.config))):
        x = decoder_layer(layer, x, ctx, layer_type, cache, i, fused)
    return x


def final_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LM head on final-normed hidden states (..., D), soft-capped where the family does: (..., V)."""
    return softcap_logits(model, model.lm_head(x))


def softcap_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The final logit soft-capping of the model's config (Gemma 2), if it has one."""
    return softcap(logits, getattr(model.config, "final_logit_softcapping", None))


def check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input ids must be a non-empty integer tensor of shape (batch, tokens), "
                         f"got shape {tuple(ids.shape)} and dtype {ids.dtype}.")


@torch.no_grad()
def forward(model: nn.Module, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
            fused: bool = True) -> torch.Tensor:
    """Logits of our own forward pass: ids (b, t) -> (b, t, V), or (b, 1, V) with `last_only`.

    With a cache, the t tokens sit at positions [cache.length, cache.length + t) and attend to the cached
    tokens; the cache then advances by t. Without one, the t tokens are the whole sequence.
    """
    cached_layout(model)
    check_ids(ids)
    start = cache.length if cache is not None else 0
    x = decoder(model).embed_tokens(ids)  # (b, t, D); Gemma scales by sqrt(D) inside its embedding
    x = run_layers(model, x, step_context(model.config, start, ids.shape[1], x.device, x.dtype), cache, fused)
    if cache is not None:
        cache.advance(ids.shape[1])
    x = decoder(model).norm(x[:, -1:] if last_only else x)  # (b, t or 1, D)
    return final_logits(model, x)


class RaggedBatch:
    """The cache of a ragged batch: each sequence's own cache (`KVCache` or `paged.PagedCache`), seen by the
    layers as one left-padded (b, g, s, d) tensor per layer."""

    def __init__(self, caches: Sequence, past: list[int], n_new: list[int], total_width: int) -> None:
        self.caches, self.past, self.n_new, self.total_width = caches, past, n_new, total_width

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each sequence's real new tokens of k, v (b, g, t, d); return left-padded histories (b, g, s, d)."""
        b, g, t, d = k.shape
        keys = k.new_zeros(b, g, self.total_width, d)  # (b, g, s, d)
        values = torch.zeros_like(keys)
        for i, cache in enumerate(self.caches):
            end = self.past[i] + self.n_new[i]
            cache.write(layer, self.past[i], k[i, :, t - self.n_new[i]:], v[i, :, t - self.n_new[i]:])
            keys[i, :, self.total_width - end:], values[i, :, self.total_width - end:] = cache.read(layer, end)
        return keys, values

    def advance(self) -> None:
        for cache, n in zip(self.caches, self.n_new):
            cache.length += n


class PackedBatch(RaggedBatch):
    """The cache of a packed batch: sequence i's new tokens are columns starts[i]:starts[i + 1] of one row, and
    the layers see every sequence's history side by side, (1, g, S, d) with S = sum of history lengths."""

    def __init__(self, caches: Sequence, past: list[int], n_new: list[int]) -> None:
        super().__init__(caches, past, n_new, sum(p + n for p, n in zip(past, n_new)))
        self.starts = [0, *itertools.accumulate(n_new)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each sequence's columns of k, v (1, g, T, d); return all histories back to back (1, g, S, d)."""
        keys, values = [], []
        for i, cache in enumerate(self.caches):
            a, b = self.starts[i], self.starts[i + 1]
            cache.write(layer, self.past[i], k[0, :, a:b], v[0, :, a:b])
            key, value = cache.read(layer, self.past[i] + self.n_new[i])  # (g, s_i, d) each
            keys.append(key)
            values.append(value)
        return torch.cat(keys, 1)[None], torch.cat(values, 1)[None]  # (1, g, S, d)


def packed_context(config, past: list[int], n_new: list[int], dtype: torch.dtype,
                   device: torch.device) -> StepContext:
    """Rotary rows (T, d) and bool masks (T, S) for a packed batch: a token sees its own sequence's keys only."""
    seq = torch.arange(len(n_new))
    q_pos = torch.cat([torch.arange(p, p + n) for p, n in zip(past, n_new)])  # (T,)
    k_pos = torch.cat([torch.arange(p + n) for p, n in zip(past, n_new)])  # (S,)
    same = (seq.repeat_interleave(torch.tensor(n_new))[:, None]
            == seq.repeat_interleave(torch.tensor(past) + torch.tensor(n_new))[None])  # (T, S)
    rope, masks = {}, {}
    for layer_type in set(layer_types(config)):
        rope[layer_type] = rope_cos_sin(config, layer_type, q_pos.to(device), dtype)  # (T, d) each
        masks[layer_type] = (attention_mask(q_pos, k_pos, layer_window(config, layer_type)) & same).to(device)
    return StepContext(q_pos, rope, masks)


def _check_batch(tokens: Sequence[Sequence[int]], caches: Sequence, name: str) -> None:
    if len(tokens) != len(caches) or not tokens:
        raise ValueError(f"{name} needs one cache per sequence and at least one sequence, "
                         f"got {len(tokens)} token lists and {len(caches)} caches.")
    if any(len(t) == 0 for t in tokens):
        raise ValueError("Every sequence in the batch needs at least one new token.")


@torch.no_grad()
def forward_tokens(model: nn.Module, tokens: Sequence[Sequence[int]], caches: Sequence,
                   fused: bool = True) -> torch.Tensor:
    """Feed `tokens[i]` to sequence i (whose history is in `caches[i]`); return next-token logits (b, V).

    A cache is anything with `length`, `reserve`, `write` and `read` (`KVCache`, `paged.PagedCache`).
    Sequences may bring different numbers of new tokens (a prompt, or one decode token) and have different
    history lengths: both are left-padded and masked. The caches are extended in place.
    """
    _check_batch(tokens, caches, "forward_tokens")
    cached_layout(model)
    n_new, past = [len(t) for t in tokens], [c.length for c in caches]
    width, total_width = max(n_new), max(p + n for p, n in zip(past, n_new))
    for c, p, n in zip(caches, past, n_new):
        c.reserve(p + n)
    ids = torch.full((len(tokens), width), model.config.pad_token_id or 0, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, width - len(t):] = torch.as_tensor(list(t), dtype=torch.long)  # left padding
    q_pos, k_pos = ragged_positions(torch.tensor(past), torch.tensor(n_new), width, total_width)
    x = decoder(model).embed_tokens(ids.to(model.device))  # (b, t, D)
    batch = RaggedBatch(caches, past, n_new, total_width)
    x = run_layers(model, x, ragged_context(model.config, q_pos, k_pos, x.dtype, x.device), batch, fused)
    batch.advance()
    return final_logits(model, decoder(model).norm(x[:, -1]))  # (b, V): the last column is every sequence's last


@torch.no_grad()
def forward_packed(model: nn.Module, tokens: Sequence[Sequence[int]], caches: Sequence,
                   fused: bool = True) -> torch.Tensor:
    """What `forward_tokens` computes, without its padding: the new tokens of every sequence side by side in one
    row of T = sum of their counts (vLLM's flattened batch), so a prompt and one-token decodes share a pass and
    the linears run on T tokens, not b x the longest. Attention reads each sequence's own cache, through a
    block-diagonal causal mask. Returns next-token logits (b, V); the caches are extended in place.
    """
    _check_batch(tokens, caches, "forward_packed")
    cached_layout(model)
    n_new, past = [len(t) for t in tokens], [c.length for c in caches]
    for c, p, n in zip(caches, past, n_new):
        c.reserve(p + n)
    ids = torch.tensor([[int(t) for seq in tokens for t in seq]], device=model.device)  # (1, T)
    x = decoder(model).embed_tokens(ids)  # (1, T, D)
    batch = PackedBatch(caches, past, n_new)
    x = run_layers(model, x, packed_context(model.config, past, n_new, x.dtype, x.device), batch, fused)
    batch.advance()
    last = torch.tensor(batch.starts[1:], device=x.device) - 1  # (b,): each sequence's newest token
    return final_logits(model, decoder(model).norm(x[0, last]))  # (b, V)
