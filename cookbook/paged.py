"""A paged KV cache from scratch: fixed-size blocks, a free list, block tables, prefix sharing, admission by memory.

A server that gives every request one contiguous KV buffer must size it before the answer exists, so it reserves for
the longest answer it allows and wastes the rest (over-reservation), and the holes left by finished requests rarely fit
the next one (fragmentation). PagedAttention (vLLM) cuts the cache into blocks of `block_size` token slots:

- `BlockPool` holds every layer's keys and values as `n_blocks` blocks, a free list and a reference count per block;
- `PagedCache` is one sequence's view: a block table (logical block i -> physical block) and a length. It takes a new
  block only when its last one is full, so at most `block_size - 1` slots per sequence sit empty. It offers what
  `core.forward_tokens` needs of a cache (`length`, `reserve`, `write`, `read`): attention gathers the sequence's
  keys through its block table, so the model runs unchanged on it;
- `PrefixCache` remembers the full blocks of earlier prompts by their token prefix: a request that starts with the
  same tokens (a shared system prompt) points its table at those blocks (one more reference each) and prefills only
  the rest. A block shared by several sequences is copied before one of them writes into it (copy-on-write);
- `PagedEngine` admits a waiting request when its blocks fit beside the blocks the running sequences take at this
  step, grows running sequences block by block, and when the pool runs dry preempts the last sequence in queue order
  by *recompute*: its blocks are freed and, readmitted, it
  prefills its prompt and the tokens it already produced again (nothing is swapped). `PreallocatedEngine` is the
  baseline: admission by the contiguous reservation of each request.

Both are chosen with `serving.Policy(kind="continuous", memory=KVMemory(...))` and run by `serving.simulate`,
so every run is checked token for token against `model.generate` like the other policies.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import serving as sv


class OutOfBlocks(RuntimeError):
    """The pool has no free block; the engine's admission and preemption are meant to prevent this."""


# ---------------------------------------------------------------- the pool and one sequence's view of it


