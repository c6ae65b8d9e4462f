"""The sensitivity profile: what each part of the model costs and saves in each format, measured one part at a time.

For every decoder linear and the head, in every format: the bytes it holds as served, the KL divergence of the
model's next-token distribution from the float model's when ONLY that part is quantized (mean nats per token on
held-out windows of the training text), and the seconds it takes in one decode step (timed on this machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import quantization as Q
from ..bench.settings import BenchSettings
from ..core import capture_layer_inputs, decoder, decoder_layers, decoder_linears, final_logits
from ..data import calibration_batch, encode, load_text, with_bos
from ..evaluate import PerplexityProtocol, perplexity
from ..measure import measure_generation, model_bytes, time_function
from .space import HEAD, HEAD_FORMATS, LINEAR_FORMATS, apply_head, check_formats, gptq_option, served_linear


@dataclass(frozen=True)
class OptimizeSettings:
    """What the search measures. calib_*: GPTQ's calibration windows (seed 0 of the training text, as the bench);
    profile_*: the held-out windows (seed 2) the KL of each part is measured on; group_size: of int4 / int3;
    candidates: how many of the best estimated plans are built and measured; protocol, prompt_tokens,
    new_tokens, repeats: the bench's perplexity protocol and decode timing, so results sit on its pictures."""

    calib_samples: int = 4
    calib_seq_len: int = 256
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


@torch.no_grad()
def layer_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """The float hidden states entering each decoder layer and the final norm: L + 1 tensors (n, t, D)."""
    captured = capture_layer_inputs(model, ids)
    hidden = [captured.hidden]
    for layer, kw in zip(decoder_layers(model), captured.kwargs):
        hidden.append(layer(hidden[-1], **kw))
    return hidden, captured.kwargs


@torch.no_grad()
def log_probs_from(model: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], start: int) -> torch.Tensor:
    """Next-token log-probabilities (n * t, V), running the decoder from layer `start` on its float input."""
    x = hidden[start]  # (n, t, D)
    for layer, kw in zip(decoder_layers(model)[start:], kwargs[start:]):
        x = layer(x, **kw)
    logits = final_logits(model, decoder(model).norm(x))  # (n, t, V)
    return F.log_softmax(logits.float().flatten(0, 1), dim=-1)  # (n * t, V)


def mean_kl(base: torch.Tensor, new: torch.Tensor) -> float:
    """Mean over rows of KL(base || new), both log-probabilities (rows, V); nats. Float rounding can leave a
    tiny negative sum (-1e-8) where the two are almost equal: a KL is never below 0, so that reads as 0."""
    return max(0.0, F.kl_div(new, base, log_target=True, reduction="batchmean").item())


def part_kl(model: nn.Module, weights: dict, settings: OptimizeSettings, hidden, kwargs, base: torch.Tensor,
            part: str, fmt: str) -> float:
    """KL of the model with only `part` (a decoder linear's full name, or "lm_head") in `fmt`, the rest float."""
    if part == HEAD:
        with head_format(model, fmt):
            return mean_kl(base, log_probs_from(model, hidden, kwargs, len(hidden) - 1))  # the final norm + head
    linear = model.get_submodule(part)
    new = served_linear(weights[part, gptq_option(fmt, settings.group_size)], linear.bias)
    originals = Q.swap_modules(model, {part: new})
    try:
        return mean_kl(base, log_probs_from(model, hidden, kwargs, int(part.split(".")[2])))
    finally:
        Q.restore_modules(model, originals)


def linear_kls(model: nn.Module, weights: dict, settings: OptimizeSettings, hidden, kwargs, base: torch.Tensor,
               tick: Callable[[], None]) -> dict[tuple[str, str], float]:
    """`part_kl` of every decoder linear in every linear format."""
    out = {}
    for name in decoder_linears(model):
        for fmt in settings.linear_formats:
            out[name, fmt] = part_kl(model, weights, settings, hidden, kwargs, base, name, fmt)
            tick()
    return out


