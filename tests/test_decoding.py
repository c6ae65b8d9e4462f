"""Fast tests of cookbook.decoding on the tiny random Gemma 3 (sliding window 8, so windows do bite)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import decoding as dec
from cookbook.core.cache import dequantize_int8, quantize_int8_per_head
from cookbook.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=4)


def prompt(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- forward and cache equivalence


def test_forward_matches_transformers_beyond_the_sliding_window(model):
    ids = prompt(20)  # longer than the window of 8
    ref = model(ids).logits
    torch.testing.assert_close(dec.forward(model, ids), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dec.forward(model, ids, fused=False), ref, atol=1e-4, rtol=1e-4)


def test_cached_chunks_equal_one_pass(model):
    ids = prompt(20)
    cache = dec.KVCache.allocate(model.config, 20)
    parts = [dec.forward(model, ids[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(parts, dim=1), dec.forward(model, ids), atol=1e-4, rtol=1e-4)
    assert cache.length == 20


def test_greedy_loops_match_generate(model):
    ids = prompt(4)
    ref = hf_greedy(model, ids, 16)
    assert dec.generate_with_cache(model, ids, 16)[0].tokens == ref
    assert dec.generate_no_cache(model, ids, 16).tokens == ref


def test_cache_bytes_and_crop(model):
    c = model.config
    cache = dec.KVCache.allocate(c, 10)
    assert cache.nbytes() == 2 * c.num_hidden_layers * c.num_key_value_heads * 10 * c.head_dim * 4
    q = dec.Int8KVCache.allocate(c, 10)
    assert q.nbytes() == 2 * c.num_hidden_layers * c.num_key_value_heads * 10 * (c.head_dim + 2)
    dec.forward(model, prompt(6), cache)
    cache.crop(3)
    assert cache.length == 3
    with pytest.raises(ValueError, match="crop"):
        cache.crop(4)


def test_full_cache_raises_clear_error(model):
    cache = dec.KVCache.allocate(model.config, 4)
    with pytest.raises(ValueError, match="larger max_len"):
        dec.forward(model, prompt(5), cache)


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long),
                                 torch.zeros(1, 3)])
def test_bad_ids_raise(model, bad):
    with pytest.raises(ValueError, match="input ids"):
        dec.forward(model, bad)


def test_batch_two_rejected_by_loops(model):
    with pytest.raises(ValueError, match="batch 1"):
        dec.generate_with_cache(model, prompt(4).repeat(2, 1), 3)


# ---------------------------------------------------------------- int8 cache


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.floats(1e-3, 1e3))
def test_int8_roundtrip_error_bounded_by_half_step(g, t, magnitude):
    x = torch.randn(1, g, t, 16, generator=torch.Generator().manual_seed(g * 7 + t)) * magnitude
    q, scale = quantize_int8_per_head(x)
    err = (dequantize_int8(q, scale) - x).abs()
    assert q.dtype == torch.int8 and scale.shape == (1, g, t, 1)
    assert bool((err <= scale * 0.5 + 1e-6 * magnitude).all())


def test_int8_cache_logits_close_to_float(model):
    ids = prompt(12)
    a = dec.teacher_forced_logits(model, ids)
    b = dec.teacher_forced_logits(model, ids, dec.Int8KVCache)
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()
