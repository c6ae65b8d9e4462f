"""cookbook.core on tiny random models of every family it supports (Gemma 2, Gemma 3, Llama, Mistral, Qwen 2,
Qwen 3): our forward pass gives Hugging Face's logits, cached greedy decoding gives `generate`'s tokens, a ragged
batch gives each sequence's own logits, scaled RoPE variants match transformers', and anything else is refused
with an error that names what is supported."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from cookbook import core
from cookbook import decoding as dec
from cookbook.core.cache import Int8KVCache, KVCache
from cookbook.core.capture import capture_layer_inputs, run_layer
from cookbook.core.layout import set_layers

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
FAMILIES = {
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(sliding_window=4)),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=4)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
}


def tiny(family: str, **extra) -> torch.nn.Module:
    config_cls, model_cls, own = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**SIZES, **own, **extra)
    config._attn_implementation = "eager"
    return model_cls(config).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_forward_matches_transformers(family):
    model = tiny(family)
    ids = torch.randint(0, 128, (2, 11))  # longer than the sliding windows of 4
    with torch.no_grad():
        ref = model(ids).logits  # (2, 11, V)
    torch.testing.assert_close(core.forward(model, ids), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(core.forward(model, ids, fused=False), ref, atol=1e-5, rtol=1e-4)


def test_cached_greedy_decoding_is_token_identical_to_generate(family):
    model = tiny(family)
    prompt = torch.randint(0, 128, (1, 6))
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    gen, cache = dec.generate_with_cache(model, prompt, 10)
    assert gen.tokens == ref
    assert dec.generate_no_cache(model, prompt, 10).tokens == ref
    assert cache.length == 6 + 9


def test_ragged_batch_matches_each_sequence_alone(family):
    model = tiny(family)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4], [11, 12, 13, 14, 15]]
    alone = torch.cat([core.forward(model, torch.tensor([p]))[:, -1] for p in prompts])  # (3, V)
    caches = [KVCache.for_model(model, 2) for _ in prompts]  # too small on purpose: reserve grows them
    torch.testing.assert_close(core.forward_tokens(model, prompts, caches), alone, atol=1e-5, rtol=1e-4)
    nxt = [[1], [2, 3], [4]]  # then a ragged step over different history lengths
    alone = torch.cat([core.forward(model, torch.tensor([p + n]))[:, -1] for p, n in zip(prompts, nxt)])
    torch.testing.assert_close(core.forward_tokens(model, nxt, caches), alone, atol=1e-5, rtol=1e-4)


def test_packed_batch_matches_each_sequence_alone(family):
    model = tiny(family)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 6, 6, 2, 9], [4, 4], [11, 12, 13, 14, 15]]
    alone = torch.cat([core.forward(model, torch.tensor([p]))[:, -1] for p in prompts])  # (3, V)
    caches = [KVCache.for_model(model, 2) for _ in prompts]  # too small on purpose: reserve grows them
    torch.testing.assert_close(core.forward_packed(model, prompts, caches), alone, atol=1e-5, rtol=1e-4)
    # a mixed pass: one-token decodes beside a 9-token prompt chunk, histories past the sliding window of 8
    nxt = [[1], [2, 3, 6, 7, 8, 9, 1, 2, 3], [4]]
    alone = torch.cat([core.forward(model, torch.tensor([p + n]))[:, -1] for p, n in zip(prompts, nxt)])
    torch.testing.assert_close(core.forward_packed(model, nxt, caches), alone, atol=1e-5, rtol=1e-4)
    assert [c.length for c in caches] == [12, 11, 6]
    with pytest.raises(ValueError, match="at least one new token"):
        core.forward_packed(model, [[1], []], caches[:2])
    with pytest.raises(ValueError, match="forward_packed needs one cache per sequence"):
        core.forward_packed(model, [[1]], [])


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_scaled_rope_matches_transformers(rope):
    model = tiny("llama", rope_parameters=rope)
    pos = torch.arange(40)[None]  # (1, 40)
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    ours = core.rope_cos_sin(model.config, "full_attention", pos, torch.float32)
    torch.testing.assert_close(ours, (cos, sin))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(core.forward(model, ids), model(ids).logits, atol=1e-5, rtol=1e-4)


def test_gemma3_keeps_one_rope_per_layer_type():
    model = tiny("gemma3", rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1e6}})
    pos = torch.arange(20)[None]
    for kind in ("sliding_attention", "full_attention"):
        ref = model.model.rotary_emb(torch.zeros(1), pos, kind)
        torch.testing.assert_close(core.rope_cos_sin(model.config, kind, pos, torch.float32), ref)


def test_layout_of_each_family(family):
    layout = core.check_model(tiny(family))
    assert layout.sandwich_norms == family.startswith("gemma")
    assert layout.qk_norm == (family in ("gemma3", "qwen3"))
    assert len(layout.windows) == 3 and (4 in layout.windows) == (family in ("gemma3", "gemma2", "mistral"))


def test_unsupported_models_are_refused_with_what_is_supported():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    for model in (gpt2, torch.nn.Linear(2, 2)):
        with pytest.raises(core.LayoutError, match="Llama"):
            core.forward(model, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(core.LayoutError, match="varies|changes with the sequence length"):
        core.rope_cos_sin(tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0}).config,
                          "full_attention", torch.arange(3), torch.float32)
    model = tiny("llama")
    del model.model.layers[1].mlp.gate_proj
    with pytest.raises(core.LayoutError, match="Layer 1 .*mlp.gate_proj"):
        core.check_model(model)


def test_decoder_linears_name_every_linear_once():
    model = tiny("qwen3")
    linears = core.decoder_linears(model)
    assert len(linears) == 3 * 7
    assert all(model.get_submodule(name) is module for name, module in linears.items())
    assert list(core.decoder_linears(model, [2])) == [core.linear_key(2, p) for p in core.LINEAR_NAMES]
    with pytest.raises(ValueError, match="out of range"):
        core.decoder_linears(model, [3])


def test_set_layers_renumbers_and_keeps_the_config_in_step():
    model = tiny("gemma3")
    layers = core.decoder_layers(model)
    set_layers(model, [layers[2], layers[0]], ["full_attention", "sliding_attention"])
    assert model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in core.decoder_layers(model)] == [0, 1]
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(core.forward(model, ids), model(ids).logits, atol=1e-5, rtol=1e-4)


def test_captured_inputs_replay_every_layer(family):
    model = tiny(family)
    ids = torch.randint(0, 128, (2, 9))
    captured = capture_layer_inputs(model, ids)
    hidden = captured.hidden  # (2, 9, D)
    with torch.no_grad():
        for layer, kwargs in zip(core.decoder_layers(model), captured.kwargs):
            hidden = run_layer(layer, hidden, kwargs, chunk=1)
        ref = model.model(ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(hidden), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache_cls", [KVCache, Int8KVCache])
def test_one_cache_serves_both_protocols(cache_cls):
    model = tiny("gemma3")
    cache = cache_cls.for_model(model, 3)
    assert cache.nbytes() > 0 and cache.used_nbytes() == 0
    k, v = torch.randn(2, 5, 16), torch.randn(2, 5, 16)  # (g, t, d) of one sequence
    cache.reserve(5)
    assert cache.max_len == 6  # doubled
    cache.write(0, 0, k, v)
    cache.length = 5
    rk, rv = cache.read(0, 5)
    tol = 0.02 if cache_cls is Int8KVCache else 0.0
    torch.testing.assert_close(rk, k, atol=tol, rtol=0)
    torch.testing.assert_close(rv, v, atol=tol, rtol=0)
    assert cache.used_nbytes() == cache.nbytes() * 5 // 6
    batch = cache_cls.for_model(model, 4, batch=2)
    with pytest.raises(ValueError, match="one sequence"):
        batch.read(0, 1)


def test_the_layout_check_is_cached_until_the_layers_change():
    model = tiny("llama")
    ids = torch.randint(0, 128, (1, 4))
    core.forward(model, ids)
    first = model.__dict__["_cookbook_layout"]
    core.forward(model, ids)
    assert model.__dict__["_cookbook_layout"] is first  # the same check, not walked again
    layers = core.decoder_layers(model)
    set_layers(model, [layers[0]], ["full_attention"])
    core.forward(model, ids)
    assert model.__dict__["_cookbook_layout"] is not first  # a new layer list is checked again


def test_split_linear_key_inverts_linear_key():
    for layer, path in ((0, "self_attn.q_proj"), (17, "mlp.down_proj")):
        assert core.split_linear_key(core.linear_key(layer, path)) == (layer, path)


def test_adamw_loop_hooks_and_the_gradients_it_leaves():
    from cookbook.core.train import adamw_loop

    w = torch.nn.Parameter(torch.ones(3))
    seen, after = [], []
    losses, _ = adamw_loop([w], lambda step: (w * (step + 1)).pow(2).sum(), 3, lr=0.1,
                           on_backward=lambda step: seen.append(w.grad.clone()),
                           on_step=lambda step, loss: after.append(w.grad))
    assert len(losses) == 3 and torch.equal(seen[0], torch.full((3,), 2.0))  # d/dw of sum(w^2) at w = 1
    assert all(g is None for g in after), "gradients are freed after every step"
    adamw_loop([w], lambda step: w.pow(2).sum(), 2, keep_grads=True)
    assert w.grad is not None, "keep_grads leaves the last step's gradients"
