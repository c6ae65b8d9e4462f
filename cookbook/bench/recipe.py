"""Rows for notebook 14's recipe: every stage measured as it would be served."""

from __future__ import annotations

from .. import decoding as dec
from .. import recipe as R
from .decoding import cached_perplexity
from .rows import bench_prompt, best_of, dtype_name, measure_model, result_row
from .serving import batching_rows
from .settings import BenchSettings
from .weights import packed_note


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
    static vs continuous batching at saturation."""
    recipe, rows = recipe_for(settings), []
    final = R.apply_recipe(model, tokenizer, recipe, after_stage=lambda stage, work, result: rows.append(
        recipe_stage_row(stage, work, tokenizer, settings, recipe, result)))
    rows.append(recipe_kv_cache_row(final, tokenizer, device, settings, rows[-1]["format"]))
    rows += recipe_serving_rows(final, tokenizer, device, settings, rows[-1]["format"])
    del final
    return rows


def recipe_serving_rows(model, tokenizer, device, settings: BenchSettings, fmt: str) -> list[dict]:
    """`batching_rows` (static, continuous and mixed continuous batching) on the recipe's model, labelled as its
    last stage."""
    return [r | {"technique": "recipe", "variant": f"recipe 5: {r['variant']}", "format": fmt}
            for r in batching_rows(model, tokenizer, settings)]
