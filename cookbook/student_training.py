"""The long student run behind `python -m cookbook train student`: which layers to keep, by measured importance;
hidden-state distillation, which never runs the 262k-way output layer; the run, its checkpoint and its report.

Notebook 06 trains a student live for a few steps with the teacher's top-k logits; a student worth using needs
about a thousand steps, which is this command's job (about an hour on 2 CPU cores). Two choices make that hour go
far on a CPU:
- **Keep the layers whose removal hurts most.** Each layer is removed alone and the perplexity measured; the
  student keeps the `n_keep` layers with the largest damage (evenly spaced layers or ShortGPT's cosine score pick
  layers this model cannot lose: layer 17, whose output the final norm sees, and layers 1, 3 or 5).
- **Match the teacher's final hidden state**, the input of the tied output layer, instead of its logits. The
  logits are that state times the embedding table, so matching one matches the other up to the table's scale,
  and a step skips the output layer forward and backward: 0.67 of the 1.1 GFLOP per token of a logit loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distillation as D
from .core import LINEAR_NAMES, decoder_layers
from .data import encode, load_text
from .evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, perplexity
from .models import cache_dir
from .trainer import TrainSettings, text_windows, train

TRAIN_TEXT = "shakespeare_train"
IMPORTANCE_PROTOCOL = PerplexityProtocol(seq_len=256, stride=256, max_tokens=1024)  # 18 evaluations: kept short
REPORT_KIND = "cookbook student run"


@dataclass(frozen=True)
class StudentSettings:
    """n_keep of the teacher's layers, trained by `train`; the curve on `protocol` (the default one).
    share: how many consecutive kept layers run on one set of weights (1: none; 2: pairs, `shared_student`)."""

    n_keep: int = 12
    train: TrainSettings = field(default_factory=TrainSettings)
    protocol: PerplexityProtocol = DEFAULT_PROTOCOL
    share: int = 1
    relax_rank: int = 0

    def __post_init__(self) -> None:
        if self.share < 1 or self.n_keep % self.share:
            raise ValueError(f"share must be a positive divisor of n_keep={self.n_keep} (the kept layers are tied in "
                             f"groups of `share` consecutive ones), got {self.share}.")
        if self.relax_rank < 0 or (self.relax_rank and self.share == 1):
            raise ValueError(f"relax_rank must be 0 (strict sharing) or a positive LoRA rank with share > 1 (it "
                             f"relaxes the shared weights per use), got relax_rank={self.relax_rank}, "
                             f"share={self.share}.")

    def variant(self) -> str:
        """What sets this run apart in file names: '', '-shared-2' or '-shared-2-relaxed-16'."""
        shared = f"-shared-{self.share}" if self.share > 1 else ""
        return shared + (f"-relaxed-{self.relax_rank}" if self.relax_rank else "")


@torch.no_grad()
def layer_drop_perplexities(teacher: nn.Module, tokenizer,
                            protocol: PerplexityProtocol = IMPORTANCE_PROTOCOL) -> list[float]:
    """The teacher's perplexity with each decoder layer removed alone: how much the model needs that layer."""
    n = teacher.config.num_hidden_layers
    return [perplexity(D.make_student(teacher, [j for j in range(n) if j != i]), tokenizer, protocol)
            for i in range(n)]


def keep_by_importance(drop_perplexities: list[float], n_keep: int) -> list[int]:
    """The n_keep layers whose removal raises perplexity most, in their original order."""
    if not 1 <= n_keep <= len(drop_perplexities):
        raise ValueError(f"n_keep must be in [1, {len(drop_perplexities)}], got {n_keep}.")
    ranked = sorted(range(len(drop_perplexities)), key=lambda i: -drop_perplexities[i])
    return sorted(ranked[:n_keep])


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output after its final norm, the tied output layer's input: (b, t, d)."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def hidden_distill_loss(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the teacher's hidden states, relative to their mean square (1.0 = predicting zero)."""
    teacher_h = teacher_h.float()
    return F.mse_loss(student_h.float(), teacher_h) / teacher_h.pow(2).mean()


def hidden_state_match(teacher: nn.Module, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`hidden_distill_loss` of the model's final hidden states against the teacher's on ids (b, t): no output layer
    in either, so the 262k-way head costs nothing."""
    with torch.no_grad():
        target = final_hidden(teacher, ids)  # (b, t, d)
    return hidden_distill_loss(final_hidden(model, ids), target)


