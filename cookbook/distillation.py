"""Knowledge distillation and parameter sharing: a smaller student that keeps most of the teacher.

Three from-scratch pieces, each small enough to read in one sitting:

* Students cut from the teacher (DistilBERT-style): keep every k-th decoder layer, copy their weights,
  and keep (share) the teacher's embedding, which is also the output layer (tied).
* The distillation loss: temperature-scaled KL divergence between the teacher's and the student's
  next-token distributions (on the teacher's top-k tokens, cached once), mixed with the usual
  cross-entropy on the real next token.
* ALBERT-style cross-layer parameter sharing: several layers use one set of weights, one storage;
  `repeat_layers` runs each trained layer several times. ALBERT's other saving, the factorized embedding, is
  `factorized_embedding.py`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core.layout import decoder as _decoder
from .core.layout import layer_types, renumber, set_layers, subset_config
from .core.train import adamw_loop
from .factorized_embedding import FactorizedEmbedding, FactorizedLMHead
from .models import cache_dir

STUDENT_DIR_NAME = "distilled-student"


def student_dir() -> Path:
    """Where notebook 06 saves the distilled student (`save_pretrained` + tokenizer).

    Load it as a draft model with `cookbook.load_model(str(student_dir()))`.
    """
    return cache_dir() / STUDENT_DIR_NAME


# ---------------------------------------------------------------- building a student


def evenly_spaced_layers(n_layers: int, n_keep: int) -> list[int]:
    """`n_keep` of `n_layers` layer indices, evenly spaced and ending at the last layer.

    18 -> 6 gives [2, 5, 8, 11, 14, 17]: every third layer, which for Gemma 3 keeps all three
    global-attention layers (5, 11, 17) and drops only sliding-window ones.
    """
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"n_keep must be between 1 and n_layers={n_layers}, got {n_keep}.")
    return [round((i + 1) * n_layers / n_keep) - 1 for i in range(n_keep)]


def make_student(teacher: nn.Module, keep: Sequence[int], share_embedding: bool = True) -> nn.Module:
    """A smaller model of the teacher's family made of the teacher's layers `keep` (copied, in order).

    The embedding (tied to the output layer) is the teacher's own tensor when `share_embedding`
    (no copy: it is frozen during distillation anyway), else a copy. Every other weight is a copy,
    so training the student never changes the teacher.
    """
    decoder = _decoder(teacher)
    n_layers = len(decoder.layers)
    keep = list(keep)
    if not keep or any(not 0 <= i < n_layers for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must be distinct layer indices in [0, {n_layers}), got {keep}.")
    config = subset_config(teacher.config, keep)
    with torch.device("meta"):  # build the skeleton without allocating or initialising weights
        student = type(teacher)(config)
    inner = _decoder(student)
    inner.embed_tokens = decoder.embed_tokens if share_embedding else copy.deepcopy(decoder.embed_tokens)
    inner.layers = nn.ModuleList(renumber(copy.deepcopy(decoder.layers[i]), j) for j, i in enumerate(keep))
    inner.norm = copy.deepcopy(decoder.norm)
    inner.rotary_emb = copy.deepcopy(decoder.rotary_emb)
    student.lm_head.weight = inner.embed_tokens.weight  # tied, as in the teacher
    _check_materialised(student)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(teacher.device).eval()


def _check_materialised(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise TypeError(f"make_student could not fill these tensors from the teacher: {left[:5]}")


def freeze_embedding(model: nn.Module) -> int:
    """Stop training the (tied) embedding and output layer; returns how many parameters were frozen."""
    params = list(model.get_input_embeddings().parameters())
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """Distillation compares distributions token by token: both sides need the same vocabulary."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        diff = len(set(t_vocab.items()) ^ set(s_vocab.items()))
        raise ValueError(
            f"Teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, {diff} entries "
            "not in both): logit distillation needs one shared vocabulary. Use a student of the teacher's "
            "family (same tokenizer), or map the vocabularies first."
        )


