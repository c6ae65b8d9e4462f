"""The search: a cheap additive estimate from the profile, and the plan it ranks best under a budget.

Each part's bytes, KL and decode seconds add up: a plan is estimated to hold fixed + sum(bytes) bytes, to take
rest + sum(seconds) per decode step and to reach perplexity base * exp(sum(KL)) (each part's KL is the mean
extra nats per token it costs alone; interactions between parts are what this estimate leaves out, and the
measured candidates report its error). Choosing one format per part to minimise the summed KL under a byte
budget is a multiple-choice knapsack, solved exactly by dynamic programming on a grid of bytes (each part's bytes
rounded UP to the grid, so a plan never exceeds its limit but may leave up to one grid step per part unused); a
decode-speed floor enters as a Lagrange penalty on seconds, its multiplier found by bisection (a penalty finds the
plans on the convex hull of the speed-KL trade, not every plan between them). The byte grid
(`unit_for`) spans the model's whole range in about `STEPS` steps: 44 KiB for Gemma 3 270M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .profile import PartCost, Profile
from .space import Plan

UNIT = 2**16  # the default bytes per step of the dynamic programme; every part's extra bytes are rounded UP to it
SPREAD = 0.02  # the candidates' estimated perplexities, about this far apart
STEPS = 2**14  # the search's grid: the whole range of byte choices in about this many steps


@dataclass(frozen=True)
class Budget:
    """At most `max_bytes`, at most `max_ppl_increase` (0.10 = perplexity 10% above the float model's), at
    least `min_decode_x` times the float model's decode speed. None = no limit on that axis."""

    max_bytes: int | None = None
    max_ppl_increase: float | None = None
    min_decode_x: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_ppl_increase", "min_decode_x"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")

    @property
    def objective(self) -> str:
        """What the search minimises: bytes when only quality (and speed) is bounded, else perplexity."""
        return "bytes" if self.max_bytes is None and self.max_ppl_increase is not None else "perplexity"

    def allows(self, nbytes: int, perplexity: float, decode_x: float, base_ppl: float) -> bool:
        """Whether a model of `nbytes`, `perplexity` and `decode_x` meets every limit (float32 at `base_ppl`)."""
        return ((self.max_bytes is None or nbytes <= self.max_bytes)
                and (self.max_ppl_increase is None or perplexity <= base_ppl * (1 + self.max_ppl_increase))
                and (self.min_decode_x is None or decode_x >= self.min_decode_x))

    def describe(self) -> str:
        parts = [f"<= {self.max_bytes / 2**20:.1f} MiB" if self.max_bytes else "",
                 f"perplexity <= +{self.max_ppl_increase:.0%}" if self.max_ppl_increase else "",
                 f"decode >= {self.min_decode_x:.2f}x float32" if self.min_decode_x else ""]
        return ", ".join(p for p in parts if p) or "no limit"


@dataclass(frozen=True)
class Estimate:
    """What the profile predicts for a plan."""

    plan: Plan
    bytes: int
    kl: float
    step_s: float
    perplexity: float
    decode_x: float

    def meets(self, budget: Budget, base_ppl: float) -> bool:
        return budget.allows(self.bytes, self.perplexity, self.decode_x, base_ppl)


class BudgetError(ValueError):
    """No plan in the search meets the budget; `closest` is the estimate nearest to it."""

    def __init__(self, message: str, closest: Estimate) -> None:
        super().__init__(message)
        self.closest = closest


def estimate(profile: Profile, plan: Plan) -> Estimate:
    """The additive estimate of `plan`'s bytes, perplexity and decode speed."""
    cost = {(c.part, c.fmt): c for c in profile.costs}
    chosen = [cost[name, fmt] for name, fmt in plan.linears.items()] + [cost["lm_head", plan.head]]
    kl, step = sum(c.kl for c in chosen), profile.rest_step_s + sum(c.step_s for c in chosen)
    return Estimate(plan, profile.fixed_bytes + sum(c.bytes for c in chosen), kl, step,
                    profile.base_perplexity * math.exp(kl), profile.base_step_s / step)


def to_plan(choice: dict[str, str]) -> Plan:
    return Plan({k: v for k, v in choice.items() if k != "lm_head"}, choice["lm_head"])


