"""The measurement suite: every technique of the cookbook measured on one model, one device, one protocol.

`python -m cookbook bench` runs `run_bench` and writes `reports/<device>.md`, `.json` and `.png`.

Each technique is a plain function `bench_<name>(model, tokenizer, device, settings) -> list[dict]`
listed in `TECHNIQUES`. It works on a copy of the model (or on modules it swaps back), so the
model it is given is unchanged when it returns; it measures with the package's own tools
(`perplexity` on ONE fixed protocol, `generate` timed on ONE fixed prompt, `model_bytes`) and
calls each technique's public functions from its module, never a re-implementation.

The package is split by concern: `settings` (what every report states), `rows` (one row, measured the same way
for every variant), the rows of each family (`weights`, `decoding`, `serving`, `recipe`), `suite` (the techniques
and the run), `pareto` (fronts and the plot) and `report` (markdown, JSON and the command).

Energy and cost are estimates, not measurements: tokens per joule = tokens/s / an ASSUMED power
draw (W), and dollars per million tokens = an ASSUMED price per hour / (3600 x tokens/s) x 1e6.
Both assumptions are written into every report.
"""

from .decoding import TWIN_K, bench_compiled, cached_perplexity
from .pareto import pareto_front, plot_pareto, speed_vs_baseline
from .recipe import bench_recipe, recipe_for, recipe_kv_cache_row, recipe_serving_rows, recipe_stage_row
from .report import BenchReport, bench_command, load_report, machine_info, report_name, report_protocol
from .rows import UNSEPARATED_DECODE, compiled_row, dtype_name, measure_model, result_row
from .settings import (COLUMNS, CPU_WATTS_PER_THREAD, INT4_HEAD_GROUP, QUICK, BenchSettings, make_settings,
                       tokens_per_joule, usd_per_million_tokens)
from .suite import TECHNIQUES, check_techniques, finish_rows, run_bench
from .weights import bench_distilled_student

__all__ = [
    "COLUMNS", "CPU_WATTS_PER_THREAD", "INT4_HEAD_GROUP", "QUICK", "TECHNIQUES", "TWIN_K", "UNSEPARATED_DECODE",
    "BenchReport", "BenchSettings", "bench_command", "bench_compiled", "bench_distilled_student", "bench_recipe",
    "cached_perplexity", "check_techniques", "compiled_row", "dtype_name", "finish_rows", "load_report",
    "machine_info", "make_settings", "measure_model", "pareto_front", "plot_pareto", "recipe_for",
    "recipe_kv_cache_row", "recipe_serving_rows", "recipe_stage_row", "report_name", "report_protocol",
    "result_row", "run_bench", "speed_vs_baseline", "tokens_per_joule", "usd_per_million_tokens",
]
