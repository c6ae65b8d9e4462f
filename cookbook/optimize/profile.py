"""The sensitivity profile: what each part of the model costs and saves in each format, measured one part at a time.

For every decoder linear and the head, in every format: the bytes it holds as served, the KL divergence of the
model's next-token distribution from the float model's when ONLY that part is quantized (mean nats per token on
held-out windows of the training text), and the seconds it takes in one decode step (timed on this machine).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as K
from .. import quantization as Q
from ..bench.rows import bench_prompt
from ..bench.settings import BenchSettings
from ..core import capture_layer_inputs, decoder, decoder_layers, decoder_linears, final_logits, split_linear_key
from ..data import calibration_batch
from ..evaluate import PerplexityProtocol, perplexity
from ..measure import measure_generation, model_bytes, time_function
from .space import HEAD, HEAD_FORMATS, LINEAR_FORMATS, apply_head, check_formats, gptq_option, served_linear


@dataclass(frozen=True)
class OptimizeSettings:
    """What the search measures. calib_*: GPTQ's calibration windows (seed 0 of the training text, as the bench);
    profile_*: the held-out windows (seed 2) the KL of each part is measured on; gptq_order: GPTQ's column order
    ('act' or 'input', `quantization.sweep_plan`); group_size: of int4 / int3;
    candidates: how many of the best estimated plans are built and measured; protocol, prompt_tokens,
    new_tokens, repeats: the bench's perplexity protocol and decode timing, so results sit on its pictures."""

    calib_samples: int = 4
    calib_seq_len: int = 256
    gptq_order: str = "act"
    profile_samples: int = 2
    profile_seq_len: int = 128
    group_size: int = 128
    linear_formats: tuple[str, ...] = tuple(LINEAR_FORMATS)
    head_formats: tuple[str, ...] = HEAD_FORMATS
    candidates: int = 5
    protocol: PerplexityProtocol = BenchSettings().protocol
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 2

    def __post_init__(self) -> None:
        check_formats(self.linear_formats, self.head_formats)
        Q.check_gptq_order(self.gptq_order)
        if min(self.calib_samples, self.profile_samples, self.candidates, self.repeats) < 1:
            raise ValueError("calib_samples, profile_samples, candidates and repeats must all be >= 1.")
        if min(self.calib_seq_len, self.profile_seq_len) < 2 or self.new_tokens < 2:
            raise ValueError("calib_seq_len, profile_seq_len and new_tokens must be >= 2.")


QUICK = dict(calib_samples=2, calib_seq_len=256, profile_samples=1, profile_seq_len=128, candidates=3,
             new_tokens=16, repeats=2)


@dataclass(frozen=True)
class PartCost:
    """One part (a decoder linear's full name, or "lm_head") in one format."""

    part: str
    fmt: str
    bytes: int
    kl: float  # mean KL(float || this) per token, nats, with only this part changed
    step_s: float  # its share of one decode step, seconds


@dataclass
class Profile:
    """Every part's costs, plus what no choice changes: the other tensors' bytes and the rest of a decode step."""

    costs: list[PartCost]
    fixed_bytes: int  # norms and anything else outside the parts
    base_bytes: int  # the float model
    base_step_s: float  # one decode step of the float model, measured
    rest_step_s: float  # base_step_s less the parts' float times: attention, norms, sampling, Python
    base_perplexity: float
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def parts(self) -> dict[str, list[PartCost]]:
        out: dict[str, list[PartCost]] = {}
        for c in self.costs:
            out.setdefault(c.part, []).append(c)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        return cls(**{**d, "costs": [PartCost(**c) for c in d["costs"]]})


# ---------------------------------------------------------------- KL of one part at a time


@dataclass
class Reference:
    """The float model on the held-out windows: the ids (n, t), the hidden states entering each decoder layer and
    the final norm (L + 1 tensors (n, t, D)), each layer's keyword arguments, and next-token log-probabilities
    (n * t, V) computed layer by layer (`base`, against which a changed linear is compared) and by the whole model
    (`base_full`, against which a changed table is compared: it changes the embedding lookup too)."""

    ids: torch.Tensor
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    base: torch.Tensor
    base_full: torch.Tensor


