"""A combined recipe: structured pruning, then distillation recovery, then GPTQ 4-bit (+ an int8 embedding).

Every stage changes the model in place by calling the technique's own module (`pruning`,
`distillation`, `quantization`); nothing here re-implements a technique. The order matters:

1. prune first, while the weights are still float and trainable (`structured_pruning.prune_mlp_channels`);
2. recover by distilling the UNPRUNED model's cached top-k logits into the pruned one
   (`cache_teacher`, then `distill_recovery`: `distillation.train_student`), updating only the MLP weights;
3. quantize last, so GPTQ calibrates on the weights that will be served
   (`quantization.quantize_model_layerwise`, then `quantization.quantize_tied_embedding_int8`), and hand the
   codes to the packed int4/int8 kernels where they run (`kernels.pack_model`, CPU), so the smaller model
   also decodes faster.

The KV cache and continuous batching change how the result is run, not its weights; the notebook and
`bench.bench_recipe` apply them to the recipe's output.

A mixed-precision recipe, one format per linear found by `python -m cookbook optimize` and saved as JSON, is
rebuilt on a fresh model by `apply_mixed_recipe`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import distillation as D
from . import kernels as K
from . import pruning as P
from . import quantization as Q
from . import structured_pruning as SP
from .data import calibration_batch

STAGES = ("prune", "distill", "quantize")


@dataclass(frozen=True)
class Recipe:
    """The knobs of the combined recipe (defaults: what notebook 14 and the bench run).

    mlp_fraction: share of each layer's MLP channels removed. distill_*: AdamW steps, batch and window
    length of the recovery, top_k teacher logits cached per position, its lr, temperature and alpha
    (the KL share of the loss). bits / group_size: GPTQ of every decoder linear; int8_embedding: the
    tied embedding / lm_head to int8 too; packed: serve the codes on the packed kernels (CPU; elsewhere the
    reference modules stay and the stage says why). calib_*: the calibration windows of pruning and GPTQ.
    """

    mlp_fraction: float = 0.25
    distill_steps: int = 16
    distill_batch: int = 1
    distill_seq_len: int = 128
    top_k: int = 64
    lr: float = 1e-4
    temperature: float = 1.0
    alpha: float = 0.5
    bits: int = 4
    group_size: int = 128
    int8_embedding: bool = True
    packed: bool = True
    calib_samples: int = 4
    calib_seq_len: int = 256

    def __post_init__(self) -> None:
        P.check_sparsity(self.mlp_fraction)
        Q.check_bits(self.bits)
        if min(self.distill_steps, self.distill_batch, self.top_k, self.calib_samples) < 1:
            raise ValueError("distill_steps, distill_batch, top_k and calib_samples must all be >= 1.")
        if self.distill_seq_len < 2 or self.calib_seq_len < 2:
            raise ValueError("distill_seq_len and calib_seq_len must be >= 2 tokens.")
        if not (self.lr > 0 and self.temperature > 0 and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"Need lr > 0, temperature > 0 and 0 <= alpha <= 1, got {self.lr}, "
                             f"{self.temperature}, {self.alpha}.")

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def calibration_windows(tokenizer, recipe: Recipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruning / GPTQ calibration windows (seed 0) and the distillation windows (seed 1) of the training text."""
    calib = calibration_batch(tokenizer, recipe.calib_samples, recipe.calib_seq_len, seed=0)  # (n, t)
    train = calibration_batch(tokenizer, recipe.distill_steps * recipe.distill_batch, recipe.distill_seq_len,
                              seed=1)  # (steps * batch, t')
    return calib.to(device), train.to(device)


def prune_stage(model: nn.Module, calib: torch.Tensor, fraction: float) -> int:
    """Remove `fraction` of every layer's MLP channels, scored on `calib` (n, t); returns the new MLP width."""
    return SP.prune_mlp_channels(model, P.collect_input_norms(model, calib), fraction)


def is_mlp_weight(name: str) -> bool:
    """The default recovery target: the decoder's MLP weights (the tensors pruning reshaped)."""
    return ".mlp." in name


def set_trainable(model: nn.Module, train: Callable[[str], bool]) -> int:
    """Let only the parameters whose name passes `train` learn (never the embedding); returns how many weights."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(train(name) and "embed" not in name)
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError("The `train` filter selected no parameters of the model.")
    return n


def distill_recovery(student: nn.Module, cache: D.TeacherCache, steps: int, batch_size: int = 1, lr: float = 1e-4,
                     temperature: float = 1.0, alpha: float = 0.5,
                     train: Callable[[str], bool] = is_mlp_weight) -> D.TrainLog:
    """Recover a pruned `student` by distilling a teacher's cached top-k logits (`distillation.cache_teacher_topk`).

    The student trains `steps` AdamW steps on the mixed KL + cross-entropy loss (`distillation.train_student`)
    over the cached windows, updating only the parameters `train` selects; every parameter is frozen again
    afterwards. The teacher itself is not needed any more (free it first to save memory).
    """
    set_trainable(student, train)
    try:
        with torch.enable_grad():  # callers such as bench.run_bench run under torch.no_grad()
            return D.train_student(student, cache, steps, batch_size, lr, temperature, alpha)
    finally:
        for p in student.parameters():
            p.requires_grad_(False)


def cache_teacher(teacher: nn.Module, student: nn.Module, train_ids: torch.Tensor, k: int = 64) -> D.TeacherCache:
    """The teacher's top-k logits on `train_ids` (n, t), after checking that teacher and student share a vocabulary."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"Student and teacher must share a vocabulary, got {student.config.vocab_size} "
                         f"and {teacher.config.vocab_size} tokens.")
    return D.cache_teacher_topk(teacher, train_ids, k=k, batch_size=1)


