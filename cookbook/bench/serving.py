"""Rows for serving: batching policies on one fitted pass cost, KV memory under a budget, the HTTP load test."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import paged as pg
from .. import serving as sv
from ..data import encode, load_text
from ..loadtest import load_test
from .rows import dtype_name, result_row
from .settings import BenchSettings


def bench_serving(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Static vs continuous batching (`batching_rows`), then continuous batching limited by KV memory
    (`kv_memory_rows`), on one synthetic workload under overload (notebook 11)."""
    return batching_rows(model, tokenizer, settings, with_memory=True)


def serving_workload(tokenizer, settings: BenchSettings) -> tuple[torch.Tensor, list[sv.Request]]:
    """The token pool (4,000 Shakespeare tokens) and the serving rows' synthetic workload, drawn at 1 request/s."""
    pool = encode(tokenizer, load_text("shakespeare_train"), 4000)
    return pool, sv.synthetic_workload(pool, n_requests=settings.serving_requests, rate_per_s=1.0, seed=0,
                                       prompt_range=(8, 64), output_range=settings.serving_output_range,
                                       bos_id=tokenizer.bos_token_id)


def batching_rows(model, tokenizer, settings: BenchSettings, with_memory: bool = False) -> list[dict]:
    """Static vs continuous batching of one synthetic workload under overload.

    Both policies are charged the same pass costs, fitted once from measured forward passes, so the
    throughput is aggregate generated tokens per second over all requests, not one stream's speed.
    """
    _, requests = serving_workload(tokenizer, settings)
    cost = sv.fit_pass_cost(model, requests[0].prompt_ids[:32], sorted({1, 2, settings.max_batch}))
    overload = sv.with_rate(requests, 1000.0, 1.0)  # every request waiting at t ~ 0: the throughput limit
    fmt = dtype_name(model)
    rows = []
    for kind in ("static", "continuous"):
        res = sv.simulate(model, overload, sv.Policy(kind, settings.max_batch), sv.VirtualClock(cost))
        rows.append(result_row(
            "serving", f"{kind} batching, batch {settings.max_batch}", fmt, model, None, res.throughput,
            notes=(f"aggregate tokens/s of {len(requests)} requests arriving at once (fitted pass cost); "
                   f"padding waste {res.stats.padding_waste:.0%}"), aggregate=True))
    return rows + (kv_memory_rows(model, overload, cost, settings, fmt) if with_memory else [])


def bench_load_test(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The HTTP server under a wall-clock load test (`cookbook.loadtest`): open-loop arrivals from a client process
    at 1x and 3x the capacity the fitted pass cost implies, for dynamic, continuous and continuous + paged + prefix
    cache batching. The requests share a 47-token system prompt (three blocks of 16 with BOS)."""
    pool, requests = serving_workload(tokenizer, settings)
    requests = pg.with_shared_prefix(requests, pool[2000:2047].tolist(), tokenizer.bos_token_id)
    reference = sv.reference_outputs(model, requests)
    cost = sv.fit_pass_cost(model, requests[0].prompt_ids[:32], sorted({1, 2, settings.max_batch}))
    step_s = cost(settings.max_batch, settings.max_batch)  # one decode step of a full batch
    capacity = settings.max_batch / step_s / np.mean([r.max_new_tokens for r in requests])  # requests/s
    budget = 16 * (math.ceil(max(len(r.prompt_ids) + r.max_new_tokens for r in requests) / 16) + 1) * settings.max_batch
    policies = [sv.Policy("dynamic", settings.max_batch, window_s=8 * step_s, name="dynamic"),
                sv.Policy("continuous", settings.max_batch, name="continuous"),
                sv.Policy("continuous", settings.max_batch, memory=pg.KVMemory(budget, prefix_cache=True),
                          name="continuous + paged + prefix cache")]
    fmt, rows = dtype_name(model), []
    for policy in policies:
        for load in (1.0, 3.0):
            arrivals = sv.with_rate(requests, load * capacity, 1.0)
            r = load_test(model, tokenizer, policy, arrivals, reference, deadline_s=600)
            rows.append(result_row(
                "serving", f"HTTP load test, {policy.label}, {load:g}x capacity", fmt, model, None, r["tok/s"],
                notes=(f"wall clock, {r['sent']} requests at {load * capacity:.2f}/s from a client process: "
                       f"TTFT mean {r['TTFT mean s']:.2f} s, p50/p99 {r['TTFT p50 s']:.2f}/{r['TTFT p99 s']:.2f} s, TPOT p50/p99 "
                       f"{r['TPOT p50 ms']:.0f}/{r['TPOT p99 ms']:.0f} ms, latency p50/p99 {r['latency p50 s']:.2f}/"
                       f"{r['latency p99 s']:.2f} s; {r['ok']} ok, {r['503']} refused, {r['errors']} errors, "
                       f"{r['lost']} lost; "
                       f"tokens as generate: {r['exact']}"), aggregate=True))
    return rows


def kv_memory_rows(model, overload: list[sv.Request], cost: sv.PassCost, settings: BenchSettings, fmt: str) -> list[dict]:
    """Continuous batching when KV memory, not batch slots, limits concurrency (`cookbook.paged`): one contiguous
    reservation per request for the longest allowed answer vs a paged cache, in the same budget (a quarter of what
    the whole overload would need at its final lengths)."""
    need = sum(len(r.prompt_ids) + r.max_new_tokens for r in overload)
    longest = max(len(r.prompt_ids) for r in overload) + settings.serving_output_range[1]
    budget = max(need // 4, 16 * (math.ceil(longest / 16) + 1))  # the longest request fits, in whole blocks
    memories = {"preallocated, longest answer": pg.KVMemory(budget, paged=False,
                                                              reserve_new_tokens=settings.serving_output_range[1]),
                "paged, block 16": pg.KVMemory(budget, block_size=16),
                "paged, block 8": pg.KVMemory(budget, block_size=8)}
    reference = sv.reference_outputs(model, overload)
    rows = []
    for name, memory in memories.items():
        res = sv.simulate(model, overload, sv.Policy("continuous", len(overload), memory=memory), sv.VirtualClock(cost))
        st = res.stats
        rows.append(result_row(
            "serving", f"continuous batching, KV {name}", fmt, model, None, res.throughput,
            notes=(f"KV budget {budget} tokens ({budget * pg.token_bytes(model) / 2**20:.1f} MiB); reserved/used "
                   f"{st.kv_overhead:.2f}; peak {st.peak_running} running; {st.preemptions} preemptions; "
                   f"tokens as generate: {sv.check_outputs(res, reference) == []}"), aggregate=True))
    return rows