# ---------------------------------------------------------------- the knapsack


def unit_for(parts: dict[str, list[PartCost]]) -> int:
    """Bytes per grid step: the spread between every part's smallest and largest format, over `STEPS`."""
    span = sum(max(c.bytes for c in o) - min(c.bytes for c in o) for o in parts.values())
    return max(64, span // STEPS)


def knapsack(parts: dict[str, list[PartCost]], capacity: int, lam: float = 0.0, unit: int = UNIT
             ) -> dict[str, str] | None:
    """The format per part minimising sum(KL + lam * seconds) with at most `capacity` units of `unit` bytes above
    every part's smallest format; None if even the smallest formats do not fit."""
    if capacity < 0:
        return None
    names, table, chosen = list(parts), np.zeros(capacity + 1), []
    for name in names:
        opts = parts[name]
        low = min(c.bytes for c in opts)
        new, pick = np.full(capacity + 1, np.inf), np.zeros(capacity + 1, dtype=np.int8)
        for j, c in enumerate(opts):
            w = -(-(c.bytes - low) // unit)  # extra bytes, rounded up
            if w > capacity:
                continue
            cand = table[: capacity + 1 - w] + (c.kl + lam * c.step_s)  # (capacity + 1 - w,)
            better = cand < new[w:]
            new[w:][better], pick[w:][better] = cand[better], j
        table = new
        chosen.append(pick)
    out, b = {}, capacity
    for name, pick in zip(reversed(names), reversed(chosen)):
        opts = parts[name]
        c = opts[pick[b]]
        out[name] = c.fmt
        b -= -(-(c.bytes - min(o.bytes for o in opts)) // unit)
    return out


def capacity_for(profile: Profile, max_bytes: int | None) -> int:
    """Grid steps (`unit_for`) of bytes a plan may add above the smallest format of every part."""
    parts = profile.parts()
    unit = unit_for(parts)
    floor = profile.fixed_bytes + sum(min(c.bytes for c in opts) for opts in parts.values())
    full = sum(-(-(max(c.bytes for c in o) - min(c.bytes for c in o)) // unit) for o in parts.values())
    return full if max_bytes is None else min(full, (max_bytes - floor) // unit)  # more room than that buys nothing


def plan_at(profile: Profile, capacity: int, lam: float = 0.0) -> Estimate | None:
    """The knapsack's plan within `capacity` grid steps and speed penalty `lam`, estimated; None if none fits."""
    parts = profile.parts()
    choice = knapsack(parts, capacity, lam, unit_for(parts))
    return None if choice is None else estimate(profile, to_plan(choice))


def best_plan(profile: Profile, capacity: int, min_decode_x: float | None) -> tuple[Estimate | None, float]:
    """The knapsack's plan within `capacity`, with the smallest speed penalty that meets `min_decode_x`
    (found by growing it, then bisecting); returns the estimate and that penalty."""
    est = plan_at(profile, capacity)
    if est is None or min_decode_x is None or est.decode_x >= min_decode_x:
        return est, 0.0
    lo, hi = 0.0, 1.0
    while (fast := plan_at(profile, capacity, hi)).decode_x < min_decode_x:
        if hi > 1e9:
            return fast, hi  # the fastest plan there is, still too slow
        lo, hi = hi, hi * 4
    for _ in range(30):
        mid = (lo + hi) / 2
        e = plan_at(profile, capacity, mid)
        if e.decode_x >= min_decode_x:
            hi, fast = mid, e
        else:
            lo = mid
    return fast, hi


# ---------------------------------------------------------------- candidates under a budget


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _point(e: Estimate, base_ppl: float) -> str:
    return (f"{e.plan.describe()}: {_mib(e.bytes)}, estimated perplexity {e.perplexity:.2f} "
            f"({e.perplexity / base_ppl - 1:+.1%}), decode {e.decode_x:.2f}x")


def check_reachable(profile: Profile, budget: Budget, first: Estimate | None) -> None:
    """Raise BudgetError, naming the closest point, when the estimate puts the budget out of reach."""
    base = profile.base_perplexity
    if first is None:
        smallest = plan_at(profile, 0)  # every part in its smallest format
        raise BudgetError(f"No plan fits {_mib(budget.max_bytes)}: the smallest in this search is "
                          f"{_point(smallest, base)}. Use --max-mib {math.ceil(smallest.bytes / 2**20)} or more.",
                          smallest)
    if budget.min_decode_x is not None and first.decode_x < budget.min_decode_x:
        raise BudgetError(f"No plan decodes {budget.min_decode_x:.2f}x as fast as float32 here; the fastest within the "
                          f"byte limit is {_point(first, base)}. Ask for --min-decode-x "
                          f"{math.floor(100 * first.decode_x) / 100:.2f} or less (by this machine's timings).", first)
    if budget.max_ppl_increase is not None and not first.meets(Budget(max_ppl_increase=budget.max_ppl_increase), base):
        raise BudgetError(f"No plan within the limits keeps perplexity within +{budget.max_ppl_increase:.0%}; the most "
                          f"accurate is {_point(first, base)}. Raise --max-ppl-increase to "
                          f"{math.ceil(100 * (first.perplexity / base - 1))} (percent; in Python "
                          f"Budget(max_ppl_increase={math.ceil(100 * (first.perplexity / base - 1)) / 100})) or "
                          "more, or loosen the other limits.", first)


def smallest_capacity(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The fewest grid steps in [lo, hi] that pass `ok` (bisection: more bytes never raise the summed KL, so `ok`
    turns true once and stays true); `hi` when none does."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def fastest_plan(profile: Profile, max_bytes: int | None = None) -> Estimate | None:
    """The fastest plan by the estimate within `max_bytes` (a prohibitive speed penalty); None if none fits."""
    return plan_at(profile, capacity_for(profile, max_bytes), 1e12)


def smallest_penalty(profile: Profile, capacity: int, lo: float, target: float) -> Estimate:
    """The plan within `capacity` at the smallest speed penalty >= `lo` whose summed KL reaches `target`
    (bisection on a log scale: a larger penalty buys speed with KL)."""
    hi = max(lo, 1e-6) * 2
    while (e := plan_at(profile, capacity, hi)).kl < target and hi < 1e12:
        hi *= 4
    if e.kl < target:
        return e
    for _ in range(20):
        mid = math.sqrt(max(lo, 1e-9) * hi)
        if plan_at(profile, capacity, mid).kl >= target:
            hi = mid
        else:
            lo = mid
    return plan_at(profile, capacity, hi)


def candidates(profile: Profile, budget: Budget, n: int) -> list[Estimate]:
    """Up to `n` distinct plans the estimate says meet `budget`, best first, about `SPREAD` apart in estimated
    perplexity, so that measuring them tests the estimate's ranking. Under a byte limit: the optimum, then ever
    smaller plans (or, under a speed floor too, ever faster ones within the same bytes); under a perplexity
    limit alone: the smallest plan that meets it, then ever more accurate ones."""
    top = capacity_for(profile, budget.max_bytes)
    first, lam = best_plan(profile, top, budget.min_decode_x)
    check_reachable(profile, budget, first)
    base = profile.base_perplexity

    def at_most(span: tuple[int, int], target: float) -> Estimate | None:  # the smallest plan with KL <= target
        cap = smallest_capacity(*span, lambda c: (p := plan_at(profile, c, lam)) is not None
                                and p.kl <= target + 1e-12)
        return plan_at(profile, cap, lam)

    if budget.objective == "bytes":
        full = capacity_for(profile, None)
        low = smallest_capacity(0, full, lambda c: plan_at(profile, c, lam).meets(budget, base))
        anchor = plan_at(profile, low, lam)
        pick = lambda target: at_most((low, full), target)
        step = -math.log1p(SPREAD)
    else:
        anchor, step = first, math.log1p(SPREAD)
        pick = (lambda target: smallest_penalty(profile, top, lam, target)) if budget.min_decode_x else \
            (lambda target: at_most((0, top), target))  # under a speed floor, fewer bytes would mean int3: slower
    out: list[Estimate] = []
    for k in range(4 * n):
        e = anchor if k == 0 else pick(anchor.kl + k * step)
        if e is not None and e.meets(budget, base) and all(e.plan != o.plan for o in out):
            out.append(e)
        if len(out) == n:
            break
    return out
