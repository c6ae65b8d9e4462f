"""Tests for cookbook.live and cookbook.loadtest: every live policy answers exactly over HTTP from a client
process, overload is refused with a retry hint and nothing is lost, static batching is refused live."""

import math

import pytest
import torch

from cookbook import paged as pg
from cookbook import serving as sv
from cookbook.live import DynamicEngine, LiveEngine, live_engine
from cookbook.loadtest import load_test, summarize_load
from cookbook.models import ByteTokenizer, tiny_model

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=4)


@pytest.fixture(scope="module")
def workload():
    pool = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(0))
    return sv.synthetic_workload(pool, 6, rate_per_s=40, prompt_range=(3, 10), output_range=(2, 6))


@pytest.fixture(scope="module")
def reference(model, workload):
    return sv.reference_outputs(model, workload)


LIVE_POLICIES = [sv.Policy("dynamic", 4, window_s=0.05, name="dynamic"),
                 sv.Policy("continuous", 4, name="continuous"),
                 sv.Policy("continuous", 4, mixed=True, name="mixed continuous"),
                 sv.Policy("continuous", 4, memory=pg.KVMemory(128, block_size=4, prefix_cache=True), name="paged"),
                 sv.Policy("continuous", 4, memory=pg.KVMemory(128, block_size=4, prefix_cache=True), mixed=True,
                           name="mixed, paged")]


@pytest.mark.parametrize("policy", LIVE_POLICIES, ids=lambda p: p.label)
def test_every_live_policy_answers_exactly_over_http(model, workload, reference, policy):
    row = load_test(model, ByteTokenizer(), policy, workload, reference, deadline_s=60)
    assert (row["sent"], row["ok"], row["503"], row["lost"]) == (6, 6, 0, 0)
    assert row["exact"] and row["tok/s"] > 0
    assert 0 < row["TTFT p50 s"] <= row["TTFT p99 s"] and row["TPOT p50 ms"] > 0


def test_overload_is_refused_with_a_retry_hint_and_nothing_is_lost(model, workload, reference):
    burst = sv.with_rate(workload, 1000.0, 40)  # all six within a few milliseconds
    row = load_test(model, ByteTokenizer(), sv.Policy("continuous", 2), burst, reference, max_in_flight=2, deadline_s=60)
    assert row["lost"] == 0 and row["ok"] + row["503"] == 6
    assert row["ok"] >= 2 and row["503"] >= 1 and row["503 with Retry-After"] == row["503"]
    assert row["exact"]


def test_static_batching_cannot_run_live(model):
    with pytest.raises(ValueError, match="cannot run live"):
        LiveEngine(model, sv.Policy("static", 4))
    assert isinstance(live_engine(model, sv.Policy("dynamic", 2, window_s=1.0)), DynamicEngine)


def test_dynamic_engine_waits_for_a_full_batch_or_its_window(model):
    engine = DynamicEngine(model, sv.Policy("dynamic", 2, window_s=0.5))
    assert engine.wait_s(0.0) == math.inf  # nothing waits
    engine.add(sv.SeqState(sv.Request(0, (2, 5, 7), 2, arrival_s=1.0)))
    assert engine.wait_s(1.2) == pytest.approx(0.3)  # the window closes at 1.5
    assert engine.wait_s(1.6) == 0.0
    engine.add(sv.SeqState(sv.Request(1, (2, 9), 2, arrival_s=1.1)))
    assert engine.wait_s(1.2) == 0.0  # a full batch starts at once


def test_summary_counts_lost_requests(workload, reference):
    r = workload[0]
    answers = [{"status": 200, "json": {"token_ids": reference[r.rid], "ttft_s": 0.1, "latency_s": 0.5},
                "retry_after": None, "sent_s": 0.0, "done_s": 0.6},
               {"status": None, "error": "no answer within 60 s"}]
    row = summarize_load(answers, workload[:2], reference)
    assert (row["ok"], row["lost"], row["exact"]) == (1, 1, True)


def test_summary_tells_errors_from_lost_and_nothing_from_exact(workload, reference):
    answers = [{"status": 500, "json": {"detail": "Internal Server Error"}, "retry_after": None, "sent_s": 0.0,
                "done_s": 0.1}, {"status": None, "error": "no answer within 60 s"}]
    row = summarize_load(answers, workload[:2], reference)
    assert (row["ok"], row["errors"], row["lost"], row["exact"]) == (0, 1, 1, False)
    with pytest.raises(ValueError, match="one answer per request"):
        summarize_load(answers[:1], workload[:2], reference)
    with pytest.raises(ValueError, match="at least one request"):
        load_test(None, None, sv.Policy("continuous", 2), [], reference)
