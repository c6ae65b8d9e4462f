"""cookbook.fast_decoding on the tiny random Gemma 3 (sliding window 8): the static step against our eager forward,
and one small compiled run."""

from __future__ import annotations

import pytest
import torch

from cookbook import decoding as dec
from cookbook import fast_decoding as fd
from cookbook.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=3)


def repeating_prompt() -> torch.Tensor:
    body = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(1))
    return torch.cat([body, body, body[:4]])[None]  # (1, 28): the text repeats, so lookups find drafts


def test_static_step_matches_the_eager_forward_past_the_window(model):
    ids = repeating_prompt()
    ref = dec.forward(model, ids)[0]  # (t, V) in one pass, no cache
    decoder = fd.StaticDecoder(model, 40)
    decoder.prefill(ids[:, :1])
    rows = [decoder.step([int(t)])[0] for t in ids[0, 1:]]  # one token per step: 27 > the window of 8
    torch.testing.assert_close(torch.stack(rows), ref[1:], atol=1e-4, rtol=1e-4)
    assert decoder.cache.length == ids.shape[1]


def test_static_generate_is_our_cached_greedy(model):
    ids = repeating_prompt()
    ref, _ = dec.generate_with_cache(model, ids, 10)
    assert fd.StaticDecoder(model, 40).generate(ids, 10).tokens == ref.tokens


def test_bad_input_is_refused_with_a_clear_message(model):
    decoder = fd.StaticDecoder(model, 8)
    with pytest.raises(ValueError, match="larger max_len"):
        decoder.prefill(repeating_prompt()[:, :4])
        decoder.step(list(range(5)))
    with pytest.raises(ValueError, match="max_len > prompt length"):
        decoder.prefill(repeating_prompt())
    int8 = dec.Int8KVCache.allocate(model.config, 8)
    with pytest.raises(ValueError, match="float KVCache"):
        int8.write_at(0, torch.tensor([0]), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))


def test_the_step_is_one_graph_and_compiles_to_the_same_tokens(model):
    ids = repeating_prompt()
    eager = fd.StaticDecoder(model, 40)
    eager.prefill(ids)
    assert fd.graph_breaks(eager, 3) == (1, 0)
    compiled = fd.StaticDecoder(model, 40, compile=True)
    assert compiled.generate(ids, 6).tokens == eager.generate(ids, 6).tokens
    compiled.prefill(ids)
    counts, eager_counts = fd.ops_per_step(compiled, 3), fd.ops_per_step(eager, 3)
    assert counts.compiled_graphs == 1 and eager_counts.compiled_graphs == 0
    assert counts.aten_ops < eager_counts.aten_ops / 3


def test_the_matvec_head_is_the_linear_head(model):
    x = torch.randn(1, 1, model.config.hidden_size)
    torch.testing.assert_close(fd.matvec_head(model.lm_head, x), model.lm_head(x), atol=1e-5, rtol=1e-5)


def test_the_fused_head_is_chosen_by_timing_and_gives_the_same_tokens(model, monkeypatch):
    ids = repeating_prompt()
    fd._HEAD_CHOICES.clear()
    assert fd.fused_head_pays(model.lm_head) in (True, False) and len(fd._HEAD_CHOICES) == 1
    monkeypatch.setattr(fd, "fused_head_pays", lambda head: (_ for _ in ()).throw(AssertionError("timed again")))
    assert not fd.StaticDecoder(model, 40).fused_head, "eager steps never take it"
    both = [fd.StaticDecoder(model, 40, compile=True, fused_head=choice) for choice in (True, False)]
    assert [d.fused_head for d in both] == [True, False]
    assert both[0].generate(ids, 6).tokens == both[1].generate(ids, 6).tokens
