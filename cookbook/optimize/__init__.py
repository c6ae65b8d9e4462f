"""`python -m cookbook optimize`: the model finds its own mixed-precision recipe under a budget.

`profile` measures what each decoder linear and the head cost in each format (bytes, KL to the float model,
decode seconds), `search` adds those costs up and solves the knapsack, `run` builds and measures the best few
plans and writes the winner as a JSON recipe, and `space` holds the formats and turns a plan into a model.
"""

from .profile import OptimizeSettings, PartCost, Profile, QUICK, profile_model
from .run import (RECIPE_KIND, Measured, Result, candidate_rows, optimize, plan_table, recipe_dict, spearman)
from .search import UNIT, Budget, BudgetError, Estimate, candidates, estimate, fastest_plan, knapsack
from .space import HEAD_FORMATS, LINEAR_FORMATS, Plan, apply_head, apply_plan, gptq_option, served_linear

__all__ = [
    "OptimizeSettings", "PartCost", "Profile", "QUICK", "profile_model", "RECIPE_KIND", "Measured", "Result",
    "candidate_rows", "optimize", "plan_table", "recipe_dict", "spearman", "UNIT", "Budget", "BudgetError",
    "Estimate", "candidates", "estimate", "fastest_plan", "knapsack", "HEAD_FORMATS", "LINEAR_FORMATS", "Plan", "apply_head",
    "apply_plan", "gptq_option", "served_linear",
]
