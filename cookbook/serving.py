"""Serving many requests with one model: static, dynamic and continuous batching, priority scheduling.

Everything here is built from scratch on a Hugging Face Gemma 3 model's weights:

- `forward_tokens` (from `cookbook.core`) runs a *ragged* batch through the decoder: each sequence brings its own
  KV cache (`KVCache`, one per request) and its own number of new tokens. New tokens are left-padded to the
  longest, cached keys are left-padded to the longest history, and an attention bias built from the
  true positions hides the padding (and keys outside Gemma 3's sliding window). Left padding puts
  every sequence's last token in the same column, so one slice gives the next-token logits.
  `forward_packed` runs the same batch without padding, every sequence's new tokens side by side in one row:
  with `Policy(mixed=True)` newcomers' prompts ride in the running sequences' decode pass instead of a pass of
  their own (Orca's iteration-level scheduling with selective batching).
- `simulate` replays a timed workload (`synthetic_workload`, in `cookbook.workload` with the `Request` it is made of)
  under one `Policy` on a virtual clock (`cookbook.clocks`):
  the model really runs, and each forward pass advances the clock by its measured wall time, or by a
  cost model fitted once from measured passes (`fit_pass_cost`) so that every policy is charged the
  same costs; idle gaps between arrivals are skipped instead of slept.
- `ContinuousEngine` is the iteration-level scheduler (admit and retire sequences every step, with
  optional priority preemption); `cookbook.live.LiveEngine` runs it in a background thread for an HTTP front end.

Generation is greedy and ignores EOS: each request gets exactly `max_new_tokens` tokens, so the
workload's output lengths are the ones drawn, and every output can be compared token for token with
`model.generate` on that request alone (`reference_outputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .clocks import PassCost, VirtualClock, fit_pass_cost  # noqa: F401  (re-exported: serving runs on them)
from .core.cache import KVCache
from .core.forward import forward_packed, forward_tokens
from .workload import (  # noqa: F401  (re-exported: a request, its checks and workloads are served here)
    HIGH,
    LOW,
    PRIORITY_NAMES,
    Request,
    generate_alone,
    make_request,
    reference_outputs,
    synthetic_workload,
    validate_request,
    with_rate,
)

# ---------------------------------------------------------------- per-request state and scheduling


@dataclass
class SeqState:
    """A request in flight: its cache, tokens so far and timestamps (seconds on the engine's clock)."""

    request: Request
    cache: KVCache | str | None = None  # REPLAYED in a replayed run
    output: list[int] = field(default_factory=list)
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return len(self.output) >= self.request.max_new_tokens


def cached_tokens(s: SeqState) -> int:
    """Tokens whose keys and values are in the sequence's cache: the prompt and every output token but the newest
    (which is fed at the next step); 0 before its prefill."""
    return len(s.request.prompt_ids) + len(s.output) - 1 if s.output else 0


def queue_key(r: Request, priority_delay_s: float) -> tuple[float, float, int]:
    """Scheduling order: a LOW request queues as if it had arrived `priority_delay_s` later.

    So HIGH requests jump ahead of LOW ones that arrived less than `priority_delay_s` earlier, but a
    LOW request is never overtaken by anything arriving more than `priority_delay_s` after it: the
    bound that prevents starvation. 0 means plain first-come-first-served; math.inf strict priority.
    """
    delay = 0.0 if r.priority == HIGH else priority_delay_s
    return (r.arrival_s + delay, r.arrival_s, r.rid)


@dataclass
class Stats:
    """Work counters of one run: forward passes and token slots computed, useful or wasted on padding."""

    prefill_passes: int = 0
    decode_steps: int = 0
    prefill_slots: int = 0  # (batch x padded prompt width) of every prefill pass
    prefill_pad_slots: int = 0
    decode_slots: int = 0  # rows of every decode step
    decode_idle_slots: int = 0  # rows whose request had already finished (static/dynamic batching)
    preemptions: int = 0
    prefix_hit_tokens: int = 0  # tokens whose keys and values came from the prefix cache at admission (paged)
    recomputed_tokens: int = 0  # tokens prefilled again after a recompute preemption (paged)
    kv_reserved_token_steps: int = 0  # KV token slots held, summed over engine steps (continuous engines)
    kv_used_token_steps: int = 0  # tokens actually cached, summed over the same steps
    peak_kv_reserved: int = 0
    peak_running: int = 0

    def record_memory(self, reserved: int, used: int, running: int) -> None:
        """Account one engine step: `reserved` KV token slots held, `used` of them filled, `running` sequences."""
        self.kv_reserved_token_steps += reserved
        self.kv_used_token_steps += used
        self.peak_kv_reserved = max(self.peak_kv_reserved, reserved)
        self.peak_running = max(self.peak_running, running)

    @property
    def kv_overhead(self) -> float:
        """KV slots reserved per token cached, averaged over steps: 1.0 = nothing reserved in vain; below 1 when
        sequences share blocks (a paged cache with prefix sharing holds a shared prefix once)."""
        return self.kv_reserved_token_steps / max(self.kv_used_token_steps, 1)

    @property
    def padding_waste(self) -> float:
        """Fraction of computed token slots that produced nothing a request asked for."""
        total = self.prefill_slots + self.decode_slots
        return (self.prefill_pad_slots + self.decode_idle_slots) / max(total, 1)


class Replay:
    """Stands in for the model in `simulate` when every request's tokens are already known.

    The scheduler and the clock's cost model run as usual; no forward pass does, and each pass hands every
    sequence its next known token. What a policy schedules depends on prompt lengths, `max_new_tokens` and
    arrival times, not on the generated tokens (a prefix cache also matches prompt tokens and produced ones, which
    a replay of the run's own outputs reproduces), so a replayed run's times and counters equal those of the real
    run under the same cost model (tests/test_serving.py and tests/test_paged.py check it). Use it to sweep loads
    once real runs of each policy have matched `reference_outputs` (`check_outputs`): their tokens are then the
    ones to replay.
    """

    def __init__(self, outputs: dict[int, list[int]]) -> None:
        self.outputs = outputs

    def check(self, requests: Sequence[Request], clock: VirtualClock) -> None:
        if clock.cost_model is None:
            raise ValueError("A replayed run has no forward passes to time: give the VirtualClock a cost model "
                             "(e.g. fit_pass_cost(model, ...)).")
        short = [r.rid for r in requests if len(self.outputs.get(r.rid, ())) < r.max_new_tokens]
        if short:
            raise ValueError(f"Replay has fewer tokens than max_new_tokens for request ids {short}: replay the "
                             "outputs of a real run of the same requests (reference_outputs or RunResult.outputs).")

    def next_tokens(self, seqs: Sequence[SeqState]) -> list[int]:
        """Each sequence's next token; a finished row (static batching's padding) repeats its last one."""
        return [self.outputs[s.request.rid][min(len(s.output), s.request.max_new_tokens - 1)] for s in seqs]


REPLAYED = "replayed"  # the cache of a sequence in a replayed run: there is none, but it has been prefilled


def _pass(model, tokens: list[list[int]], seqs: list[SeqState], clock: VirtualClock, slots: int,
          packed: bool = False) -> list[int]:
    """One forward pass over `seqs` on the clock: the greedy next token of each (replayed if `model` is a Replay).
    Left-padded (`forward_tokens`), or packed without padding (`forward_packed`)."""
    if isinstance(model, Replay):
        return clock.run(lambda: model.next_tokens(seqs), len(seqs), slots)
    run = forward_packed if packed else forward_tokens
    logits = clock.run(lambda: run(model, tokens, [s.cache for s in seqs]), len(seqs), slots)  # (b, V)
    return logits.argmax(-1).tolist()


def _new_caches(model, seqs: list[SeqState]) -> None:
    """Give each new sequence a cache sized for its whole request."""
    for s in seqs:
        capacity = len(s.request.prompt_ids) + s.request.max_new_tokens
        s.cache = REPLAYED if isinstance(model, Replay) else KVCache.for_model(model, capacity)


def _prefill(model, seqs: list[SeqState], clock: VirtualClock, stats: Stats) -> None:
    """One left-padded prefill pass over new sequences, each in a cache sized for its whole request."""
    _new_caches(model, seqs)
    prefill_pass(model, seqs, [s.request.prompt_ids for s in seqs], clock, stats)


def _take(s: SeqState, token: int, clock: VirtualClock) -> None:
    """Append a pass's token to s, stamping its first-token time (a preempted sequence keeps its first) and its
    finish time if the token ends it."""
    s.output.append(token)
    if s.first_token_s is None:
        s.first_token_s = clock.now
    if s.done:
        s.finished_s = clock.now


def mixed_pass(model, new: list[SeqState], fed: list[list[int]], running: list[SeqState], clock: VirtualClock,
               stats: Stats) -> None:
    """One packed pass (`forward_packed`) for newcomers and running sequences together: each newcomer feeds its
    tokens not cached yet (`fed`: its prompt, or what a shared prefix leaves), each running sequence its last
    token, and every one gets its next token. Nothing is padded: the pass costs its real token count."""
    tokens = fed + [[s.output[-1]] for s in running]
    nexts = _pass(model, tokens, new + running, clock, sum(map(len, tokens)), packed=True)
    stats.prefill_passes += not running  # a pass with running sequences counts as their decode step
    stats.decode_steps += bool(running)
    stats.prefill_slots += sum(map(len, fed))
    stats.decode_slots += len(running)
    for s, tok in zip(new + running, nexts):
        _take(s, tok, clock)


def prefill_pass(model, seqs: list[SeqState], fed: list[list[int]], clock: VirtualClock, stats: Stats) -> None:
    """One left-padded pass over `fed`, the tokens of each sequence that are not in its cache yet (the whole
    prompt, or what a shared prefix leaves): each gets its next token, its first-token time if it had none (a
    preempted sequence computed again keeps its first), and its finish time if that token ends it."""
    width = max(map(len, fed))
    tokens = _pass(model, fed, seqs, clock, len(seqs) * width)
    stats.prefill_passes += 1
    stats.prefill_slots += len(seqs) * width
    stats.prefill_pad_slots += sum(width - len(f) for f in fed)
    for s, tok in zip(seqs, tokens):
        _take(s, tok, clock)


def _decode(model, seqs: list[SeqState], clock: VirtualClock, stats: Stats, extra: dict[int, list[int]] | None = None) -> None:
    """One decode step: every sequence feeds its last token. Finished rows (static batching) keep
    running on their own continuation (`extra`), which is the padding waste of request-level batching."""
    def last(s: SeqState) -> int:
        tail = extra.get(s.request.rid) if extra else None
        return tail[-1] if tail else s.output[-1]
    tokens = _pass(model, [[last(s)] for s in seqs], seqs, clock, len(seqs))
    stats.decode_steps += 1
    stats.decode_slots += len(seqs)
    for s, tok in zip(seqs, tokens):
        if s.done:
            stats.decode_idle_slots += 1
            if extra is not None:
                extra.setdefault(s.request.rid, []).append(tok)
            continue
        s.output.append(tok)
        if s.done:
            s.finished_s = clock.now


class ContinuousEngine:
    """Iteration-level batching: every `step` retires finished sequences, admits waiting ones into free
    slots (in `queue_key` order), prefills the newcomers in one pass, then decodes all running ones; with
    `mixed=True` the newcomers' prompts and the running sequences' last tokens share one packed pass instead.

    With `preempt=True`, a waiting HIGH request that finds the batch full evicts the running LOW
    sequence that is last in queue order. The evicted sequence keeps its KV cache (nothing is
    recomputed; a GPU server would swap it to host memory) and resumes where it stopped when readmitted.
    """

    def __init__(self, model, max_batch: int = 8, priority_delay_s: float = 0.0, preempt: bool = False,
                 mixed: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        if priority_delay_s < 0:
            raise ValueError(f"priority_delay_s must be >= 0, got {priority_delay_s}.")
        self.model, self.max_batch, self.delay, self.preempt = model, max_batch, priority_delay_s, preempt
        self.mixed = mixed
        self.waiting: list[SeqState] = []
        self.running: list[SeqState] = []
        self.stats = Stats()

    def check(self, request: Request) -> None:
        """Raise ValueError, saying what to change, if this engine can never serve `request` (memory-bound engines)."""

    def add(self, seq: SeqState) -> None:
        self.check(seq.request)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def wait_s(self, now: float) -> float:
        """Seconds until a `step` can do something without a new arrival: 0 with work, inf without."""
        return 0.0 if self.has_work() else math.inf

    def _key(self, s: SeqState):
        return queue_key(s.request, self.delay)

    def kv_reserved(self) -> int:
        """KV token slots held by the running sequences: each cache is allocated for prompt + max_new_tokens."""
        return sum(len(s.request.prompt_ids) + s.request.max_new_tokens for s in self.running)

    def _admit(self, clock: VirtualClock) -> list[SeqState]:
        self.waiting.sort(key=self._key)
        if self.preempt:
            self._preempt_for_high()
        free = self.max_batch - len(self.running)
        admitted, self.waiting = self.waiting[:free], self.waiting[free:]
        self._enter(admitted, clock)
        return [s for s in admitted if s.cache is None]  # preempted ones resume without a prefill

    def _enter(self, admitted: list[SeqState], clock: VirtualClock) -> None:
        """Move admitted sequences into the running batch; the first admission is the one timed."""
        for s in admitted:
            if s.admitted_s is None:
                s.admitted_s = clock.now
        self.running += admitted

    def _preempt_for_high(self) -> None:
        free = self.max_batch - len(self.running)
        for w in [w for w in self.waiting if w.request.priority == HIGH][max(free, 0):]:
            victims = [r for r in self.running if r.request.priority > w.request.priority
                       and self._key(r) > self._key(w)]
            if not victims:
                break
            victim = max(victims, key=self._key)
            self.running.remove(victim)
            victim.preemptions += 1
            self.stats.preemptions += 1
            self.waiting.append(victim)
        self.waiting.sort(key=self._key)

    def step(self, clock: VirtualClock) -> list[SeqState]:
        """One iteration; returns the sequences that finished in it."""
        new = self._admit(clock)
        to_decode = [s for s in self.running if not s.done and s not in new]
        if self.mixed and new:
            _new_caches(self.model, new)
            mixed_pass(self.model, new, [list(s.request.prompt_ids) for s in new], to_decode, clock, self.stats)
        else:
            if new:
                _prefill(self.model, new, clock, self.stats)
            if to_decode:
                _decode(self.model, to_decode, clock, self.stats)
        self.stats.record_memory(self.kv_reserved(), sum(cached_tokens(s) for s in self.running), len(self.running))
        finished = [s for s in self.running if s.done]
        self.running = [s for s in self.running if not s.done]
        return finished


# ---------------------------------------------------------------- policies and the simulator


@dataclass(frozen=True)
class Policy:
    """How requests are batched.

    kind: "static" (wait for `max_batch` requests, run the batch to completion), "dynamic" (launch
    when `max_batch` are waiting or the oldest has waited `window_s`, run to completion) or
    "continuous" (iteration-level). priority_delay_s: see `queue_key`. preempt: continuous only.
    mixed: continuous only: newcomers' prompts share the running sequences' decode pass, packed without padding
    (`mixed_pass`), instead of a left-padded prefill pass of their own before it.
    memory: a `cookbook.paged.KVMemory` (continuous only): admit requests by the KV memory they need, in a
    preallocated or a paged cache, instead of by batch slots alone.
    """

    kind: str
    max_batch: int = 8
    window_s: float = 0.0
    priority_delay_s: float = 0.0
    preempt: bool = False
    name: str = ""
    memory: object | None = None
    mixed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("static", "dynamic", "continuous"):
            raise ValueError(f"Unknown policy kind {self.kind!r}; use 'static', 'dynamic' or 'continuous'.")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}.")
        if self.window_s < 0 or self.priority_delay_s < 0:
            raise ValueError("window_s and priority_delay_s must be >= 0.")
        if (self.preempt or self.mixed) and self.kind != "continuous":
            raise ValueError("preempt=True and mixed=True need kind='continuous': request-level batches prefill "
                             "together, then run to completion.")
        if self.memory is not None and not callable(getattr(self.memory, "engine", None)):
            raise ValueError(f"memory must be a cookbook.paged.KVMemory, got {type(self.memory).__name__}.")
        if self.memory is not None and (self.kind != "continuous" or self.preempt):
            raise ValueError("memory= needs kind='continuous' without preempt=True: memory-bound engines preempt "
                             "when blocks run out, not for priority.")

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class RunResult:
    """Everything one simulated run produced: per-request states, work counters, clock."""

    policy: Policy
    seqs: list[SeqState]
    stats: Stats
    makespan_s: float
    busy_s: float

    @property
    def outputs(self) -> dict[int, list[int]]:
        return {s.request.rid: s.output for s in self.seqs}

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.output) for s in self.seqs)

    @property
    def throughput(self) -> float:
        """Generated tokens per second from the first arrival to the last completion."""
        return self.generated_tokens / self.makespan_s

    def latencies(self, priority: int | None = None) -> np.ndarray:
        return np.array([s.finished_s - s.request.arrival_s for s in self.seqs
                         if priority is None or s.request.priority == priority])

    def ttfts(self, priority: int | None = None) -> np.ndarray:
        return np.array([s.first_token_s - s.request.arrival_s for s in self.seqs
                         if priority is None or s.request.priority == priority])


