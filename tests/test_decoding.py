"""Fast tests of cookbook.decoding on the tiny random Gemma 3 (sliding window 8, so windows do bite)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cookbook import decoding as dec
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
    q, scale = dec.quantize_int8_per_head(x)
    err = (dec.dequantize_int8(q, scale) - x).abs()
    assert q.dtype == torch.int8 and scale.shape == (1, g, t, 1)
    assert bool((err <= scale * 0.5 + 1e-6 * magnitude).all())


def test_int8_cache_logits_close_to_float(model):
    ids = prompt(12)
    a = dec.teacher_forced_logits(model, ids)
    b = dec.teacher_forced_logits(model, ids, dec.Int8KVCache)
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


# ---------------------------------------------------------------- early exit


def test_early_exit_threshold_one_never_exits_and_matches_full(model):
    ids = prompt(10)
    res = dec.early_exit_teacher_forced(model, ids, exit_layers=[1, 2], threshold=1.0)
    assert set(res.exit_layers) == {4}
    assert res.tokens == dec.forward(model, ids)[0, :-1].argmax(-1).tolist()


def test_early_exit_low_threshold_exits_first_point(model):
    res = dec.early_exit_teacher_forced(model, prompt(10), exit_layers=[2], threshold=1e-6)
    assert set(res.exit_layers) == {2}
    assert len(res.nll) == 9


@pytest.mark.parametrize("layers,thr", [([0], 0.9), ([4], 0.9), ([2], 0.0), ([2], 1.5)])
def test_early_exit_bad_arguments(model, layers, thr):
    cache = dec.KVCache.allocate(model.config, 4)
    with pytest.raises(ValueError):
        dec.early_exit_step(model, prompt(1), cache, layers, thr)


# ---------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_identical_to_target(model, k):
    ids = prompt(5, seed=k)
    draft = dec.truncated_draft(model, 2)
    res = dec.speculative_generate(model, draft, ids, 15, k=k)
    assert res.tokens == hf_greedy(model, ids, 15)
    assert 0 <= res.accepted <= res.proposed


def test_self_draft_accepts_everything(model):
    ids = prompt(5)
    res = dec.speculative_generate(model, model, ids, 12, k=3)
    assert res.acceptance_rate == 1.0 and res.tokens_per_target_pass == 4.0


def test_truncated_draft_shares_weights_and_runs_in_transformers(model):
    draft = dec.truncated_draft(model, 2)
    assert draft.model.layers[0] is model.model.layers[0] and len(model.model.layers) == 4
    assert draft.lm_head.weight is model.lm_head.weight
    torch.testing.assert_close(draft(prompt(6)).logits, dec.forward(draft, prompt(6)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_layers"):
        dec.truncated_draft(model, 4)
    with pytest.raises(ValueError, match="keep"):
        dec.layer_subset_draft(model, [2, 1])


def test_layer_subset_draft_keeps_greedy_identity(model):
    ids = prompt(5)
    res = dec.speculative_generate(model, dec.layer_subset_draft(model, [0, 3]), ids, 10, k=2)
    assert res.tokens == hf_greedy(model, ids, 10)


def test_mismatched_vocabulary_raises(model):
    other = tiny_model(vocab_size=600, num_layers=1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        dec.speculative_generate(model, other, prompt(3), 4)


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_mismatched_tokenizers_raise(model):
    a, b = FakeTokenizer({"a": 0, "b": 1}), FakeTokenizer({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="different ids"):
        dec.check_compatible(model, model, a, b)
    with pytest.raises(ValueError, match="both tokenizers"):
        dec.check_compatible(model, model, a, None)
    dec.check_compatible(model, model, a, FakeTokenizer({"a": 0, "b": 1}))


def test_rejection_sampling_follows_target_distribution():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])  # (k + 1, V), k = 1
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])  # (k, V): a poor draft, even proposes impossible token 4
    gen = torch.Generator().manual_seed(0)
    n, counts, lengths = 20000, torch.zeros(5), []
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=gen)
        out = dec.rejection_sample(p, q, draft, gen)
        counts[out[0]] += 1
        lengths.append(len(out))
    freq = counts / n
    assert (freq - p[0]).abs().max() < 0.015  # ~4 standard errors at n = 20000
    assert counts[4] == 0
    accept = sum(length == 2 for length in lengths) / n
    assert abs(accept - torch.minimum(p[0], q[0]).sum()) < 0.015  # acceptance = sum min(p, q) = 0.6


def test_sampled_speculative_runs_and_self_draft_accepts_all(model):
    gen = torch.Generator().manual_seed(0)
    res = dec.speculative_generate(model, model, prompt(4), 10, k=3, temperature=1.0, generator=gen)
    assert len(res.tokens) == 10 and res.acceptance_rate == 1.0


def test_expected_speedup_formula():
    assert dec.expected_speedup(1.0, 4, 0.0) == 5.0
    assert dec.expected_speedup(0.0, 4, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        dec.expected_speedup(1.5, 4, 0.1)
