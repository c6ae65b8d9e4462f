"""Decoding from scratch: greedy generation loops over the core's forward pass and KV cache.

`cookbook.core` holds the forward pass (rotary positions, masks, attention, the layers) and the caches
(`KVCache`, `Int8KVCache`); this module runs them: one pass over the whole sequence per token (no cache), or
one prefill and then one token per pass through a preallocated cache. Early exit (`cookbook.early_exit`),
speculative decoding (`cookbook.speculative`) and compiled decoding (`cookbook.fast_decoding`) reuse the same
core. Shapes: b batch, t tokens, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core.cache import Int8KVCache, KVCache, dynamic_cache_bytes
from .core.forward import check_ids, forward

__all__ = ["Generation", "Int8KVCache", "KVCache", "agreeing_prefix", "dynamic_cache_bytes", "forward",
           "generate_no_cache", "generate_with_cache", "nll_of_logits", "teacher_forced_logits"]


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


def check_prompt(prompt_ids: torch.Tensor, max_new_tokens: int) -> None:
    check_ids(prompt_ids)
    if prompt_ids.shape[0] != 1:
        raise ValueError(f"These decoding loops handle one sequence (batch 1), got batch {prompt_ids.shape[0]}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")


def stopped(token: int, stop_token_id: int | None) -> bool:
    return stop_token_id is not None and token == stop_token_id


@torch.no_grad()
def generate_no_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                      stop_token_id: int | None = None) -> Generation:
    """Greedy decoding that re-runs the whole sequence for every new token (the cost a cache removes)."""
    check_prompt(prompt_ids, max_new_tokens)
    ids, tokens, times, start = prompt_ids, [], [], time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = int(forward(model, ids, None, last_only=True)[0, -1].argmax())
        tokens.append(nxt)
        times.append(time.perf_counter() - start)
        if stopped(nxt, stop_token_id):
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)  # (1, t + 1)
    return Generation(tokens, times)


@torch.no_grad()
def generate_with_cache(model, prompt_ids: torch.Tensor, max_new_tokens: int, cache_cls: type[KVCache] = KVCache,
                        stop_token_id: int | None = None) -> tuple[Generation, KVCache]:
    """Greedy decoding with our preallocated cache: one prefill pass, then one token per pass."""
    check_prompt(prompt_ids, max_new_tokens)
    start = time.perf_counter()
    cache = cache_cls.allocate(model.config, prompt_ids.shape[1] + max_new_tokens,
                               dtype=model.dtype, device=prompt_ids.device)
    logits = forward(model, prompt_ids, cache, last_only=True)  # (1, 1, V)
    tokens, times = [], []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        tokens.append(nxt)
        times.append(time.perf_counter() - start)
        if stopped(nxt, stop_token_id) or len(tokens) == max_new_tokens:
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
