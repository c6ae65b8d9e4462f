"""Rows for serving: batching policies at saturation, KV memory under a budget, the HTTP load test."""

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
    """Static vs continuous batching at saturation (`batching_rows`), then continuous batching limited by KV memory
    (`kv_memory_rows`) on the serving workload all waiting at once (notebook 11)."""
    _, requests = serving_workload(tokenizer, settings)
    cost = pass_cost(model, requests, settings)
    overload = sv.with_rate(requests, 1000.0, 1.0)  # every request waiting at t ~ 0
    return batching_rows(model, tokenizer, settings, cost) + kv_memory_rows(model, overload, cost, settings,
                                                                             dtype_name(model))


def serving_workload(tokenizer, settings: BenchSettings,
                     n_requests: int | None = None) -> tuple[torch.Tensor, list[sv.Request]]:
    """The token pool (4,000 Shakespeare tokens) and the serving rows' synthetic workload, drawn at 1 request/s
    (`settings.serving_requests` of them unless `n_requests` is given)."""
    pool = encode(tokenizer, load_text("shakespeare_train"), 4000)
    return pool, sv.synthetic_workload(pool, n_requests=n_requests or settings.serving_requests, rate_per_s=1.0,
                                       seed=0, prompt_range=(8, 64), output_range=settings.serving_output_range,
                                       bos_id=tokenizer.bos_token_id)


def pass_cost(model, requests: list[sv.Request], settings: BenchSettings) -> sv.PassCost:
    """The fitted pass cost every virtual-clock row is charged (`clocks.fit_pass_cost`)."""
    return sv.fit_pass_cost(model, requests[0].prompt_ids[:32], sorted({1, 2, settings.max_batch}))


BATCHING = {"static batching": {"kind": "static"}, "continuous batching": {"kind": "continuous"},
            "mixed continuous batching": {"kind": "continuous", "mixed": True}}


def batching_rows(model, tokenizer, settings: BenchSettings, cost: sv.PassCost | None = None) -> list[dict]:
    """Static, continuous and mixed continuous batching (prompts packed into the decode pass) at saturation:
    `settings.saturation_requests` requests all waiting at t ~ 0, each policy run once on the real model.

    Throughput is aggregate generated tokens per second, on the wall clock (the passes' measured time: at
    saturation nothing idles) and on the fitted pass cost (the same run replayed on one cost model, so that what
    else the machine does cannot favour a policy)."""
    _, requests = serving_workload(tokenizer, settings, settings.saturation_requests)
    cost = cost or pass_cost(model, requests, settings)
    saturated = sv.with_rate(requests, 1000.0, 1.0)
    runs = {name: sv.simulate(model, saturated, sv.Policy(max_batch=settings.max_batch, **kw), sv.VirtualClock())
            for name, kw in BATCHING.items()}
    fitted = {name: sv.simulate(sv.Replay(r.outputs), saturated, r.policy, sv.VirtualClock(cost))
              for name, r in runs.items()}
    first = runs["static batching"].outputs  # rid -> tokens; a request differs if any policy gave it other tokens
    differ = sum(any(r.outputs[rid] != tokens for r in runs.values()) for rid, tokens in first.items())
    wall0, fit0 = runs["static batching"].throughput, fitted["static batching"].throughput
    rows = []
    for name, r in runs.items():
        passes, f = r.stats.prefill_passes + r.stats.decode_steps, fitted[name].throughput
        rows.append(result_row(
            "serving", f"{name}, batch {settings.max_batch}", dtype_name(model), model, None, r.throughput,
            notes=(f"aggregate tokens/s of {len(requests)} requests all waiting (saturation), wall clock: "
                   f"x{r.throughput / wall0:.2f} static; on the fitted pass cost {f:.2f} tok/s (x{f / fit0:.2f}); "
                   f"{passes} passes, padding waste {r.stats.padding_waste:.0%}; requests whose tokens differ "
                   f"between policies: {differ} of {len(requests)}"),
            aggregate=True, fitted_tok_s=f))
    return rows


def bench_load_test(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The HTTP server under a wall-clock load test (`cookbook.loadtest`): open-loop arrivals from a client process
    at 1x and 3x the capacity the fitted pass cost implies, for dynamic, continuous, mixed continuous (prompts
    packed into the decode pass) and continuous + paged + prefix cache batching. The requests share a 47-token
    system prompt (three blocks of 16 with BOS)."""
    pool, requests = serving_workload(tokenizer, settings)
    requests = pg.with_shared_prefix(requests, pool[2000:2047].tolist(), tokenizer.bos_token_id)
    reference = sv.reference_outputs(model, requests)
    cost = pass_cost(model, requests, settings)
    step_s = cost(settings.max_batch, settings.max_batch)  # one decode step of a full batch
    capacity = settings.max_batch / step_s / np.mean([r.max_new_tokens for r in requests])  # requests/s
    budget = 16 * (math.ceil(max(len(r.prompt_ids) + r.max_new_tokens for r in requests) / 16) + 1) * settings.max_batch
    policies = [sv.Policy("dynamic", settings.max_batch, window_s=8 * step_s, name="dynamic"),
                sv.Policy("continuous", settings.max_batch, name="continuous"),
                sv.Policy("continuous", settings.max_batch, mixed=True, name="mixed continuous"),
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
