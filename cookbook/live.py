"""Serving on the wall clock: the engines of `cookbook.serving` driven by a background thread while requests arrive.

`LiveEngine` takes requests from any thread (`submit` blocks until the answer is complete) and runs one engine
step at a time in its own thread, the only one that touches the model. The engine is the one the policy names:
continuous batching (`serving.ContinuousEngine`, or a memory-bound engine of `cookbook.paged`) or dynamic batching
(`DynamicEngine`, request-level). Static batching cannot run live: a partial batch would wait forever for its last
request, since a live server cannot know that no more will come (`serving.simulate` can); bounding that wait is
exactly dynamic batching. `cookbook.server` puts the HTTP front end on it and `cookbook.loadtest` measures it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Sequence

from .serving import (
    LOW,
    ContinuousEngine,
    Policy,
    Request,
    SeqState,
    Stats,
    VirtualClock,
    _decode,
    _prefill,
    continuous_engine,
    queue_key,
    validate_request,
)


class WallClock(VirtualClock):
    """Real time since creation, for the live server."""

    def __init__(self) -> None:
        super().__init__()
        self._t0 = time.perf_counter()

    @property  # type: ignore[override]
    def now(self) -> float:
        return time.perf_counter() - self._t0

    @now.setter
    def now(self, _: float) -> None:  # time moves by itself
        pass

    def run(self, fn, n_sequences, token_slots):
        start = time.perf_counter()
        result = fn()
        self.busy_s += time.perf_counter() - start
        return result


class DynamicEngine:
    """Dynamic batching as a step engine: a batch of up to `max_batch` starts when that many wait or when the oldest
    has waited `window_s`, then runs to completion (request-level: finished rows keep decoding, as in `simulate`)."""

    def __init__(self, model, policy: Policy) -> None:
        if policy.kind != "dynamic":
            raise ValueError(f"DynamicEngine serves kind='dynamic', got {policy.kind!r}.")
        self.model, self.policy, self.max_batch = model, policy, policy.max_batch
        self.waiting: list[SeqState] = []
        self.batch: list[SeqState] = []
        self.extra: dict[int, list[int]] = {}  # finished rows' continuations (padding work)
        self.stats = Stats()

    def check(self, request: Request) -> None:
        """Every valid request fits: the per-sequence caches grow on demand."""

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.batch)

    def wait_s(self, now: float) -> float:
        """0 when a batch runs or can start; else seconds until the oldest request's window closes (inf: none waits)."""
        if self.batch or len(self.waiting) >= self.max_batch:
            return 0.0
        if not self.waiting:
            return math.inf
        return max(0.0, min(s.request.arrival_s for s in self.waiting) + self.policy.window_s - now)

    def step(self, clock: VirtualClock) -> list[SeqState]:
        """Start a batch (one prefill) or decode the running one; returns the batch once all of it is done."""
        if not self.batch:
            if self.wait_s(clock.now) > 0:
                return []
            self.waiting.sort(key=lambda s: queue_key(s.request, self.policy.priority_delay_s))
            self.batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            for s in self.batch:
                s.admitted_s = clock.now
            self.extra = {}
            _prefill(self.model, self.batch, clock, self.stats)
        else:
            _decode(self.model, self.batch, clock, self.stats, self.extra)
        if not all(s.done for s in self.batch):
            return []
        done, self.batch = self.batch, []
        return done


def live_engine(model, policy: Policy) -> ContinuousEngine | DynamicEngine:
    """The step engine that serves `policy` live; static batching is refused with the reason."""
    if policy.kind == "static":
        raise ValueError("Static batching cannot run live: a partial batch would wait forever for its last request. "
                         "Serve it as Policy('dynamic', window_s=...), which bounds that wait.")
    return DynamicEngine(model, policy) if policy.kind == "dynamic" else continuous_engine(model, policy)


class Overloaded(RuntimeError):
    """The server already holds as many requests as it accepts; `retry_after_s` says when to try again."""

    def __init__(self, in_flight: int, retry_after_s: float) -> None:
        super().__init__(f"The server is at capacity ({in_flight} requests in flight): retry in about "
                         f"{retry_after_s:.0f} s.")
        self.retry_after_s = retry_after_s