@torch.no_grad()
def reference(model: nn.Module, ids: torch.Tensor) -> Reference:
    captured = capture_layer_inputs(model, ids)
    hidden = [captured.hidden]
    for layer, kw in zip(decoder_layers(model), captured.kwargs):
        hidden.append(layer(hidden[-1], **kw))
    ref = Reference(ids, hidden, captured.kwargs, torch.empty(0), torch.empty(0))
    ref.base, ref.base_full = log_probs_from(model, ref, len(hidden) - 1), full_log_probs(model, ids)
    return ref


@torch.no_grad()
def log_probs_from(model: nn.Module, ref: Reference, start: int) -> torch.Tensor:
    """Next-token log-probabilities (n * t, V), running the decoder from layer `start` on its float input."""
    x = ref.hidden[start]  # (n, t, D)
    for layer, kw in zip(decoder_layers(model)[start:], ref.kwargs[start:]):
        x = layer(x, **kw)
    logits = final_logits(model, decoder(model).norm(x))  # (n, t, V)
    return F.log_softmax(logits.float().flatten(0, 1), dim=-1)  # (n * t, V)


@torch.no_grad()
def full_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (n * t, V) of the whole model, embedding lookup included."""
    return F.log_softmax(model(input_ids=ids).logits.float().flatten(0, 1), dim=-1)


def mean_kl(base: torch.Tensor, new: torch.Tensor) -> float:
    """Mean over rows of KL(base || new), both log-probabilities (rows, V); nats. Float rounding can leave a
    tiny negative sum (-1e-8) where the two are almost equal: a KL is never below 0, so that reads as 0."""
    return max(0.0, F.kl_div(new, base, log_target=True, reduction="batchmean").item())


def part_kl(model: nn.Module, weights: dict, settings: OptimizeSettings, ref: Reference, part: str, fmt: str) -> float:
    """KL of the model with only `part` (a decoder linear's full name, or "lm_head": the tied table, so the
    embedding lookup and the head) in `fmt`, the rest float."""
    if part == HEAD:
        with head_format(model, fmt):
            return mean_kl(ref.base_full, full_log_probs(model, ref.ids))
    linear = model.get_submodule(part)
    new = served_linear(weights[part, gptq_option(fmt, settings.group_size)], linear.bias)
    originals = Q.swap_modules(model, {part: new})
    try:
        return mean_kl(ref.base, log_probs_from(model, ref, split_linear_key(part)[0]))
    finally:
        Q.restore_modules(model, originals)


def all_kls(model: nn.Module, weights: dict, settings: OptimizeSettings, ref: Reference,
            tick: Callable[[], None]) -> dict[tuple[str, str], float]:
    """`part_kl` of every decoder linear in every linear format and of the table in every head format."""
    parts = [(n, f) for n in decoder_linears(model) for f in settings.linear_formats]
    parts += [(HEAD, f) for f in settings.head_formats]
    out = {}
    for part, fmt in parts:
        out[part, fmt] = part_kl(model, weights, settings, ref, part, fmt)
        tick()
    return out


@torch.no_grad()
def remeasure_kls(model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings,
                  parts: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """`part_kl` of a few (part, format) pairs, from scratch: to check a saved profile on this machine."""
    ref = reference(model, calibration_windows(tokenizer, settings)[1].to(model.device))
    return {(part, fmt): part_kl(model, weights, settings, ref, part, fmt) for part, fmt in parts}


@torch.no_grad()
def head_step_s(model: nn.Module) -> float:
    """Seconds the LM head takes on one decode token."""
    h = torch.randn(1, 1, model.config.hidden_size)  # (b, t, D)
    return time_function(lambda: model.lm_head(h), warmup=2, repeats=10).median_s


@contextmanager
def head_format(model: nn.Module, fmt: str):
    """The model with its tied table in `fmt` inside the block, float again after it."""
    emb, head = model.model.embed_tokens, model.lm_head
    apply_head(model, fmt)
    try:
        yield model
    finally:
        model.model.embed_tokens, model.lm_head = emb, head


# ---------------------------------------------------------------- decode-step seconds and bytes of the linears


@torch.no_grad()
def module_seconds(modules: dict[str, nn.Module], repeats: int = 7) -> dict[str, float]:
    """Each module's seconds on one decode token (median of `repeats`), timed one by one inside passes over all of
    them in model order, with 256 MiB of other memory read between passes: as in a decode step, each weight comes
    from memory, not from a cache still warm from the last call."""
    xs = {n: torch.randn(1, 1, m.in_features) for n, m in modules.items()}  # (b, t, in) one token each
    flush = torch.ones(2**26)  # 256 MiB, read between passes to evict the caches
    times: dict[str, list[float]] = {n: [] for n in modules}
    for r in range(repeats + 1):  # the first pass warms up
        flush.sum()
        for n, m in modules.items():
            start = time.perf_counter()
            m(xs[n])
            if r:
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(v) for n, v in times.items()}


def linear_costs(model: nn.Module, weights: dict, settings: OptimizeSettings,
                 tick: Callable[[], None]) -> tuple[dict[tuple[str, str], tuple[int, float]], dict[str, float]]:
    """{(name, fmt): (bytes served, step seconds)} of every decoder linear, and {name: float step seconds}."""
    linears = decoder_linears(model)
    floats, out = module_seconds(linears), {}
    for fmt in settings.linear_formats:
        served = {n: served_linear(weights[n, gptq_option(fmt, settings.group_size)], m.bias)
                  for n, m in linears.items()}
        out |= {(n, fmt): (model_bytes(served[n]), t) for n, t in module_seconds(served).items()}
        tick()
    return out, floats


# ---------------------------------------------------------------- the whole profile


def decode_step_s(model: nn.Module, tokenizer, settings: OptimizeSettings) -> float:
    """Seconds per greedy decode step (best of `repeats`) from the bench's prompt, as the bench measures decode; when noise hides the
    decode steps (a very small model), the whole generation's seconds per token instead, an upper bound."""
    speed = measure_generation(model, bench_prompt(tokenizer, settings, model.device), settings.new_tokens, warmup=1,
                               repeats=settings.repeats, statistic="min")
    step = speed.decode_s_per_token
    return step if math.isfinite(step) else speed.generate_s / speed.new_tokens


