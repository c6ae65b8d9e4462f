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

One module per concern: `sharding` (checks, splits, communication counting), `tensor`, `pipeline`, `runs`
(real runs and launching torchrun) and `cost` (the cost model).
"""

from .cost import (FP32_ADAM, GEMMA3_270M, LLAMA2_7B, LLAMA2_70B, MIXED_BF16_ADAM, ModelShape, Precision,
                   comm_bytes_per_device, devices_needed, memory_per_device, params_per_device, train_flops_per_device)
from .pipeline import (PipelineStageModule, PipelineStepResult, bubble_fraction, max_in_flight, pipeline_schedule,
                       run_pipeline_step, stage_layer_bounds)
from .runs import (backend_for, full_tensor, launch, max_relative_error, mean_over_ranks, real_submodel, remap_tokens,
                   state_bytes, train_steps, worker_device)
from .sharding import (STRATEGIES, CommCounter, GiB, causal_lm_loss, check_divisible, ring_wire_bytes, shard_range,
                       split_batch, split_microbatches, tensor_nbytes)
from .tensor import (ColumnParallelLinear, ParallelRegion, RowParallelLinear, sharded_reference, tensor_parallel_layer,
                     tensor_parallel_model)

__all__ = [
    "STRATEGIES", "GiB", "check_divisible", "shard_range", "split_batch", "split_microbatches", "causal_lm_loss",
    "tensor_nbytes", "CommCounter", "ring_wire_bytes", "ParallelRegion", "ColumnParallelLinear",
    "RowParallelLinear", "tensor_parallel_layer", "tensor_parallel_model", "sharded_reference",
    "stage_layer_bounds", "PipelineStageModule", "pipeline_schedule", "bubble_fraction", "max_in_flight",
    "PipelineStepResult", "run_pipeline_step", "real_submodel", "remap_tokens", "state_bytes", "train_steps",
    "mean_over_ranks", "full_tensor", "max_relative_error", "worker_device", "backend_for", "launch", "ModelShape",
    "GEMMA3_270M", "LLAMA2_7B", "LLAMA2_70B", "Precision", "FP32_ADAM", "MIXED_BF16_ADAM", "params_per_device",
    "memory_per_device", "comm_bytes_per_device", "train_flops_per_device", "devices_needed",
]