@torch.no_grad()
def remeasure_kls(model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings,
                  parts: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """`part_kl` of a few (part, format) pairs, from scratch: to check a saved profile on this machine."""
    held_out = calibration_windows(tokenizer, settings)[1].to(model.device)
    hidden, kwargs = layer_inputs(model, held_out)
    base = log_probs_from(model, hidden, kwargs, len(hidden) - 1)  # (n * t, V)
    return {(part, fmt): part_kl(model, weights, settings, hidden, kwargs, base, part, fmt) for part, fmt in parts}


@torch.no_grad()
def head_step_s(model: nn.Module) -> float:
    """Seconds the LM head takes on one decode token."""
    h = torch.randn(1, 1, model.config.hidden_size)  # (b, t, D)
    return time_function(lambda: model.lm_head(h), warmup=2, repeats=10).median_s


def head_costs(model: nn.Module, settings: OptimizeSettings, hidden, kwargs, base: torch.Tensor,
               tick: Callable[[], None]) -> dict[str, tuple[int, float]]:
    """(bytes, KL) of the tied table in each head format, swapped in and back out."""
    others = model_bytes(model) - model_bytes(model.get_input_embeddings())
    out = {}
    for fmt in settings.head_formats:
        with head_format(model, fmt):
            held = model_bytes(model) - others
        out[fmt] = (held, part_kl(model, {}, settings, hidden, kwargs, base, HEAD, fmt))
        tick()
    return out


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


def kind_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'mlp.up_proj': linears of one kind share a shape in every layer."""
    return name.split(".", 3)[3]


@torch.no_grad()
def linear_step_seconds(modules: list[nn.Module], in_features: int) -> float:
    """Seconds one module of `modules` takes on one token, timed as a pass over all of them: together they
    exceed the caches as a decode step's weights do, so each is read from memory, not from a warm cache."""
    x = torch.randn(1, 1, in_features)  # (b, t, in) one decode token
    timing = time_function(lambda: [m(x) for m in modules], warmup=2, repeats=7)
    return timing.median_s / len(modules)


def linear_costs(model: nn.Module, weights: dict, settings: OptimizeSettings,
                 tick: Callable[[], None]) -> tuple[dict[tuple[str, str], tuple[int, float]], dict[str, float]]:
    """{(name, fmt): (bytes served, step seconds)} and {name: float step seconds}, timed kind by kind."""
    linears = decoder_linears(model)
    kinds: dict[str, list[str]] = {}
    for name in linears:
        kinds.setdefault(kind_of(name), []).append(name)
    out, floats = {}, {}
    for names in kinds.values():
        in_features = linears[names[0]].in_features
        t_float = linear_step_seconds([linears[n] for n in names], in_features)
        floats |= {n: t_float for n in names}
        for fmt in settings.linear_formats:
            served = {n: served_linear(weights[n, gptq_option(fmt, settings.group_size)], linears[n].bias)
                      for n in names}
            t = linear_step_seconds(list(served.values()), in_features)
            out |= {(n, fmt): (model_bytes(m), t) for n, m in served.items()}
            tick()
    return out, floats


# ---------------------------------------------------------------- the whole profile


def bench_prompt_ids(tokenizer, settings: OptimizeSettings) -> torch.Tensor:
    """BOS + the first `prompt_tokens` tokens of the protocol's text, as the bench's decode prompt: (1, t)."""
    return with_bos(tokenizer, encode(tokenizer, load_text(settings.protocol.text), settings.prompt_tokens)[None])


def decode_step_s(model: nn.Module, tokenizer, settings: OptimizeSettings) -> float:
    """Seconds per greedy decode step (best of `repeats`), as the bench measures decode; when noise hides the
    decode steps (a very small model), the whole generation's seconds per token instead, an upper bound."""
    speed = measure_generation(model, bench_prompt_ids(tokenizer, settings), settings.new_tokens, warmup=1,
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
    return Q.gptq_options(model, calib, {n: options for n in decoder_linears(model)}, on_layer=on_layer)


def step_seconds(model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings,
                 tick: Callable[[], None] = lambda: None) -> tuple[dict, int, float, float]:
    """What a decode step costs here: {(part, fmt): (bytes, seconds)}, the bytes outside the parts, the float
    model's step and the rest of it (attention, norms, sampling, Python: what no format changes)."""
    costs, float_s = linear_costs(model, weights, settings, tick)
    for fmt in settings.head_formats:
        with head_format(model, fmt):
            costs["lm_head", fmt] = (0, head_step_s(model))  # the head's bytes come from `head_costs`
        tick()
    base_step = decode_step_s(model, tokenizer, settings)
    rest = base_step - sum(float_s.values()) - head_step_s(model)
    fixed = model_bytes(model) - model_bytes(model.get_input_embeddings()) \
        - sum(model_bytes(m) for m in decoder_linears(model).values())
    return costs, fixed, base_step, rest


def retime(profile: Profile, model: nn.Module, tokenizer, weights: dict, settings: OptimizeSettings) -> Profile:
    """`profile` with every decode time measured again on this machine (bytes and KL carry over: they are the
    model's, the seconds are the machine's)."""
    costs, _, base_step, rest = step_seconds(model, tokenizer, weights, settings)
    return replace(profile, costs=[replace(c, step_s=costs[c.part, c.fmt][1]) for c in profile.costs],
                   base_step_s=base_step, rest_step_s=rest)


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
    linears = decoder_linears(model)
    calib, held_out = (t.to(model.device) for t in calibration_windows(tokenizer, settings))
    n_layers, n_kinds, n_fmt = len(decoder_layers(model)), len({kind_of(n) for n in linears}), len(settings.linear_formats)
    total = n_layers + (len(linears) + n_kinds) * n_fmt + 2 * len(settings.head_formats) + 1
    bar = tqdm(total=total, desc="profile", unit="step", disable=not progress)
    tick = lambda: bar.update(1)
    weights = gptq_weights(model, calib, settings, on_layer=lambda i: tick())
    hidden, kwargs = layer_inputs(model, held_out)
    base = log_probs_from(model, hidden, kwargs, len(hidden) - 1)  # (n * t, V) the float model's
    kls = linear_kls(model, weights, settings, hidden, kwargs, base, tick)
    heads = head_costs(model, settings, hidden, kwargs, base, tick)
    del base, hidden
    costs, fixed, base_step, rest = step_seconds(model, tokenizer, weights, settings, tick)
    base_ppl = perplexity(model, tokenizer, settings.protocol)
    bar.update(1)
    bar.close()
    rows = [PartCost(n, f, costs[n, f][0], kls[n, f], costs[n, f][1]) for n in linears for f in settings.linear_formats]
    rows += [PartCost(HEAD, f, heads[f][0], heads[f][1], costs[HEAD, f][1]) for f in settings.head_formats]
    return Profile(rows, fixed, model_bytes(model), base_step, rest, base_ppl,
                   settings=asdict(settings) | {"protocol": settings.protocol.describe()},
                   seconds=time.perf_counter() - started), weights