# ---------------------------------------------------------------- the distillation loss


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) over the last dim: T > 1 flattens, T -> 0 tends to one-hot, T -> inf to uniform."""
    _check_temperature(temperature)
    return torch.softmax(_upcast(logits) / temperature, dim=-1)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), averaged over positions; full vocabulary.

    student_logits, teacher_logits: (..., vocab). The T^2 factor keeps the gradient's size
    independent of T (Hinton et al. 2015), so the mix with cross-entropy means the same at any T.
    """
    _check_vocab_match(student_logits.shape[-1], teacher_logits.shape[-1])
    _check_temperature(temperature)
    log_p = torch.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)  # (..., V) teacher
    log_q = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (..., V) student
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,)
    return temperature**2 * kl.mean()


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits and their token ids: two (..., k) tensors (float16 / int32 to cache)."""
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {teacher_logits.shape[-1]}, got {k}.")
    values, indices = teacher_logits.float().topk(k, dim=-1)  # (..., k)
    return values, indices.to(torch.int32)


def kd_kl_loss_topk(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL on the teacher's top-k tokens only: the cached-logits approximation of `kd_kl_loss`.

    The teacher distribution is softmax(top_values / T) renormalised over its k tokens (the mass
    it put elsewhere is dropped); the student keeps its full-vocabulary log-softmax, so any mass
    it puts outside the teacher's top k is still penalised. With k = vocab this equals `kd_kl_loss`.
    student_logits: (..., V); top_values, top_indices: (..., k).
    """
    _check_temperature(temperature)
    if top_values.shape != top_indices.shape or top_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"Shapes do not line up: student logits {tuple(student_logits.shape)}, teacher top-k values "
            f"{tuple(top_values.shape)} and indices {tuple(top_indices.shape)} must share all but the last dim."
        )
    vocab = student_logits.shape[-1]
    if int(top_indices.max()) >= vocab or int(top_indices.min()) < 0:
        raise ValueError(
            f"The teacher's token ids reach {int(top_indices.max())} but the student's vocabulary has {vocab} "
            "tokens: teacher and student must share one vocabulary (same tokenizer)."
        )
    log_p = torch.log_softmax(_upcast(top_values) / temperature, dim=-1)  # (..., k) teacher, renormalised
    log_q_all = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)  # (..., V)
    log_q = log_q_all.gather(-1, top_indices.long())  # (..., k) student on the teacher's tokens
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,)
    return temperature**2 * kl.mean()


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    top_values: torch.Tensor,
    top_indices: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels): returns (loss, kl, ce).

    student_logits: (b, t, V) predicting labels (b, t) (already shifted; -100 = ignore).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha mixes KL and cross-entropy and must be in [0, 1], got {alpha}.")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the student logits' leading dims "
                         f"{tuple(student_logits.shape[:-1])}.")
    ce = F.cross_entropy(_upcast(student_logits).flatten(0, 1), labels.flatten(), ignore_index=-100)
    keep = labels != -100  # (b, t) positions that count
    if bool(keep.all()):  # no masked position: skip the (n, V) copy that boolean indexing makes
        kl = kd_kl_loss_topk(student_logits, top_values, top_indices, temperature)
    else:
        kl = kd_kl_loss_topk(student_logits[keep], top_values[keep], top_indices[keep], temperature)
    return alpha * kl + (1 - alpha) * ce, kl, ce


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for the softmax; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")


def _check_vocab_match(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"Student logits cover {student_vocab} tokens but the teacher's cover {teacher_vocab}: logit "
            "distillation needs one shared vocabulary (same tokenizer)."
        )


# ---------------------------------------------------------------- caching the teacher, training


@dataclass
class TeacherCache:
    """The teacher's top-k next-token logits for each training window, computed once.

    inputs: (n, t) token ids; values (float16) and indices (int32): (n, t - 1, k), the teacher's
    prediction for positions 1..t-1 (what the student learns to predict); mass: (n, t - 1) the
    share of the teacher's probability (at T = 1) that its top k tokens hold.
    """

    inputs: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    mass: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices))


@torch.no_grad()
def cache_teacher_topk(teacher: nn.Module, inputs: torch.Tensor, k: int = 64, batch_size: int = 4) -> TeacherCache:
    """Run the teacher once over `inputs` (n, t) and keep its top-k logits per position (not 1 MB/token)."""
    teacher.eval()
    values, indices, mass = [], [], []
    for chunk in inputs.split(batch_size):
        logits = teacher(input_ids=chunk.to(teacher.device), use_cache=False).logits[:, :-1].float()  # (b, t-1, V)
        v, i = teacher_topk(logits, k)  # (b, t-1, k)
        mass.append((v - logits.logsumexp(-1, keepdim=True)).exp().sum(-1).cpu())  # (b, t-1)
        values.append(v.half().cpu())
        indices.append(i.cpu())
    return TeacherCache(inputs.cpu(), torch.cat(values), torch.cat(indices), torch.cat(mass))


