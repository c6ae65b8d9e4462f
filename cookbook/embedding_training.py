"""The factorized-embedding fine-tune behind `python -m cookbook train embedding`: the tied embedding becomes
rank-r factors (activation-aware, `factorized_embedding.activation_aware_spectrum`), then only the factors train,
distilled from the unfactorized model's output distribution.

Notebook 07 factorizes without training. Even the activation-aware factors leave the logits off, and the factors
were chosen for a linear error, not for the softmax the model is judged by. Choices that keep the run honest and
cheap:
- **Only A and B train.** The decoder body stays the teacher's, so the run measures what the factors themselves can
  recover (and the saved artifact is the factors alone).
- **The loss is the KL divergence to the teacher's full next-token distribution** (temperature 1), not
  cross-entropy on the training text: the output layer is exactly what changed, and matching the teacher does not
  pull the model toward one text. Both eval texts are measured before and after.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distillation as D
from . import factorized_embedding as FE
from .data import calibration_batch
from .evaluate import perplexities
from .measure import model_bytes
from .models import cache_dir
from .student_training import distil_run, final_hidden
from .trainer import TrainSettings, TwoTextRunSettings

REPORT_KIND = "cookbook factorized-embedding fine-tune"


def embedding_train_settings() -> TrainSettings:
    """The run's defaults: two windows a step (each step computes the full 262k-way softmax of both models), a
    short warmup, and the recovery run's peak learning rate, since the factors start close."""
    return TrainSettings(steps=200, batch_size=2, lr=1e-4, warmup=10, eval_every=25, checkpoint_every=25)


@dataclass(frozen=True, kw_only=True)
class EmbeddingSettings(TwoTextRunSettings):
    """rank of the factors; the hidden states that weight the factorization come from calib_samples windows of
    calib_seq_len tokens of the training text (seed 0), damped by `damp` (see `activation_aware_spectrum`)."""

    rank: int = 256
    damp: float = 0.01
    train: TrainSettings = field(default_factory=embedding_train_settings)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer (below the model's hidden size), got {self.rank!r}.")
        super().__post_init__()


@torch.no_grad()
def head_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The final normed hidden states the tied output layer reads, for every token of ids (n, len): (n * len, H)."""
    parts = [final_hidden(model, ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]  # (b, len, H)
    return torch.cat(parts).flatten(0, 1)  # (n * len, H)


def activation_aware_factorized(teacher: nn.Module, tokenizer, settings: EmbeddingSettings) -> nn.Module:
    """A copy of the teacher (decoder body shared and frozen) whose tied embedding is the rank-`settings.rank`
    activation-aware factors, the only trainable parameters."""
    calib = calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, seed=0)  # (n, len)
    weight = teacher.get_input_embeddings().weight
    spectrum = FE.activation_aware_spectrum(weight, head_inputs(teacher, calib), settings.damp)
    model = D.make_student(teacher, list(range(teacher.config.num_hidden_layers)))
    FE.factorize_embedding(model, settings.rank, spectrum)
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" in name)  # the factors A, B (the head holds the same two Parameters)
    return model


def logit_match(teacher: nn.Module, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """KL divergence (temperature 1) from the teacher's full next-token distribution on ids (b, t) to the model's."""
    with torch.no_grad():
        target = teacher(input_ids=ids).logits  # (b, t, V)
    return D.kd_kl_loss(model(input_ids=ids).logits, target)


def embedding_run(teacher: nn.Module, model: nn.Module, tokenizer, settings: EmbeddingSettings,
                  checkpoint: Path | None = None, progress: bool = True) -> dict:
    """Distil the teacher's next-token distributions into the factors; returns the curve."""
    return distil_run(teacher, model, tokenizer, settings.train, settings.protocol, logit_match, checkpoint,
                      {"what": "factorized embedding", "rank": settings.rank, "damp": settings.damp,
                       "calib": [settings.calib_samples, settings.calib_seq_len],
                       "protocol": asdict(settings.protocol)}, progress)


def factors_path(rank: int, tag: str = "") -> Path:
    """Where the fine-tuned factors are saved (outside git: V x rank floats); the training checkpoint sits beside
    it (.ckpt). `tag` keeps a trial run (--quick) apart from the real one."""
    return cache_dir() / f"factorized-embedding-r{rank}{tag}.pt"


def load_fine_tuned(teacher: nn.Module, rank: int = 256) -> nn.Module | None:
    """The teacher's body with the factors `train embedding --rank <rank>` saved in this machine's cache, or None
    if they are not there (or belong to a model of another shape)."""
    path = factors_path(rank)
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)  # {"a": (V, r), "b": (r, H)}
    if state["a"].shape[0] != teacher.get_input_embeddings().weight.shape[0]:
        return None
    model = D.make_student(teacher, list(range(teacher.config.num_hidden_layers)))
    return FE.set_factors(model, state["a"], state["b"]).eval()


def embedding_command(teacher: nn.Module, tokenizer, model_name: str, settings: EmbeddingSettings, out: Path,
                      fresh: bool = False, progress: bool = True, tag: str = "") -> dict:
    """The whole run: measure the teacher and the SVD factors, factorize activation-aware, train the factors
    (resumed if a checkpoint of this run exists), measure on both texts, save the factors under the cache and the
    report to `out` (JSON)."""
    from .bench import machine_info

    hidden = teacher.config.hidden_size
    if settings.rank >= hidden:
        raise ValueError(f"rank must be below the hidden size {hidden} to save anything, got {settings.rank}.")
    began = time.perf_counter()
    dense = perplexities(teacher, tokenizer, settings.protocols)
    with FE.factorized_embedding(teacher, settings.rank) as svd:
        svd_ppl = perplexities(svd, tokenizer, settings.protocols)
    model = activation_aware_factorized(teacher, tokenizer, settings)
    before = perplexities(model, tokenizer, settings.protocols)
    checkpoint = factors_path(settings.rank, tag).with_suffix(".ckpt")
    if fresh and checkpoint.exists():
        checkpoint.unlink()
    run = embedding_run(teacher, model, tokenizer, settings, checkpoint, progress)
    after = perplexities(model, tokenizer, settings.protocols)
    factors = model.model.embed_tokens
    torch.save({"a": factors.a.detach().clone(), "b": factors.b.detach().clone()}, factors_path(settings.rank, tag))
    main = settings.protocol.text
    report = {
        "kind": REPORT_KIND, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model_name,
        "machine": machine_info(torch.device("cpu")), "settings": asdict(settings),
        "loss": "KL divergence to the unfactorized model's full next-token distribution (temperature 1); only the "
                "factors A and B train",
        "bytes": {"teacher": model_bytes(teacher), "factorized": model_bytes(model),
                  "factors": int(factors.a.nbytes + factors.b.nbytes)},
        "dense perplexity": dense, "svd perplexity": svd_ppl, "activation-aware perplexity": before,
        "fine-tuned perplexity": after,
        "ratio to dense": {"svd": svd_ppl[main] / dense[main], "activation-aware": before[main] / dense[main],
                           "fine-tuned": after[main] / dense[main]},
        "wall seconds (this invocation)": round(time.perf_counter() - began, 1), **run,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report
