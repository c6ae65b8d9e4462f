"""Rows for the techniques that change the weights: precision, quantization (RTN, LLM.int8 and SmoothQuant,
GPTQ and AWQ, NF4, the packed kernels), pruning, distillation, sharing, MoE, LoRA, and llama.cpp as the
yardstick."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import decoding as dec
from .. import distillation as D
from .. import factorized_embedding as FE
from .. import matvec
from .. import kernels as K
from .. import lora, moe
from .. import pruning as P
from .. import quantization as Q
from .. import structured_pruning as SP
from ..embedding_training import head_inputs
from ..evaluate import perplexity
from ..measure import count_parameters, cpu_has_native_bf16
from .rows import (bench_prompt, calibration, compiled_row, dtype_name, fresh_copy, measure_model, result_row,
                   saved_student)
from .settings import INT4_HEAD_GROUP, BenchSettings

# ---------------------------------------------------------------- the techniques, one function each


def bench_baseline(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The model as loaded: the reference every other row is compared with."""
    fmt = dtype_name(model)
    return [measure_model(model, tokenizer, settings, "baseline", "as loaded", fmt)]


def bench_precision(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """The whole model cast to bfloat16 (notebook 01); skipped when it is already bf16."""
    if model.dtype == torch.bfloat16:
        return []
    work = fresh_copy(model).to(torch.bfloat16)
    note = ("CPU: bf16 is fast only with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere it can be slower"
            if device.type == "cpu" else "")
    row = measure_model(work, tokenizer, settings, "precision", "cast to bf16", "bf16", note)
    del work
    return [row]


REFERENCE_NOTE = "decoder linears only; the reference path: the float weight rebuilt on every call"


def packed_note() -> str:
    """What the packed rows ran: the kernels, the activation dtype around them, and whether the CPU has bf16."""
    native = "native bf16 on this CPU" if cpu_has_native_bf16() else "no native bf16 on this CPU (converted)"
    return (f"packed int8/int4 kernels (aten._weight_int*pack_mm), activations cast to bf16 around them; {native}; "
            f"decode steps: {matvec.status()}")


def packed_rows(work, tokenizer, device, settings: BenchSettings, variant: str, fmt: str,
                float_head_row: bool = True) -> list[dict]:
    """`work` (quantized QuantLinears, float or int8 tied head) on the packed kernels: the linears alone (unless
    `float_head_row` is False), then with the tied table as int8 and the head packed too. Changes `work`."""
    if device.type != "cpu":
        return [result_row("weight quantization", f"{variant}, packed", fmt,
                           notes="not measured: the packed kernels here are CPU kernels")]
    rows = []
    K.pack_quantized_linears(work)
    if not isinstance(work.lm_head, Q.HeadView):
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
    the reference QuantLinear, then the same codes on the packed kernels, with and without an int8 head; int8 with
    the int8 head also through our compiled static decode step."""
    rows = []
    for bits, group in ((8, None), (4, settings.group_size)):
        work = fresh_copy(model)
        Q.quantize_linears_rtn(work, bits, group, symmetric=False)
        fmt = f"int{bits} " + (f"g{group}" if group else "per channel")
        rows.append(measure_model(work, tokenizer, settings, "weight quantization", f"RTN int{bits}", fmt,
                                  REFERENCE_NOTE))
        rows += packed_rows(work, tokenizer, device, settings, f"RTN int{bits}", fmt)
        if bits == 8 and settings.compile and device.type == "cpu":  # the int8 target of the report
            rows.append(compiled_row(work, tokenizer, settings, rows[-1]))
            if matvec.available():  # the same codes on PyTorch's int8 kernel, for comparison
                K.use_our_kernels(work, on=False)
                rows.append(compiled_row(work, tokenizer, settings, rows[-2] | {
                    "variant": rows[-2]["variant"] + ", PyTorch's int8 kernel"}))
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
        work = fresh_copy(model)
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


def _has_tied_embedding(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def bench_nf4(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """NF4 with double quantization (QLoRA's storage format, notebook 04)."""
    work = fresh_copy(model)
    Q.quantize_linears_nf4(work, 64, double_quant=True)
    rows = [measure_model(work, tokenizer, settings, "weight quantization", "NF4 + double quant", "nf4 b64",
                          REFERENCE_NOTE + "; bitsandbytes' CPU path works the same way")]
    if device.type != "cpu" or not matvec.available():
        why = "the NF4 kernel is a CPU kernel" if device.type != "cpu" else matvec.status()
        return rows + [result_row("weight quantization", "NF4 + double quant, packed", "nf4 b64",
                                  notes=f"not measured: {why}")]
    K.pack_nf4_linears(work)  # the same codes and absmaxes on our NF4 kernel (csrc/nf4_matvec.cpp)
    note = "our NF4 kernel for decode steps (the codebook looked up in registers), the reference for prefill"
    rows.append(measure_model(work, tokenizer, settings, "weight quantization", "NF4 + double quant, packed",
                              "nf4 b64", note + "; float head"))
    Q.quantize_tied_embedding_int8(work)
    K.pack_int8_head(work)
    rows.append(measure_model(work, tokenizer, settings, "weight quantization", "NF4 + double quant + int8 head, "
                              "packed", "nf4 b64 + int8 emb", note + "; the tied table int8, one scale per row"))
    if settings.compile:
        rows.append(compiled_row(work, tokenizer, settings, rows[-1]))
    del work
    return rows


def bench_wanda(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Wanda unstructured pruning, 50% of every decoder linear's weights (notebook 05)."""
    work = fresh_copy(model)
    P.prune_wanda(work, P.collect_input_norms(work, calibration(tokenizer, settings, device)), 0.5)
    row = measure_model(work, tokenizer, settings, "pruning", "Wanda 50% unstructured",
                        dtype_name(model),
                        f"{P.sparsity_of(work):.0%} zeros stored densely: no bytes or time saved without sparse kernels")
    del work
    return [row]


def bench_structured(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Structured pruning: 25% of the MLP channels of every layer removed, no fine-tune (notebook 05)."""
    work = fresh_copy(model)
    inter = work.config.intermediate_size
    new = SP.prune_mlp_channels(work, P.collect_input_norms(work, calibration(tokenizer, settings, device)), 0.25)
    row = measure_model(work, tokenizer, settings, "pruning", "MLP channels -25%", dtype_name(model),
                        f"intermediate size {inter} -> {new}; no recovery fine-tune")
    del work
    return [row]


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
    """Notebook 07's factorized embedding: the tied embedding / LM head as rank hidden/2 factors, the truncated SVD's
    and the activation-aware ones, without training. Cross-layer sharing is not benched: sharing a trained model's layers without retraining
    destroys it (perplexity in the millions), and the retraining notebook 07 does is too long for the bench."""
    if not _has_tied_embedding(model):
        return [result_row("parameter sharing", "factorized embedding", "", notes="not measured: needs a tied embedding")]
    rank = model.config.hidden_size // 2
    weight, rows = model.get_input_embeddings().weight, []
    hidden = head_inputs(model, calibration(tokenizer, settings, device))  # (n, H) what the output layer reads
    for how, spectrum, what in (("SVD", FE.embedding_spectrum(weight), "closest weights"),
                                ("activation-aware", FE.activation_aware_spectrum(weight, hidden),
                                 "closest logits on the calibration text's hidden states")):
        with FE.factorized_embedding(model, rank, spectrum) as work:
            rows.append(measure_model(work, tokenizer, settings, "parameter sharing",
                                      f"embedding rank {rank} ({how}, no training)", dtype_name(model),
                                      f"V x {rank} + {rank} x H factors instead of V x H, {what}; not fine-tuned"))
        del spectrum
    return rows


def bench_moe(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """Every MLP upcycled into 4 experts, top-2 routing (notebook 08): the same outputs as the dense model
    before any training, so the row shows what experts cost in bytes and speed at unchanged quality."""
    experts, k = 4, 2
    work = fresh_copy(model)
    moe.upcycle_mlps(work, experts, k)
    counts = moe.moe_parameter_counts(work.config, experts, k)
    row = measure_model(work, tokenizer, settings, "mixture of experts", f"upcycled, {experts} experts top-{k}",
                        dtype_name(model),
                        f"{counts['total']:,} parameters, {counts['active']:,} active per token; untrained router "
                        "(identical experts: same outputs as dense)")
    del work
    return [row]


def bench_llamacpp(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """llama.cpp on the packaged Q4_K_M GGUF the default model was converted from (`cookbook.llamacpp`, optional
    extra): the same perplexity protocol, prompt, decode definition and thread count as every other row."""
    from .. import llamacpp
    from ..models import default_model_path

    variant, fmt = f"llama.cpp, packaged GGUF, {torch.get_num_threads()} threads", "gguf Q4_K_M"
    why_not = ("the GGUF is the default model's; this is another model"
               if Path(getattr(model, "name_or_path", "")) != default_model_path() else
               "llama.cpp runs here on the CPU only" if device.type != "cpu" else
               f"llama-cpp-python is not installed ({llamacpp.INSTALL_HINT})" if not llamacpp.available() else "")
    why_not = why_not or llamacpp.crash_reason(llamacpp.packaged_gguf())
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


TORCHAO_HINT = "pip install -e '.[torchao]'"


def torchao_configs(group_size: int) -> dict[str, tuple[str, object, str]]:
    """torchao's weight-only configs beside our RTN rows: {variant: (format, config, how its CPU path runs)};
    ImportError without torchao."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {"torchao int8 weight-only": ("int8 per channel", Int8WeightOnlyConfig(),
                                         "Int8Tensor: torch.mm of the activations with the int8 codes, then the scales"),
            f"torchao int4 weight-only g{group_size}": (f"int4 g{group_size}", IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(group_size)),
                "IntxUnpackedToInt8Tensor: one int4 code per byte, dequantized on every call (no CPU int4 layout in "
                "this torchao)")}


def bench_torchao(model, tokenizer, device, settings: BenchSettings) -> list[dict]:
    """torchao's weight-only quantization of the decoder linears (optional extra), the library beside our RTN int8
    and int4 packed rows with their float head: the same linears, formats and protocol, measured in the same run."""
    try:
        configs = torchao_configs(settings.group_size)
    except ImportError as err:
        return [result_row("weight quantization", "torchao weight-only", "int8 / int4",
                           notes=f"not measured: torchao is not installed ({TORCHAO_HINT}; {err})")]
    import torchao
    from torchao.quantization import quantize_

    rows = []
    for variant, (fmt, config, how) in configs.items():
        work = fresh_copy(model)
        linears = set(Q.decoder_linears(work))
        try:
            quantize_(work, config, filter_fn=lambda module, name: name in linears)
        except Exception as err:  # noqa: BLE001 (a config this torch / torchao pair cannot run: say which)
            rows.append(result_row("weight quantization", variant, fmt, notes=f"not measured: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200]}"))
            continue
        rows.append(measure_model(work, tokenizer, settings, "weight quantization", variant, fmt,
                                  f"torchao {torchao.__version__} quantize_, decoder linears only, float head; {how}"))
        del work
    return rows


def exported_gptq_row(model, tokenizer, device, settings: BenchSettings) -> dict:
    """Our GPTQ (4 bits, symmetric groups of 32: Q4_0's grid) written into the packaged GGUF's template by
    `gguf_export` and run by llama.cpp: perplexity and greedy tokens against our model holding the same codes."""
    import tempfile

    from .. import gguf_export, llamacpp

    work = fresh_copy(model)
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
    work = fresh_copy(model)
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