class BlockPool:
    """Keys and values of every layer as `n_blocks` blocks of `block_size` token slots, a free list and reference
    counts.

    keys, values: (layers, n_blocks * block_size, kv_heads, head_dim); token slot = block * block_size + offset.
    Without `storage` (layers, kv_heads, head_dim) the pool only does the bookkeeping (a replayed run,
    `serving.Replay`).
    """

    def __init__(self, n_blocks: int, block_size: int = 16, storage: tuple[int, int, int] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs n_blocks >= 1 and block_size >= 1, got {n_blocks} and {block_size}.")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.keys = self.values = None
        if storage is not None:
            layers, kv_heads, head_dim = storage
            self.keys = torch.zeros(layers, n_blocks * block_size, kv_heads, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)
        self.refs = [0] * n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self.copies = 0  # copy-on-write copies made

    @classmethod
    def for_model(cls, model, n_blocks: int, block_size: int = 16) -> BlockPool:
        """A pool shaped for `model`'s KV heads (bookkeeping only if `model` is a `serving.Replay`)."""
        if isinstance(model, sv.Replay):
            return cls(n_blocks, block_size)
        cfg, p = model.config, next(model.parameters())
        storage = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        return cls(n_blocks, block_size, storage, p.dtype, p.device)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self) -> int:
        """Take a free block (reference count 1)."""
        if not self._free:
            raise OutOfBlocks(f"All {self.n_blocks} KV blocks are in use: free or preempt a sequence first.")
        block = self._free.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a block that is in use."""
        if self.refs[block] < 1:
            raise ValueError(f"Block {block} is free: only a block in use can be shared.")
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; the last one returns the block to the free list."""
        if self.refs[block] < 1:
            raise ValueError(f"Block {block} is already free (released twice?).")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)

    def copy(self, block: int) -> int:
        """A new block holding the same keys and values as `block`, in every layer (copy-on-write)."""
        new = self.allocate()
        if self.keys is not None:
            bs = self.block_size
            src, dst = slice(block * bs, (block + 1) * bs), slice(new * bs, (new + 1) * bs)
            self.keys[:, dst], self.values[:, dst] = self.keys[:, src], self.values[:, src]
        self.copies += 1
        return new

    def slots(self, table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices (end - start,) of token positions [start, end) of a sequence with block `table`."""
        pos = torch.arange(start, end)
        blocks = torch.as_tensor(list(table), dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.keys.device)


class PagedCache:
    """One sequence's KV cache as a block table into a `BlockPool`: the protocol `core.forward_tokens` uses."""

    def __init__(self, pool: BlockPool, blocks: Sequence[int] = (), length: int = 0) -> None:
        self.pool, self.blocks, self.length = pool, list(blocks), length

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def _blocks_for(self, total: int) -> range:
        """Logical blocks that tokens [length, total) are written to and that exist already."""
        bs = self.pool.block_size
        return range(self.length // bs, min(math.ceil(total / bs), len(self.blocks)))

    def blocks_needed(self, total: int) -> int:
        """Free blocks `reserve(total)` takes: new blocks, plus copies of shared blocks it must write into."""
        grow = max(0, math.ceil(total / self.pool.block_size) - len(self.blocks))
        return grow + sum(self.pool.refs[self.blocks[i]] > 1 for i in self._blocks_for(total))

    def reserve(self, total: int) -> None:
        """Make tokens [length, total) writable: copy shared blocks in that range, append blocks up to `total`."""
        for i in self._blocks_for(total):
            if self.pool.refs[self.blocks[i]] > 1:  # copy-on-write: others keep the original
                old, self.blocks[i] = self.blocks[i], self.pool.copy(self.blocks[i])
                self.pool.release(old)
        while self.capacity < total:
            self.blocks.append(self.pool.allocate())

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter one layer's k, v (kv_heads, t, head_dim) to the slots of positions [start, start + t)."""
        slots = self.pool.slots(self.blocks, start, start + k.shape[1])  # (t,)
        self.pool.keys[layer].index_copy_(0, slots, k.transpose(0, 1))  # pool rows are (slot, kv_heads, head_dim)
        self.pool.values[layer].index_copy_(0, slots, v.transpose(0, 1))

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather one layer's keys and values of positions [0, end) through the block table:
        (kv_heads, end, head_dim)."""
        slots = self.pool.slots(self.blocks, 0, end)  # (end,)
        return (self.pool.keys[layer].index_select(0, slots).transpose(0, 1),
                self.pool.values[layer].index_select(0, slots).transpose(0, 1))

    def free(self) -> None:
        """Give every block back (shared ones lose one holder)."""
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.length = [], 0


# ---------------------------------------------------------------- prefix sharing


class PrefixCache:
    """Full blocks of earlier sequences, found again by the whole token prefix they end. The cache holds one
    reference on each, so a block outlives its sequence until the pool needs it (least recently used first)."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._blocks: OrderedDict[tuple[int, ...], int] = OrderedDict()  # tokens[:end] -> block holding [end - bs, end)

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks of the longest run of full blocks that starts `tokens`."""
        bs, keys = self.pool.block_size, []
        for end in range(bs, len(tokens) + 1, bs):
            key = tuple(tokens[:end])
            if key not in self._blocks:
                break
            keys.append(key)
        self._touch(keys)
        return [self._blocks[k] for k in keys]

    def _touch(self, keys: list[tuple[int, ...]]) -> None:
        """Mark a chain of prefixes used, the shortest last: eviction then takes the tail of a prefix before its
        head, so what is left of a prefix can still be matched."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Remember the full blocks of a sequence whose cached tokens are `tokens`, held in `blocks`."""
        bs, keys = self.pool.block_size, []
        for i in range(len(tokens) // bs):
            keys.append(tuple(tokens[: (i + 1) * bs]))
            if keys[-1] not in self._blocks:
                self.pool.share(blocks[i])
                self._blocks[keys[-1]] = blocks[i]
        self._touch(keys)

    def evict(self, n: int) -> int:
        """Drop least recently used blocks that no sequence holds until `n` are freed; return how many were."""
        freed = 0
        for key in list(self._blocks):
            if freed >= n:
                break
            block = self._blocks[key]
            if self.pool.refs[block] == 1:  # only the cache holds it
                del self._blocks[key]
                self.pool.release(block)
                freed += 1
        return freed


# ---------------------------------------------------------------- engines: admission by memory


@dataclass(frozen=True)
class KVMemory:
    """The KV memory of a server and how it is handed out (`serving.Policy(memory=...)`).

    budget_tokens: KV token slots in all (times `token_bytes(model)` for bytes).
    paged=False: each admitted request reserves one contiguous buffer for its prompt + `reserve_new_tokens` new
    tokens (its own max_new_tokens when None: exact here, because generation ignores EOS; a real server must reserve
    for the longest answer it allows). paged=True: blocks of `block_size` tokens, taken as sequences grow;
    prefix_cache=True also shares the full blocks of prompts seen before.
    """

    budget_tokens: int
    paged: bool = True
    block_size: int = 16
    prefix_cache: bool = False
    reserve_new_tokens: int | None = None

    def __post_init__(self) -> None:
        ints = {"budget_tokens": self.budget_tokens, "block_size": self.block_size,
                "reserve_new_tokens": self.reserve_new_tokens or 1}
        bad = {k: v for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer))}
        if bad:
            raise ValueError(f"KVMemory needs whole numbers of tokens, got {bad}.")
        if self.block_size < 1 or self.budget_tokens < self.block_size:
            raise ValueError(f"KVMemory needs block_size >= 1 and budget_tokens >= block_size, got "
                             f"{self.block_size} and {self.budget_tokens}.")
        if self.prefix_cache and not self.paged:
            raise ValueError("prefix_cache=True needs paged=True: prefixes are shared block by block.")
        if self.reserve_new_tokens is not None and (self.paged or self.reserve_new_tokens < 1):
            raise ValueError("reserve_new_tokens (>= 1) is for the preallocated cache (paged=False) only.")

    def engine(self, model, policy: sv.Policy) -> sv.ContinuousEngine:
        if not self.paged:
            return PreallocatedEngine(model, policy.max_batch, policy.priority_delay_s, self.budget_tokens,
                                      self.reserve_new_tokens, policy.mixed)
        pool = BlockPool.for_model(model, self.budget_tokens // self.block_size, self.block_size)
        return PagedEngine(model, pool, policy.max_batch, policy.priority_delay_s, self.prefix_cache, policy.mixed)


def token_bytes(model) -> int:
    """KV cache bytes per token: keys and values of every layer's KV heads."""
    cfg, p = model.config, next(model.parameters())
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * p.element_size()


class PreallocatedEngine(sv.ContinuousEngine):
    """Continuous batching where each request reserves one contiguous buffer for prompt + new tokens, admitted
    while the reservations fit in `budget_tokens` (the baseline a paged cache is measured against)."""

    def __init__(self, model, max_batch: int, priority_delay_s: float, budget_tokens: int,
                 reserve_new_tokens: int | None = None, mixed: bool = False) -> None:
        super().__init__(model, max_batch, priority_delay_s, mixed=mixed)
        self.budget, self.reserve_new = budget_tokens, reserve_new_tokens

    def reservation(self, s: sv.SeqState) -> int:
        return len(s.request.prompt_ids) + (self.reserve_new or s.request.max_new_tokens)

    def kv_reserved(self) -> int:
        return sum(self.reservation(s) for s in self.running)

    def check(self, r: sv.Request) -> None:
        if self.reserve_new is not None and r.max_new_tokens > self.reserve_new:
            raise ValueError(f"Request {r.rid} asks {r.max_new_tokens} new tokens; this server reserves "
                             f"{self.reserve_new}: lower max_new_tokens or raise KVMemory.reserve_new_tokens.")
        need = self.reservation(sv.SeqState(r))
        if need > self.budget:
            raise ValueError(f"Request {r.rid} needs {need} KV token slots; the budget is "
                             f"{self.budget}: raise KVMemory.budget_tokens or shorten the request.")

    def _admit(self, clock: sv.VirtualClock) -> list[sv.SeqState]:
        self.waiting.sort(key=self._key)
        held, admitted = self.kv_reserved(), []
        while (self.waiting and len(self.running) + len(admitted) < self.max_batch
               and held + self.reservation(self.waiting[0]) <= self.budget):  # first come first served: no skipping
            admitted.append(self.waiting.pop(0))
            held += self.reservation(admitted[-1])
        self._enter(admitted, clock)
        return admitted


def _unservable(s: sv.SeqState, pool: BlockPool) -> OutOfBlocks:
    return OutOfBlocks(f"Request {s.request.rid} does not fit in an idle pool of {pool.n_blocks} blocks "
                       f"({pool.n_free} free): this is a bug in the engine's admission check, please report it.")


def context(s: sv.SeqState) -> list[int]:
    """The tokens a (re)admitted sequence prefills: its prompt and every token it produced before a preemption."""
    return list(s.request.prompt_ids) + s.output


class PagedEngine(sv.ContinuousEngine):
    """Continuous batching over a `BlockPool`: admission when a request's blocks fit, growth block by block,
    recompute preemption of the last sequence in queue order when the pool runs dry, optional prefix sharing."""

    def __init__(self, model, pool: BlockPool, max_batch: int = 64, priority_delay_s: float = 0.0,
                 prefix_cache: bool = False, mixed: bool = False) -> None:
        super().__init__(model, max_batch, priority_delay_s, mixed=mixed)
        self.pool = pool
        self.prefix = PrefixCache(pool) if prefix_cache else None

    def kv_reserved(self) -> int:
        """Token slots of the distinct blocks the running sequences hold (a shared block counts once; blocks only the
        prefix cache holds are not counted: they are given back whenever the pool needs them)."""
        return len({b for s in self.running for b in s.cache.blocks}) * self.pool.block_size

    def check(self, r: sv.Request) -> None:
        bs = self.pool.block_size
        need = math.ceil((len(r.prompt_ids) + r.max_new_tokens) / bs) + (self.prefix is not None)
        if need > self.pool.n_blocks:
            raise ValueError(f"Request {r.rid} needs {need} blocks of {bs} tokens"
                             f"{' (one spare for copy-on-write)' if self.prefix is not None else ''}; the pool has "
                             f"{self.pool.n_blocks}: raise KVMemory.budget_tokens or shorten the request.")

    def step(self, clock: sv.VirtualClock) -> list[sv.SeqState]:
        new = self._admit(clock)
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))  # one-token answers retire below
        if self.mixed and new:
            return self._mixed_step(new, clock)
        if new:
            self._prefill(new, clock)
        finished = self._retire()  # answers of one token end at their prefill: free their blocks now
        to_decode = self._grow([s for s in self.running if s not in new])
        if to_decode:
            sv._decode(self.model, to_decode, clock, self.stats)
            self._advance_replayed(to_decode, [1] * len(to_decode))
        self.stats.record_memory(self.kv_reserved(), sum(s.cache.length for s in self.running), len(self.running))
        return finished + self._retire()

    # -- admission

    def _admit(self, clock: sv.VirtualClock) -> list[sv.SeqState]:
        self.waiting.sort(key=self._key)
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            cache = self._allocate(context(self.waiting[0]))
            if cache is None:  # first come first served: the head waits for blocks, nobody overtakes it
                break
            s = self.waiting.pop(0)
            s.cache = cache
            admitted.append(s)
        self._enter(admitted, clock)
        if self.waiting and not self.running:  # `check` makes this impossible; never spin on it
            raise _unservable(self.waiting[0], self.pool)
        return admitted

    def _allocate(self, tokens: list[int]) -> PagedCache | None:
        """A cache for `tokens` (cached prefix blocks shared, the rest reserved), or None if the blocks do not fit."""
        hit = self.prefix.match(tokens) if self.prefix is not None else []
        for b in hit:
            self.pool.share(b)
        # at least the last token is computed, for its logits: if the prefix covers everything, its block is copied
        cache = PagedCache(self.pool, hit, min(len(hit) * self.pool.block_size, len(tokens) - 1))
        # set aside the blocks the running sequences take at this step's decode: admitting into them would only
        # preempt the newcomer (last in queue order) right after its prefill
        need = cache.blocks_needed(len(tokens)) + sum(s.cache.blocks_needed(s.cache.length + 1) for s in self.running)
        if need > self.pool.n_free and self.prefix is not None:
            self.prefix.evict(need - self.pool.n_free)
        if need > self.pool.n_free:
            cache.free()
            return None
        cache.reserve(len(tokens))
        return cache

    # -- passes

    def _mixed_step(self, new: list[sv.SeqState], clock: sv.VirtualClock) -> list[sv.SeqState]:
        """A step with newcomers under `mixed=True`: room for one more token in each running sequence, then one
        packed pass for the newcomers' uncached tokens and the running sequences' last tokens."""
        running = self._grow([s for s in self.running if s not in new and not s.done])
        new = [s for s in new if s in self.running]  # growth may preempt a newcomer (the last in queue order)
        contexts, fed = self._feed(new)
        sv.mixed_pass(self.model, new, fed, running, clock, self.stats)
        self._advance_replayed(new + running, [len(f) for f in fed] + [1] * len(running))
        self._share_prefixes(new, contexts)
        self.stats.record_memory(self.kv_reserved(), sum(s.cache.length for s in self.running), len(self.running))
        return self._retire()

    def _feed(self, seqs: list[sv.SeqState]) -> tuple[list[list[int]], list[list[int]]]:
        """Each new sequence's context and the part of it not in its cache yet (what its prefill computes)."""
        contexts = [context(s) for s in seqs]  # taken before the pass appends each one's next token
        fed = [c[s.cache.length:] for s, c in zip(seqs, contexts)]
        for s, f in zip(seqs, fed):
            self.stats.prefix_hit_tokens += s.cache.length
            self.stats.recomputed_tokens += len(f) if s.preemptions else 0
        return contexts, fed

    def _share_prefixes(self, seqs: list[sv.SeqState], contexts: list[list[int]]) -> None:
        if self.prefix is not None:
            for s, tokens in zip(seqs, contexts):
                self.prefix.insert(tokens, s.cache.blocks)

    def _prefill(self, seqs: list[sv.SeqState], clock: sv.VirtualClock) -> None:
        """One left-padded pass over the tokens of each new sequence that are not in its cache yet."""
        contexts, fed = self._feed(seqs)
        sv.prefill_pass(self.model, seqs, fed, clock, self.stats)
        self._advance_replayed(seqs, [len(f) for f in fed])
        self._share_prefixes(seqs, contexts)

    def _advance_replayed(self, seqs: list[sv.SeqState], n: list[int]) -> None:
        """A replayed pass writes nothing; move the lengths as the real pass would have."""
        if isinstance(self.model, sv.Replay):
            for s, k in zip(seqs, n):
                s.cache.length += k

    # -- growth, preemption, retirement

    def _grow(self, seqs: list[sv.SeqState]) -> list[sv.SeqState]:
        """Room for one more token in each sequence, in queue order; when the pool runs dry, evict cached prefixes,
        then preempt the running sequence that is last in queue order (possibly the one asking)."""
        for s in sorted(seqs, key=self._key):
            if s not in self.running:  # preempted for an earlier one
                continue
            total = s.cache.length + 1
            while s.cache.blocks_needed(total) > self.pool.n_free:
                short = s.cache.blocks_needed(total) - self.pool.n_free
                if self.prefix is not None and self.prefix.evict(short):
                    continue
                victim = max((r for r in self.running if not r.done), key=self._key)
                self._preempt(victim)
                if victim is s:
                    break
            else:
                s.cache.reserve(total)
        return [s for s in seqs if s in self.running]

    def _preempt(self, s: sv.SeqState) -> None:
        """Recompute preemption: free the blocks; readmitted, the sequence prefills its prompt and output again."""
        s.cache.free()
        s.cache = None
        self.running.remove(s)
        self.waiting.append(s)
        s.preemptions += 1
        self.stats.preemptions += 1

    def _retire(self) -> list[sv.SeqState]:
        done = [s for s in self.running if s.done]
        for s in done:
            s.cache.free()
        self.running = [s for s in self.running if not s.done]
        return done