def calibration_windows(tokenizer, settings: OptimizeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's calibration windows (seed 0) and the profile's held-out windows (seed 2), both of the training text."""
    return (calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, seed=0),
            calibration_batch(tokenizer, settings.profile_samples, settings.profile_seq_len, seed=2))


def gptq_weights(model: nn.Module, calib: torch.Tensor, settings: OptimizeSettings,
                 on_layer: Callable[[int], None] | None = None) -> dict:
    """GPTQ codes of every decoder linear in every linear format: {(name, option): QuantizedWeight}."""
    options = sorted({gptq_option(f, settings.group_size) for f in settings.linear_formats}, key=str)
    return Q.gptq_options(model, calib, {n: options for n in decoder_linears(model)}, on_layer=on_layer,
                          gptq_order=settings.gptq_order)


def step_seconds(model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings,
                 tick: Callable[[], None] = lambda: None) -> tuple[dict, int, float, float]:
    """What each part holds and costs in a decode step here: {(part, fmt): (bytes as served, seconds)}, the bytes
    outside the parts, the float model's step and the rest of it (attention, norms, sampling, Python: what no
    format changes). Bytes are measured here too: a packed kernel's layout depends on the torch build."""
    costs, float_s = linear_costs(model, weights, settings, tick)
    others = model_bytes(model) - model_bytes(model.get_input_embeddings())  # all but the tied table
    for fmt in settings.head_formats:
        with head_format(model, fmt):
            costs[HEAD, fmt] = (model_bytes(model) - others, head_step_s(model))
        tick()
    base_step = decode_step_s(model, tokenizer, settings)
    rest = max(0.0, base_step - sum(float_s.values()) - head_step_s(model))  # >= 0 even when timings disagree
    fixed = others - sum(model_bytes(m) for m in decoder_linears(model).values())
    return costs, fixed, base_step, rest