def quantize_stage(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int = 128,
                   int8_embedding: bool = True, packed: bool = True) -> dict[str, str]:
    """GPTQ every decoder linear to `bits` (bit-packed QuantLinear), then the tied embedding to int8, then (if
    `packed`) the packed kernels. Returns {module: reason} of what stays on the reference path."""
    Q.quantize_model_layerwise(model, calib, "gptq", bits, group_size, symmetric=False)
    if int8_embedding:
        Q.quantize_tied_embedding_int8(model)
    if not packed:
        return {}
    if model.device.type != "cpu":
        return {"every module": f"the packed kernels here are CPU kernels; the model is on {model.device.type}"}
    return K.pack_model(model, fallback=True)[1]


def apply_recipe(teacher: nn.Module, tokenizer, recipe: Recipe = Recipe(),
                 after_stage: Callable[[str, nn.Module, object], None] | None = None) -> nn.Module:
    """The recipe applied to a copy of `teacher` (left unchanged); `after_stage(name, model, result)`
    is called after each of `STAGES` (e.g. to measure it). Returns the final model."""
    calib, train_ids = calibration_windows(tokenizer, recipe, teacher.device)
    work = copy.deepcopy(teacher)
    stages = {
        "prune": lambda: prune_stage(work, calib, recipe.mlp_fraction),
        "distill": lambda: distill_recovery(work, cache_teacher(teacher, work, train_ids, recipe.top_k),
                                            recipe.distill_steps, recipe.distill_batch, recipe.lr,
                                            recipe.temperature, recipe.alpha),
        "quantize": lambda: quantize_stage(work, calib, recipe.bits, recipe.group_size, recipe.int8_embedding,
                                           recipe.packed),
    }
    for name in STAGES:
        result = stages[name]()
        if after_stage is not None:
            after_stage(name, work, result)
    return work


# ---------------------------------------------------------------- a mixed-precision recipe found by the optimizer


def load_mixed_recipe(source) -> dict:
    """A recipe written by `python -m cookbook optimize` (a path or the dict itself), checked field by field."""
    from .optimize import HEAD_FORMATS, LINEAR_FORMATS, RECIPE_KIND

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No recipe at {path}; write one with `python -m cookbook optimize --out {path}`.")
        try:
            source = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err}); write a recipe with `python -m cookbook optimize`.") from None
    if not isinstance(source, dict) or source.get("kind") != RECIPE_KIND or source.get("version") != 1:
        source = source if isinstance(source, dict) else {}
        raise ValueError(f"Not a version-1 {RECIPE_KIND!r} (kind={source.get('kind')!r}, "
                         f"version={source.get('version')!r}); write one with `python -m cookbook optimize`.")
    missing = [k for k in ("linears", "head", "group_size", "calibration") if k not in source]
    missing += [f"calibration.{k}" for k in ("text", "samples", "seq_len", "seed")
                if "calibration" in source and k not in source["calibration"]]
    if missing or not isinstance(source.get("linears"), dict):
        raise ValueError(f"The recipe lacks {missing or ['a linears mapping']}; write it again with "
                         "`python -m cookbook optimize`.")
    bad = sorted({f for f in source["linears"].values() if f not in LINEAR_FORMATS})
    if bad or source.get("head") not in HEAD_FORMATS:
        raise ValueError(f"Unknown formats in the recipe: linears {bad}, head {source.get('head')!r}; linears take "
                         f"{list(LINEAR_FORMATS)} and the head {list(HEAD_FORMATS)}.")
    return source


def apply_mixed_recipe(model: nn.Module, tokenizer, source) -> nn.Module:
    """A copy of the float `model` (left unchanged) in a mixed recipe's formats: GPTQ on the recipe's calibration
    windows, every layer on the float model's activations, as the optimizer measured it; packed kernels where
    a format has one."""
    from .optimize import Plan, apply_plan, gptq_option

    spec = load_mixed_recipe(source)
    cal, gs = spec["calibration"], spec["group_size"]
    extra = sorted(set(spec["linears"]) - set(Q.decoder_linears(model)))
    if extra:
        raise ValueError(f"The recipe names linears this model lacks ({extra[:3]}); it was made for "
                         f"{spec.get('model')!r}.")
    calib = calibration_batch(tokenizer, cal["samples"], cal["seq_len"], seed=cal["seed"], text=cal["text"])
    wanted = {name: [gptq_option(fmt, gs)] for name, fmt in spec["linears"].items()}
    weights = Q.gptq_options(model, calib.to(model.device), wanted)
    return apply_plan(copy.deepcopy(model), Plan(spec["linears"], spec["head"]), weights, gs)
