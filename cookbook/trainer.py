"""Training runs longer than a notebook's few minutes: a warmup + cosine schedule, a deterministic order of the
training windows, checkpoints that a stopped run resumes from exactly, a progress bar, and a perplexity curve.

`core.train.adamw_loop` is the AdamW loop the notebooks run live; `train` here runs that loop with what a run of an
hour needs around it. Resuming gives the same weights as an uninterrupted run: the data order is a
function of (seed, epoch), the learning rate a function of the step, and the optimizer state is checkpointed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.train import adamw_loop
from .evaluate import DEFAULT_PROTOCOL, SECOND_PROTOCOL, PerplexityProtocol


@dataclass(frozen=True)
class TrainSettings:
    """steps of batch_size windows of seq_len tokens; lr after `warmup` linear steps, cosine down to
    min_lr_ratio * lr at the last step; gradient norm clipped to `clip`; held-out perplexity every `eval_every`
    steps; a checkpoint every `checkpoint_every` steps; `seed` orders the windows of each epoch."""

    steps: int = 1200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    warmup: int = 20
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {k: getattr(self, k) for k in ("steps", "batch_size", "eval_every", "checkpoint_every")}
        if min(ints.values()) < 1 or self.seq_len < 2 or self.warmup < 0:
            raise ValueError(f"Need steps, batch_size, eval_every, checkpoint_every >= 1, seq_len >= 2 and "
                             f"warmup >= 0; got {ints}, seq_len={self.seq_len}, warmup={self.warmup}.")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.clip > 0):
            raise ValueError(f"Need lr > 0, 0 <= min_lr_ratio <= 1 and clip > 0; got lr={self.lr}, "
                             f"min_lr_ratio={self.min_lr_ratio}, clip={self.clip}.")


@dataclass(frozen=True, kw_only=True)
class TwoTextRunSettings:
    """A run that calibrates on calib_samples windows of calib_seq_len tokens of its training text (seed 0), trains
    with `train`, and is measured before and after on `protocol` (text like its training text) and on
    `second_protocol` (another kind of text)."""

    calib_samples: int = 16
    calib_seq_len: int = 256
    train: TrainSettings = field(default_factory=TrainSettings)
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL
    second_protocol: PerplexityProtocol = SECOND_PROTOCOL

    @property
    def protocols(self) -> tuple[PerplexityProtocol, PerplexityProtocol]:
        """The trained text's protocol, then the other text's, both measured before and after."""
        return self.protocol, self.second_protocol

    def __post_init__(self) -> None:
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise ValueError(f"Need calib_samples >= 1 and calib_seq_len >= 2; got {self.calib_samples}, "
                             f"{self.calib_seq_len}.")


def lr_at(step: int, s: TrainSettings) -> float:
    """The learning rate of step `step` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - 1 - s.warmup)
    progress = min(1.0, (step - s.warmup) / span)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def text_windows(ids: torch.Tensor, seq_len: int, bos_id: int) -> torch.Tensor:
    """Every non-overlapping window of the token ids (n,), each BOS + (seq_len - 1) tokens: (windows, seq_len)."""
    body = seq_len - 1
    count = len(ids) // body
    if count < 1:
        raise ValueError(f"The training text has {len(ids)} tokens, fewer than one window of {seq_len}.")
    windows = ids[: count * body].view(count, body)  # (windows, seq_len - 1)
    return torch.cat([torch.full((count, 1), bos_id, dtype=ids.dtype), windows], 1)  # (windows, seq_len)


def batch_rows(step: int, batch_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """Which windows step `step` trains on: each epoch is a fresh permutation drawn from (seed, epoch)."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(position, n_windows)
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(int(order[k]))
    return torch.tensor(rows)


@dataclass
class Curve:
    """Held-out perplexity against steps: one point per evaluation, with the mean training loss since the last."""

    points: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0

    def summary(self, n_windows: int, batch_size: int) -> dict:
        """The run's record for its report: training windows, steps run, epochs seen, the curve, the losses and
        the seconds spent training."""
        steps = self.points[-1]["step"] if self.points else 0
        return {"windows": n_windows, "steps run": steps, "epochs": steps * batch_size / n_windows,
                "points": self.points, "losses": self.losses, "train seconds": self.train_seconds}


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a run killed mid-write leaves the last checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path: Path | None, fingerprint: dict) -> dict | None:
    """The checkpoint at `path` if it belongs to this run (same fingerprint), else None; a checkpoint of another
    run is an error, not something to overwrite silently."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"The checkpoint {path} belongs to another run ({state.get('fingerprint')}); "
                         "pass fresh=True (--fresh) to start over, or another checkpoint path.")
    return state


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require a gradient, by name; an error if there are none."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("Nothing to train: every parameter of the model is frozen.")
    return params


