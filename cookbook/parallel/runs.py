"""Real runs on one machine: a sub-model that fits two CPU processes, the training steps (one process or data
parallel), the checks that compare ranks with one process, and launching `torchrun` from a notebook or test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.train import adamw_loop
from .sharding import causal_lm_loss, split_batch, tensor_nbytes

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


# ---------------------------------------------------------------- training steps (1 process or data parallel)


def train_steps(model: nn.Module, batches: torch.Tensor, lr: float = 1e-4, rank: int = 0, world_size: int = 1):
    """AdamW on each global batch of `batches` (steps, B, t) in turn, using this rank's B / world_size rows.

    Returns (losses, first_grads, step_times, optimizer): this rank's loss at each step (`mean_over_ranks` turns
    them into the global batch's), the gradients after the first backward (FSDP shards gathered), and seconds
    per step. The last step's gradients are kept: `state_bytes` counts them.
    """
    started, times, first_grads = [], [], {}

    def step_loss(step: int) -> torch.Tensor:
        local = split_batch(batches[step], world_size, rank)  # (B / world, t)
        started.append(time.perf_counter())
        return causal_lm_loss(model(input_ids=local).logits, local)

    def after_backward(step: int) -> None:
        if step == 0:
            first_grads.update({n: full_tensor(p.grad).clone() for n, p in model.named_parameters()})

    model.train()
    losses, optimizer = adamw_loop(model.parameters(), step_loss, len(batches), lr, weight_decay=0.01,  # torch's default
                                   on_backward=after_backward, keep_grads=True,
                                   on_step=lambda step, _: times.append(time.perf_counter() - started[step]))
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
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding cookbook/
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
