"""The clocks serving is measured on: a virtual clock that charges each forward pass its measured wall time (or a
fitted cost), and the cost model `fit_pass_cost` fits once so that every scheduling policy pays the same costs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .core.cache import KVCache
from .core.forward import forward_tokens


class VirtualClock:
    """Simulated time. `run` executes a forward pass for real and advances the clock by its wall time,
    or by `cost_model(n_sequences, token_slots)` seconds when one is given (deterministic, for tests)."""

    def __init__(self, cost_model: Callable[[int, int], float] | None = None) -> None:
        self.now = 0.0
        self.cost_model = cost_model
        self.busy_s = 0.0

    def run(self, fn: Callable[[], object], n_sequences: int, token_slots: int):
        start = time.perf_counter()
        result = fn()
        spent = time.perf_counter() - start if self.cost_model is None else self.cost_model(n_sequences, token_slots)
        self.now += spent
        self.busy_s += spent
        return result

    def wait_until(self, t: float) -> None:
        """Idle until `t` (free on a virtual clock)."""
        self.now = max(self.now, t)


@dataclass(frozen=True)
class PassCost:
    """Seconds per forward pass = `fixed_s` (reading the weights once) + `per_slot_s` x token slots.

    Fitted once from measured passes (`fit_pass_cost`) and then used by every policy's `VirtualClock`,
    so the policies are compared on the same costs instead of on whatever else the machine was doing
    while each one ran."""

    fixed_s: float
    per_slot_s: float

    def __call__(self, n_sequences: int, token_slots: int) -> float:
        return self.fixed_s + self.per_slot_s * token_slots


def fit_pass_cost(model, prompt_ids: Sequence[int], batch_sizes: Sequence[int] = (1, 2, 4, 8),
                  repeats: int = 3) -> PassCost:
    """Time decode steps (1 token per sequence) and prefills (the whole prompt) at each batch size,
    and fit seconds = fixed + per_slot x token_slots by least squares (both kept >= 0)."""
    slots, seconds = [], []
    for b in batch_sizes:
        caches = [KVCache.for_model(model, len(prompt_ids) + repeats + 2) for _ in range(b)]
        prefill = [list(prompt_ids)] * b
        seconds.append(min(_timed(lambda: forward_tokens(model, prefill, [KVCache.for_model(model, len(prompt_ids))
                                                                           for _ in range(b)])) for _ in range(repeats)))
        slots.append(b * len(prompt_ids))
        forward_tokens(model, prefill, caches)
        step = [[int(prompt_ids[-1])]] * b
        seconds.append(min(_timed(lambda: forward_tokens(model, step, caches)) for _ in range(repeats)))
        slots.append(b)
    x, y = np.asarray(slots, dtype=float), np.asarray(seconds)
    per_slot = max(float(np.cov(x, y, bias=True)[0, 1] / x.var()), 0.0)
    return PassCost(max(float(y.mean() - per_slot * x.mean()), 0.0), per_slot)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
