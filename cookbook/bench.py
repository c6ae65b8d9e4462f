"""The measurement suite: every technique of the cookbook measured on one model, one device, one protocol.

`python -m cookbook bench` runs `run_bench` and writes `reports/<device>.md`, `.json` and `.png`.

Each technique is a plain function `bench_<name>(model, tokenizer, device, settings) -> list[dict]`
listed in `TECHNIQUES`. It works on a copy of the model (or on modules it swaps back), so the
model it is given is unchanged when it returns; it measures with the package's own tools
(`perplexity` on ONE fixed protocol, `generate` timed on ONE fixed prompt, `model_bytes`) and
calls each technique's public functions from its module, never a re-implementation.

Energy and cost are estimates, not measurements: tokens per joule = tokens/s / an ASSUMED power
draw (W), and dollars per million tokens = an ASSUMED price per hour / (3600 x tokens/s) x 1e6.
Both assumptions are written into every report.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import attention as A
from . import decoding as dec
from . import distillation as D
from . import early_exit as EE
from . import fast_decoding as fd
from . import kernels as K
from . import lora
from . import moe
from . import paged as pg
from . import pruning as P
from . import quantization as Q
from . import recipe as R
from . import serving as sv
from . import speculative as sp
from .data import TRAIN_TEXT, calibration_batch, copy_task, encode, load_text, with_bos
from .evaluate import PerplexityProtocol, perplexity, relative_change
from .loadtest import load_test
from .measure import (count_parameters, cpu_has_native_bf16, decode_bytes_per_token, format_bytes,
                      measure_generation, memory_bandwidth, model_bytes, roofline_tokens_per_s)

COLUMNS = ("technique", "variant", "format", "params", "bytes held", "bytes/token", "perplexity", "rel. change",
           "decode tok/s", "% roofline", "prefill tok/s", "tokens/J", "$/M tokens", "notes")


# ---------------------------------------------------------------- settings and assumptions


@dataclass(frozen=True)
class BenchSettings:
    """Everything that fixes what the bench measures; recorded in the report.

    protocol: the one perplexity protocol of every row. prompt_tokens / new_tokens: the one prompt
    (BOS + the first tokens of the eval text) and the greedy tokens generated from it for decode
    speed, timed `repeats` times after `warmup` runs (best of the repeats, see `measure_model`). calib_*: calibration windows of the
    training text for GPTQ, AWQ, Wanda and structured pruning. recipe_*: AdamW steps and window length
    of the combined recipe's distillation recovery (`cookbook.recipe`). attention_window: the sliding window the
    attention row puts on the model's global layers. watts, usd_per_hour: the ASSUMED
    power draw and price behind tokens/J and $/M tokens (see `default_power_and_price`). compile: also measure
    the `torch.compile` rows (each compile costs tens of seconds and needs a C++ compiler on CPU).
    """

    protocol: PerplexityProtocol = PerplexityProtocol(seq_len=256, stride=256, max_tokens=1024)
    prompt_tokens: int = 32
    new_tokens: int = 64
    loop_new_tokens: int = 16
    warmup: int = 1
    repeats: int = 2
    calib_samples: int = 4
    calib_seq_len: int = 256
    group_size: int = 128
    serving_requests: int = 16
    serving_output_range: tuple[int, int] = (4, 32)
    max_batch: int = 8
    recipe_steps: int = 16
    recipe_seq_len: int = 128
    attention_window: int = 128
    watts: float = 20.0
    usd_per_hour: float = 0.10
    assumptions: str = ""
    quick: bool = False
    compile: bool = True

    def __post_init__(self) -> None:
        if self.new_tokens < 2 or self.loop_new_tokens < 2:
            raise ValueError("new_tokens and loop_new_tokens must be >= 2 to separate decode from prefill.")
        if self.prompt_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("Need prompt_tokens >= 1, repeats >= 1 and warmup >= 0.")
        if not (self.watts > 0 and self.usd_per_hour >= 0):
            raise ValueError(f"watts must be > 0 and usd_per_hour >= 0, got {self.watts} and {self.usd_per_hour}.")

    def describe(self) -> dict:
        d = asdict(self)
        d["protocol"] = self.protocol.describe()
        return d


QUICK = dict(protocol=PerplexityProtocol(seq_len=256, stride=256, max_tokens=512), new_tokens=8, loop_new_tokens=8,
             warmup=1, repeats=2, calib_samples=2, calib_seq_len=128, serving_requests=8, max_batch=4, recipe_steps=8)

# Board power from the vendors' spec sheets (maximum TDP): an UPPER BOUND on what a decode loop draws.
GPU_TDP_W = {"h200": 700.0, "h100 sxm": 700.0, "h100 80gb hbm3": 700.0, "h100 pcie": 350.0, "h100": 700.0,
             "a100": 400.0, "l40s": 350.0, "l4": 72.0, "a10": 150.0, "t4": 70.0, "rtx 4090": 450.0}
CPU_WATTS_PER_THREAD = 10.0
CPU_USD_PER_HOUR = 0.10  # roughly a 2-vCPU general-purpose cloud instance on demand
GPU_USD_PER_HOUR = 3.00  # roughly one H100 / H200 rented by the hour


def default_power_and_price(device: torch.device) -> tuple[float, float, str]:
    """The assumed power draw (W), price ($/hour) and the sentence stating both, for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in GPU_TDP_W if k in name.lower()), None)
        watts = GPU_TDP_W[key] if key else 300.0
        source = (f"the board TDP of the {name} from the vendor's spec sheet ({watts:.0f} W)" if key else
                  f"a generic 300 W (no spec-sheet TDP known for {name}; pass --watts)")
        return watts, GPU_USD_PER_HOUR, (
            f"Power: {source}, an UPPER BOUND, not a measurement (a batch-1 decode loop draws less). "
            f"Price: ${GPU_USD_PER_HOUR:.2f}/hour, a typical on-demand rental of one such GPU. "
            "Pass --watts and --usd-per-hour for your own figures.")
    threads = torch.get_num_threads()
    watts = CPU_WATTS_PER_THREAD * threads
    return watts, CPU_USD_PER_HOUR, (
        f"Power: {CPU_WATTS_PER_THREAD:.0f} W per busy CPU thread x {threads} threads = {watts:.0f} W, a stated "
        "assumption (a server core under load draws roughly 5-15 W), not a measurement. "
        f"Price: ${CPU_USD_PER_HOUR:.2f}/hour, roughly a {threads}-vCPU cloud instance on demand. "
        "Pass --watts and --usd-per-hour for your own figures.")


def make_settings(device: torch.device, quick: bool = False, watts: float | None = None,
                  usd_per_hour: float | None = None, **overrides) -> BenchSettings:
    """Settings for `device`: the full or `quick` sizes, the stated power and price unless given."""
    default_w, default_usd, text = default_power_and_price(device)
    if watts is not None or usd_per_hour is not None:
        text = (f"Power {watts if watts is not None else default_w:g} W and price "
                f"${usd_per_hour if usd_per_hour is not None else default_usd:g}/hour as given on the command line "
                f"(defaults would have been: {text})")
    base = dict(QUICK, quick=True) if quick else {}
    return BenchSettings(**(base | overrides), watts=default_w if watts is None else watts,
                         usd_per_hour=default_usd if usd_per_hour is None else usd_per_hour, assumptions=text)


def tokens_per_joule(tokens_per_s: float | None, watts: float) -> float | None:
    """Tokens per joule at an assumed constant power draw: (tokens/s) / W."""
    return None if tokens_per_s is None else tokens_per_s / watts


def usd_per_million_tokens(tokens_per_s: float | None, usd_per_hour: float) -> float | None:
    """Dollars per million tokens at `usd_per_hour` for a machine producing `tokens_per_s`."""
    if tokens_per_s is None or tokens_per_s <= 0:
        return None
    return usd_per_hour / (3600.0 * tokens_per_s) * 1e6


# ---------------------------------------------------------------- one row