def distil_run(teacher: nn.Module, model: nn.Module, tokenizer, s: TrainSettings, protocol: PerplexityProtocol,
               match: Callable[[nn.Module, nn.Module, torch.Tensor], torch.Tensor], checkpoint: Path | None,
               fingerprint: dict, progress: bool = True, stop_at: int | None = None) -> dict:
    """`trainer.train` of `model` toward the frozen teacher on the training text's windows: each step's loss is
    match(teacher, model, ids), the held-out curve is perplexity on `protocol`; returns the run's summary. The
    student, recovery and embedding runs differ only in `match` and in what they let train."""
    teacher.requires_grad_(False)
    windows = text_windows(encode(tokenizer, load_text(TRAIN_TEXT)), s.seq_len, tokenizer.bos_token_id)
    curve = train(model, lambda rows: match(teacher, model, windows[rows].to(model.device)), len(windows), s,
                  lambda: perplexity(model, tokenizer, protocol), checkpoint, fingerprint, progress, stop_at)
    return curve.summary(len(windows), s.batch_size)


@torch.no_grad()
def shared_student(teacher: nn.Module, keep: list[int], share: int, importance: list[float]) -> nn.Module:
    """The student of layers `keep` whose consecutive groups of `share` kept layers run on one set of weights:
    the weights of the group's most important layer (largest `importance`, e.g. `layer_drop_perplexities`).
    The twin of `make_student(teacher, keep)` with 1/share of its unique layer weights and the same depth,
    attention types and compute. (Starting each group at its layers' mean trained slower: perplexity 1,597
    against 1,419 after 24 steps of `train student`'s schedule, on 2,048 held-out tokens.)"""
    student = D.make_student(teacher, keep)
    groups = D.consecutive_groups(len(keep), share)
    layers = decoder_layers(student)
    for group in groups:
        best = max(group, key=lambda i: importance[keep[i]])
        source = dict(layers[best].named_parameters())
        for name, p in layers[group[0]].named_parameters():
            p.copy_(source[name])  # the first layer's tensors become the group's (share_layer_parameters)
    return D.share_layer_parameters(student, groups)


def relax_sharing(student: nn.Module, own_norms: list[dict[str, torch.Tensor]], rank: int) -> nn.Module:
    """Relaxed sharing (Relaxed Recursive Transformers, Bae et al. 2024): every use of a shared layer gets its own
    norm weights (`own_norms`: per layer, name -> tensor, e.g. the unshared twin's) and a LoRA of `rank` on each
    linear (B = 0: it starts as the strictly shared layer), trained with the shared weights. A few MiB per use."""
    from .lora import LoRALinear, _set_module

    for layer, norms in zip(decoder_layers(student), own_norms):
        for name, value in norms.items():
            _set_module(layer, name, nn.Parameter(value.detach().clone()))
        for name in LINEAR_NAMES:
            _set_module(layer, name, LoRALinear(layer.get_submodule(name), rank, alpha=2.0 * rank))
    return student


def trainable_student(teacher: nn.Module, keep: list[int], share: int = 1,
                      importance: list[float] | None = None, relax_rank: int = 0) -> nn.Module:
    """The student with the teacher's layers `keep` (tied in groups of `share` by `importance`: `shared_student`;
    relaxed per use by LoRAs of `relax_rank`: `relax_sharing`); every parameter but the frozen embedding trains."""
    if share > 1 and importance is None:
        raise ValueError("A shared student needs each layer's importance (layer_drop_perplexities) to pick the "
                         "layer whose weights each group keeps.")
    student = D.make_student(teacher, keep) if share == 1 else shared_student(teacher, keep, share, importance)
    if relax_rank:
        teacher_layers = decoder_layers(teacher)
        norms = [{n: p for n, p in teacher_layers[i].named_parameters() if "norm" in n} for i in keep]  # each use's own
        relax_sharing(student, norms, relax_rank)
    for name, p in student.named_parameters():
        p.requires_grad_("embed_tokens" not in name)
    return student


