"""Pipeline parallelism: stages of whole decoder layers (the model core's layers), the GPipe and 1F1B
schedules, and one training step run on point-to-point sends with a recorded timeline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core import decoder_layer, decoder_layers, layer_types, softcap, step_context
from .sharding import CommCounter, causal_lm_loss, check_divisible, tensor_nbytes

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
