"""Tests for cookbook.serving: batched decoding is exact, schedulers keep their invariants, bad input is refused."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import serving as sv
from cookbook.core.forward import ragged_positions
from cookbook.core.ops import additive_mask, attention_mask
from cookbook.live import LiveEngine
from cookbook.models import ByteTokenizer, tiny_model


def cost(b: int, slots: int) -> float:
    return 0.01 + 0.001 * slots


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=6)  # 5 sliding-window layers (window 8) + 1 full layer, like Gemma 3


@pytest.fixture(scope="module")
def pool():
    return torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def workload(pool):
    # prompts up to 20 tokens and outputs up to 16: histories longer than the sliding window of 8
    return sv.synthetic_workload(pool, 8, rate_per_s=50, prompt_range=(3, 16), output_range=(2, 12))


@pytest.fixture(scope="module")
def reference(model, workload):
    return sv.reference_outputs(model, workload)


# ---------------------------------------------------------------- the forward pass


def test_batch_of_one_matches_hf_logits(model):
    ids = torch.randint(3, 512, (1, 13), generator=torch.Generator().manual_seed(1))
    cache = sv.KVCache.for_model(model, 4)  # too small on purpose: must grow
    ours = sv.forward_tokens(model, [ids[0].tolist()], [cache])
    theirs = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert cache.length == 13


def test_ragged_batch_matches_each_sequence_alone(model):
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    alone = []
    for p in prompts:
        c = sv.KVCache.for_model(model, 32)
        sv.forward_tokens(model, [p[:-2]], [c])
        alone.append(sv.forward_tokens(model, [p[-2:]], [c])[0])
    caches = [sv.KVCache.for_model(model, 32) for _ in prompts]
    sv.forward_tokens(model, [p[:-2] for p in prompts], caches)  # padded prefill
    batched = sv.forward_tokens(model, [p[-2:] for p in prompts], caches)  # 2 new tokens each, ragged history
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_fused_and_manual_attention_agree(model):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 12)]
    a = sv.forward_tokens(model, prompts, [sv.KVCache.for_model(model, 16) for _ in prompts], fused=True)
    b = sv.forward_tokens(model, prompts, [sv.KVCache.for_model(model, 16) for _ in prompts], fused=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(past=st.lists(st.integers(0, 20), min_size=1, max_size=4), data=st.data())
def test_attention_bias_sees_exactly_the_window(past, data):
    n_new = [data.draw(st.integers(1, 5)) for _ in past]
    window = data.draw(st.one_of(st.none(), st.integers(1, 10)))
    width, total_width = max(n_new), max(p + n for p, n in zip(past, n_new))
    q_pos, k_pos = ragged_positions(torch.tensor(past), torch.tensor(n_new), width, total_width)
    visible = additive_mask(attention_mask(q_pos, k_pos, window), torch.float32) == 0  # (b, n, T)
    for i, (p, n) in enumerate(zip(past, n_new)):
        real_q = q_pos[i][q_pos[i] >= 0].tolist()
        assert real_q == list(range(p, p + n))  # queries carry their true positions
        assert sorted(k_pos[i][k_pos[i] >= 0].tolist()) == list(range(p + n))
        for j in range(width - n, width):
            seen = sorted(k_pos[i][visible[i, j]].tolist())
            q = q_pos[i, j].item()
            lo = 0 if window is None else max(0, q - window + 1)
            assert seen == list(range(lo, q + 1))


def test_generate_alone_matches_hf_generate(model, workload, reference):
    for r in workload[:4]:
        assert sv.generate_alone(model, r) == reference[r.rid]


# ---------------------------------------------------------------- schedulers


POLICIES = [
    sv.Policy("static", 4),
    sv.Policy("dynamic", 4, window_s=0.05),
    sv.Policy("continuous", 4),
    sv.Policy("continuous", 3, priority_delay_s=0.1, preempt=True),
    sv.Policy("continuous", 2, priority_delay_s=math.inf),
    sv.Policy("continuous", 4, mixed=True),
    sv.Policy("continuous", 3, priority_delay_s=0.1, preempt=True, mixed=True),
]


def policy_id(p: sv.Policy) -> str:
    return f"{p.kind}-{p.max_batch}-{p.preempt}" + ("-mixed" if p.mixed else "")


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_every_request_completes_with_its_solo_output(model, workload, reference, policy):
    res = sv.simulate(model, workload, policy, sv.VirtualClock(cost))
    assert sorted(res.outputs) == [r.rid for r in workload]  # none lost, none duplicated
    assert sv.check_outputs(res, reference) == []  # none corrupted
    for s in res.seqs:
        assert s.request.arrival_s <= s.admitted_s <= s.first_token_s <= s.finished_s


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
def test_a_replayed_run_schedules_and_times_exactly_like_the_real_one(model, workload, reference, policy):
    real = sv.simulate(model, workload, policy, sv.VirtualClock(cost))
    replayed = sv.simulate(sv.Replay(reference), workload, policy, sv.VirtualClock(cost))
    assert replayed.outputs == real.outputs and replayed.stats == real.stats
    assert replayed.makespan_s == real.makespan_s and replayed.busy_s == real.busy_s
    for a, b in zip(real.seqs, replayed.seqs):
        assert (a.admitted_s, a.first_token_s, a.finished_s, a.preemptions) == \
               (b.admitted_s, b.first_token_s, b.finished_s, b.preemptions)
    assert sv.summarize(replayed, 1.0) == sv.summarize(real, 1.0)


def test_replay_refuses_what_it_cannot_replay(workload, reference):
    with pytest.raises(ValueError, match="cost model"):
        sv.simulate(sv.Replay(reference), workload, sv.Policy("static", 4), sv.VirtualClock())
    short = {rid: toks[:-1] for rid, toks in reference.items()}
    with pytest.raises(ValueError, match="fewer tokens than max_new_tokens"):
        sv.simulate(sv.Replay(short), workload, sv.Policy("static", 4), sv.VirtualClock(cost))


def test_continuous_wastes_less_than_static(model, workload):
    static = sv.simulate(model, workload, sv.Policy("static", 4), sv.VirtualClock(cost))
    cont = sv.simulate(model, workload, sv.Policy("continuous", 4), sv.VirtualClock(cost))
    assert cont.stats.decode_idle_slots == 0 < static.stats.decode_idle_slots
    assert cont.stats.padding_waste < static.stats.padding_waste


def test_mixed_passes_pay_for_tokens_not_padding(model, workload):
    """A mixed pass carries the newcomers' prompts in the decode pass, unpadded: fewer passes, no padded slots, and
    on a clock that charges a fixed cost per pass, more throughput."""
    apart = sv.simulate(model, workload, sv.Policy("continuous", 4), sv.VirtualClock(cost))
    mixed = sv.simulate(model, workload, sv.Policy("continuous", 4, mixed=True), sv.VirtualClock(cost))
    assert mixed.stats.padding_waste == 0 < apart.stats.padding_waste
    passes = [r.stats.prefill_passes + r.stats.decode_steps for r in (mixed, apart)]
    assert passes[0] < passes[1] and mixed.throughput > apart.throughput
    with pytest.raises(ValueError, match="kind='continuous'"):
        sv.Policy("static", 4, mixed=True)


def test_static_batches_never_exceed_max_batch_and_run_to_completion(model, workload):
    res = sv.simulate(model, workload, sv.Policy("static", 4), sv.VirtualClock(cost))
    starts = sorted({s.admitted_s for s in res.seqs})
    for t in starts:
        batch = [s for s in res.seqs if s.admitted_s == t]
        assert len(batch) <= 4
        later = [s for s in res.seqs if s.admitted_s > t]
        assert all(o.admitted_s >= max(b.finished_s for b in batch) for o in later)


def _stream(pool, n_high: int, gap: float) -> list[sv.Request]:
    """A LOW request at t=0.001 inside a steady stream of HIGH requests."""
    ids = pool[:6].tolist()
    reqs = [sv.Request(i, tuple(ids), 6, i * gap, sv.HIGH) for i in range(n_high)]
    return reqs + [sv.Request(n_high, tuple(ids), 6, 0.001, sv.LOW)]


@pytest.mark.parametrize("kind", ["continuous", "dynamic"])
def test_no_starvation_beyond_the_priority_delay(model, pool, kind):
    delay = 0.2
    reqs = _stream(pool, 30, 0.02)
    res = sv.simulate(model, reqs, sv.Policy(kind, 1, priority_delay_s=delay), sv.VirtualClock(cost))
    low = next(s for s in res.seqs if s.request.priority == sv.LOW)
    overtakers = [s for s in res.seqs if s.request.priority == sv.HIGH and s.admitted_s < low.admitted_s]
    assert overtakers, "HIGH requests should jump ahead of the LOW one"
    assert all(s.request.arrival_s <= low.request.arrival_s + delay for s in overtakers)
    assert low.finished_s is not None


def test_strict_priority_starves_low_while_high_keep_coming(model, pool):
    reqs = _stream(pool, 30, 0.02)
    res = sv.simulate(model, reqs, sv.Policy("continuous", 1, priority_delay_s=math.inf), sv.VirtualClock(cost))
    low = next(s for s in res.seqs if s.request.priority == sv.LOW)
    assert low.admitted_s >= max(s.admitted_s for s in res.seqs if s.request.priority == sv.HIGH)


def test_preemption_lets_high_in_and_keeps_outputs_exact(model, pool):
    ids = pool[:8].tolist()
    reqs = [sv.Request(0, tuple(ids), 16, 0.0, sv.LOW), sv.Request(1, tuple(pool[10:15].tolist()), 4, 0.05, sv.HIGH)]
    ref = sv.reference_outputs(model, reqs)
    res = sv.simulate(model, reqs, sv.Policy("continuous", 1, priority_delay_s=1.0, preempt=True), sv.VirtualClock(cost))
    low, high = res.seqs
    assert res.stats.preemptions == 1 and low.preemptions == 1
    assert high.finished_s < low.finished_s
    assert sv.check_outputs(res, ref) == []
    no_pre = sv.simulate(model, reqs, sv.Policy("continuous", 1, priority_delay_s=1.0), sv.VirtualClock(cost))
    assert no_pre.seqs[1].finished_s > high.finished_s


def test_workload_is_reproducible_and_in_range(pool):
    a = sv.synthetic_workload(pool, 20, 3.0, seed=5)
    b = sv.synthetic_workload(pool, 20, 3.0, seed=5)
    assert a == b
    assert all(8 <= len(r.prompt_ids) <= 64 and 4 <= r.max_new_tokens <= 32 for r in a)
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:])) and a[0].arrival_s == 0
    faster = sv.with_rate(a, 6.0, 3.0)
    assert np.allclose([r.arrival_s * 2 for r in faster], [r.arrival_s for r in a])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args, match", [
    (([], 4), "empty"),
    (("hello", 4), "tokenize"),
    (([1, 2, 3], 0), "between 1 and"),
    (([1, 2, 3], 1000), "between 1 and"),
    (([1, 2, 3], 2.5), "integer"),
    (([1, -2, 3], 4), "outside the vocabulary"),
    (([1, 999, 3], 4), "outside the vocabulary"),
    (([1, 2.0], 4), "integers only"),
    (([1] * 2000, 4), "at most"),
])
def test_malformed_requests_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        sv.validate_request(*args, vocab_size=512)


def test_bad_priority_policy_and_workload_arguments():
    with pytest.raises(ValueError, match="priority"):
        sv.make_request(0, [1, 2], 4, priority=7)
    with pytest.raises(ValueError, match="Unknown policy"):
        sv.Policy("fifo")
    with pytest.raises(ValueError, match="preempt"):
        sv.Policy("static", preempt=True)
    with pytest.raises(ValueError, match="max_batch"):
        sv.Policy("continuous", max_batch=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        sv.synthetic_workload(torch.arange(100), 4, rate_per_s=0)


def test_simulate_refuses_empty_and_duplicate_requests(model):
    with pytest.raises(ValueError, match="at least one"):
        sv.simulate(model, [], sv.Policy("continuous"))
    r = sv.Request(0, (2, 5, 6), 3)
    with pytest.raises(ValueError, match="unique"):
        sv.simulate(model, [r, r], sv.Policy("continuous"))


def test_forward_tokens_refuses_mismatched_batches(model):
    with pytest.raises(ValueError, match="one cache per sequence"):
        sv.forward_tokens(model, [[1, 2]], [])
    with pytest.raises(ValueError, match="at least one new token"):
        sv.forward_tokens(model, [[]], [sv.KVCache.for_model(model, 4)])


def test_live_engine_serves_concurrent_requests_exactly(model, pool):
    import concurrent.futures as cf

    reqs = [sv.Request(i, tuple(pool[i * 7 : i * 7 + 5 + i].tolist()), 3 + i) for i in range(5)]
    ref = sv.reference_outputs(model, reqs)
    live = LiveEngine(model, sv.Policy("continuous", 3)).start()
    try:
        with cf.ThreadPoolExecutor(5) as ex:
            states = list(ex.map(lambda r: live.submit(list(r.prompt_ids), r.max_new_tokens), reqs))
        with pytest.raises(ValueError, match="between 1 and"):
            live.submit([2, 3], 0)
    finally:
        live.stop()
    assert [s.output for s in states] == [ref[r.rid] for r in reqs]
    with pytest.raises(RuntimeError, match="was stopped; start a new LiveEngine"):
        live.submit([2, 3], 2)


def test_http_front_end_on_loopback(model, pool):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from cookbook.server import BackgroundServer, create_app

    req = sv.Request(0, tuple(pool[:9].tolist()), 5)
    ref = sv.reference_outputs(model, [req])[0]
    live = LiveEngine(model, sv.Policy("continuous", 2)).start()
    try:
        with BackgroundServer(create_app(live, ByteTokenizer())) as server:
            assert server.url.startswith("http://127.0.0.1:")
            ok = httpx.post(server.url + "/generate", json={"prompt_ids": list(req.prompt_ids), "max_new_tokens": 5},
                            timeout=60)
            text = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_new_tokens": 2}, timeout=60)
            bad = [httpx.post(server.url + "/generate", json=body, timeout=60) for body in (
                {"prompt_ids": [], "max_new_tokens": 4},
                {"prompt": "x", "max_new_tokens": 0},
                {"prompt": "x", "prompt_ids": [2], "max_new_tokens": 3},
                {"prompt": "x", "priority": "urgent"},
                {"prompt": "x", "max_new_tokens": "many"},
            )]
        assert not server.running
    finally:
        live.stop()
    assert ok.status_code == 200 and ok.json()["token_ids"] == ref
    assert text.status_code == 200 and len(text.json()["token_ids"]) == 2
    assert [b.status_code for b in bad] == [400, 400, 400, 400, 422]
    assert "empty" in bad[0].json()["detail"] and "between 1 and" in bad[1].json()["detail"]
    with pytest.raises(ValueError, match="loopback"):
        BackgroundServer(create_app(live, ByteTokenizer()), host="0.0.0.0")


def test_fit_pass_cost_is_positive_and_grows_with_slots():
    model = tiny_model()
    cost = sv.fit_pass_cost(model, list(range(3, 19)), batch_sizes=(1, 2), repeats=2)
    assert cost.fixed_s >= 0 and cost.per_slot_s >= 0
    assert cost(2, 32) >= cost(1, 1) > 0
