"""Requests and workloads for the serving engines: what a client sends, checked (`make_request`), a reproducible
open-loop workload (`synthetic_workload`), and the outputs each request must get (`reference_outputs`: `generate` on the
request alone; `generate_alone`: our own forward, batch size 1).

Generation is greedy and ignores EOS: each request gets exactly `max_new_tokens` tokens, so the workload's output
lengths are the ones drawn, and every output can be compared token for token with the request run alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .core.cache import KVCache
from .core.forward import forward_tokens

HIGH, LOW = 0, 1
PRIORITY_NAMES = {"high": HIGH, "low": LOW}


# ---------------------------------------------------------------- requests and workload


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids (BOS included), tokens wanted, arrival time, priority."""

    rid: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0
    priority: int = LOW  # HIGH (0) or LOW (1)


def validate_request(
    prompt_ids: Sequence[int], max_new_tokens: int, priority: int = LOW,
    vocab_size: int | None = None, max_prompt_tokens: int = 1024, max_new_limit: int = 256,
) -> None:
    """Raise ValueError, saying what to change, if a request cannot be served."""
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError("prompt_ids must be a list of token ids, not text; tokenize the prompt first.")
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("The prompt is empty: send at least one token (a BOS token is enough).")
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"The prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}.")
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_ids must contain integers only.")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"Token id {bad[0]} is outside the vocabulary [0, {vocab_size}).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}.")
    if not 1 <= max_new_tokens <= max_new_limit:
        raise ValueError(f"max_new_tokens must be between 1 and {max_new_limit}, got {max_new_tokens}.")
    if priority not in (HIGH, LOW):
        raise ValueError(f"priority must be {HIGH} (high) or {LOW} (low), got {priority!r}.")


def make_request(
    rid: int, prompt_ids: Sequence[int], max_new_tokens: int, arrival_s: float = 0.0, priority: int = LOW,
    vocab_size: int | None = None,
) -> Request:
    """A checked `Request` (see `validate_request`)."""
    validate_request(prompt_ids, max_new_tokens, priority, vocab_size)
    return Request(rid, tuple(int(t) for t in prompt_ids), int(max_new_tokens), float(arrival_s), priority)


def synthetic_workload(
    token_pool: torch.Tensor, n_requests: int = 24, rate_per_s: float = 4.0, seed: int = 0,
    prompt_range: tuple[int, int] = (8, 64), output_range: tuple[int, int] = (4, 32),
    high_fraction: float = 0.25, bos_id: int | None = 2,
) -> list[Request]:
    """A reproducible open-loop workload: Poisson arrivals at `rate_per_s`, mixed prompt and output lengths.

    Prompt lengths are uniform in `prompt_range` (prompts are windows of `token_pool` (n,), BOS first);
    output lengths are log-uniform in `output_range`, so short answers are common and long ones rare;
    a `high_fraction` of the requests (rounded, picked at random) is HIGH priority. Same seed, same requests; the rate only rescales arrivals.
    """
    if n_requests < 1 or rate_per_s <= 0:
        raise ValueError("synthetic_workload needs n_requests >= 1 and rate_per_s > 0.")
    (p_lo, p_hi), (o_lo, o_hi) = prompt_range, output_range
    if not 1 <= p_lo <= p_hi or not 1 <= o_lo <= o_hi:
        raise ValueError(f"Bad ranges prompt_range={prompt_range}, output_range={output_range}: need 1 <= lo <= hi.")
    if len(token_pool) <= p_hi:
        raise ValueError(f"token_pool has {len(token_pool)} tokens; it needs more than {p_hi}.")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n_requests)  # unit-rate inter-arrival gaps
    arrivals = (np.cumsum(gaps) - gaps[0]) / rate_per_s  # first request at t = 0
    prompt_lens = rng.integers(p_lo, p_hi + 1, n_requests)
    out_lens = np.exp(rng.uniform(math.log(o_lo), math.log(o_hi + 1), n_requests)).astype(int).clip(o_lo, o_hi)
    starts = rng.integers(0, len(token_pool) - p_hi, n_requests)
    high = np.zeros(n_requests, dtype=bool)
    high[rng.permutation(n_requests)[: round(high_fraction * n_requests)]] = True  # exactly that share
    requests = []
    for i in range(n_requests):
        body = token_pool[starts[i] : starts[i] + prompt_lens[i] - (bos_id is not None)].tolist()
        ids = ([bos_id] if bos_id is not None else []) + body
        requests.append(Request(i, tuple(ids), int(out_lens[i]), float(arrivals[i]), HIGH if high[i] else LOW))
    return requests


def with_rate(requests: Sequence[Request], rate_per_s: float, base_rate_per_s: float) -> list[Request]:
    """The same requests with arrival times rescaled from `base_rate_per_s` to `rate_per_s`."""
    scale = base_rate_per_s / rate_per_s
    return [Request(r.rid, r.prompt_ids, r.max_new_tokens, r.arrival_s * scale, r.priority) for r in requests]


@torch.no_grad()
def reference_outputs(model, requests: Sequence[Request]) -> dict[int, list[int]]:
    """What `model.generate` (greedy, EOS ignored) produces for each request run alone: {rid: new tokens}."""
    out = {}
    for r in requests:
        ids = torch.tensor([r.prompt_ids], device=model.device)  # (1, t)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id or 0)
        out[r.rid] = gen[0, ids.shape[1]:].tolist()
    return out


@torch.no_grad()
def generate_alone(model, request: Request, fused: bool = True) -> list[int]:
    """Greedy tokens for one request through `forward_tokens` with batch size 1 (no padding at all)."""
    cache = KVCache.for_model(model, len(request.prompt_ids) + request.max_new_tokens)
    logits = forward_tokens(model, [request.prompt_ids], [cache], fused)
    out = [int(logits[0].argmax())]
    while len(out) < request.max_new_tokens:
        out.append(int(forward_tokens(model, [[out[-1]]], [cache], fused)[0].argmax()))
    return out
