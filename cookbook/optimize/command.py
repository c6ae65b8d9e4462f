"""`python -m cookbook optimize`: load the model, profile it (or reuse a saved profile), search, print, write."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..report import ResultsTable
from .profile import QUICK, OptimizeSettings, Profile, profile_model, reuse_profile
from .run import candidate_rows, optimize, plan_table, recipe_dict
from .search import Budget


# the settings a profile's bytes and KLs depend on (its seconds are measured again where it is used: `retime`)
PROFILE_FIELDS = ("calib_samples", "calib_seq_len", "gptq_order", "profile_samples", "profile_seq_len", "group_size",
                  "linear_formats", "head_formats", "protocol")


def load_profile(path: Path, model_name: str, settings: OptimizeSettings) -> Profile | None:
    """A profile saved by an earlier run for this model and these settings, else None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        stored = saved["profile"]["settings"]
        Profile.from_dict(saved["profile"])  # every field present
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a profile written by `python -m cookbook optimize --profile` ({err!r}); "
                         "point --profile at a new file or delete this one.") from None
    wanted = json.loads(json.dumps(asdict(settings) | {"protocol": settings.protocol.describe()}))
    same = all(stored.get(k) == wanted[k] for k in PROFILE_FIELDS)
    if saved.get("model") != model_name or not same:
        print(f"{path} was measured for another model or other settings; profiling again.", file=sys.stderr)
        return None
    return Profile.from_dict(saved["profile"])


def optimize_command(model_name: str | None, budget: Budget, quick: bool, out: str, profile_path: str | None,
                     n_candidates: int | None = None, head_formats: tuple[str, ...] | None = None,
                     progress: bool = True) -> dict:
    """What `python -m cookbook optimize` runs; returns the recipe it wrote."""
    import transformers

    from ..bench.report import machine_info
    from ..models import load_model, set_seed
    from ..models import model_name as resolve_name

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = replace(OptimizeSettings(), **QUICK) if quick else OptimizeSettings()
    settings = replace(settings, candidates=n_candidates) if n_candidates else settings
    settings = replace(settings, head_formats=head_formats) if head_formats else settings
    set_seed(0)
    model, tok = load_model(model_name, device="cpu")  # the packed kernels it prices are CPU kernels
    name = resolve_name(model_name)
    profile = load_profile(Path(profile_path), name, settings) if profile_path else None
    if profile is not None:
        print(f"reusing the profile in {profile_path}: computing the GPTQ codes and timing every part here",
              file=sys.stderr)
        profile, weights = reuse_profile(profile, model, tok, settings)
    else:
        profile, weights = profile_model(model, tok, settings, progress)
        if profile_path:
            Path(profile_path).parent.mkdir(parents=True, exist_ok=True)
            saved = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "machine": machine_info(model.device), "profile": profile.to_dict()}
            Path(profile_path).write_text(json.dumps(saved, indent=1) + "\n")
    result = optimize(model, tok, budget, settings, profile, weights, progress)
    print(ResultsTable(plan_table(result.chosen.estimate.plan), "The chosen plan: format of each linear").text())
    print()
    print(ResultsTable(candidate_rows(result), f"Candidates for {budget.describe()} (estimated vs measured; "
                       f"float32 perplexity {result.base_perplexity:.2f})").text())
    rho = "n/a (fewer than 3 candidates)" if result.spearman is None else f"{result.spearman:.2f}"
    print(f"\nprofile {profile.seconds:.0f} s; Spearman rank correlation of estimated vs measured perplexity: {rho}")
    if not result.met:
        print("warning: no measured candidate meets the budget (the estimate was too optimistic); the closest "
              "is written. Loosen the budget or raise --candidates.", file=sys.stderr)
    recipe = recipe_dict(result, name, settings) | {"machine": machine_info(model.device)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"wrote {out}; rebuild it with cookbook.recipe.apply_mixed_recipe(model, tokenizer, {out!r})")
    return recipe