def represented_parameters(model: nn.Module) -> int:
    """Weights the model stands for: its parameters plus the weights packed in quantized modules' buffers."""
    n = count_parameters(model)
    tables = set()
    for m in model.modules():
        if isinstance(m, (Q.QuantLinear, Q.NF4Linear, K.PackedInt4Linear, K.PackedInt8Linear)):
            n += m.out_features * m.in_features
        elif isinstance(m, (Q.Int8MixedLinear, Q.W8A8Linear)):
            n += m.weight_codes.numel()
        elif isinstance(m, Q.Int8TiedEmbedding) and id(m) not in tables:
            tables.add(id(m))
            n += m.codes.numel()
        elif isinstance(m, K.PackedInt4TiedTable) and id(m) not in tables:
            tables.add(id(m))
            n += 2 * m.packed.numel()  # two 4-bit codes per byte
    return n


def dtype_name(model: nn.Module) -> str:
    """The model's dtype as the report's format column writes it: 'float32', 'bfloat16', ..."""
    return str(model.dtype).replace("torch.", "")


def bench_prompt(tokenizer, settings: BenchSettings, device) -> torch.Tensor:
    """The one prompt every decode measurement uses: BOS + the eval text's first tokens, (1, t)."""
    ids = encode(tokenizer, load_text(settings.protocol.text), settings.prompt_tokens - 1)
    return with_bos(tokenizer, ids[None]).to(device)  # (1, prompt_tokens)


def result_row(technique: str, variant: str, fmt: str, model: nn.Module | None = None, ppl: float | None = None,
               decode: float | None = None, prefill: float | None = None, notes: str = "", **extra) -> dict:
    """One results row with every column of `COLUMNS` (None where not measured)."""
    return {"technique": technique, "variant": variant, "format": fmt,
            "params": None if model is None else represented_parameters(model),
            "bytes held": None if model is None else model_bytes(model),
            "bytes/token": None if model is None else decode_bytes_per_token(model),
            "perplexity": ppl, "rel. change": None, "decode tok/s": decode, "% roofline": None, "prefill tok/s": prefill,
            "tokens/J": None, "$/M tokens": None, "notes": notes, **extra}


UNSEPARATED_DECODE = ("decode speed not measured: the whole generate timed no slower than its one-token run "
                      "(timing noise from other work on the machine)")


def best_of(run: Callable[[], object], tokens_per_s: Callable[[object], float], settings: BenchSettings):
    """Call `run` `warmup` + `repeats` times: the last result, and the best tokens/s over the repeats."""
    for _ in range(settings.warmup):
        run()
    results = [run() for _ in range(settings.repeats)]
    return results[-1], max(tokens_per_s(r) for r in results)


def measure_model(model, tokenizer, settings: BenchSettings, technique: str, variant: str, fmt: str,
                  notes: str = "") -> dict:
    """Perplexity on the protocol and greedy prefill / decode speed on the prompt: one row."""
    gc.collect()
    ppl = perplexity(model, tokenizer, settings.protocol)
    # the BEST of the repeats: on a shared machine other work can only slow a run down
    speed = measure_generation(model, bench_prompt(tokenizer, settings, model.device), settings.new_tokens,
                               settings.warmup, settings.repeats, statistic="min")
    decode = speed.decode_tokens_per_s
    if math.isnan(decode):
        decode, notes = None, "; ".join(filter(None, [notes, UNSEPARATED_DECODE]))
    return result_row(technique, variant, fmt, model, ppl, decode, speed.prefill_tokens_per_s, notes)


def calibration(tokenizer, settings: BenchSettings, device) -> torch.Tensor:
    return calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, seed=0).to(device)


def _fresh_copy(model: nn.Module) -> nn.Module:
    gc.collect()
    return copy.deepcopy(model)


# ---------------------------------------------------------------- the techniques, one function each