def resume(checkpoint: Path | None, fingerprint: dict, params: dict[str, nn.Parameter],
           optimizer: torch.optim.Optimizer) -> tuple[Curve, int]:
    """Load this run's checkpoint (`load_checkpoint`) into `params` and `optimizer`; its curve and step, or a new
    curve at step 0 when there is none."""
    state = load_checkpoint(checkpoint, fingerprint)
    if state is None:
        return Curve(), 0
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["model"][n])
    optimizer.load_state_dict(state["optimizer"])
    return state["curve"], state["step"]


def train(model: nn.Module, step_loss: Callable[[torch.Tensor], torch.Tensor], n_windows: int,
          settings: TrainSettings, evaluate: Callable[[], float], checkpoint: Path | None = None,
          fingerprint: dict | None = None, progress: bool = True, stop_at: int | None = None) -> Curve:
    """AdamW on `model`'s trainable parameters; step_loss(rows) is the loss of the training windows `rows`.

    Resumes from `checkpoint` when it holds this run's state (same `fingerprint` and settings); writes it every
    `checkpoint_every` steps and at the end. evaluate() gives the held-out perplexity of the model as it is.
    `stop_at`: end after that many steps of the `settings.steps`-step schedule, evaluated and checkpointed there;
    a later call with a larger `stop_at` (or none) goes on from it as if never stopped.
    """
    last_step = settings.steps if stop_at is None else stop_at
    if not 1 <= last_step <= settings.steps:
        raise ValueError(f"stop_at must be in [1, {settings.steps}] (the schedule's steps), got {stop_at}.")
    from tqdm.auto import tqdm

    fingerprint = {"settings": asdict(settings), **(fingerprint or {})}
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=0.0)
    curve, start_step = resume(checkpoint, fingerprint, params, optimizer)
    if start_step > last_step:
        raise ValueError(f"The checkpoint {checkpoint} is at step {start_step}, past stop_at={stop_at}: pass a "
                         f"later stop (or none) to go on, or fresh=True (--fresh) to start over.")

    def record(step: int) -> None:
        model.eval()
        recent = curve.losses[-settings.eval_every:] if step else []
        curve.points.append({"step": step, "tokens": step * settings.batch_size * settings.seq_len,
                             "train loss": sum(recent) / len(recent) if recent else None,
                             "perplexity": evaluate(), "train seconds": round(curve.train_seconds, 1)})
        model.train()

    if not curve.points:
        record(0)
    bar = tqdm(total=settings.steps, initial=start_step, desc="train", unit="step", disable=not progress)
    last = time.perf_counter()  # train seconds leave out the evaluations and checkpoints between steps

    def after_step(step: int, loss: float) -> None:
        nonlocal last
        curve.losses.append(loss)
        curve.train_seconds += time.perf_counter() - last
        done = step + 1
        if done % settings.eval_every == 0 or done == last_step:
            record(done)
            bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{curve.points[-1]['perplexity']:.1f}")
        if checkpoint is not None and (done % settings.checkpoint_every == 0 or done == last_step):
            save_atomically({"fingerprint": fingerprint, "step": done, "model": trainable_state(model),
                             "optimizer": optimizer.state_dict(), "curve": curve}, checkpoint)
        bar.update(1)
        last = time.perf_counter()

    model.train()
    try:
        adamw_loop(list(params.values()), lambda step: step_loss(batch_rows(step, settings.batch_size, n_windows,
                                                                            settings.seed)),
                   last_step, clip=settings.clip, on_step=after_step, optimizer=optimizer, start=start_step,
                   schedule=lambda step: lr_at(step, settings))
    finally:
        bar.close()
        model.eval()
    return curve
