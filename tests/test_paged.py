"""Tests for cookbook.paged: the block table reads what was written, memory-bound engines stay exact, blocks are
never lost or shared wrongly, prefix sharing saves prefill, bad settings are refused."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import paged as pg
from cookbook import serving as sv
from cookbook.live import LiveEngine, Overloaded
from cookbook.models import tiny_model


def cost(b: int, slots: int) -> float:
    return 0.01 + 0.001 * slots


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=6)  # sliding window 8 + a full layer, like Gemma 3


@pytest.fixture(scope="module")
def pool_ids():
    return torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def workload(pool_ids):
    return sv.synthetic_workload(pool_ids, 8, rate_per_s=50, prompt_range=(3, 16), output_range=(2, 12))


@pytest.fixture(scope="module")
def reference(model, workload):
    return sv.reference_outputs(model, workload)


def run(model, requests, memory: pg.KVMemory, max_batch: int = 8, mixed: bool = False) -> sv.RunResult:
    policy = sv.Policy("continuous", max_batch, memory=memory, mixed=mixed)
    return sv.simulate(model, requests, policy, sv.VirtualClock(cost))


# ---------------------------------------------------------------- the cache itself


@settings(max_examples=30, deadline=None)
@given(block_size=st.integers(1, 5), steps=st.lists(st.integers(1, 7), min_size=1, max_size=6))
def test_block_table_reads_back_what_was_written(block_size, steps):
    pool = pg.BlockPool(48, block_size, storage=(2, 1, 3))  # room for 6 x 7 tokens
    pool.allocate()  # block 0 taken, so logical and physical blocks differ
    cache, ref = pg.PagedCache(pool), torch.empty(1, 0, 3)
    for t in steps:
        k = torch.randn(1, t, 3)  # (kv_heads, t, head_dim)
        cache.reserve(cache.length + t)
        cache.write(1, cache.length, k, -k)
        cache.length += t
        ref = torch.cat([ref, k], dim=1)
        assert cache.capacity - cache.length < block_size  # never a whole block reserved in vain
    keys, values = cache.read(1, cache.length)
    assert torch.equal(keys, ref) and torch.equal(values, -ref)


def test_forward_on_paged_caches_equals_contiguous_caches(model):
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    pool = pg.BlockPool.for_model(model, 32, block_size=4)
    contiguous = [sv.KVCache.for_model(model, 32) for _ in prompts]
    paged = [pg.PagedCache(pool) for _ in prompts]
    for caches in (contiguous, paged):
        sv.forward_tokens(model, [p[:-2] for p in prompts], caches)
    a = sv.forward_tokens(model, [p[-2:] for p in prompts], contiguous)
    b = sv.forward_tokens(model, [p[-2:] for p in prompts], paged)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [c.length for c in paged] == [3, 17, 9] and pool.n_used == 1 + 5 + 3


def test_pool_refuses_double_release_sharing_a_free_block_and_overdraw():
    pool = pg.BlockPool(2, 4)
    b = pool.allocate()
    pool.release(b)
    with pytest.raises(ValueError, match="already free"):
        pool.release(b)
    with pytest.raises(ValueError, match="is free"):
        pool.share(b)
    pool.allocate(), pool.allocate()
    with pytest.raises(pg.OutOfBlocks, match="free or preempt"):
        pool.allocate()


# ---------------------------------------------------------------- engines


MEMORIES = {
    "paged, roomy": pg.KVMemory(256, block_size=4),
    "paged, preempting": pg.KVMemory(24, block_size=4),
    "paged + prefix, preempting": pg.KVMemory(28, block_size=4, prefix_cache=True),
    "preallocated": pg.KVMemory(40, paged=False),
    "preallocated, max answer": pg.KVMemory(64, paged=False, reserve_new_tokens=12),
}


@pytest.mark.parametrize("mixed", [False, True], ids=["apart", "mixed"])
@pytest.mark.parametrize("name", MEMORIES)
def test_memory_bound_runs_are_exact_and_replayable(model, workload, reference, name, mixed):
    res = run(model, workload, MEMORIES[name], mixed=mixed)
    assert sv.check_outputs(res, reference) == []
    assert res.stats.peak_kv_reserved <= MEMORIES[name].budget_tokens
    replayed = run(sv.Replay(res.outputs), workload, MEMORIES[name], mixed=mixed)
    assert replayed.stats == res.stats
    assert [s.finished_s for s in replayed.seqs] == [s.finished_s for s in res.seqs]


def test_a_tight_pool_preempts_by_recompute_and_loses_nothing(model, workload, reference):
    res = run(model, workload, MEMORIES["paged, preempting"])
    assert res.stats.preemptions > 0 and res.stats.recomputed_tokens > 0
    assert sorted(res.outputs) == sorted(reference)


def test_paged_reserves_less_than_preallocated(model, workload):
    paged = run(sv.Replay(sv.reference_outputs(model, workload)), workload, pg.KVMemory(256, block_size=4))
    prealloc = run(sv.Replay(paged.outputs), workload, pg.KVMemory(256, paged=False, reserve_new_tokens=12))
    assert 1.0 <= paged.stats.kv_overhead < 1.2 < prealloc.stats.kv_overhead


def drive(engine: pg.PagedEngine, requests) -> list[sv.SeqState]:
    clock, pending, done = sv.VirtualClock(cost), sorted(requests, key=lambda r: r.arrival_s), []
    while pending or engine.has_work():
        while pending and pending[0].arrival_s <= clock.now:
            engine.add(sv.SeqState(pending.pop(0)))
        if not engine.has_work():
            clock.wait_until(pending[0].arrival_s)
            continue
        done += engine.step(clock)
    return sorted(done, key=lambda s: s.request.rid)


def test_identical_prompts_share_blocks_and_copy_on_write(model, pool_ids):
    prompt = [2] + pool_ids[:11].tolist()  # 12 tokens: 3 full blocks of 4, all shared by later requests
    requests = [sv.Request(i, tuple(prompt), 5, 0.05 * i) for i in range(4)]
    ref = sv.reference_outputs(model, requests)
    engine = pg.PagedEngine(model, pg.BlockPool.for_model(model, 32, block_size=4), prefix_cache=True)
    done = drive(engine, requests)
    assert {s.request.rid: s.output for s in done} == ref
    assert engine.stats.prefix_hit_tokens > 0 and engine.pool.copies > 0
    # when all is done only the prefix cache holds blocks, one reference each
    assert engine.pool.n_used == len(engine.prefix) and all(r in (0, 1) for r in engine.pool.refs)


def test_prefix_cache_saves_prefill_and_time_to_first_token(model, workload, pool_ids):
    shared = pg.with_shared_prefix(workload, pool_ids[200:224].tolist())
    assert all(r.prompt_ids[1:25] == tuple(pool_ids[200:224].tolist()) for r in shared)
    ref = sv.reference_outputs(model, shared)
    without = run(model, shared, pg.KVMemory(512, block_size=4))
    with_cache = run(model, shared, pg.KVMemory(512, block_size=4, prefix_cache=True))
    assert sv.check_outputs(without, ref) == [] and sv.check_outputs(with_cache, ref) == []
    assert with_cache.stats.prefix_hit_tokens > 0
    assert pg.memory_summary(with_cache)["prefill tokens"] < pg.memory_summary(without)["prefill tokens"]
    assert with_cache.ttfts().mean() < without.ttfts().mean()


def test_prefix_cache_gives_blocks_back_when_the_pool_needs_them(model, workload, reference):
    res = run(model, workload, pg.KVMemory(32, block_size=4, prefix_cache=True), max_batch=2)
    assert sv.check_outputs(res, reference) == []


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("kwargs, match", [
    ({"budget_tokens": 8, "block_size": 16}, "budget_tokens >= block_size"),
    ({"budget_tokens": 64, "paged": False, "prefix_cache": True}, "prefix_cache=True needs paged=True"),
    ({"budget_tokens": 64, "reserve_new_tokens": 8}, "preallocated cache"),
])
def test_bad_memory_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pg.KVMemory(**kwargs)


def test_requests_that_can_never_fit_are_refused(model, workload):
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in workload)
    with pytest.raises(ValueError, match="raise KVMemory.budget_tokens"):
        run(model, workload, pg.KVMemory(4 * (math.ceil(longest / 4) - 1), block_size=4))
    with pytest.raises(ValueError, match="raise KVMemory.budget_tokens"):
        run(model, workload, pg.KVMemory(longest - 1, paged=False))
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        run(model, workload, pg.KVMemory(512, paged=False, reserve_new_tokens=1))
    with pytest.raises(ValueError, match="memory= needs kind='continuous'"):
        sv.Policy("static", 8, memory=pg.KVMemory(64))


# ---------------------------------------------------------------- the live engine and its HTTP front end


def test_live_engine_on_a_paged_cache_is_exact_and_refuses_overload(model, pool_ids):
    import concurrent.futures as cf

    system = pool_ids[300:316].tolist()
    reqs = [sv.Request(i, (2, *system, *pool_ids[i * 7: i * 7 + 3 + i].tolist()), 3 + i) for i in range(5)]
    ref = sv.reference_outputs(model, reqs)
    memory = pg.KVMemory(64, block_size=4, prefix_cache=True)
    live = LiveEngine(model, sv.Policy("continuous", 3, memory=memory), max_in_flight=5).start()
    try:
        with cf.ThreadPoolExecutor(5) as ex:
            states = list(ex.map(lambda r: live.submit(list(r.prompt_ids), r.max_new_tokens), reqs))
        with pytest.raises(ValueError, match="raise KVMemory.budget_tokens"):
            live.submit(pool_ids[:60].tolist(), 10)  # 70 tokens can never fit in 64
        live._events.update({-i: None for i in range(1, 6)})  # five requests in flight
        with pytest.raises(Overloaded, match=r"at capacity \(5 requests in flight\): retry in about"):
            live.submit([2, 3], 2)
        live._events.clear()
    finally:
        live.stop()
    assert [s.output for s in states] == [ref[r.rid] for r in reqs]
    assert live.engine.stats.prefix_hit_tokens > 0 and live.completed == 5


def test_http_front_end_answers_503_with_retry_after_when_full(model):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from cookbook.server import BackgroundServer, create_app

    live = LiveEngine(model, sv.Policy("continuous", 2), max_in_flight=1).start()
    try:
        live._events[-1] = None  # one request in flight already
        with BackgroundServer(create_app(live, None)) as server:
            full = httpx.post(server.url + "/generate", json={"prompt_ids": [2, 5, 7], "max_new_tokens": 2}, timeout=60)
        live._events.clear()
    finally:
        live.stop()
    assert full.status_code == 503 and "retry in about" in full.json()["detail"]
    assert int(full.headers["Retry-After"]) >= 1


# ---------------------------------------------------------------- review findings


def test_admission_leaves_the_running_sequences_their_next_block():
    # A fills 4 blocks of 4 with its 16-token prompt and needs a fifth at its first decode; B's 5 tokens need 2
    # blocks. The pool has 6: admitting B would leave A no block, and A would preempt B right after its prefill.
    a, b = sv.Request(0, tuple(range(3, 19)), 4), sv.Request(1, (2, 7, 8, 9, 10), 2)
    engine = pg.PagedEngine(sv.Replay({0: [5] * 4, 1: [6] * 2}), pg.BlockPool(6, 4))
    clock = sv.VirtualClock(cost)
    engine.add(sv.SeqState(a))
    engine.step(clock)  # A prefilled: 16 tokens cached, its next token needs block 5
    engine.add(sv.SeqState(b))
    engine.step(clock)
    assert [s.request.rid for s in engine.waiting] == [1] and engine.stats.preemptions == 0


def test_eviction_takes_the_tail_of_a_prefix_before_its_head():
    pool = pg.BlockPool(8, 2)
    cache, tokens = pg.PrefixCache(pool), [5, 6, 7, 8, 9, 10]
    blocks = [pool.allocate() for _ in range(3)]
    cache.insert(tokens, blocks)
    for b in blocks:
        pool.release(b)  # the sequence finished: only the cache holds them
    assert cache.evict(1) == 1
    assert cache.match(tokens) == blocks[:2]  # what is left still matches


def test_live_engine_reports_a_failed_engine_thread_at_once(model):
    live = LiveEngine(model, sv.Policy("continuous", 2), request_timeout_s=60)

    def broken(clock):
        raise RuntimeError("boom")

    live.engine.step = broken
    live.start()
    try:
        with pytest.raises(RuntimeError, match=r"engine thread failed \(RuntimeError: boom\)"):
            live.submit([2, 5, 7], 2)
        with pytest.raises(RuntimeError, match="engine thread failed"):
            live.submit([2, 5, 7], 2)
    finally:
        live.stop()


def test_bad_memory_objects_are_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="memory must be a cookbook.paged.KVMemory"):
        sv.Policy("continuous", 4, memory=object())
    with pytest.raises(ValueError, match="whole numbers of tokens"):
        pg.KVMemory(4096.0)
