"""Parallelism from scratch: data parallel (DDP), sharded data parallel (FSDP / ZeRO-3), tensor parallel
(Megatron column/row-parallel Linear) and pipeline parallel (GPipe and 1F1B on send/recv), plus a cost model.

The multi-process parts run for real under `torchrun` (see `cookbook/parallel_runs.py`): gloo on CPU, NCCL on
GPUs, same code. Everything else here is plain functions the notebook and tests call in one process:

- sharding helpers (`shard_range`, `tensor_parallel_layer`, `stage_layer_bounds`) that raise a clear ValueError
  when the world size does not divide the heads, the MLP width, the batch or the layers;
- `CommCounter`, which records the bytes every collective moves (wrapping the call, not guessing);
- `pipeline_schedule` (the order of forward / backward micro-batch steps for GPipe and 1F1B) and
  `run_pipeline_step`, which executes it with point-to-point sends and records a timeline;
- the cost model: parameters, per-device memory for params / grads / optimizer states, bytes communicated and
  compute per device, for a `ModelShape` given as config numbers (Gemma 3 270M, Llama-2 7B / 70B).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core import decoder_layer, decoder_layers, layer_types, softcap, step_context

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


# ---------------------------------------------------------------- a real sub-model that fits two CPU processes


def real_submodel(model, num_layers: int, token_ids: torch.Tensor):
    """The real model's first `num_layers` decoder layers, its final norm, and an embedding / LM head cut to the
    rows of `token_ids` (the vocabulary the training text uses), untied so each stage can own its copy.

    Training the full 262k-row tied embedding would make every gradient 670 MB; keeping only the rows the batch
    uses keeps the pretrained weights of everything it touches. Token ids are mapped with `remap_tokens`.
    """
    transformers = __import__("transformers")
    if not 1 <= num_layers <= model.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{model.config.num_hidden_layers}, got {num_layers}.")
    vocab = torch.unique(token_ids.flatten())  # sorted (V,)
    config = transformers.Gemma3TextConfig.from_dict(model.config.to_dict())
    config.num_hidden_layers = num_layers
    config.layer_types = model.config.layer_types[:num_layers]
    config.vocab_size = len(vocab)
    config.tie_word_embeddings = False
    config.pad_token_id = config.bos_token_id = config.eos_token_id = None
    small = transformers.Gemma3ForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("model.layers.", "model.embed_tokens", "lm_head"))
             or (k.startswith("model.layers.") and int(k.split(".")[2]) < num_layers)}
    rows = model.get_input_embeddings().weight.detach()[vocab].clone()  # (V, d)
    state["model.embed_tokens.weight"] = rows
    state["lm_head.weight"] = rows.clone()
    small.load_state_dict(state, strict=True)
    small.config._attn_implementation = model.config._attn_implementation
    return small.eval(), vocab


def remap_tokens(ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Token ids of the full vocabulary -> positions in the sorted sub-vocabulary `vocab`."""
    out = torch.searchsorted(vocab, ids)
    if (out >= len(vocab)).any() or not torch.equal(vocab[out.clamp(max=len(vocab) - 1)], ids):
        raise ValueError("Some token ids are not in the sub-model's vocabulary; build it from these tokens.")
    return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process really holds for parameters, gradients and optimizer states (local shards only:
    FSDP's DTensors count their `to_local()` part)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = list(model.parameters())
    out = {"params": sum(tensor_nbytes(local(p)) for p in params),
           "grads": sum(tensor_nbytes(local(p.grad)) for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(tensor_nbytes(local(v)) for s in optimizer.state.values()
                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return out


# ---------------------------------------------------------------- tensor parallel (Megatron-style)


class _CopyToParallel(torch.autograd.Function):
    """Megatron's `f`: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        if ctx.counter is not None:
            ctx.counter.add("all_reduce", tensor_nbytes(grad))
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's `g`: all-reduce forward (sum the partial outputs), identity backward."""

    @staticmethod
    def forward(ctx, x, group, counter):
        import torch.distributed as dist

        x = x.contiguous()
        if counter is not None:
            counter.add("all_reduce", tensor_nbytes(x))
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class ParallelRegion(nn.Module):
    """Wraps a block (attention or MLP) whose input is replicated on every rank: the input passes through `f`
    once, so backward all-reduces dL/d(input) once per block, as in Megatron."""

    def __init__(self, inner: nn.Module, group=None, counter: CommCounter | None = None):
        super().__init__()
        self.inner, self.group, self.counter = inner, group, counter

    def forward(self, hidden_states, *args, **kwargs):
        return self.inner(_CopyToParallel.apply(hidden_states, self.group, self.counter), *args, **kwargs)


class ColumnParallelLinear(nn.Module):
    """Holds rows `rows` of a Linear's weight (out_features split): each rank computes its slice of the
    output from the full input, with no communication."""

    def __init__(self, linear: nn.Linear, rows: slice):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ColumnParallelLinear here supports bias-free Linear layers (Gemma 3 has none).")
        self.rows = rows
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())  # (out / p, in)

    def forward(self, x):  # (b, t, in) -> (b, t, out / p)
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Holds columns `cols` of a Linear's weight (in_features split): each rank multiplies its slice of the
    input and the partial outputs are summed with one all-reduce (`g`), counted by `counter`."""

    def __init__(self, linear: nn.Linear, cols: slice, group=None, counter: CommCounter | None = None):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowParallelLinear here supports bias-free Linear layers (Gemma 3 has none).")
        self.cols = cols
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())  # (out, in / p)
        self.group, self.counter = group, counter

    def forward(self, x):  # (b, t, in / p) -> (b, t, out), summed over ranks
        return _ReduceFromParallel.apply(F.linear(x, self.weight), self.group, self.counter)


def tensor_parallel_layer(layer: nn.Module, rank: int, world_size: int, group=None,
                          counter: CommCounter | None = None) -> list[nn.Parameter]:
    """Shard one Gemma 3 decoder layer in place across `world_size` ranks, Megatron-style.

    MLP: gate/up column-parallel (each rank a slice of the intermediate width), down row-parallel + all-reduce.
    Attention: query heads split across ranks (q_proj column-parallel, o_proj row-parallel + all-reduce). With
    fewer KV heads than ranks (Gemma 3 270M has 1), the KV heads are replicated on every rank, as Megatron does
    for GQA/MQA when tp > kv_heads; with at least as many, each rank keeps the KV heads of its query group.
    So: 2 all-reduces of the (b, t, d) activations forward per layer, 2 backward (the `f` at each block's input).
    Returns the replicated parameters whose gradients are partial per rank (all-reduce them after backward):
    the replicated K/V projections and the per-head norms, which only see this rank's heads.
    """
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    local_heads = check_divisible(heads, world_size, "the number of attention heads",
                                  "Tensor parallelism splits whole query heads; use a world size dividing it.")
    check_divisible(mlp.gate_proj.out_features, world_size, "the MLP intermediate size")
    if kv_heads >= world_size:
        kv_rows = shard_range(kv_heads * hd, world_size, rank, "the number of KV heads")
        attn.k_proj = ColumnParallelLinear(attn.k_proj, kv_rows)
        attn.v_proj = ColumnParallelLinear(attn.v_proj, kv_rows)
        local_kv, partial = kv_heads // world_size, [attn.q_norm.weight, attn.k_norm.weight]
    elif kv_heads == 1:  # MQA: every rank computes the one KV head and shares it among its query heads
        local_kv = 1
        partial = [attn.q_norm.weight, attn.k_norm.weight, attn.k_proj.weight, attn.v_proj.weight]
    else:
        raise ValueError(f"{kv_heads} KV heads over {world_size} ranks: this helper splits KV heads when the "
                         "world size is at most the KV heads (and divides them), or replicates a single one.")
    attn.q_proj = ColumnParallelLinear(attn.q_proj, shard_range(heads * hd, world_size, rank))
    attn.o_proj = RowParallelLinear(attn.o_proj, shard_range(heads * hd, world_size, rank), group, counter)
    attn.num_key_value_groups = local_heads // local_kv
    inter = shard_range(mlp.gate_proj.out_features, world_size, rank, "the MLP intermediate size")
    mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, inter)
    mlp.up_proj = ColumnParallelLinear(mlp.up_proj, inter)
    mlp.down_proj = RowParallelLinear(mlp.down_proj, inter, group, counter)
    layer.self_attn = ParallelRegion(attn, group, counter)
    layer.mlp = ParallelRegion(mlp, group, counter)
    return partial


def tensor_parallel_model(model, rank: int, world_size: int, group=None,
                          counter: CommCounter | None = None) -> list[nn.Parameter]:
    """`tensor_parallel_layer` on every decoder layer; embedding, norms and head stay replicated."""
    partial = []
    for layer in decoder_layers(model):
        partial += tensor_parallel_layer(layer, rank, world_size, group, counter)
    return partial


def sharded_reference(module: nn.Module, full: torch.Tensor) -> torch.Tensor:
    """The slice of the unsharded tensor `full` that a Column/RowParallelLinear holds (else `full` itself)."""
    if isinstance(module, ColumnParallelLinear):
        return full[module.rows]
    if isinstance(module, RowParallelLinear):
        return full[:, module.cols]
    return full


# ---------------------------------------------------------------- pipeline parallel


def stage_layer_bounds(num_layers: int, num_stages: int) -> list[range]:
    """Which decoder layers each pipeline stage runs: equal contiguous blocks."""
    per_stage = check_divisible(num_layers, num_stages, "the number of decoder layers",
                                "Pick a number of pipeline stages that divides the layers.")
    return [range(s * per_stage, (s + 1) * per_stage) for s in range(num_stages)]


class PipelineStageModule(nn.Module):
    """One pipeline stage of a Gemma 3 causal LM: the embedding on the first stage, its block of decoder layers,
    and the final norm + LM head on the last. Input: token ids (b, t) on stage 0, hidden states (b, t, d) after;
    output: hidden states, or logits (b, t, V) on the last stage. Shares the parameters of `model`."""

    def __init__(self, model, stage: int, num_stages: int):
        super().__init__()
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}.")
        layers = stage_layer_bounds(model.config.num_hidden_layers, num_stages)[stage]
        self.config = model.config
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.embed = model.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList(decoder_layers(model)[i] for i in layers)
        self.layer_types = [layer_types(model.config)[i] for i in layers]
        self.norm = model.model.norm if self.last else None
        self.head = model.lm_head if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.first else x  # (b, t, d)
        ctx = step_context(self.config, 0, h.shape[1], h.device, h.dtype)  # rotary tables and masks, no cache
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            h = decoder_layer(layer, h, ctx, kind, None, i)  # the core's layer: the model's forward, written once
        if not self.last:
            return h  # (b, t, d)
        return softcap(self.head(self.norm(h)), getattr(self.config, "final_logit_softcapping", None))  # (b, t, V)


def pipeline_schedule(kind: str, stage: int, num_stages: int, num_microbatches: int) -> list[tuple[str, int]]:
    """The order in which `stage` runs forward ("F", i) and backward ("B", i) steps of micro-batch i.

    GPipe: all m forwards, then all m backwards (every stage stores m micro-batches' activations).
    1F1B: `num_stages - stage - 1` warm-up forwards, then alternate one forward / one backward, then drain;
    a stage never holds more than `num_stages - stage` micro-batches. Both have the same bubble.
    """
    if kind not in ("gpipe", "1f1b"):
        raise ValueError(f"Unknown schedule {kind!r}; use 'gpipe' or '1f1b'.")
    if not 0 <= stage < num_stages or num_microbatches < 1:
        raise ValueError("Need 0 <= stage < num_stages and num_microbatches >= 1.")
    m = num_microbatches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(num_stages - stage - 1, m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle share of a GPipe / 1F1B step with equal stages: (p - 1) / (m + p - 1)."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def max_in_flight(ops: Sequence[tuple[str, int]]) -> int:
    """Most micro-batches whose activations a stage holds at once under schedule `ops`."""
    live = peak = 0
    for kind, _ in ops:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclass
class PipelineStepResult:
    loss: float  # mean over micro-batches (last stage; 0.0 elsewhere)
    events: list[tuple[str, int, float, float]]  # (kind, micro-batch, start, end) in perf_counter seconds
    step_start: float
    step_end: float
    peak_in_flight: int

    @property
    def busy_s(self) -> float:
        return sum(end - start for _, _, start, end in self.events)

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy_s / (self.step_end - self.step_start)


def run_pipeline_step(stage_module: PipelineStageModule, ops: Sequence[tuple[str, int]], stage: int,
                      num_stages: int, microbatches: Sequence[torch.Tensor], hidden_size: int,
                      counter: CommCounter | None = None) -> PipelineStepResult:
    """Run one training step of a pipeline stage with blocking receives and asynchronous sends.

    Each forward receives hidden states from `stage - 1` (or embeds token ids on stage 0) and sends its output
    to `stage + 1`; the last stage turns logits into the loss (divided by m, so gradients are the full-batch
    mean). Each backward receives dL/d(output) from `stage + 1` and sends dL/d(input) to `stage - 1`.
    Only compute is timed as busy; the rest of the step (waiting in `recv`, and for the other stages to
    finish) is the bubble.
    """
    import torch.distributed as dist

    m = len(microbatches)
    first, last = stage == 0, stage == num_stages - 1
    shape = (*microbatches[0].shape, hidden_size)  # (b/m, t, d)
    device = microbatches[0].device
    inputs, outputs, sends, events = {}, {}, [], []
    losses, live, peak = [], 0, 0
    dist.barrier()
    step_start = time.perf_counter()
    for kind, i in ops:
        if kind == "F":
            if first:
                x = microbatches[i]
            else:
                x = torch.empty(shape, device=device)
                dist.recv(x, stage - 1)
                x.requires_grad_(True)
            start = time.perf_counter()
            y = stage_module(x)
            if last:
                y = causal_lm_loss(y, microbatches[i]) / m
                losses.append(y.item())
            events.append(("F", i, start, time.perf_counter()))
            inputs[i], outputs[i] = x, y
            live += 1
            peak = max(peak, live)
            if not last:
                sends.append(_isend(y.detach(), stage + 1, counter))
        else:
            grad = None
            if not last:
                grad = torch.empty(shape, device=device)
                dist.recv(grad, stage + 1)
            start = time.perf_counter()
            outputs.pop(i).backward(grad)
            events.append(("B", i, start, time.perf_counter()))
            x = inputs.pop(i)
            live -= 1
            if not first:
                sends.append(_isend(x.grad, stage - 1, counter))
    for work in sends:
        work.wait()
    dist.barrier()  # the step ends when every stage is done (the optimizer step would come next)
    step_end = time.perf_counter()
    return PipelineStepResult(sum(losses), events, step_start, step_end, peak)


def _isend(tensor: torch.Tensor, peer: int, counter: CommCounter | None):
    import torch.distributed as dist

    if counter is not None:
        counter.add("send", tensor_nbytes(tensor))
    return dist.isend(tensor.contiguous(), peer)


# ---------------------------------------------------------------- training steps (1 process or data parallel)


def train_steps(model: nn.Module, batches: torch.Tensor, lr: float = 1e-4, rank: int = 0, world_size: int = 1):
    """AdamW on each global batch of `batches` (steps, B, t) in turn, using this rank's B / world_size rows.

    Returns (losses, first_grads, step_times, optimizer): this rank's loss at each step (`mean_over_ranks` turns
    them into the global batch's), the gradients after the first backward (FSDP shards gathered), and seconds
    per step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, times, first_grads = [], [], None
    model.train()
    for step, batch in enumerate(batches):
        local = split_batch(batch, world_size, rank)  # (B / world, t)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model(input_ids=local).logits, local)
        loss.backward()
        if step == 0:
            first_grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, first_grads, times, optimizer


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """Average each value over all ranks (one all-reduce); the values themselves in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP DTensor shard (this all-gathers) or a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The worst tensor's max|got - want| / max|want| over the names in `want`."""
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


# ---------------------------------------------------------------- launching torchrun from a notebook or test


def worker_device(world_size: int, local_rank: int = 0) -> torch.device:
    """The device a rank trains on: its own GPU when there is one GPU per rank, else the CPU (NCCL cannot put
    two ranks on one GPU, so a 1-GPU machine runs the 2-process examples on CPU with gloo)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for GPUs, gloo for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def launch(mode: str, out: str | Path, nproc: int = 2, args: Sequence[str] = (), timeout: float = 300) -> dict:
    """Run `python -m cookbook.parallel_runs MODE` under torchrun with `nproc` processes; return its JSON.

    Raises RuntimeError with the tail of the processes' output if the run fails or times out.
    """
    out = Path(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cookbook.parallel_runs", mode, "--out", str(out), *map(str, args)]
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": os.environ.get("COOKBOOK_THREADS_PER_RANK", "1")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"torchrun {mode} did not finish within {timeout} s.") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {mode} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(out.read_text())
    work = str(out.parent)  # shown as $WORK: a printed command holds no path of this machine
    result["command"] = " ".join(["torchrun", *cmd[3:]]).replace(work, "$WORK")
    result["log"] = proc.stdout.replace(work, "$WORK")
    return result


# ---------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its cost (no weights needed)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True
    gated_mlp: bool = True
    norms_per_layer: int = 2  # RMSNorm vectors of size `hidden` per layer
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Gemma 3)

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        return cls(name or getattr(config, "model_type", "model"), config.num_hidden_layers, config.hidden_size,
                   config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", True)), True,
                   4 if config.model_type.startswith("gemma3") else 2,
                   config.model_type.startswith("gemma3"))

    def attention_params(self) -> dict[str, int]:
        d, hd = self.hidden, self.head_dim
        return {"q": d * self.heads * hd, "k": d * self.kv_heads * hd, "v": d * self.kv_heads * hd,
                "o": self.heads * hd * d, "qk_norm": 2 * hd if self.qk_norm else 0}

    def mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    def layer_params(self) -> int:
        return sum(self.attention_params().values()) + self.mlp_params() + self.norms_per_layer * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden  # + final norm

    def tp_layer_params(self, tp: int) -> int:
        """Parameters of one layer on one rank under tensor parallelism of degree `tp`: query heads, o_proj
        and the MLP split; KV heads split while tp <= kv_heads, else replicated (each rank keeps a full copy)."""
        check_divisible(self.heads, tp, f"{self.name}: the number of attention heads")
        check_divisible(self.intermediate, tp, f"{self.name}: the MLP intermediate size")
        a = self.attention_params()
        kv = (a["k"] + a["v"]) // min(tp, self.kv_heads)
        return (a["q"] + a["o"] + self.mlp_params()) // tp + kv + a["qk_norm"] + self.norms_per_layer * self.hidden


# Config numbers of public models (from their config.json), for projections only: nothing is downloaded.
GEMMA3_270M = ModelShape("Gemma 3 270M", 18, 640, 2048, 4, 1, 256, 262144, True, True, 4, True)
LLAMA2_7B = ModelShape("Llama-2 7B", 32, 4096, 11008, 32, 32, 128, 32000, False)
LLAMA2_70B = ModelShape("Llama-2 70B", 80, 8192, 28672, 64, 8, 128, 32000, False)


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer states. Default: fp32 + Adam (2 moments)."""

    param: int = 4
    grad: int = 4
    optimizer: int = 8
    activation: int = 4

    @property
    def per_param(self) -> int:
        return self.param + self.grad + self.optimizer


FP32_ADAM = Precision()
MIXED_BF16_ADAM = Precision(param=2, grad=2, optimizer=12, activation=2)  # bf16 weights/grads, fp32 master + 2 moments


def params_per_device(shape: ModelShape, strategy: str, world_size: int) -> float:
    """Parameters whose weights, gradients and optimizer states one device holds.

    single / ddp: everything (DDP replicates). fsdp (ZeRO-3): 1 / p of everything. tp: the layers as in
    `tp_layer_params`, the embedding split by vocabulary (Megatron's vocab-parallel embedding). pp: the largest
    stage, i.e. layers / p plus the embedding (and the LM head, if untied, which sits on the last stage).
    """
    p = world_size
    if strategy in ("single", "ddp"):
        return shape.params()
    if strategy == "fsdp":
        return shape.params() / p
    if strategy == "tp":
        return shape.layers * shape.tp_layer_params(p) + shape.embedding_params() / p + shape.hidden
    if strategy == "pp":
        per_stage = check_divisible(shape.layers, p, f"{shape.name}: the number of layers")
        if p == 1:
            return shape.params()
        return per_stage * shape.layer_params() + shape.vocab * shape.hidden + shape.hidden  # last stage: head, norm
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def memory_per_device(shape: ModelShape, strategy: str, world_size: int,
                      precision: Precision = FP32_ADAM) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states per device (activations are not included)."""
    n = params_per_device(shape, strategy, world_size)
    out = {"params": n * precision.param, "grads": n * precision.grad, "optimizer": n * precision.optimizer}
    out["total"] = sum(out.values())
    return out


def comm_bytes_per_device(shape: ModelShape, strategy: str, world_size: int, tokens: int,
                          precision: Precision = FP32_ADAM, num_microbatches: int = 1) -> float:
    """Bytes one device sends per training step of `tokens` tokens (global batch x sequence), ring algorithms.

    ddp: one all-reduce of all gradients. fsdp: all-gather the weights for forward and again for backward,
    reduce-scatter the gradients. tp: per layer, two all-reduces of the (tokens, hidden) activations forward and
    two backward. pp: an interior stage sends the (tokens, hidden) activations forward and their gradients back.
    """
    p = world_size
    if strategy == "single" or p == 1:
        return 0.0
    grads = shape.params() * precision.grad
    if strategy == "ddp":
        return ring_wire_bytes("all_reduce", grads, p)
    if strategy == "fsdp":
        weights = shape.params() * precision.param
        return 2 * ring_wire_bytes("all_gather", weights, p) + ring_wire_bytes("reduce_scatter", grads, p)
    activations = tokens * shape.hidden * precision.activation
    if strategy == "tp":
        return shape.layers * 4 * ring_wire_bytes("all_reduce", activations, p)
    if strategy == "pp":
        return (2 if p > 2 else 1) * activations
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def train_flops_per_device(shape: ModelShape, strategy: str, world_size: int, tokens: int,
                           num_microbatches: int = 1) -> float:
    """Matmul FLOPs one device spends per step (6 per parameter per token; attention scores left out), scaled
    for pipelines by the time the bubble wastes: (m + p - 1) / m."""
    p = world_size
    matmul = shape.params() - shape.embedding_params() + shape.vocab * shape.hidden  # the lookup is free
    if strategy in ("single", "ddp", "fsdp"):
        return 6 * matmul * tokens / (1 if strategy == "single" else p)
    if strategy == "tp":
        return 6 * tokens * (shape.layers * shape.tp_layer_params(p) + shape.vocab * shape.hidden / p)
    if strategy == "pp":
        stage = 6 * tokens * matmul / p
        return stage * (num_microbatches + p - 1) / num_microbatches
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def devices_needed(shape: ModelShape, strategy: str, device_bytes: float, sizes: Sequence[int],
                   precision: Precision = FP32_ADAM) -> int | None:
    """The smallest world size in `sizes` at which the model's states fit in `device_bytes` per device."""
    for p in sizes:
        try:
            if memory_per_device(shape, strategy, p, precision)["total"] <= device_bytes:
                return p
        except ValueError:  # this strategy cannot split the model p ways
            continue
    return None
