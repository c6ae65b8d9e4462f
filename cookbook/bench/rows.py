"""One row of the bench: what is measured for every variant (bytes, perplexity, speeds), measured the same way."""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import decoding as dec
from .. import distillation as D
from .. import fast_decoding as fd
from .. import kernels as K
from .. import quantization as Q
from ..data import calibration_batch, encode, load_text, with_bos
from ..evaluate import perplexity
from ..measure import count_parameters, decode_bytes_per_token, measure_generation, model_bytes
from .settings import BenchSettings

# ---------------------------------------------------------------- one row


def represented_parameters(model: nn.Module) -> int:
    """Weights the model stands for: its parameters plus the weights packed in quantized modules' buffers."""
    n = count_parameters(model)
    tables = set()
    for m in model.modules():
        if isinstance(m, (Q.QuantLinear, Q.NF4Linear, K.PackedInt4Linear, K.PackedInt8Linear, K.PackedNF4Linear)):
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


def fresh_copy(model: nn.Module) -> nn.Module:
    gc.collect()
    return copy.deepcopy(model)


def saved_student(model, tokenizer, device) -> tuple[nn.Module | None, str]:
    """The student notebook 06 saved at `distillation.student_dir()` if it is there and fits this model,
    else None and the reason."""
    from ..models import load_model

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