# ---------------------------------------------------------------- workloads and results


def with_shared_prefix(requests: Sequence[sv.Request], prefix_ids: Sequence[int],
                       bos_id: int | None = 2) -> list[sv.Request]:
    """The same requests with `prefix_ids` (a system prompt) right after BOS: every prompt now starts alike."""
    out = []
    for r in requests:
        head = r.prompt_ids[:1] if bos_id is not None and r.prompt_ids[:1] == (bos_id,) else ()
        prompt = head + tuple(int(t) for t in prefix_ids) + r.prompt_ids[len(head):]
        out.append(dataclasses.replace(r, prompt_ids=prompt))
    return out


def memory_summary(result: sv.RunResult) -> dict:
    """One results-table row of a memory-bound run: KV slots reserved per token cached, peak concurrency,
    prefill work saved by prefix sharing or redone after preemption, and time to first token."""
    st = result.stats
    return {
        "policy": result.policy.label,
        "reserved / used": st.kv_overhead,
        "peak running": st.peak_running,
        "peak KV tokens": st.peak_kv_reserved,
        "prefill tokens": st.prefill_slots - st.prefill_pad_slots,
        "prefix hits": st.prefix_hit_tokens,
        "preemptions": st.preemptions,
        "recomputed": st.recomputed_tokens,
        "TTFT mean s": float(np.mean(result.ttfts())),
        "tok/s": result.throughput,
    }
