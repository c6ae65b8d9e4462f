"""The optimizer end to end: profile, search, build and measure the best few plans, keep the best that meets the
budget, and write it as a JSON recipe (`cookbook.recipe.apply_mixed_recipe` rebuilds it on a fresh model)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..core import split_linear_key
from ..data import TRAIN_TEXT
from ..evaluate import perplexity
from ..measure import model_bytes
from .profile import OptimizeSettings, Profile, decode_step_s, profile_model
from .search import Budget, Estimate, candidates
from .space import Plan, apply_plan

RECIPE_KIND = "cookbook mixed-precision recipe"


@dataclass(frozen=True)
class Measured:
    """A plan built and measured: its estimate beside what it really holds, scores and decodes at."""

    estimate: Estimate
    bytes: int
    perplexity: float
    decode_x: float

    def meets(self, budget: Budget, base_ppl: float) -> bool:
        return budget.allows(self.bytes, self.perplexity, self.decode_x, base_ppl)


@dataclass
class Result:
    budget: Budget
    chosen: Measured
    measured: list[Measured]
    met: bool  # the chosen plan meets the budget as MEASURED (the estimate can be wrong)
    spearman: float | None  # rank agreement of estimated and measured perplexity over the candidates
    base_perplexity: float
    base_step_s: float


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points."""
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    for r, x in ((ra, np.asarray(a)), (rb, np.asarray(b))):
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() and rb.std() else None


def build(model: nn.Module, plan: Plan, weights: dict, settings: OptimizeSettings) -> nn.Module:
    """A copy of the float `model` in `plan`'s formats (the original is left as it was)."""
    return apply_plan(copy.deepcopy(model), plan, weights, settings.group_size)


def measure(model: nn.Module, tokenizer, e: Estimate, weights: dict, settings: OptimizeSettings,
            base_step_s: float) -> Measured:
    work = build(model, e.plan, weights, settings)
    step = decode_step_s(work, tokenizer, settings)
    return Measured(e, model_bytes(work), perplexity(work, tokenizer, settings.protocol), base_step_s / step)


def pick(measured: list[Measured], budget: Budget, base_ppl: float) -> tuple[Measured, bool]:
    """The best measured plan that meets the budget (by the budget's objective), else the closest one."""
    key = (lambda m: m.bytes) if budget.objective == "bytes" else (lambda m: m.perplexity)
    meeting = [m for m in measured if m.meets(budget, base_ppl)]
    if meeting:
        return min(meeting, key=key), True
    return min(measured, key=lambda m: m.perplexity), False


def optimize(model: nn.Module, tokenizer, budget: Budget, settings: OptimizeSettings | None = None,
             profile: Profile | None = None, weights: dict | None = None, progress: bool = True,
             base_step_s: float | None = None) -> Result:
    """Search the plans for `budget`; pass a `profile` and its `weights` (from `profile_model` or `reuse_profile`)
    to reuse them, else the model is profiled first. `base_step_s`: the float model's decode step, already timed
    on this machine in this process (e.g. an earlier result's `base_step_s`); else it is timed here."""
    from tqdm.auto import tqdm

    settings = settings or OptimizeSettings()
    if profile is None or weights is None:
        profile, weights = profile_model(model, tokenizer, settings, progress)
    found = candidates(profile, budget, settings.candidates)
    # the float baseline of the speed ratios: the quicker of this measurement and the profile's (both on this
    # machine, in this process), as each speed is the best of its repeats: other work can only slow a run down
    if base_step_s is None:
        base_step_s = decode_step_s(model, tokenizer, settings)
    base_step = min(base_step_s, profile.base_step_s)
    measured = [measure(model, tokenizer, e, weights, settings, base_step)
                for e in tqdm(found, desc="measure", unit="plan", disable=not progress)]
    chosen, met = pick(measured, budget, profile.base_perplexity)
    rho = spearman([m.estimate.perplexity for m in measured], [m.perplexity for m in measured])
    return Result(budget, chosen, measured, met, rho, profile.base_perplexity, base_step)


# ---------------------------------------------------------------- tables and the JSON recipe


def plan_table(plan: Plan) -> list[dict]:
    """One row per decoder layer, one column per linear kind: the format each linear got."""
    rows: dict[int, dict] = {}
    for name, fmt in plan.linears.items():
        layer, path = split_linear_key(name)
        rows.setdefault(layer, {"layer": layer})[path.split(".")[1]] = fmt
    return [rows[i] for i in sorted(rows)] + [{"layer": "head", "q_proj": plan.head}]


def candidate_rows(result: Result) -> list[dict]:
    base = result.base_perplexity
    return [{"plan": m.estimate.plan.describe(), "chosen": m is result.chosen,
             "MiB est.": m.estimate.bytes / 2**20, "MiB": m.bytes / 2**20,
             "ppl est.": m.estimate.perplexity, "ppl": m.perplexity, "ppl vs float32": f"{m.perplexity / base - 1:+.1%}",
             "decode x est.": m.estimate.decode_x, "decode x": m.decode_x} for m in result.measured]


def recipe_dict(result: Result, model_name: str, settings: OptimizeSettings) -> dict:
    """The chosen plan as a small JSON-able recipe, with what it was measured at."""
    m, plan = result.chosen, result.chosen.estimate.plan
    return {
        "kind": RECIPE_KIND, "version": 1, "model": model_name,
        "method": "gptq, every layer calibrated on the float model's activations",
        "calibration": {"text": TRAIN_TEXT, "samples": settings.calib_samples, "seq_len": settings.calib_seq_len,
                        "seed": 0},
        "group_size": settings.group_size, "head": plan.head, "linears": dict(plan.linears),
        "budget": result.budget.describe(), "budget met (measured)": result.met,
        "measured": {"bytes": m.bytes, "perplexity": m.perplexity, "decode x float32": m.decode_x,
                     "float32 perplexity": result.base_perplexity, "protocol": settings.protocol.describe()},
        "estimated": {"bytes": m.estimate.bytes, "perplexity": m.estimate.perplexity,
                      "decode x float32": m.estimate.decode_x},
    }