@dataclass
class TrainLog:
    """Per-step losses of one training run (kl is NaN when the run does not distil)."""

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_student(
    student: nn.Module,
    cache: TeacherCache,
    steps: int,
    batch_size: int = 1,
    lr: float = 3e-4,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> TrainLog:
    """AdamW on the student's trainable parameters over the cached windows, one pass, in order.

    alpha = 0 trains on cross-entropy alone (the teacher's logits are not used): the CE-only
    baseline sees exactly the same windows, steps and learning rate as the distilled student.
    """
    if steps * batch_size > len(cache.inputs):
        raise ValueError(f"{steps} steps x batch {batch_size} need {steps * batch_size} windows; "
                         f"the cache holds {len(cache.inputs)}. Cache more windows or train fewer steps.")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The student has no trainable parameters.")
    log, start = TrainLog(), time.perf_counter()

    def step_loss(step: int) -> torch.Tensor:
        rows = slice(step * batch_size, (step + 1) * batch_size)
        ids = cache.inputs[rows].to(student.device)  # (b, t)
        logits = student(input_ids=ids[:, :-1], use_cache=False).logits  # (b, t-1, V)
        labels = ids[:, 1:]  # (b, t-1)
        if alpha > 0:
            values = cache.values[rows].to(student.device)
            indices = cache.indices[rows].to(student.device)
            loss, kl, ce = distillation_loss(logits, labels, values, indices, temperature, alpha)
        else:
            ce = F.cross_entropy(_upcast(logits).flatten(0, 1), labels.flatten())
            loss, kl = ce, torch.tensor(float("nan"))
        log.ce.append(ce.item())
        log.kl.append(kl.item())
        return loss

    student.train()
    try:
        log.loss, _ = adamw_loop(params, step_loss, steps, lr, clip=1.0)
    finally:
        student.eval()
    log.seconds = time.perf_counter() - start
    return log


# ---------------------------------------------------------------- ALBERT: cross-layer parameter sharing


def share_layer_parameters(model: nn.Module, groups: Sequence[Sequence[int]]) -> nn.Module:
    """Make the layers in each group use the first layer's parameters (the same tensors, one storage).

    groups: e.g. [[0, 1], [2, 3], [4, 5]] keeps 6 layers deep but 3 layers of unique weights.
    Each layer stays its own module (own `layer_idx`, own KV-cache slot, own attention type);
    only the nn.Parameter objects are shared, so gradients from every use add up in one tensor.
    """
    layers = _decoder(model).layers
    seen: set[int] = set()
    for group in groups:
        group = list(group)
        if not group or any(not 0 <= i < len(layers) for i in group) or seen & set(group):
            raise ValueError(f"groups must be disjoint, non-empty lists of layer indices in [0, {len(layers)}); "
                             f"got {list(map(list, groups))}.")
        seen |= set(group)
        source = layers[group[0]]
        for i in group[1:]:
            for name, param in source.named_parameters():
                module_name, _, leaf = name.rpartition(".")
                target = layers[i].get_submodule(module_name) if module_name else layers[i]
                setattr(target, leaf, param)
    return model


def consecutive_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """[[0, 1], [2, 3], ...]: consecutive layers share weights (ALBERT shares all; here in groups)."""
    if group_size < 1 or n_layers % group_size:
        raise ValueError(f"group_size must divide n_layers={n_layers}, got {group_size}.")
    return [list(range(s, s + group_size)) for s in range(0, n_layers, group_size)]


def repeat_layers(model: nn.Module, uses: int) -> nn.Module:
    """Deepen `model` in place: each decoder layer runs `uses` times in a row, all uses on one set of weights.

    6 layers with uses=2 become 12 layers (0, 0, 1, 1, ...) holding 6 layers of unique weights: the
    ALBERT trade (depth without parameters) applied to a model whose layers are already trained.
    Every use is its own module (own `layer_idx` and KV-cache slot) with the source layer's attention
    type; the config's layer count and layer types follow.
    """
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        raise ValueError(f"uses must be a positive integer (how often each layer runs), got {uses!r}.")
    decoder = _decoder(model)
    old = list(decoder.layers)
    types = layer_types(model.config)
    set_layers(model, [copy.deepcopy(layer) for layer in old for _ in range(uses)],
               [types[i] for i in range(len(old)) for _ in range(uses)])
    return share_layer_parameters(model, consecutive_groups(len(decoder.layers), uses))


def layer_storage_groups(model: nn.Module) -> list[list[int]]:
    """Decoder layers grouped by the storage their weights live in: [[0, 1], [2, 3], ...] when pairs share.

    Read from the tensors themselves (`data_ptr` of every parameter), not from how the model was built;
    an unshared model gives one group per layer.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, layer in enumerate(_decoder(model).layers):
        key = tuple(p.data_ptr() for p in layer.parameters())
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def matmul_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token in the model's matrix multiplies: 2 x multiply-adds, every use counted.

    A weight shared by two layers is multiplied twice, so it counts twice here (but once in
    `count_parameters`). Attention scores (which grow with the context), norms and activations
    are left out; the embedding lookup is free, the tied output layer is a (V, H) matmul.
    """
    macs = 0
    for module in model.modules():  # distinct modules: each use of a shared weight is its own module
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features
        elif isinstance(module, (FactorizedEmbedding, FactorizedLMHead)):
            macs += module.macs_per_token()
    return 2 * macs