def percentiles(x: np.ndarray, qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{'p50': ..., 'p95': ..., 'p99': ...} (linear interpolation, as numpy does)."""
    return {f"p{q:g}": float(np.percentile(x, q)) for q in qs}


def _arrive(pending: list[Request], now: float, into: list[SeqState]) -> list[Request]:
    while pending and pending[0].arrival_s <= now:
        into.append(SeqState(pending.pop(0)))
    return pending


def simulate(model, requests: Sequence[Request], policy: Policy, clock: VirtualClock | None = None) -> RunResult:
    """Serve `requests` under `policy` on a virtual clock and return every request's tokens and times.

    Time: requests arrive at their `arrival_s`; every forward pass advances the clock by its measured
    wall time (or the clock's cost model); when nothing can run, the clock jumps to the next event
    (an arrival, or a dynamic-batching window closing). Latency = finish - arrival, TTFT = first token -
    arrival, both on this clock, so queueing delay is included. `model` may be a `Replay` of known outputs.
    """
    if not requests:
        raise ValueError("simulate needs at least one request.")
    if len({r.rid for r in requests}) != len(requests):
        raise ValueError("Request ids (rid) must be unique.")
    clock = clock or VirtualClock()
    if isinstance(model, Replay):
        model.check(requests, clock)
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
    start = pending[0].arrival_s
    clock.wait_until(start)
    if policy.kind == "continuous":
        seqs, stats = _simulate_continuous(model, pending, policy, clock)
    else:
        seqs, stats = _simulate_request_level(model, pending, policy, clock)
    seqs.sort(key=lambda s: s.request.rid)
    return RunResult(policy, seqs, stats, max(s.finished_s for s in seqs) - start, clock.busy_s)


def continuous_engine(model, policy: Policy) -> ContinuousEngine:
    """The iteration-level engine `policy` asks for: by batch slots, or by KV memory (`policy.memory`)."""
    if policy.kind != "continuous":
        raise ValueError(f"continuous_engine needs kind='continuous', got {policy.kind!r}.")
    if policy.memory is not None:
        return policy.memory.engine(model, policy)
    return ContinuousEngine(model, policy.max_batch, policy.priority_delay_s, policy.preempt, policy.mixed)


def _simulate_continuous(model, pending: list[Request], policy: Policy, clock: VirtualClock):
    engine = continuous_engine(model, policy)
    for r in pending:  # refuse what can never be served before serving anything
        engine.check(r)
    done: list[SeqState] = []
    while pending or engine.has_work():
        _arrive(pending, clock.now, engine.waiting)
        if not engine.has_work():
            clock.wait_until(pending[0].arrival_s)
            continue
        done += engine.step(clock)
    return done, engine.stats


def _simulate_request_level(model, pending: list[Request], policy: Policy, clock: VirtualClock):
    waiting: list[SeqState] = []
    done: list[SeqState] = []
    stats = Stats()
    while pending or waiting:
        _arrive(pending, clock.now, waiting)
        waiting.sort(key=lambda s: queue_key(s.request, policy.priority_delay_s))
        full = len(waiting) >= policy.max_batch
        window_closed = (policy.kind == "dynamic" and waiting
                         and clock.now >= min(s.request.arrival_s for s in waiting) + policy.window_s)
        if not (full or window_closed or (waiting and not pending)):
            events = [pending[0].arrival_s] if pending else []
            if policy.kind == "dynamic" and waiting:
                events.append(min(s.request.arrival_s for s in waiting) + policy.window_s)
            clock.wait_until(min(events))
            continue
        batch, waiting = waiting[: policy.max_batch], waiting[policy.max_batch :]
        for s in batch:
            s.admitted_s = clock.now
        _prefill(model, batch, clock, stats)
        extra: dict[int, list[int]] = {}
        while not all(s.done for s in batch):
            _decode(model, batch, clock, stats, extra)
        done += batch
    return done, stats


# ---------------------------------------------------------------- checks


def check_outputs(result: RunResult, reference: dict[int, list[int]]) -> list[int]:
    """Request ids whose tokens differ from `reference` (or are missing); [] means all match."""
    outputs = result.outputs
    return [rid for rid, ref in reference.items() if outputs.get(rid) != ref]


def summarize(result: RunResult, load_per_s: float | None = None) -> dict:
    """One results-table row: throughput, mean TTFT, TTFT and latency percentiles, padding waste."""
    lat, ttft = percentiles(result.latencies()), percentiles(result.ttfts())
    row = {"policy": result.policy.label}
    if load_per_s is not None:
        row["load req/s"] = load_per_s
    row |= {
        "tok/s": result.throughput,
        "TTFT mean s": float(result.ttfts().mean()), "TTFT p50 s": ttft["p50"], "TTFT p95 s": ttft["p95"],
        "lat p50 s": lat["p50"], "lat p95 s": lat["p95"], "lat p99 s": lat["p99"],
        "steps": result.stats.prefill_passes + result.stats.decode_steps,
        "pad waste %": 100 * result.stats.padding_waste,
    }
    return row