class LiveEngine:
    """An engine (`live_engine(model, policy)`) driven by a background thread on the wall clock; `submit` blocks
    until done. Thread-safe: HTTP handlers call `submit` from any thread; only the engine thread touches the model.

    max_in_flight: requests held at once (running + queued); one more is refused with `Overloaded` instead of
    queueing without bound. request_timeout_s: how long `submit` waits for an answer by default. If the engine
    thread fails, every request in flight is released with a RuntimeError that says why, and so is every later one.
    """

    def __init__(self, model, policy: Policy | None = None, max_prompt_tokens: int = 256, max_new_limit: int = 64,
                 max_in_flight: int | None = None, request_timeout_s: float = 120.0) -> None:
        self.policy = policy or Policy("continuous", 8)
        self.engine = live_engine(model, self.policy)
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (or None for no bound), got {max_in_flight}.")
        self.max_in_flight, self.request_timeout_s = max_in_flight, request_timeout_s
        self.error: BaseException | None = None  # why the engine thread stopped, if it failed
        self.clock = WallClock()
        self.vocab_size = model.config.vocab_size
        self.max_prompt_tokens, self.max_new_limit = max_prompt_tokens, max_new_limit
        self._inbox: queue.Queue = queue.Queue()
        self._events: dict[int, threading.Event] = {}  # requests in flight
        self._lock = threading.Lock()
        self._next_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cookbook-engine")
        self.completed = 0

    def start(self) -> LiveEngine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight are released with a RuntimeError."""
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        self._release_all()

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, priority: int = LOW,
               timeout: float | None = None) -> SeqState:
        """Queue a request, wait for it, return its state (tokens and wall-clock timestamps).

        Raises ValueError for a request that can never be served and `Overloaded` when `max_in_flight` are held."""
        validate_request(prompt_ids, max_new_tokens, priority, self.vocab_size,
                         self.max_prompt_tokens, self.max_new_limit)
        if not self._thread.is_alive():
            raise RuntimeError(self._why_not_running())
        with self._lock:
            if self.max_in_flight is not None and len(self._events) >= self.max_in_flight:
                raise Overloaded(len(self._events), self._retry_after_s(len(self._events)))
            rid, self._next_id = self._next_id, self._next_id + 1
            request = Request(rid, tuple(int(t) for t in prompt_ids), int(max_new_tokens), self.clock.now, priority)
            self.engine.check(request)  # ValueError for what memory can never hold
            done = self._events[rid] = threading.Event()
        seq = SeqState(request)
        self._inbox.put(seq)
        if not self._thread.is_alive():  # it died between the check above and now: nobody will answer
            self._release_all()
        timeout = self.request_timeout_s if timeout is None else timeout
        if not done.wait(timeout):  # it stays in flight: the engine finishes it and only then lets it go
            raise TimeoutError(f"Request {rid} did not finish within {timeout} s.")
        if seq.finished_s is None:  # released without an answer: the engine failed or was stopped
            raise RuntimeError(self._why_not_running())
        return seq

    def _why_not_running(self) -> str:
        if self.error is not None:
            return f"The engine thread failed ({type(self.error).__name__}: {self.error}); start a new LiveEngine."
        if self._stop.is_set():
            return "The engine was stopped; start a new LiveEngine."
        return "The engine is not running: call start() first."

    def _release_all(self) -> None:
        """Wake every request in flight (they find no answer and raise)."""
        with self._lock:
            for event in self._events.values():
                event.set()
            self._events.clear()

    def _retry_after_s(self, in_flight: int) -> float:
        """When a slot should free up: the requests ahead, at the rate completed so far (1 s if none yet)."""
        rate = self.completed / max(self.clock.now, 1e-9)
        return min(max(1.0, (in_flight - self.engine.max_batch + 1) / rate if rate > 0 else 1.0), 60.0)

    def _loop(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - whatever killed the engine is reported to every caller
            self.error = exc
            self._release_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = min(self.engine.wait_s(self.clock.now), 0.5)  # wake at least twice a second to see stop()
            try:  # take what arrived; sleep on the inbox only while the engine has nothing to do yet
                item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
                while True:
                    if item is not None:
                        self.engine.add(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self.engine.wait_s(self.clock.now) == 0:
                for s in self.engine.step(self.clock):
                    self.completed += 1
                    with self._lock:
                        event = self._events.pop(s.request.rid, None)  # None: released by stop()
                    if event is not None:
                        event.set()
