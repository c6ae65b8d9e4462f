"""The one training loop: AdamW steps on a loss the caller computes (distillation, LoRA, MoE routers and experts,
recovery after pruning all run it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def adamw_loop(params: Iterable, step_loss: Callable[[int], torch.Tensor], steps: int, lr: float = 1e-3,
               weight_decay: float = 0.0, clip: float | None = None,
               on_step: Callable[[int, float], None] | None = None,
               on_backward: Callable[[int], None] | None = None,
               keep_grads: bool = False, optimizer: torch.optim.Optimizer | None = None, start: int = 0,
               schedule: Callable[[int], float] | None = None) -> tuple[list[float], torch.optim.Optimizer]:
    """AdamW steps `start` .. `steps` - 1: loss = step_loss(step), backward, gradient-norm clip to `clip` if given,
    update.

    params: tensors, or param groups (dicts with their own "lr") as torch.optim takes them. Returns the loss of
    every step and the optimizer (its state is what fine-tuning memory is made of). on_backward(step) sees the
    gradients before the update; on_step(step, loss) runs after it. Gradients are freed after every step, the
    last one's too unless `keep_grads` (a memory table that counts them, notebook 13). A resumed run passes its
    `optimizer` (state loaded) and the `start` step; `schedule(step)` sets every group's learning rate."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not tensors:
        raise ValueError("Nothing to train: no parameter was given (are they all frozen?).")
    if steps < 1 or not 0 <= start <= steps:
        raise ValueError(f"steps must be >= 1 and start in [0, steps], got steps={steps}, start={start}.")
    optimizer = optimizer or torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(start, steps):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        loss = step_loss(step)
        loss.backward()
        if on_backward is not None:
            on_backward(step)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        optimizer.step()
        if step < steps - 1 or not keep_grads:
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses, optimizer
