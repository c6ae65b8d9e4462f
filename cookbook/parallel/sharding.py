"""What every strategy shares: divisibility checks that say what to change, shard ranges, batch and
micro-batch splits, the causal LM loss, and `CommCounter`, which records the bytes every collective moves
(wrapping the call, not guessing)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

STRATEGIES = ("single", "ddp", "fsdp", "tp", "pp")
GiB = 2**30


# ---------------------------------------------------------------- checks and sharding helpers


def check_divisible(total: int, world_size: int, what: str, fix: str = "") -> int:
    """`total // world_size`, or a ValueError naming what does not divide and what to change."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    if total % world_size:
        hint = f" {fix}" if fix else f" Use a world size that divides {total}."
        raise ValueError(f"{what} ({total}) is not divisible by the world size ({world_size}).{hint}")
    return total // world_size


def shard_range(total: int, world_size: int, rank: int, what: str = "dimension") -> slice:
    """The contiguous slice of `total` rows that `rank` owns when `world_size` ranks split it evenly."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
    size = check_divisible(total, world_size, what)
    return slice(rank * size, (rank + 1) * size)


def split_batch(batch: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This rank's equal share of a global batch (rows): (B, ...) -> (B / world_size, ...)."""
    rows = shard_range(batch.shape[0], world_size, rank, "the global batch size")
    return batch[rows]


def split_microbatches(batch: torch.Tensor, num_microbatches: int) -> list[torch.Tensor]:
    """(B, t) -> m tensors of (B / m, t); every micro-batch the same size so their mean losses average exactly."""
    size = check_divisible(batch.shape[0], num_microbatches, "the batch size",
                           "Pick a number of micro-batches that divides the batch.")
    return list(batch.split(size))


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits (b, t, V) predict ids shifted by one (b, t)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


# ---------------------------------------------------------------- counting communication


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CommCounter:
    """Bytes handed to each kind of collective: `payload[op]` sums the size of the *full* tensor of every call
    (an all-gather's output, a reduce-scatter's input, an all-reduce's buffer, a send's tensor); `calls[op]`
    counts them. Wire bytes per rank follow from the payload with `ring_wire_bytes`."""

    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, nbytes: int) -> None:
        self.payload[op] += nbytes
        self.calls[op] += 1

    def as_dict(self) -> dict:
        return {"payload": dict(self.payload), "calls": dict(self.calls)}

    @contextmanager
    def watch_collectives(self) -> Iterator[CommCounter]:
        """Wrap torch.distributed's all_reduce / all-gather / reduce-scatter entry points while inside the block.

        FSDP2 calls `dist.all_gather_single` and `dist.reduce_scatter_single`; older code paths call the
        `_into_tensor` / `_tensor` names. Each wrapper records the full (unsharded) tensor size, then calls through.
        """
        import torch.distributed as dist

        # name in torch.distributed -> (kind of collective, the argument holding the full-size tensor)
        watched = {
            "all_reduce": ("all_reduce", 0, "tensor"),
            "all_gather_single": ("all_gather", 0, "output_tensor"),
            "all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
            "reduce_scatter_single": ("reduce_scatter", 1, "input"),
            "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
        }
        originals = {name: getattr(dist, name) for name in watched if hasattr(dist, name)}

        def wrap(name: str, fn: Callable) -> Callable:
            op, position, keyword = watched[name]

            def counted(*args, **kwargs):
                self.add(op, tensor_nbytes(args[position] if len(args) > position else kwargs[keyword]))
                return fn(*args, **kwargs)
            return counted

        try:
            for name, fn in originals.items():
                setattr(dist, name, wrap(name, fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def ddp_hook(self) -> Callable:
        """A DDP communication hook that records each gradient bucket, then all-reduces it as DDP would."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):
            self.add("all_reduce", tensor_nbytes(bucket.buffer()))
            return default_hooks.allreduce_hook(state, bucket)

        return hook


def ring_wire_bytes(op: str, payload_bytes: float, world_size: int) -> float:
    """Bytes each rank sends for a collective on `payload_bytes` with the ring algorithm (NCCL's and gloo's
    default for large tensors): all-reduce 2(p-1)/p, all-gather and reduce-scatter (p-1)/p, send 1x."""
    p = world_size
    factor = {"all_reduce": 2 * (p - 1) / p, "all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p,
              "send": 1.0}
    if op not in factor:
        raise ValueError(f"Unknown collective {op!r}; use one of {sorted(factor)}.")
    return factor[op] * payload_bytes