def retime(profile: Profile, model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings) -> Profile:
    """`profile` with every part's bytes and decode time measured again on this machine (its KLs carry over: they
    are the model's; the seconds are the machine's, and the served bytes the torch build's)."""
    costs, fixed, base_step, rest = step_seconds(model, tokenizer, weights, settings)
    return replace(profile, costs=[replace(c, bytes=costs[c.part, c.fmt][0], step_s=costs[c.part, c.fmt][1])
                                   for c in profile.costs], fixed_bytes=fixed, base_step_s=base_step, rest_step_s=rest)


def check_profilable(model: nn.Module, settings: OptimizeSettings) -> None:
    """Refuse, before minutes of work, a model or head format the profile cannot price."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if not tied and set(settings.head_formats) != {"float32"}:
        raise ValueError("This model's head is not tied to its embedding; the int8 / int4 table formats need a tied "
                         "table. Profile it with head_formats=('float32',) (CLI: --head-formats float32).")
    if "int4" in settings.head_formats:
        problem = K.int4_table_problem(emb.weight.shape[0], emb.weight.shape[1], 32, emb.weight.device)
        if problem:
            raise ValueError(f"No int4 table here: {problem}. Leave it out: head_formats=('float32', 'int8') "
                             "(CLI: --head-formats float32,int8).")


def reuse_profile(profile: Profile, model: nn.Module, tokenizer, settings: OptimizeSettings) -> tuple[Profile, dict]:
    """A saved profile made ready for this machine: the GPTQ codes computed again (the same codes: same windows,
    same float model) and every decode time measured again (`retime`). Returns it and the codes."""
    weights = gptq_weights(model, calibration_windows(tokenizer, settings)[0].to(model.device), settings)
    return retime(profile, model, tokenizer, weights, settings), weights


@torch.no_grad()
def profile_model(model: nn.Module, tokenizer, settings: OptimizeSettings | None = None,
                  progress: bool = True) -> tuple[Profile, dict]:
    """Measure every part in every format; returns the profile and the GPTQ weights it priced
    ({(name, option): QuantizedWeight}, what `space.apply_plan` builds plans from). `model` is left as it was."""
    from tqdm.auto import tqdm

    settings, started = settings or OptimizeSettings(), time.perf_counter()
    check_profilable(model, settings)
    linears = decoder_linears(model)
    calib, held_out = (t.to(model.device) for t in calibration_windows(tokenizer, settings))
    n_parts = len(linears) * len(settings.linear_formats) + len(settings.head_formats)
    total = len(decoder_layers(model)) + n_parts + len(settings.linear_formats) + len(settings.head_formats) + 1
    bar = tqdm(total=total, desc="profile", unit="step", disable=not progress)
    tick = lambda: bar.update(1)
    weights = gptq_weights(model, calib, settings, on_layer=lambda i: tick())
    kls = all_kls(model, weights, settings, reference(model, held_out), tick)
    costs, fixed, base_step, rest = step_seconds(model, tokenizer, weights, settings, tick)
    base_ppl = perplexity(model, tokenizer, settings.protocol)
    bar.update(1)
    bar.close()
    rows = [PartCost(part, fmt, costs[part, fmt][0], kl, costs[part, fmt][1]) for (part, fmt), kl in kls.items()]
    return Profile(rows, fixed, model_bytes(model), base_step, rest, base_ppl,
                   settings=asdict(settings) | {"protocol": settings.protocol.describe()},
                   seconds=time.perf_counter() - started), weights
