"""Rows for attention and decoding: the KV cache, early exit, speculative decoding, compiled decoding."""

from __future__ import annotations

import math
import time

from torch import nn

from .. import attention as A
from .. import decoding as dec
from .. import early_exit as EE
from .. import fast_decoding as fd
from .. import kernels as K
from .. import speculative as sp
from ..data import TRAIN_TEXT, copy_task, encode, load_text, with_bos
from ..evaluate import PerplexityProtocol, perplexity
from ..measure import format_bytes, measure_generation
from .rows import bench_prompt, best_of, compile_choices, dtype_name, result_row, saved_student, static_decode_speed
from .settings import INT4_HEAD_GROUP, BenchSettings


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
    tps = lambda r: r.tokens_per_s
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