def bench_baseline(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The model as loaded: the reference every other row is compared with."""
    fmt = dtype_name(model)
    return [measure_model(model, tokenizer, settings, "baseline", "as loaded", fmt)]


def bench_precision(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The whole model cast to bfloat16 (notebook 01); skipped when it is already bf16."""
    if model.dtype == torch.bfloat16:
        return []
    work = _fresh_copy(model).to(torch.bfloat16)
    note = ("CPU: bf16 is fast only with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere it can be slower"
            if device.type == "cpu" else "")
    row = measure_model(work, tokenizer, settings, "precision", "cast to bf16", "bf16", note)
    del work
    return [row]


REFERENCE_NOTE = "decoder linears only; the reference path: the float weight rebuilt on every call"


def packed_note() -> str:
    """What the packed rows ran: the kernels, the activation dtype around them, and whether the CPU has bf16."""
    native = "native bf16 on this CPU" if cpu_has_native_bf16() else "no native bf16 on this CPU (converted)"
    return f"packed int8/int4 kernels (aten._weight_int*pack_mm), activations cast to bf16 around them; {native}"


def packed_rows(work, tokenizer, device, settings: BenchSettings, variant: str, fmt: str,
                float_head_row: bool = True) -> list[dict]:
    """`work` (quantized QuantLinears, float or int8 tied head) on the packed kernels: the linears alone (unless
    `float_head_row` is False), then with the tied table as int8 and the head packed too. Changes `work`."""
    if device.type != "cpu":
        return [result_row("weight quantization", f"{variant}, packed", fmt,
                           notes="not measured: the packed kernels here are CPU kernels")]
    rows = []
    K.pack_quantized_linears(work)
    if not isinstance(work.lm_head, Q._HeadView):
        if float_head_row:
            rows.append(measure_model(work, tokenizer, settings, "weight quantization", f"{variant}, packed", fmt,
                                      packed_note() + "; float head"))
        if not _has_tied_embedding(work):
            return rows
        Q.quantize_tied_embedding_int8(work)
    K.pack_int8_head(work)
    rows.append(measure_model(work, tokenizer, settings, "weight quantization", f"{variant} + int8 head, packed",
                              f"{fmt} + int8 emb", packed_note() + "; the tied table int8, one scale per row"))
    return rows


def bench_rtn(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Round-to-nearest int8 (one scale per output channel) and int4 (groups) of every decoder linear (notebook 02):
    the reference QuantLinear, then the same codes on the packed kernels, with and without an int8 head."""
    rows = []
    for bits, group in ((8, None), (4, settings.group_size)):
        work = _fresh_copy(model)
        Q.quantize_linears_rtn(work, bits, group, symmetric=False)
        fmt = f"int{bits} " + (f"g{group}" if group else "per channel")
        rows.append(measure_model(work, tokenizer, settings, "weight quantization", f"RTN int{bits}", fmt,
                                  REFERENCE_NOTE))
        rows += packed_rows(work, tokenizer, device, settings, f"RTN int{bits}", fmt)
        del work
    return rows


def bench_outliers(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """W8A8 on every decoder linear (notebook 03): LLM.int8 (outlier input columns in float, threshold 6) and
    static per-tensor activations with SmoothQuant (alpha 0.5), calibrated on the calibration windows."""
    absmax = Q.activation_absmax(model, calibration(tokenizer, settings, device))
    variants = {
        "LLM.int8 (threshold 6)": lambda name, m: Q.Int8MixedLinear(m, 6.0),
        "W8A8 static + SmoothQuant": lambda name, m: Q.W8A8Linear(
            m, absmax[name], Q.smoothing_scale(absmax[name], m.weight, 0.5)),
    }
    rows = []
    for variant, make in variants.items():
        originals = Q.swap_modules(model, {n: make(n, m) for n, m in Q.decoder_linears(model).items()})
        try:
            rows.append(measure_model(model, tokenizer, settings, "activation quantization", variant, "int8 W8A8",
                                      "decoder linears only; the int8 matmul emulated in float32 (no int8 kernel)"))
        finally:
            Q.restore_modules(model, originals)
    return rows


def bench_gptq_awq(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """GPTQ and AWQ at 4 bits on calibration data (notebook 04), and GPTQ + int8 tied embedding."""
    rows, g = [], settings.group_size
    calib = calibration(tokenizer, settings, device)
    for method in ("gptq", "awq"):
        work = _fresh_copy(model)
        start = time.perf_counter()
        Q.quantize_model_layerwise(work, calib, method, 4, g, symmetric=False)
        spent = time.perf_counter() - start
        note = f"{len(calib)}x{calib.shape[1]} calibration tokens, quantized in {spent:.0f} s"
        rows.append(measure_model(work, tokenizer, settings, "weight quantization", method.upper() + " int4",
                                  f"int4 g{g}", f"{note}; {REFERENCE_NOTE}"))
        if not _has_tied_embedding(work):
            continue
        float_table = Q.quantize_tied_embedding_int8(work) if method == "gptq" else {}
        if method == "gptq":
            rows.append(measure_model(work, tokenizer, settings, "weight quantization",
                                      "GPTQ int4 + int8 embedding", f"int4 g{g} + int8 emb",
                                      "the tied embedding / lm_head as int8, one scale per row; reference path"))
        rows += packed_rows(work, tokenizer, device, settings, method.upper() + " int4", f"int4 g{g}",
                            float_head_row=False)
        if float_table and device.type == "cpu":
            Q.restore_modules(work, float_table)  # the float table back; the linears stay packed
            K.quantize_tied_embedding_int4(work, INT4_HEAD_GROUP)
            rows.append(measure_model(work, tokenizer, settings, "weight quantization",
                                      f"GPTQ int4 + int4 head g{INT4_HEAD_GROUP}, packed",
                                      f"int4 g{g} + int4 emb g{INT4_HEAD_GROUP}",
                                      packed_note() + "; the tied table RTN int4, stored once in the kernel's layout"))
            if settings.compile:
                rows.append(compiled_row(work, tokenizer, settings, rows[-1]))
        del work
    return rows


INT4_HEAD_GROUP = 32  # the int4 tied table's groups: the finest the kernel takes (the head's error costs most)


def _has_tied_embedding(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def bench_nf4(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """NF4 with double quantization (QLoRA's storage format, notebook 04)."""
    work = _fresh_copy(model)
    Q.quantize_linears_nf4(work, 64, double_quant=True)
    row = measure_model(work, tokenizer, settings, "weight quantization", "NF4 + double quant", "nf4 b64",
                        REFERENCE_NOTE + "; no packed CPU kernel for NF4's non-uniform levels")
    del work
    return [row]


def bench_wanda(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Wanda unstructured pruning, 50% of every decoder linear's weights (notebook 05)."""
    work = _fresh_copy(model)
    P.prune_wanda(work, P.collect_input_norms(work, calibration(tokenizer, settings, device)), 0.5)
    row = measure_model(work, tokenizer, settings, "pruning", "Wanda 50% unstructured",
                        dtype_name(model),
                        f"{P.sparsity_of(work):.0%} zeros stored densely: no bytes or time saved without sparse kernels")
    del work
    return [row]


def bench_structured(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Structured pruning: 25% of the MLP channels of every layer removed, no fine-tune (notebook 05)."""
    work = _fresh_copy(model)
    inter = work.config.intermediate_size
    new = P.prune_mlp_channels(work, P.collect_input_norms(work, calibration(tokenizer, settings, device)), 0.25)
    row = measure_model(work, tokenizer, settings, "pruning", "MLP channels -25%", dtype_name(model),
                        f"intermediate size {inter} -> {new}; no recovery fine-tune")
    del work
    return [row]


def saved_student(model, tokenizer, device) -> tuple[nn.Module | None, str]:
    """The student notebook 06 saved at `distillation.student_dir()` if it is there and fits this model,
    else None and the reason."""
    from .models import load_model

    path = D.student_dir()
    if not (path / "config.json").exists():
        return None, f"no student at <cache>/{path.name}; run notebook 06 first"
    student, student_tok = load_model(str(path), device=device, dtype=model.dtype)
    same = (student.config.hidden_size == model.config.hidden_size
            and student.config.vocab_size == model.config.vocab_size
            and student_tok.get_vocab() == tokenizer.get_vocab())
    if not same:
        return None, "the saved student was distilled from another model"
    return student, ""


def bench_distilled_student(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The student notebook 06 saved at `distillation.student_dir()`, if it is there and fits this model."""
    fmt = dtype_name(model)
    student, why_not = saved_student(model, tokenizer, device)
    if student is None:
        return [result_row("distillation", "saved student", fmt, notes=f"not measured: {why_not}")]
    row = measure_model(student, tokenizer, settings, "distillation",
                        f"student, {student.config.num_hidden_layers} of {model.config.num_hidden_layers} layers",
                        fmt, "notebook 06's student (a short distillation run)")
    del student
    return [row]


def bench_sharing(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Notebook 07's factorized embedding: the tied embedding / LM head as rank hidden/2 factors (truncated SVD),
    without training. Cross-layer sharing is not benched: sharing a trained model's layers without retraining
    destroys it (perplexity in the millions), and the retraining notebook 07 does is too long for the bench."""
    if not _has_tied_embedding(model):
        return [result_row("parameter sharing", "factorized embedding", "", notes="not measured: needs a tied embedding")]
    rank = model.config.hidden_size // 2
    with D.factorized_embedding(model, rank) as work:
        return [measure_model(work, tokenizer, settings, "parameter sharing", f"embedding rank {rank} (SVD, no training)",
                              dtype_name(model),
                              f"V x {rank} + {rank} x H factors instead of V x H; not fine-tuned")]


def bench_moe(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Every MLP upcycled into 4 experts, top-2 routing (notebook 08): the same outputs as the dense model
    before any training, so the row shows what experts cost in bytes and speed at unchanged quality."""
    experts, k = 4, 2
    work = _fresh_copy(model)
    moe.upcycle_mlps(work, experts, k)
    counts = moe.moe_parameter_counts(work.config, experts, k)
    row = measure_model(work, tokenizer, settings, "mixture of experts", f"upcycled, {experts} experts top-{k}",
                        dtype_name(model),
                        f"{counts['total']:,} parameters, {counts['active']:,} active per token; untrained router "
                        "(identical experts: same outputs as dense)")
    del work
    return [row]


def bench_attention(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """A sliding window on the global attention layers too (notebook 09, our attention swapped in; on every
    layer of a model without global layers): what it costs in perplexity, and the KV cache it saves at long
    context. Bytes held do not change; decode is not timed (the saving is in cache memory at long context,
    not in the short bench prompt)."""
    window, context = settings.attention_window, 32_768
    own = A.layer_windows(model.config)  # None = a global layer
    layers = "global" if None in own else "all"
    windows = A.windows_for(model.config, window, layers)  # None = the layer keeps its own window
    with A.patterned_attention(model, windows=windows):
        ppl = perplexity(model, tokenizer, settings.protocol)
    effective = [w if w is not None else o for w, o in zip(windows, own)]
    own_bytes, windowed = (A.kv_cache_bytes(model.config, context, dtype=model.dtype, windows=w)
                           for w in (own, effective))
    where = "the global layers" if layers == "global" else "every layer"
    return [result_row("attention", f"window {window} on {where}", dtype_name(model),
                       model, ppl, kv_cache_bytes=(own_bytes, windowed),
                       notes=f"KV cache at {context:,} tokens: {format_bytes(own_bytes)} -> {format_bytes(windowed)}")]


def cached_perplexity(model, tokenizer, protocol: PerplexityProtocol, cache_cls: type[dec.KVCache]) -> float:
    """The protocol's perplexity scored through our decoding forward with a fresh `cache_cls` per window.

    Needs stride == seq_len (windows that do not overlap): then each window BOS + w is scored exactly as
    `evaluate.perplexity` scores it, so a float cache gives the baseline's number and an int8 cache shows
    what quantizing the keys and values costs.
    """
    if protocol.stride != protocol.seq_len:
        raise ValueError("cached_perplexity needs a protocol with stride == seq_len (non-overlapping windows).")
    ids = encode(tokenizer, load_text(protocol.text), protocol.max_tokens).to(model.device)
    total, scored = 0.0, 0
    for start in range(0, len(ids), protocol.seq_len):
        window = with_bos(tokenizer, ids[start:start + protocol.seq_len][None])  # (1, t + 1)
        if window.shape[1] < 2:
            break
        logits = dec.teacher_forced_logits(model, window, cache_cls)  # (1, t + 1, V)
        total += dec.nll_of_logits(logits, window) * (window.shape[1] - 1)
        scored += window.shape[1] - 1
        del logits
    return math.exp(total / scored)


def bench_kv_cache(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Greedy decoding with our loops (notebook 10): no cache, float KV cache, int8 KV cache."""
    prompt = bench_prompt(tokenizer, settings, device)
    n, fmt = settings.loop_new_tokens, dtype_name(model)
    plain_tps = lambda g: g.tokens_per_s()
    cached_tps = lambda out: out[0].tokens_per_s()  # generate_with_cache returns (generation, cache)
    no_cache, no_cache_tps = best_of(lambda: dec.generate_no_cache(model, prompt, n), plain_tps, settings)
    (fp, fp_cache), fp_tps = best_of(lambda: dec.generate_with_cache(model, prompt, n), cached_tps, settings)
    (q8, q8_cache), q8_tps = best_of(lambda: dec.generate_with_cache(model, prompt, n, dec.Int8KVCache),
                                     cached_tps, settings)
    same = fp.tokens == no_cache.tokens
    ppl_fp = cached_perplexity(model, tokenizer, settings.protocol, dec.KVCache)
    ppl_q8 = cached_perplexity(model, tokenizer, settings.protocol, dec.Int8KVCache)
    loop = f"our loop, {prompt.shape[1]}-token prompt, {n} tokens, prefill included"
    return [
        result_row("decoding", "no KV cache", fmt, model, ppl_fp, no_cache_tps, notes=loop),
        result_row("decoding", "KV cache (float)", fmt, model, ppl_fp, fp_tps,
                   notes=f"{loop}; tokens identical to no cache: {same}; cache {fp_cache.nbytes():,} B"),
        result_row("decoding", "KV cache (int8)", fmt, model, ppl_q8, q8_tps,
                   notes=f"{loop}; cache {q8_cache.nbytes():,} B"),
    ]


SHORTLIST_SIZE = 4096  # the early-exit bound's candidates: the training text's most frequent tokens


def bench_early_exit(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Early exit (notebook 10) after 2/3 and 5/6 of the layers at threshold 0.9, teacher-forced over the eval text
    after the bench prompt: the confidence test and its shortlist bound, against the same loop without exits."""
    n_layers, fmt = model.config.num_hidden_layers, dtype_name(model)
    exits = sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in (2 / 3, 5 / 6)})
    text = encode(tokenizer, load_text(settings.protocol.text), settings.prompt_tokens + settings.new_tokens - 1)
    ids = with_bos(tokenizer, text[None]).to(device)  # (1, prompt + new tokens)
    if type(model.lm_head) is not nn.Linear or n_layers < 2:
        return [result_row("decoding", "early exit", fmt, notes="not measured: needs a float nn.Linear head and at "
                                                                "least 2 layers")]
    shortlist = EE.ShortlistTest(model, EE.frequent_tokens(encode(tokenizer, load_text(TRAIN_TEXT)), SHORTLIST_SIZE))
    run = lambda layers, bound=None: EE.early_exit_teacher_forced(model, ids, layers, 0.9, settings.prompt_tokens,
                                                                  bound)
    tps = lambda r: len(r.times_s) / r.times_s[-1]
    plain, plain_tps = best_of(lambda: run([]), tps, settings)
    rows = []
    for name, bound in (("confidence test", None), (f"shortlist bound ({SHORTLIST_SIZE} tokens)", shortlist)):
        res, res_tps = best_of(lambda: run(exits, bound), tps, settings)
        n = len(res.tokens)
        rows.append(result_row(
            "decoding", f"early exit after {exits} layers, threshold 0.9, {name}", fmt, model, None, res_tps, notes=(
                f"teacher-forced over {n} tokens after the prompt, our loop: {res_tps / plain_tps:.2f}x the same loop "
                f"without exits ({plain_tps:.1f} tok/s); perplexity of those {n} tokens "
                f"{math.exp(sum(res.nll) / n):.2f} against {math.exp(sum(plain.nll) / n):.2f}; "
                f"{sum(e < n_layers for e in res.exit_layers) / n:.0%} of tokens exit, top-1 as the full model "
                f"for {sum(a == b for a, b in zip(res.tokens, plain.tokens)) / n:.0%}; "
                f"{sum(res.head_reads) / n:.2f} whole-head reads per token by the checks")))
    return rows


def bench_speculative(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Greedy speculative decoding with two drafts: the first 2/3 of the layers (shares every weight), and
    notebook 06's distilled student when it is saved."""
    prompt = bench_prompt(tokenizer, settings, device)
    n, fmt = settings.loop_new_tokens, dtype_name(model)
    layers = model.config.num_hidden_layers
    plain, _ = dec.generate_with_cache(model, prompt, n)
    student, why_not = saved_student(model, tokenizer, device)
    drafts = {"truncated": sp.truncated_draft(model, max(1, round(2 * layers / 3)))}
    if student is not None:
        drafts["distilled student"] = student
    rows = []
    for kind, draft in drafts.items():
        spec, spec_tps = best_of(lambda: sp.speculative_generate(model, draft, prompt, n, k=3),
                                 lambda r: len(r.tokens) / r.seconds, settings)
        rows.append(result_row(
            "decoding", f"speculative, {draft.config.num_hidden_layers}-layer {kind} draft, k=3", fmt, model, None,
            spec_tps,
            notes=(f"our loop like the KV cache row; output identical to greedy: {spec.tokens == plain.tokens}; "
                   f"acceptance {spec.acceptance_rate:.2f}, {spec.tokens_per_target_pass:.2f} tokens per target pass")))
    if student is None:
        rows[0]["notes"] += f"; no distilled-student draft: {why_not}"
    return rows + twin_draft_rows(model, tokenizer, settings)


TWIN_K = 4  # drafts per round for the int4 twin: its acceptance (~0.75) makes 4-6 the best k


def twin_draft_rows(model, tokenizer, settings: BenchSettings) -> list[dict]:
    """The model's packed int4 twin (`kernels.packed_int4_model`) drafting for it, eager and compiled, against
    transformers' generate on the same prompt, both timed with their prefill."""
    fmt = dtype_name(model)
    if model.device.type != "cpu":
        return [result_row("decoding", f"speculative, packed int4 twin draft, k={TWIN_K}", fmt,
                           notes="not measured: the packed int4 kernels are CPU kernels")]
    prompt, n = bench_prompt(tokenizer, settings, model.device), settings.new_tokens
    twin = K.packed_int4_model(model, INT4_HEAD_GROUP)
    hf = measure_generation(model, prompt, n, settings.warmup, settings.repeats, statistic="min")
    hf_tps, plain = n / hf.generate_s, dec.generate_with_cache(model, prompt, n)[0].tokens
    rows, slots = [], prompt.shape[1] + n + TWIN_K
    for compiled in compile_choices(settings):
        target = fd.StaticDecoder(model, slots, compile=compiled)
        drafter = sp.ModelDrafter(fd.StaticDecoder(twin, slots, compile=compiled))
        start = time.perf_counter()
        sp.speculate(target, drafter, prompt, 2, k=TWIN_K)  # compiles both steps
        first = time.perf_counter() - start
        res, tps = best_of(lambda: sp.speculate(target, drafter, prompt, n, k=TWIN_K),
                           lambda r: len(r.tokens) / r.seconds, settings)
        how = ", both compiled" if compiled else ""
        rows.append(result_row(
            "decoding", f"speculative, packed int4 twin draft (RTN g32 + int4 head), k={TWIN_K}{how}", fmt, model,
            None, tps, aggregate=True,
            notes=(f"tokens/s with prefill, {n} tokens: {tps / hf_tps:.2f}x generate ({hf_tps:.1f}) on the same "
                   f"prompt; identical to our eager greedy: {res.tokens == plain}; acceptance "
                   f"{res.acceptance_rate:.2f}, {res.tokens_per_target_pass:.2f} tokens per target pass"
                   + (f"; compile + first tokens {first:.0f} s" if compiled else ""))))
    return rows


def compile_choices(settings: BenchSettings) -> tuple[bool, ...]:
    """Eager, then compiled unless `settings.compile` is off (`--no-compile`)."""
    return (False, True) if settings.compile else (False,)


def static_decode_speed(decoder: fd.StaticDecoder, prompt: torch.Tensor, settings: BenchSettings) -> tuple:
    """(seconds of the first call, which compiles; last Generation; best decode tok/s over the repeats)."""
    start = time.perf_counter()
    decoder.generate(prompt, 2)
    first = time.perf_counter() - start
    gen, tps = best_of(lambda: decoder.generate(prompt, settings.new_tokens), dec.Generation.decode_tokens_per_s,
                       settings)
    return first, gen, tps


def compiled_row(model, tokenizer, settings: BenchSettings, eager_row: dict) -> dict:
    """`eager_row`'s model decoding through `torch.compile` of our static step (same weights and perplexity)."""
    prompt = bench_prompt(tokenizer, settings, model.device)
    mode = None if model.device.type == "cpu" else "reduce-overhead"  # on CUDA: CUDA graphs
    decoder = fd.StaticDecoder(model, prompt.shape[1] + settings.new_tokens + 8, compile=True, mode=mode)
    first, gen, tps = static_decode_speed(decoder, prompt, settings)
    ops = fd.ops_per_step(decoder, gen.tokens[-1])
    same = gen.tokens == dec.generate_with_cache(model, prompt, settings.new_tokens)[0].tokens
    return result_row(eager_row["technique"], eager_row["variant"] + ", compiled", eager_row["format"], model,
                      eager_row["perplexity"], tps, eager_row["prefill tok/s"],
                      notes=(f"our static loop, decode alone like generate's rows; torch.compile of the step "
                             f"(fullgraph, {ops.aten_ops} aten ops per token outside fused kernels); compile + first "
                             f"tokens {first:.0f} s; greedy tokens as our eager loop: {same}"))


def bench_compiled(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Our static-shape decode step eager and compiled (notebook 10), against transformers' generate (the baseline
    row); prompt-lookup decoding on the copy task against plain greedy and generate on the same prompt."""
    prompt, n, fmt = bench_prompt(tokenizer, settings, device), settings.new_tokens, dtype_name(model)
    slots = max(prompt.shape[1], copy_task(tokenizer).shape[1]) + n + 16  # room for 8 drafts and the op count
    rows = []
    for compiled in compile_choices(settings):
        decoder = fd.StaticDecoder(model, slots, compile=compiled)
        first, gen, tps = static_decode_speed(decoder, prompt, settings)
        ops = fd.ops_per_step(decoder, gen.tokens[-1])
        how = "torch.compile (fullgraph)" if compiled else "eager"
        rows.append(result_row("decoding", f"static decode step, {how}", fmt, model, None, tps, notes=(
            f"our static loop, decode alone ({n} tokens, prefill excluded) like generate's rows; {ops.aten_ops} aten "
            "ops per token outside fused kernels" + (f"; compile + first tokens {first:.0f} s" if compiled else ""))))
    rows.append(prompt_lookup_row(model, tokenizer, settings, decoder))
    return rows


def prompt_lookup_row(model, tokenizer, settings: BenchSettings, decoder: fd.StaticDecoder) -> dict:
    """Prompt lookup (k=8, n-grams up to 3) on `data.copy_task`, timed with its prefill, against plain greedy of the
    same decoder (compiled unless the settings say not to) and transformers' generate on the same prompt."""
    prompt, n = copy_task(tokenizer).to(model.device), settings.new_tokens
    sp.prompt_lookup_generate(decoder, prompt, n, k=8)  # compiles the (k + 1)-token shape
    res, tps = best_of(lambda: sp.prompt_lookup_generate(decoder, prompt, n, k=8), lambda r: len(r.tokens) / r.seconds,
                       settings)
    plain, plain_tps = best_of(lambda: decoder.generate(prompt, n), dec.Generation.tokens_per_s, settings)
    hf = measure_generation(model, prompt, n, settings.warmup, settings.repeats, statistic="min")
    hf_tps = n / hf.generate_s
    how = "compiled" if decoder.compiled else "eager"
    return result_row("decoding", f"prompt lookup on the copy task, k=8, {how}", dtype_name(model), model, None, tps,
                      notes=(f"tokens/s with prefill on a {prompt.shape[1]}-token prompt: {tps / hf_tps:.2f}x generate "
                             f"({hf_tps:.1f}), {tps / plain_tps:.2f}x plain {how} greedy ({plain_tps:.1f}); "
                             f"identical to greedy: {res.tokens == plain.tokens}; acceptance "
                             f"{res.acceptance_rate:.2f}, {res.tokens_per_target_pass:.2f} tokens per target pass"),
                      aggregate=True)


def bench_serving(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Static vs continuous batching (`batching_rows`), then continuous batching limited by KV memory
    (`kv_memory_rows`), on one synthetic workload under overload (notebook 11)."""
    return batching_rows(model, tokenizer, settings, with_memory=True)


def serving_workload(tokenizer, settings: BenchSettings) -> tuple[torch.Tensor, list[sv.Request]]:
    """The token pool (4,000 Shakespeare tokens) and the serving rows' synthetic workload, drawn at 1 request/s."""
    pool = encode(tokenizer, load_text("shakespeare_train"), 4000)
    return pool, sv.synthetic_workload(pool, n_requests=settings.serving_requests, rate_per_s=1.0, seed=0,
                                       prompt_range=(8, 64), output_range=settings.serving_output_range,
                                       bos_id=tokenizer.bos_token_id)


def batching_rows(model, tokenizer, settings: BenchSettings, with_memory: bool = False) -> list[dict]:
    """Static vs continuous batching of one synthetic workload under overload.

    Both policies are charged the same pass costs, fitted once from measured forward passes, so the
    throughput is aggregate generated tokens per second over all requests, not one stream's speed.
    """
    _, requests = serving_workload(tokenizer, settings)
    cost = sv.fit_pass_cost(model, requests[0].prompt_ids[:32], sorted({1, 2, settings.max_batch}))
    overload = sv.with_rate(requests, 1000.0, 1.0)  # every request waiting at t ~ 0: the throughput limit
    fmt = dtype_name(model)
    rows = []
    for kind in ("static", "continuous"):
        res = sv.simulate(model, overload, sv.Policy(kind, settings.max_batch), sv.VirtualClock(cost))
        rows.append(result_row(
            "serving", f"{kind} batching, batch {settings.max_batch}", fmt, model, None, res.throughput,
            notes=(f"aggregate tokens/s of {len(requests)} requests arriving at once (fitted pass cost); "
                   f"padding waste {res.stats.padding_waste:.0%}"), aggregate=True))
    return rows + (kv_memory_rows(model, overload, cost, settings, fmt) if with_memory else [])


def bench_load_test(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The HTTP server under a wall-clock load test (`cookbook.loadtest`): open-loop arrivals from a client process
    at 1x and 3x the capacity the fitted pass cost implies, for dynamic, continuous and continuous + paged + prefix
    cache batching. The requests share a 47-token system prompt (three blocks of 16 with BOS)."""
    pool, requests = serving_workload(tokenizer, settings)
    requests = pg.with_shared_prefix(requests, pool[2000:2047].tolist(), tokenizer.bos_token_id)
    reference = sv.reference_outputs(model, requests)
    cost = sv.fit_pass_cost(model, requests[0].prompt_ids[:32], sorted({1, 2, settings.max_batch}))
    step_s = cost(settings.max_batch, settings.max_batch)  # one decode step of a full batch
    capacity = settings.max_batch / step_s / np.mean([r.max_new_tokens for r in requests])  # requests/s
    budget = 16 * (math.ceil(max(len(r.prompt_ids) + r.max_new_tokens for r in requests) / 16) + 1) * settings.max_batch
    policies = [sv.Policy("dynamic", settings.max_batch, window_s=8 * step_s, name="dynamic"),
                sv.Policy("continuous", settings.max_batch, name="continuous"),
                sv.Policy("continuous", settings.max_batch, memory=pg.KVMemory(budget, prefix_cache=True),
                          name="continuous + paged + prefix cache")]
    fmt, rows = dtype_name(model), []
    for policy in policies:
        for load in (1.0, 3.0):
            arrivals = sv.with_rate(requests, load * capacity, 1.0)
            r = load_test(model, tokenizer, policy, arrivals, reference, deadline_s=600)
            rows.append(result_row(
                "serving", f"HTTP load test, {policy.label}, {load:g}x capacity", fmt, model, None, r["tok/s"],
                notes=(f"wall clock, {r['sent']} requests at {load * capacity:.2f}/s from a client process: "
                       f"TTFT p50/p99 {r['TTFT p50 s']:.2f}/{r['TTFT p99 s']:.2f} s, TPOT p50/p99 "
                       f"{r['TPOT p50 ms']:.0f}/{r['TPOT p99 ms']:.0f} ms, latency p50/p99 {r['latency p50 s']:.2f}/"
                       f"{r['latency p99 s']:.2f} s; {r['ok']} ok, {r['503']} refused, {r['errors']} errors, "
                       f"{r['lost']} lost; "
                       f"tokens as generate: {r['exact']}"), aggregate=True))
    return rows


def kv_memory_rows(model, overload: list[sv.Request], cost: sv.PassCost, settings: BenchSettings, fmt: str) -> list[dict]:
    """Continuous batching when KV memory, not batch slots, limits concurrency (`cookbook.paged`): one contiguous
    reservation per request for the longest allowed answer vs a paged cache, in the same budget (a quarter of what
    the whole overload would need at its final lengths)."""
    need = sum(len(r.prompt_ids) + r.max_new_tokens for r in overload)
    longest = max(len(r.prompt_ids) for r in overload) + settings.serving_output_range[1]
    budget = max(need // 4, 16 * (math.ceil(longest / 16) + 1))  # the longest request fits, in whole blocks
    memories = {"preallocated, longest answer": pg.KVMemory(budget, paged=False,
                                                              reserve_new_tokens=settings.serving_output_range[1]),
                "paged, block 16": pg.KVMemory(budget, block_size=16),
                "paged, block 8": pg.KVMemory(budget, block_size=8)}
    reference = sv.reference_outputs(model, overload)
    rows = []
    for name, memory in memories.items():
        res = sv.simulate(model, overload, sv.Policy("continuous", len(overload), memory=memory), sv.VirtualClock(cost))
        st = res.stats
        rows.append(result_row(
            "serving", f"continuous batching, KV {name}", fmt, model, None, res.throughput,
            notes=(f"KV budget {budget} tokens ({budget * pg.token_bytes(model) / 2**20:.1f} MiB); reserved/used "
                   f"{st.kv_overhead:.2f}; peak {st.peak_running} running; {st.preemptions} preemptions; "
                   f"tokens as generate: {sv.check_outputs(res, reference) == []}"), aggregate=True))
    return rows


def bench_llamacpp(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """llama.cpp on the packaged Q4_K_M GGUF the default model was converted from (`cookbook.llamacpp`, optional
    extra): the same perplexity protocol, prompt, decode definition and thread count as every other row."""
    from . import llamacpp
    from .models import default_model_path

    variant, fmt = f"llama.cpp, packaged GGUF, {torch.get_num_threads()} threads", "gguf Q4_K_M"
    why_not = ("the GGUF is the default model's; this is another model"
               if Path(getattr(model, "name_or_path", "")) != default_model_path() else
               "llama.cpp runs here on the CPU only" if device.type != "cpu" else
               f"llama-cpp-python is not installed ({llamacpp.INSTALL_HINT})" if not llamacpp.available() else "")
    if why_not:
        return [result_row("llama.cpp", variant, fmt, notes=f"not measured: {why_not}")]
    lm = llamacpp.LlamaCppLM(llamacpp.packaged_gguf(), n_ctx=settings.protocol.seq_len + 1)
    ppl = perplexity(lm, tokenizer, settings.protocol)
    tps = lm.decode_tokens_per_s(bench_prompt(tokenizer, settings, device), settings.new_tokens, settings.warmup,
                                 settings.repeats)
    size = lm.path.stat().st_size  # the tied token table is read by the head: every token reads ~ the whole file
    row = result_row("llama.cpp", variant, fmt, ppl=ppl, decode=tps or None,
                     notes="its own fused kernels on the file the float copy was dequantized from; bytes = file size")
    return [row | {"bytes held": size, "bytes/token": size}, exported_gptq_row(model, tokenizer, device, settings)]


def exported_gptq_row(model, tokenizer, device, settings: BenchSettings) -> dict:
    """Our GPTQ (4 bits, symmetric groups of 32: Q4_0's grid) written into the packaged GGUF's template by
    `gguf_export` and run by llama.cpp: perplexity and greedy tokens against our model holding the same codes."""
    import tempfile

    from . import gguf_export, llamacpp

    work = _fresh_copy(model)
    Q.quantize_model_layerwise(work, calibration(tokenizer, settings, device), "gptq", 4, gguf_export.BLOCK,
                               symmetric=True)
    prompt = bench_prompt(tokenizer, settings, device)
    ours_ppl = perplexity(work, tokenizer, settings.protocol)
    ours = work.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                         do_sample=False)[0, prompt.shape[1]:].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = gguf_export.export_gguf(work, Path(tmp) / "gptq-q4_0.gguf")
        del work
        lm = llamacpp.LlamaCppLM(path, n_ctx=settings.protocol.seq_len + 1)
        ppl = perplexity(lm, tokenizer, settings.protocol)
        same = dec.agreeing_prefix(lm.greedy(prompt, 16), ours)
        tps = lm.decode_tokens_per_s(prompt, settings.new_tokens, settings.warmup, settings.repeats)
        size = path.stat().st_size
        del lm
    row = result_row("llama.cpp", "our GPTQ int4 exported as GGUF Q4_0", "gguf Q4_0 (ours)", ppl=ppl, decode=tps or None,
                     notes=(f"the same codes in our model: perplexity {ours_ppl:.2f}; llama.cpp's greedy tokens "
                            f"match ours for {same} of 16; token table and norms from the packaged file"))
    return row | {"bytes held": size, "bytes/token": size}


def bench_lora(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """What fine-tuning must keep per trainable weight: full fine-tune vs LoRA r=8 on every decoder linear.

    Counted on the real modules (no training run): AdamW keeps a gradient and two moments per
    trainable weight, 3 x 4 bytes in float32. 'bytes held' is the model as it would be served.
    """
    targets = list(Q.LINEAR_NAMES)
    work = _fresh_copy(model)
    full = count_parameters(work)
    lora.add_lora(work, targets, rank=8, alpha=16)
    trainable = count_parameters(work, trainable_only=True)
    fmt = dtype_name(model)
    rows = [
        result_row("fine-tuning", "full fine-tune", fmt, model,
                   notes=f"{full:,} trainable; gradient + AdamW state {12 * full:,} B"),
        result_row("fine-tuning", "LoRA r=8, all decoder linears", fmt, work,
                   notes=f"{trainable:,} trainable ({trainable / full:.2%}); gradient + AdamW state {12 * trainable:,} B"),
    ]
    del work
    return rows


def recipe_for(settings: BenchSettings) -> R.Recipe:
    """The combined recipe at the bench's sizes: its calibration windows, group size and recovery steps."""
    return R.Recipe(distill_steps=settings.recipe_steps, distill_seq_len=settings.recipe_seq_len,
                    group_size=settings.group_size, calib_samples=settings.calib_samples,
                    calib_seq_len=settings.calib_seq_len)


def recipe_stage_row(stage: str, model, tokenizer, settings: BenchSettings, recipe: R.Recipe, result) -> dict:
    """One measured row after a stage of `recipe.apply_recipe`, labelled with everything applied so far."""
    fmt = dtype_name(model)
    if stage == "prune":
        variant, notes = f"recipe 1: MLP -{recipe.mlp_fraction:.0%}", f"intermediate size -> {result}; no recovery yet"
    elif stage == "distill":
        variant = f"recipe 2: + distillation ({recipe.distill_steps} steps)"
        notes = (f"top-{recipe.top_k} KD from the unpruned model, MLP weights only, "
                 f"{recipe.distill_steps}x{recipe.distill_batch}x{recipe.distill_seq_len} tokens; "
                 f"train CE {result.ce[0]:.2f} -> {result.ce[-1]:.2f}")
    else:
        emb = " + int8 emb" if recipe.int8_embedding else ""
        variant, fmt = f"recipe 3: + GPTQ int{recipe.bits}{emb}", f"int{recipe.bits} g{recipe.group_size}{emb}"
        notes = "decoder linears GPTQ on the recovered weights" + ("; tied embedding int8" if emb else "")
        if recipe.packed:
            notes += ("; " + packed_note() if not result else "") + "".join(
                f"; {name} on the reference path: {why}" for name, why in (result or {}).items())
    return measure_model(model, tokenizer, settings, "recipe", variant, fmt, notes)


def recipe_kv_cache_row(model, tokenizer, device, settings: BenchSettings, fmt: str) -> dict:
    """The recipe's model decoded by our KV-cache loop: tokens checked against the no-cache loop, perplexity
    scored through the cache."""
    prompt = bench_prompt(tokenizer, settings, device)
    n = settings.loop_new_tokens
    plain, plain_tps = best_of(lambda: dec.generate_no_cache(model, prompt, n), lambda g: g.tokens_per_s(), settings)
    (gen, cache), tps = best_of(lambda: dec.generate_with_cache(model, prompt, n), lambda o: o[0].tokens_per_s(),
                                settings)
    ppl = cached_perplexity(model, tokenizer, settings.protocol, dec.KVCache)
    return result_row("recipe", "recipe 4: + our KV cache loop", fmt, model, ppl, tps,
                      tokens_identical=gen.tokens == plain.tokens, notes=(
        f"our loop, {prompt.shape[1]}-token prompt, {n} tokens, prefill included; tokens identical to no cache: "
        f"{gen.tokens == plain.tokens}; no-cache loop {plain_tps:.1f} tok/s; cache {cache.nbytes():,} B"))


def bench_recipe(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The combined recipe (`cookbook.recipe`, notebook 14): MLP pruning, distillation recovery, GPTQ int4 +
    int8 embedding, one row after each stage; then the result decoded with our KV cache and served with
    static vs continuous batching."""
    recipe, rows = recipe_for(settings), []
    final = R.apply_recipe(model, tokenizer, recipe, after_stage=lambda stage, work, result: rows.append(
        recipe_stage_row(stage, work, tokenizer, settings, recipe, result)))
    rows.append(recipe_kv_cache_row(final, tokenizer, device, settings, rows[-1]["format"]))
    rows += recipe_serving_rows(final, tokenizer, device, settings, rows[-1]["format"])
    del final
    return rows


def recipe_serving_rows(model, tokenizer, device, settings: BenchSettings, fmt: str) -> list[dict]:
    """`batching_rows` (static vs continuous batching) on the recipe's model, labelled as its last stage."""
    return [r | {"technique": "recipe", "variant": f"recipe 5: {r['variant']}", "format": fmt}
            for r in batching_rows(model, tokenizer, settings)]


TECHNIQUES: dict[str, Callable[..., list[dict]]] = {
    "precision": bench_precision,
    "rtn": bench_rtn,
    "outliers": bench_outliers,
    "gptq_awq": bench_gptq_awq,
    "nf4": bench_nf4,
    "wanda": bench_wanda,
    "structured": bench_structured,
    "distillation": bench_distilled_student,
    "sharing": bench_sharing,
    "moe": bench_moe,
    "attention": bench_attention,
    "kv_cache": bench_kv_cache,
    "early_exit": bench_early_exit,
    "speculative": bench_speculative,
    "compiled": bench_compiled,
    "serving": bench_serving,
    "load_test": bench_load_test,
    "lora": bench_lora,
    "recipe": bench_recipe,
    "llamacpp": bench_llamacpp,
}


def check_techniques(names: Sequence[str] | None) -> list[str]:
    """The technique names to run, in `TECHNIQUES` order; a clear error for an unknown name."""
    if names is None:
        return list(TECHNIQUES)
    unknown = [n for n in names if n not in TECHNIQUES]
    if unknown:
        raise ValueError(f"Unknown technique(s) {unknown}; choose from {list(TECHNIQUES)}.")
    return [n for n in TECHNIQUES if n in names]


# ---------------------------------------------------------------- the suite


def finish_rows(rows: list[dict], settings: BenchSettings, bandwidth: float | None = None) -> list[dict]:
    """Fill relative perplexity change (vs the baseline row), the share of the memory roofline each one-stream
    decode speed reaches (with `bandwidth`, bytes/s, measured in the same run), and the energy / cost estimates."""
    base = next((r["perplexity"] for r in rows if r["technique"] == "baseline"), None)
    for r in rows:
        if base is not None and r["perplexity"] is not None:
            r["rel. change"] = relative_change(r["perplexity"], base)
        one_stream = not r.get("aggregate") and r["decode tok/s"] is not None and r.get("bytes/token")
        if bandwidth and one_stream:
            r["% roofline"] = 100 * r["decode tok/s"] / roofline_tokens_per_s(r["bytes/token"], bandwidth)
        r["tokens/J"] = tokens_per_joule(r["decode tok/s"], settings.watts)
        r["$/M tokens"] = usd_per_million_tokens(r["decode tok/s"], settings.usd_per_hour)
    return rows


@torch.no_grad()
def run_bench(model, tokenizer, device, settings: BenchSettings, techniques: Sequence[str] | None = None,
              log: Callable[[str], None] | None = print, bandwidth: float | None = None) -> list[dict]:
    """The baseline, then each chosen technique; rows with relative change, % of roofline (given the measured
    memory `bandwidth` in bytes/s) and energy / cost filled in.

    A technique that fails (e.g. a model layout it does not support) gives one row saying why, and
    the others still run.
    """
    names = check_techniques(techniques)
    rows = []
    for name, fn in [("baseline", bench_baseline), *[(n, TECHNIQUES[n]) for n in names]]:
        start = time.perf_counter()
        try:
            rows += fn(model, tokenizer, device, settings)
        except Exception as exc:  # record it and go on: one unsupported technique should not sink the report
            if name == "baseline":
                raise
            rows.append(result_row(name, "failed", "", notes=f"not measured: {type(exc).__name__}: {exc}"[:300]))
        gc.collect()
        if log:
            log(f"[bench] {name}: {time.perf_counter() - start:.0f} s")
    return finish_rows(rows, settings, bandwidth)


def pareto_front(rows: Sequence[dict], cost: str, higher_is_better: bool = False) -> list[dict]:
    """Rows no other row beats on both perplexity (lower) and `cost` (lower, or higher if `higher_is_better`)."""
    pts = [r for r in rows if r.get("perplexity") is not None and r.get(cost) is not None]
    sign = -1 if higher_is_better else 1

    def dominates(a, b) -> bool:
        return (a["perplexity"] <= b["perplexity"] and sign * a[cost] <= sign * b[cost]
                and (a["perplexity"] < b["perplexity"] or sign * a[cost] < sign * b[cost]))
    return [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]


def label(row: dict) -> str:
    return row["variant"] if row["technique"] != "baseline" else f"baseline ({row['format']})"


def speed_vs_baseline(rows: Sequence[dict]) -> list[dict]:
    """The rows with "decode x baseline": decode tok/s over the same run's baseline row (None if either is missing).

    Speeds measured on different machines or runs are comparable only as such ratios.
    """
    base = next((r["decode tok/s"] for r in rows if r["technique"] == "baseline"), None)
    return [r | {"decode x baseline": None if base is None or r.get("decode tok/s") is None
                 else r["decode tok/s"] / base} for r in rows]


def plot_pareto(rows: Sequence[dict], title: str = "", path: Sequence[dict] = (), speed_key: str = "decode tok/s",
                speed_label: str = "decode tokens/s (one stream)"):
    """Two panels: perplexity vs bytes held, and perplexity vs `speed_key`; one point per row, coloured by technique.

    Stars mark the Pareto front of `rows` + `path` and only they are labelled (the table names the rest);
    `path` (e.g. the recipe's stages, in order) is also drawn as a green line from stage to stage.
    """
    import matplotlib

    from .report import new_figure

    fig, (ax_b, ax_s) = new_figure(2, width=7.0, height=5.5)
    pts = [r for r in [*rows, *path] if r.get("perplexity") is not None]
    techniques = list(dict.fromkeys(r["technique"] for r in pts))
    palette = matplotlib.colormaps["tab20"].colors  # dark shades first, then the light ones: 20 distinct colours
    colour = {t: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, t in enumerate(techniques)}
    for ax, key, scale, xlabel in ((ax_b, "bytes held", 2**-20, "MiB held (whole model)"),
                                   (ax_s, speed_key, 1.0, speed_label)):
        front = {id(r) for r in pareto_front(pts, key, higher_is_better=key != "bytes held")}
        labels: dict[tuple[float, float], list[str]] = {}
        for r in pts:
            if r.get(key) is None:
                continue
            x, on_front = r[key] * scale, id(r) in front
            ax.scatter(x, r["perplexity"], s=110 if on_front else 35, marker="*" if on_front else "o",
                       color=colour[r["technique"]], edgecolors="black" if on_front else "none", zorder=3)
            if on_front:  # points at the same place share one label
                labels.setdefault((round(x, 6), round(r["perplexity"], 6)), []).append(label(r))
        for (x, y), names in labels.items():
            ax.annotate(" / ".join(dict.fromkeys(names)), (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        line = [(r[key] * scale, r["perplexity"]) for r in path if r.get(key) is not None and r.get("perplexity")]
        if line:
            ax.plot(*zip(*line), color="C2", lw=1.5, alpha=0.8, zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
    handles = [ax_b.scatter([], [], s=35, color=colour[t], label=t) for t in techniques]
    if path:
        handles += ax_b.plot([], [], color="C2", lw=1.5, label="the recipe, stage by stage")
    ax_b.legend(handles=handles, loc="upper right", fontsize=7, title="technique", title_fontsize=7)
    ax_b.set_title("quality vs memory (stars: Pareto front)")
    ax_s.set_title("quality vs speed (stars: Pareto front)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the report


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU or GPU name, cores, memory, versions."""
    import psutil
    import transformers

    info = {"device": device.type, "cpu": _cpu_name(), "cpu vector extensions": _cpu_vector_flags(),
            "cpu threads used by torch": torch.get_num_threads(),
            "logical cpus": psutil.cpu_count(), "ram GiB": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "os": platform.platform(),
            "load average (1, 5, 15 min) at the end": _load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu memory GiB": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


def _load_average() -> str:
    """The machine's load average: other work running beside the bench slows every timing down."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):  # not on every platform
        return "unknown"


def _cpu_vector_flags() -> str:
    """The CPU's AVX / AMX flags that decide which kernels run (e.g. native bf16), or 'unknown'."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = sorted(f for f in flags.split()[2:] if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                          "amx_bf16", "amx_int8"))
    return ", ".join(wanted) or "none of avx2 / avx512 / amx"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_name(device: torch.device) -> str:
    """'cpu', or 'cuda-<gpu name>' as a file-name-safe slug."""
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@dataclass
class BenchReport:
    """Rows plus everything needed to read them: machine, versions, model, protocol, settings, date."""

    rows: list[dict]
    model: str
    machine: dict
    settings: dict
    assumptions: str
    wall_s: float
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    techniques: list[str] | None = None  # what was run (None: all of TECHNIQUES)

    def command(self) -> str:
        """The command line that measures this report again."""
        s, only = self.settings, self.techniques
        subset = f" --only {','.join(only)}" if only is not None and set(only) != set(TECHNIQUES) else ""
        return (f"python -m cookbook bench{' --quick' if s['quick'] else ''} --device {self.machine['device']}"
                f" --model {self.model}{subset}")

    def table(self):
        from .report import ResultsTable

        shown = [{k: r.get(k) for k in COLUMNS} for r in self.rows]
        return ResultsTable(shown, f"Every technique on {self.model} ({self.machine['device']})", digits=2)

    def markdown(self, png_name: str) -> str:
        s = self.settings
        lines = [
            f"# Cookbook bench: {self.model} on {self.machine.get('gpu', self.machine['cpu'])}",
            "",
            f"Measured {self.date} by `{self.command()}` in {self.wall_s / 60:.1f} minutes. Every number below was measured "
            "in that run, except tokens/J and $/M tokens, which are estimates from the stated assumptions.",
            "", "## Machine", "", "| | |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in self.machine.items()],
            "", "## Protocol", "",
            f"- Perplexity: {s['protocol']} (lower is better; every row on the same tokens).",
            f"- Decode and prefill speed: `measure_generation` on one prompt of {s['prompt_tokens']} tokens (BOS + "
            f"the eval text): prefill is one forward over the prompt; decode is `generate` of {s['new_tokens']} greedy "
            f"tokens minus `generate` of one, over the {s['new_tokens'] - 1} extra steps; best of {s['repeats']} "
            f"runs after {s['warmup']} warm-up. Rows marked 'our loop' time cookbook.decoding's loops instead "
            f"({s['loop_new_tokens']} tokens, prefill included); serving rows are aggregate tokens/s of many requests.",
            f"- Calibration (GPTQ, AWQ, Wanda, structured): {s['calib_samples']} windows of {s['calib_seq_len']} "
            f"tokens of the training text; quantization groups of {s['group_size']}.",
            f"- Bytes held: parameters + persistent buffers (packed codes and scales count), tied weights once. "
            "Bytes/token: what one decode step reads (`measure.decode_bytes_per_token`: bytes held less an untied "
            "input embedding, of which a lookup reads one row). % roofline: decode tok/s over the memory-bound "
            "ceiling, measured bandwidth / bytes per token (one-stream rows only; serving rows are aggregates).",
            "", "## Energy and cost assumptions", "",
            f"{self.assumptions}",
            f"tokens/J = decode tokens/s / {s['watts']:g} W; $/M tokens = ${s['usd_per_hour']:g}/hour / "
            "(3600 x tokens/s) x 1e6.",
            "", "## Results", "", self.table().markdown(), "",
            f"![Pareto plot]({png_name})", "",
            "Pareto front (no other row has both lower perplexity and fewer bytes): "
            + ", ".join(label(r) for r in pareto_front(self.rows, "bytes held")) + ".",
            "",
            "Pareto front (no other row has both lower perplexity and more decode tokens/s): "
            + ", ".join(label(r) for r in pareto_front(self.rows, "decode tok/s", higher_is_better=True)) + ".",
            "", "## Regenerate", "",
            "```bash", self.command(), "```", "",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"model": self.model, "date": self.date, "wall_s": self.wall_s, "machine": self.machine,
                "settings": self.settings, "assumptions": self.assumptions, "techniques": self.techniques,
                "rows": self.rows}

    def write(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        """Write `<name>.md`, `<name>.json` and `<name>.png` into `out_dir`; returns their paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {ext: out / f"{name}.{ext}" for ext in ("md", "json", "png")}
        fig = plot_pareto(self.rows, f"{self.model} on {self.machine.get('gpu', self.machine['cpu'])}")
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
        paths["json"].write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        paths["md"].write_text(self.markdown(paths["png"].name))
        return paths


def load_report(path: str | Path) -> BenchReport:
    """A report written by `BenchReport.write`, read back from its `.json`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No bench report at {path}: run `python -m cookbook bench` to write one.")
    d = json.loads(path.read_text())
    return BenchReport(d["rows"], d["model"], d["machine"], d["settings"], d["assumptions"], d["wall_s"], d["date"],
                       d.get("techniques"))


def report_protocol(report: BenchReport) -> PerplexityProtocol:
    """The perplexity protocol a report's rows were measured on (to measure new rows comparably)."""
    fields = dict(part.split("=", 1) for part in report.settings["protocol"].split(", "))
    return PerplexityProtocol(**{k: v if k == "text" else int(v) for k, v in fields.items()})


def bench_command(model_name: str | None, device: str | None, quick: bool, out_dir: str, techniques=None,
                  watts: float | None = None, usd_per_hour: float | None = None, name: str | None = None,
                  compile: bool = True) -> dict:
    """Load the model, run the suite, write the report; what `python -m cookbook bench` calls."""
    from .models import load_model, model_name as resolve_name, resolve_device, set_seed

    import transformers

    names = check_techniques(techniques)
    dev = resolve_device(device)  # a clear ModelLoadError for cuda without a GPU
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = make_settings(dev, quick, watts, usd_per_hour, compile=compile)
    set_seed(0)
    start = time.perf_counter()
    model, tok = load_model(model_name, device=dev)
    bandwidth = memory_bandwidth(device=dev)
    rows = run_bench(model, tok, dev, settings, names, log=lambda m: print(m, file=sys.stderr, flush=True),
                     bandwidth=bandwidth)
    machine = machine_info(dev) | {"memory bandwidth, measured (copy), GB/s": round(bandwidth / 1e9, 1)}
    report = BenchReport(rows, resolve_name(model_name), machine, settings.describe(), settings.assumptions,
                         time.perf_counter() - start, techniques=names)
    paths = report.write(out_dir, name or report_name(dev))
    print(report.table().text())
    print("\nwrote", ", ".join(str(p) for p in paths.values()))
    return paths
