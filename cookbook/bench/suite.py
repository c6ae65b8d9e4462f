"""The techniques the bench knows, and the run over them."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import torch

from ..evaluate import relative_change
from ..measure import roofline_tokens_per_s
from .decoding import bench_attention, bench_compiled, bench_early_exit, bench_kv_cache, bench_speculative
from .recipe import bench_recipe
from .rows import result_row
from .serving import bench_load_test, bench_serving
from .settings import BenchSettings, tokens_per_joule, usd_per_million_tokens
from .weights import (bench_baseline, bench_distilled_student, bench_gptq_awq, bench_llamacpp, bench_lora, bench_moe,
                      bench_nf4, bench_outliers, bench_precision, bench_rtn, bench_sharing, bench_structured,
                      bench_torchao, bench_wanda)

TECHNIQUES: dict[str, Callable[..., list[dict]]] = {
    "precision": bench_precision,
    "rtn": bench_rtn,
    "outliers": bench_outliers,
    "gptq_awq": bench_gptq_awq,
    "nf4": bench_nf4,
    "wanda": bench_wanda,
    "structured": bench_structured,
    "distillation": bench_distilled_student,
    "sharing": bench_sharing,
    "moe": bench_moe,
    "attention": bench_attention,
    "kv_cache": bench_kv_cache,
    "early_exit": bench_early_exit,
    "speculative": bench_speculative,
    "compiled": bench_compiled,
    "serving": bench_serving,
    "load_test": bench_load_test,
    "lora": bench_lora,
    "recipe": bench_recipe,
    "llamacpp": bench_llamacpp,
    "torchao": bench_torchao,
}


def check_techniques(names: Sequence[str] | None) -> list[str]:
    """The technique names to run, in `TECHNIQUES` order; a clear error for an unknown name."""
    if names is None:
        return list(TECHNIQUES)
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown:
        raise ValueError(f"Unknown technique(s) {unknown}; choose from {list(TECHNIQUES)}.")
    return [n for n in TECHNIQUES if n in names]


# ---------------------------------------------------------------- the suite


def finish_rows(rows: list[dict], settings: BenchSettings, bandwidth: float | None = None) -> list[dict]:
    """Fill relative perplexity change (vs the baseline row), the share of the memory roofline each one-stream
    decode speed reaches, and the energy / cost estimates. The roofline's bandwidth (bytes/s, measured in the same
    run) is the row's own "bandwidth", read beside its technique (`run_bench`), else `bandwidth`."""
    base = next((r["perplexity"] for r in rows if r["technique"] == "baseline"), None)
    for r in rows:
        if base is not None and r["perplexity"] is not None:
            r["rel. change"] = relative_change(r["perplexity"], base)
        one_stream = not r.get("aggregate") and r["decode tok/s"] is not None and r.get("bytes/token")
        ceiling = r.get("bandwidth") or bandwidth
        if ceiling and one_stream:
            r["% roofline"] = 100 * r["decode tok/s"] / roofline_tokens_per_s(r["bytes/token"], ceiling)
        r["tokens/J"] = tokens_per_joule(r["decode tok/s"], settings.watts)
        r["$/M tokens"] = usd_per_million_tokens(r["decode tok/s"], settings.usd_per_hour)
    return rows


@torch.no_grad()
def run_bench(model, tokenizer, device, settings: BenchSettings, techniques: Sequence[str] | None = None,
              log: Callable[[str], None] | None = print, bandwidth: float | None = None,
              read_bandwidth: Callable[[], float] | None = None) -> list[dict]:
    """The baseline, then each chosen technique; rows with relative change, % of roofline (given the measured
    memory `bandwidth` in bytes/s) and energy / cost filled in.

    `read_bandwidth` (e.g. `measure.memory_bandwidth`), where given, is called before and after each technique,
    and that technique's rows keep the better reading as their "bandwidth", their roofline's: a shared machine's
    bandwidth moves while the bench runs (59.3 GB/s at the start of one 32-minute run, 28.9 at its end), so a
    ceiling read half an hour away from a row says little about what that row could reach.

    A technique that fails (e.g. a model layout it does not support) gives one row saying why, and
    the others still run.
    """
    names = check_techniques(techniques)
    rows = []
    for name, fn in [("baseline", bench_baseline), *[(n, TECHNIQUES[n]) for n in names]]:
        start = time.perf_counter()
        before = read_bandwidth() if read_bandwidth else None
        try:
            new = fn(model, tokenizer, device, settings)
        except Exception as exc:  # record it and go on: one unsupported technique should not sink the report
            if name == "baseline":
                raise
            new = [result_row(name, "failed", "", notes=f"not measured: {type(exc).__name__}: {exc}"[:300])]
        gc.collect()
        if read_bandwidth:
            ceiling = max(before, read_bandwidth())
            for r in new:
                r["bandwidth"] = ceiling
        rows += new
        if log:
            log(f"[bench] {name}: {time.perf_counter() - start:.0f} s")
    return finish_rows(rows, settings, bandwidth)
