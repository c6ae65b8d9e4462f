"""A wall-clock load test of the HTTP server (`cookbook.server`): a separate client process sends requests at their
arrival times, open loop (nobody waits for an answer before sending the next), bounded in count and in time.

    row = load_test(model, tokenizer, Policy("continuous", 8), requests, reference)   # server + client + summary

Each request is one POST /generate from the client process (`loadclient.py`, its own Python interpreter, so the
client's event loop never competes with the engine thread for the GIL). The server's answer carries the request's
timestamps on the engine's clock: time to first token (TTFT) = first token - arrival at the engine, time per output
token (TPOT) = (last token - first token) / (tokens - 1). End-to-end latency is the client's (send to answer, HTTP
included). A request counts as lost if no answer at all came back before the deadline; an answer other than 200 or
503 counts under "errors". One warm-up request runs first (not counted): it also leaves its prompt's blocks in a
prefix cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .live import LiveEngine
from .serving import HIGH, Policy, Request


def _body(r: Request) -> dict:
    return {"prompt_ids": list(r.prompt_ids), "max_new_tokens": r.max_new_tokens,
            "priority": "high" if r.priority == HIGH else "low"}


def run_client(url: str, requests: Sequence[Request], deadline_s: float = 120.0) -> list[dict]:
    """Send `requests` to the server at `url` from a separate process (`loadclient.py`), each at its `arrival_s`
    (seconds after the first); one answer dict per request, in order (status None: lost, with the reason)."""
    first = min(r.arrival_s for r in requests)
    job = {"url": url, "bodies": [_body(r) for r in requests], "at_s": [r.arrival_s - first for r in requests],
           "deadline_s": deadline_s}
    script = Path(__file__).with_name("loadclient.py")
    try:  # the client stops at the deadline by itself; 60 s more to start and report
        done = subprocess.run([sys.executable, str(script)], input=json.dumps(job), capture_output=True, text=True,
                              check=False, timeout=deadline_s + 60)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"The load-test client did not report within {deadline_s + 60:.0f} s.") from None
    if done.returncode != 0:
        raise RuntimeError(f"The load-test client failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def summarize_load(answers: list[dict], requests: Sequence[Request], reference: dict[int, list[int]]) -> dict:
    """One results row: what came back (ok, refused, errors, lost), whether every answer equals `reference` (False
    when none came back), throughput,
    mean TTFT, and TTFT / TPOT / end-to-end latency percentiles (p50, p99) over the answered requests."""
    if len(answers) != len(requests):
        raise ValueError(f"{len(answers)} answers for {len(requests)} requests: give one answer per request, in order.")
    ok = [(r, a) for r, a in zip(requests, answers) if a["status"] == 200]
    refused = [a for a in answers if a["status"] == 503]
    tokens = sum(len(a["json"]["token_ids"]) for _, a in ok)
    span = (max(a["done_s"] for _, a in ok) - min(a["sent_s"] for _, a in ok)) if ok else float("nan")
    ttft = np.array([a["json"]["ttft_s"] for _, a in ok])
    tpot = np.array([(a["json"]["latency_s"] - a["json"]["ttft_s"]) / (len(a["json"]["token_ids"]) - 1)
                     for _, a in ok if len(a["json"]["token_ids"]) > 1])
    e2e = np.array([a["done_s"] - a["sent_s"] for _, a in ok])

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {
        "sent": len(answers), "ok": len(ok), "503": len(refused),
        "503 with Retry-After": sum(a["retry_after"] is not None for a in refused),
        "errors": sum(a["status"] not in (None, 200, 503) for a in answers),
        "lost": sum(a["status"] is None for a in answers),
        "exact": bool(ok) and all(a["json"]["token_ids"] == reference[r.rid] for r, a in ok),
        "tok/s": tokens / span if ok else 0.0,
        "TTFT mean s": float(ttft.mean()) if len(ttft) else float("nan"),
        "TTFT p50 s": pct(ttft, 50), "TTFT p99 s": pct(ttft, 99),
        "TPOT p50 ms": 1000 * pct(tpot, 50), "TPOT p99 ms": 1000 * pct(tpot, 99),
        "latency p50 s": pct(e2e, 50), "latency p99 s": pct(e2e, 99),
    }


def load_test(model, tokenizer, policy: Policy, requests: Sequence[Request], reference: dict[int, list[int]],
              max_in_flight: int | None = None, deadline_s: float = 120.0) -> dict:
    """Serve `policy` over HTTP on 127.0.0.1, send `requests` from a client process on their arrival times, and
    summarize (`summarize_load`). One warm-up request first, so the first timed passes are not the process's first."""
    from .server import BackgroundServer, create_app

    if not requests:
        raise ValueError("load_test needs at least one request.")
    max_prompt = max(len(r.prompt_ids) for r in requests)
    max_new = max(r.max_new_tokens for r in requests)
    live = LiveEngine(model, policy, max_prompt_tokens=max(256, max_prompt), max_new_limit=max(64, max_new),
                      max_in_flight=max_in_flight, request_timeout_s=deadline_s).start()
    try:
        live.submit(list(requests[0].prompt_ids), 2)  # warm-up, not counted
        with BackgroundServer(create_app(live, tokenizer)) as server:
            answers = run_client(server.url, requests, deadline_s)
    finally:
        live.stop()
    return {"policy": policy.label} | summarize_load(answers, requests, reference)
