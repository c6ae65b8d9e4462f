"""Distilled against CE-only students over several training samples, behind `python -m cookbook train kd-vs-ce`.

Notebook 06 trains one pair of students live: the same layer cut, the same windows, steps and learning rate; one
learns from the text alone (alpha = 0), the other also from the teacher's top-k soft labels. Which of the two ends
lower on one set of windows is a property of that sample. This trains the same pair on the windows of each of
`seeds` (seed 1 is the notebook's) and reports every pair's held-out perplexity, so the notebook can say how often
distilling wins and by how much.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from . import distillation as D
from .data import calibration_batch
from .evaluate import PerplexityProtocol, perplexity
from .models import set_seed

REPORT_KIND = "cookbook KD against CE-only, several training samples"


@dataclass(frozen=True)
class PairSettings:
    """Notebook 06's pair: `n_keep` evenly spaced layers, `steps` windows of `seq_len` tokens (batch 1), top-`k`
    soft labels at `temperature`, mixed with weight `alpha`; held-out perplexity on `protocol`."""

    n_keep: int = 6
    steps: int = 10
    seq_len: int = 128
    lr: float = 1e-4
    temperature: float = 1.0
    alpha: float = 0.5
    k: int = 64
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    protocol: PerplexityProtocol = field(default_factory=lambda: PerplexityProtocol(seq_len=128, stride=128,
                                                                                     max_tokens=1024))

    def __post_init__(self) -> None:
        if min(self.n_keep, self.steps, self.seq_len, self.k) < 1 or not self.seeds:
            raise ValueError("n_keep, steps, seq_len and k must be >= 1, and seeds must name at least one sample.")


def train_pair(teacher: nn.Module, tokenizer, settings: PairSettings, seed: int) -> dict[str, float]:
    """The CE-only and the distilled student on the training windows of `seed`: their held-out perplexities."""
    if settings.n_keep >= teacher.config.num_hidden_layers:
        raise ValueError(f"n_keep must be below the teacher's {teacher.config.num_hidden_layers} layers.")
    keep = D.evenly_spaced_layers(teacher.config.num_hidden_layers, settings.n_keep)
    windows = calibration_batch(tokenizer, settings.steps, settings.seq_len, seed=seed)  # (steps, seq_len)
    cache = D.cache_teacher_topk(teacher, windows, k=settings.k, batch_size=1)
    out = {"seed": seed}
    for name, alpha in (("CE only", 0.0), ("distilled", settings.alpha)):
        set_seed(0)
        student = D.make_student(teacher, keep)
        D.freeze_embedding(student)
        D.train_student(student, cache, settings.steps, 1, settings.lr, settings.temperature, alpha)
        out[name] = perplexity(student, tokenizer, settings.protocol)
    return out


def summarize(pairs: list[dict[str, float]]) -> dict:
    """How often and by how much the distilled student ends lower: the geometric mean of its perplexity over the
    CE-only one's, and the smallest and largest of those ratios."""
    ratios = [p["distilled"] / p["CE only"] for p in pairs]
    return {"samples": len(pairs), "distilled lower": sum(r < 1 for r in ratios),
            "ratio, geometric mean": math.exp(sum(map(math.log, ratios)) / len(ratios)),
            "ratio, min": min(ratios), "ratio, max": max(ratios)}


def kd_vs_ce_command(teacher: nn.Module, tokenizer, model_name: str, settings: PairSettings, out: Path,
                     progress: bool = True) -> dict:
    """Every seed's pair, the summary, and the report written to `out` (JSON)."""
    from .bench import machine_info

    began, pairs = time.perf_counter(), []
    for seed in settings.seeds:
        pairs.append(train_pair(teacher, tokenizer, settings, seed))
        if progress:
            print(f"seed {seed}: CE only {pairs[-1]['CE only']:.4g}, distilled {pairs[-1]['distilled']:.4g}")
    report = {"kind": REPORT_KIND, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model_name,
              "machine": machine_info(teacher.device), "settings": asdict(settings) | {
                  "protocol": settings.protocol.describe()},
              "teacher perplexity": perplexity(teacher, tokenizer, settings.protocol), "pairs": pairs,
              **summarize(pairs), "wall seconds": round(time.perf_counter() - began, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report
