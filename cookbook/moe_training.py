"""Training an upcycled MoE briefly: the layers below the first MoE layer run once per batch (`frozen_prefix`), then
AdamW steps on the routers and experts only (`train_moe`), with the load-balancing and z auxiliary losses of
`cookbook.moe` added to the language-model loss on each row's last tokens (`lm_loss_last`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .core import capture_layer_inputs, decoder_layers, final_logits, run_layer
from .core.train import adamw_loop
from .moe import auxiliary_losses, load_cv, moe_layers


@dataclass
class TrainLog:
    """Per-step losses of `train_moe`, and the load CV of each step's batch (mean over MoE layers)."""

    lm: list[float]
    balance: list[float]
    z: list[float]
    cv: list[float]


@dataclass
class FrozenPrefix:
    """A batch run once through the frozen decoder layers below `start`: what layer `start` receives."""

    ids: torch.Tensor  # (b, t) token ids
    hidden: torch.Tensor  # (b, t, d) input of decoder layer `start`
    kwargs: list[dict]  # per decoder layer: masks, rotary tables, positions
    start: int


@torch.no_grad()
def frozen_prefix(model: nn.Module, ids: torch.Tensor, start: int) -> FrozenPrefix:
    """Run `ids` (b, t) through decoder layers [0, start) once; training above them can reuse the result."""
    blocks = decoder_layers(model)
    if not 0 <= start < len(blocks):
        raise ValueError(f"start={start} out of range: the model has {len(blocks)} decoder layers.")
    captured = capture_layer_inputs(model, ids)
    hidden = captured.hidden  # (b, t, d)
    for i in range(start):
        hidden = run_layer(blocks[i], hidden, captured.kwargs[i], chunk=len(hidden))
    return FrozenPrefix(ids, hidden, captured.kwargs, start)


def forward_from(model: nn.Module, prefix: FrozenPrefix, last: int | None = None) -> torch.Tensor:
    """Decoder layers [start, end) on the prefix's hidden states, then final norm and LM head on the last
    `last` positions: -> (b, last, V) logits; `last=None` stops after the layers: -> (b, t, d)."""
    hidden = prefix.hidden  # (b, t, d)
    for block, kwargs in list(zip(decoder_layers(model), prefix.kwargs))[prefix.start:]:
        out = block(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out  # (b, t, d)
    if last is None:
        return hidden
    return final_logits(model, model.model.norm(hidden[:, -last:]))  # (b, last, V)


def lm_loss_last(model: nn.Module, prefix: FrozenPrefix, last: int) -> torch.Tensor:
    """Next-token loss on the last `last` tokens of each row (the 262k-wide head runs on those only).

    Every position still goes through every layer from `start` on, so the MoE routes all of them.
    """
    if not 1 <= last < prefix.ids.shape[1]:
        raise ValueError(f"last must be in [1, seq_len), got {last} for seq_len {prefix.ids.shape[1]}.")
    logits = forward_from(model, prefix, last + 1)[:, :-1]  # (b, last, V): positions t-last-1 .. t-2
    targets = prefix.ids[:, -last:]  # (b, last)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_moe(model: nn.Module, batches: Sequence[FrozenPrefix], lr: float = 1e-4, router_lr: float = 1e-2,
              balance_coef: float = 0.01, z_coef: float = 1e-3, last: int = 32) -> TrainLog:
    """One AdamW step per batch on the MoE layers only (routers at `router_lr`, experts at `lr`), rest frozen.

    Loss = LM loss (last `last` positions) + balance_coef * load-balancing loss + z_coef * z-loss.
    `batches` come from `frozen_prefix`, so the frozen layers below the first MoE layer run once, not per step.
    """
    names = moe_layers(model)
    if not names:
        raise ValueError("The model has no MoE layers: call upcycle_mlps(model, ...) first.")
    lowest = min(int(n.split(".layers.")[1].split(".")[0]) for n in names)
    if any(b.start > lowest for b in batches):
        raise ValueError(
            f"The batches start above MoE layer {lowest}; build them with frozen_prefix(..., start<={lowest})."
        )
    layers = list(names.values())
    for p in model.parameters():
        p.requires_grad_(False)
    routers = [p for m in layers for p in m.router.parameters()]
    experts = [p for m in layers for p in m.experts.parameters()]
    for p in routers + experts:
        p.requires_grad_(True)
    log = TrainLog([], [], [], [])

    def step_loss(step: int) -> torch.Tensor:
        lm = lm_loss_last(model, batches[step], last)
        balance, z = auxiliary_losses(model)
        log.lm.append(lm.item())
        log.balance.append(balance.item())
        log.z.append(z.item())
        log.cv.append(sum(load_cv(m.last.routed) for m in layers) / len(layers))
        return lm + balance_coef * balance + z_coef * z

    groups = [{"params": routers, "lr": router_lr}, {"params": experts, "lr": lr}]
    model.train()
    try:
        adamw_loop(groups, step_loss, len(batches), lr)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return log
