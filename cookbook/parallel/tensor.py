"""Tensor parallelism, Megatron-style: column- and row-parallel linears, the two autograd functions that
copy into and reduce out of a parallel region, and one decoder layer (or a whole model) split across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core import decoder_layers
from .sharding import CommCounter, check_divisible, shard_range, tensor_nbytes

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