def train_student_run(teacher: nn.Module, tokenizer, settings: StudentSettings, keep: list[int],
                      checkpoint: Path | None = None, progress: bool = True, stop_at: int | None = None,
                      importance: list[float] | None = None) -> tuple[nn.Module, dict]:
    """Train the student of layers `keep` on hidden-state distillation (until step `stop_at` of the schedule, if
    given); returns it and its curve (a dict)."""
    teacher.requires_grad_(False)  # before copying: the student's layers start as frozen copies (shared_student
    # writes into them in place), and trainable_student then picks what trains
    student = trainable_student(teacher, keep, settings.share, importance, settings.relax_rank)
    run = distil_run(teacher, student, tokenizer, settings.train, settings.protocol, hidden_state_match, checkpoint,
                     {"keep": keep, "protocol": asdict(settings.protocol),
                      **({"share": settings.share} if settings.share > 1 else {}),
                      **({"relax_rank": settings.relax_rank} if settings.relax_rank else {})},
                     progress, stop_at)
    return student, run


def student_path(n_keep: int, tag: str = "", variant: str = "") -> Path:
    """Where the trained student is saved (a Hugging Face checkpoint, outside git); its training checkpoint
    sits beside it (.ckpt). `tag` keeps a trial run (--quick) apart from the real one; `variant` a shared one
    (`StudentSettings.variant`). A shared student is not saved as a Hugging Face checkpoint (safetensors refuses
    shared tensors, notebook 07): its weights are the trainable state in the .ckpt, which `load_shared_student`
    puts back."""
    return cache_dir() / f"student-{n_keep}-layers{variant}-hidden-kd{tag}"


def load_shared_student(teacher: nn.Module, settings: StudentSettings, tag: str = "") -> nn.Module | None:
    """The shared student trained by `train student --share` with `settings` (as far as its checkpoint goes), or
    None if this machine has not run it."""
    path = student_path(settings.n_keep, tag, settings.variant()).with_suffix(".ckpt")
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    n = teacher.config.num_hidden_layers  # every trainable weight comes from the checkpoint: any start will do
    student = trainable_student(teacher, state["fingerprint"]["keep"], settings.share, [0.0] * n, settings.relax_rank)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name in state["model"]:
                p.copy_(state["model"][name])
    return student.requires_grad_(False).eval()


def decode_speeds(models: dict[str, nn.Module], tokenizer, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decode tokens/s of each model after the bench's prompt (1, 32), best of `repeats`."""
    from .bench.rows import bench_prompt
    from .bench.settings import BenchSettings
    from .measure import measure_generation

    prompt = bench_prompt(tokenizer, BenchSettings(), "cpu")  # (1, 32)
    return {name: measure_generation(m, prompt, new_tokens, warmup=1, repeats=repeats,
                                     statistic="min").decode_tokens_per_s for name, m in models.items()}


def student_command(teacher: nn.Module, tokenizer, model_name: str, settings: StudentSettings, out: Path,
                    fresh: bool = False, progress: bool = True, tag: str = "", stop_at: int | None = None) -> dict:
    """The whole run: layer importance, training (resumed if a checkpoint of this run exists; until step `stop_at`
    of the schedule if given), the final measurements, the student saved under the cache (an unshared one), and
    the report written to `out` (JSON)."""
    from .bench import machine_info
    from .measure import model_bytes

    began = time.perf_counter()
    drop = layer_drop_perplexities(teacher, tokenizer)
    keep = keep_by_importance(drop, settings.n_keep)
    saved = student_path(settings.n_keep, tag, settings.variant())
    checkpoint = saved.with_suffix(".ckpt")
    if fresh and checkpoint.exists():
        checkpoint.unlink()
    student, run = train_student_run(teacher, tokenizer, settings, keep, checkpoint, progress, stop_at, drop)
    teacher_ppl = perplexity(teacher, tokenizer, settings.protocol)
    speeds = decode_speeds({"teacher": teacher, "student": student}, tokenizer)
    if settings.share == 1:
        student.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
    final = run["points"][-1]["perplexity"]
    report = {
        "kind": REPORT_KIND, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model_name,
        "machine": machine_info(torch.device("cpu")), "settings": asdict(settings),
        "loss": "hidden-state distillation: MSE to the teacher's final normed hidden state / its mean square",
        "layer drop perplexities": drop, "importance protocol": asdict(IMPORTANCE_PROTOCOL), "keep": keep,
        "teacher perplexity": teacher_ppl, "student perplexity": final, "ratio to teacher": final / teacher_ppl,
        "teacher decode tok/s": speeds["teacher"], "student decode tok/s": speeds["student"],
        "decode speedup": speeds["student"] / speeds["teacher"],
        "teacher bytes": model_bytes(teacher), "student bytes": model_bytes(student),
        "weights, in the cache folder": (saved if settings.share == 1 else checkpoint).name,
        "wall seconds (this invocation)": round(time.perf_counter() - began, 1), **run,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report
