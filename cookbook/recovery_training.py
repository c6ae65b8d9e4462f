"""The pruning-recovery run behind `python -m cookbook train recovery`: Wanda prunes a copy of the model (50% of
every decoder linear's weights, or 2 of every 4), then the copy is distilled back toward the dense model with the
pruned weights held at zero.

Notebook 05 prunes in one shot: Wanda at 50% roughly doubles the perplexity, and 2:4 quadruples it. The weights
that are left were fitted for a dense neighbour, so a short training run can move them to make up for the ones that
are gone. Two choices keep the run honest and cheap:
- **The zeros stay zeros.** A gradient hook multiplies each pruned linear's gradient by its mask; AdamW without
  weight decay then never moves a zero (both its moments stay 0), so the sparsity pattern after training is
  exactly the one Wanda chose. The report checks it.
- **The teacher is the dense model itself**, matched on its final hidden state as in `student_training`; this skips
  the 262k-way output layer and, unlike plain cross-entropy on the training text, does not pull the model toward
  that one text (notebook 05's structured fine-tune shows that drift on the Python-docs text; the report measures
  both texts).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distillation as D
from . import pruning as P
from .core import decoder_linears
from .data import calibration_batch
from .evaluate import perplexities
from .models import cache_dir
from .student_training import distil_run, hidden_state_match
from .trainer import TrainSettings, TwoTextRunSettings

REPORT_KIND = "cookbook pruning recovery run"


def recovery_train_settings() -> TrainSettings:
    """The run's defaults: shorter than the student's (the pruned model starts near the teacher) and a lower peak
    learning rate, since every weight left is already a trained one."""
    return TrainSettings(steps=240, lr=1e-4, warmup=20, eval_every=20, checkpoint_every=20)


@dataclass(frozen=True, kw_only=True)
class RecoverySettings(TwoTextRunSettings):
    """pattern: "50%" (any sparsity in %, unstructured, per output row) or "N:M"; Wanda's input norms come from
    calib_samples windows of calib_seq_len tokens of the training text (seed 0, as notebook 05)."""

    pattern: str = "50%"
    calib_samples: int = 32
    calib_seq_len: int = 128
    train: TrainSettings = field(default_factory=recovery_train_settings)

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        super().__post_init__()


def parse_pattern(pattern: str) -> tuple[float | None, tuple[int, int] | None]:
    """"50%" -> (0.5, None); "2:4" -> (None, (2, 4)). Anything else is an error that shows both forms."""
    text = str(pattern).strip()
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", text):
        return P.check_sparsity(float(m.group(1)) / 100), None
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        n, m_ = int(m.group(1)), int(m.group(2))
        P.check_nm(n, m_)
        return None, (n, m_)
    raise ValueError(f"Pruning pattern {pattern!r} not understood: give a sparsity such as '50%' (unstructured) "
                     "or N:M such as '2:4' (N weights kept in every M).")


def wanda_pruned_copy(teacher: nn.Module, tokenizer, settings: RecoverySettings) -> nn.Module:
    """A copy of the teacher (its embedding shared and frozen) whose decoder linears Wanda has pruned."""
    sparsity, nm = parse_pattern(settings.pattern)
    pruned = D.make_student(teacher, list(range(teacher.config.num_hidden_layers)))
    calib = calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, seed=0)  # (n, len)
    with torch.no_grad():
        P.prune_wanda(pruned, P.collect_input_norms(pruned, calib), sparsity, nm)
    for name, p in pruned.named_parameters():
        p.requires_grad_("embed_tokens" not in name)
    return pruned


def hold_zeros(model: nn.Module) -> list:
    """Gradient hooks that keep every pruned decoder weight at zero through AdamW (weight decay 0): the gradient
    of a zero weight is masked, so its moments and its update stay 0. Returns the hooks' handles."""
    handles = []
    for lin in decoder_linears(model).values():
        keep = (lin.weight != 0).to(lin.weight.dtype)  # (out, in) 1 where the weight survived
        handles.append(lin.weight.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


def zero_counts(model: nn.Module) -> dict[str, int]:
    """Exactly-zero weights of each decoder linear: the pattern that training must not change."""
    return {name: int((lin.weight == 0).sum()) for name, lin in decoder_linears(model).items()}


def recovery_run(teacher: nn.Module, pruned: nn.Module, tokenizer, settings: RecoverySettings,
                 checkpoint: Path | None = None, progress: bool = True) -> dict:
    """Distil the dense teacher's final hidden states into the pruned copy, zeros held; returns its curve."""
    handles = hold_zeros(pruned)
    try:
        return distil_run(teacher, pruned, tokenizer, settings.train, settings.protocol, hidden_state_match,
                          checkpoint, {"what": "recovery", "pattern": settings.pattern,
                           "calib": [settings.calib_samples, settings.calib_seq_len],
                           "protocol": asdict(settings.protocol)}, progress)
    finally:
        for h in handles:
            h.remove()


def pattern_slug(pattern: str) -> str:
    """The pattern as it appears in file names: "50%" -> "50pct", "2:4" -> "2of4"."""
    return pattern.strip().replace("%", "pct").replace(":", "of")


def recovery_path(pattern: str, tag: str = "") -> Path:
    """Where the recovered model is saved (a Hugging Face checkpoint, outside git); its training checkpoint sits
    beside it (.ckpt). `tag` keeps a trial run (--quick) apart from the real one."""
    return cache_dir() / f"recovered-wanda-{pattern_slug(pattern)}{tag}"


def load_recovered(pattern: str = "50%", device: str | torch.device = "cpu") -> nn.Module | None:
    """The model `train recovery --pattern <pattern>` saved in this machine's cache, or None if it is not there."""
    import transformers

    path = recovery_path(pattern)
    if not (path / "config.json").is_file():
        return None
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def recovery_command(teacher: nn.Module, tokenizer, model_name: str, settings: RecoverySettings, out: Path,
                     fresh: bool = False, progress: bool = True, tag: str = "") -> dict:
    """The whole run: prune, measure, train (resumed if a checkpoint of this run exists), measure again on both
    texts, check the zeros, save the model under the cache and write the report to `out` (JSON)."""
    from .bench import machine_info

    began = time.perf_counter()
    dense = perplexities(teacher, tokenizer, settings.protocols)
    pruned = wanda_pruned_copy(teacher, tokenizer, settings)
    zeros_before, sparsity = zero_counts(pruned), P.sparsity_of(pruned)
    before = perplexities(pruned, tokenizer, settings.protocols)
    checkpoint = recovery_path(settings.pattern, tag).with_suffix(".ckpt")
    if fresh and checkpoint.exists():
        checkpoint.unlink()
    run = recovery_run(teacher, pruned, tokenizer, settings, checkpoint, progress)
    after = perplexities(pruned, tokenizer, settings.protocols)
    if zero_counts(pruned) != zeros_before:
        raise RuntimeError("Training moved pruned weights off zero: the mask hooks did not hold (a bug; please "
                           "report it).")
    pruned.save_pretrained(recovery_path(settings.pattern, tag))
    main = settings.protocol.text
    report = {
        "kind": REPORT_KIND, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model_name,
        "machine": machine_info(torch.device("cpu")), "settings": asdict(settings),
        "loss": "hidden-state distillation from the dense model: MSE to its final normed hidden state / its "
                "mean square",
        "sparsity": sparsity, "zeros unchanged by training": True,
        "dense perplexity": dense, "pruned perplexity": before, "recovered perplexity": after,
        "pruned ratio to dense": before[main] / dense[main], "recovered ratio to dense": after[main] / dense[main],
        "wall seconds (this invocation)": round(time.perf_counter() - began, 1), **run,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report
