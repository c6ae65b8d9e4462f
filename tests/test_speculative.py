"""cookbook.speculative on the tiny random Gemma 3 (sliding window 8): every drafter's greedy output is the target's
greedy output token for token; sampling keeps the target's distribution; bad arguments are refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch

from cookbook import decoding as dec
from cookbook import fast_decoding as fd
from cookbook import kernels as K
from cookbook import quantization as Q
from cookbook import speculative as sp
from cookbook.models import ByteTokenizer, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=4)


def prompt(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def repeating_prompt() -> torch.Tensor:
    body = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(1))
    return torch.cat([body, body, body[:4]])[None]  # (1, 28): the text repeats, so lookups find drafts


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- draft models


@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_greedy_identical_to_target(model, k):
    ids = prompt(5, seed=k)
    draft = sp.truncated_draft(model, 2)
    res = sp.speculative_generate(model, draft, ids, 15, k=k)
    assert res.tokens == hf_greedy(model, ids, 15)
    assert 0 <= res.accepted <= res.proposed


def test_self_draft_accepts_everything(model):
    ids = prompt(5)
    res = sp.speculative_generate(model, model, ids, 12, k=3)
    assert res.acceptance_rate == 1.0 and res.tokens_per_target_pass == 4.0


def test_truncated_draft_shares_weights_and_runs_in_transformers(model):
    draft = sp.truncated_draft(model, 2)
    assert draft.model.layers[0] is model.model.layers[0] and len(model.model.layers) == 4
    assert draft.lm_head.weight is model.lm_head.weight
    torch.testing.assert_close(draft(prompt(6)).logits, dec.forward(draft, prompt(6)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_layers"):
        sp.truncated_draft(model, 4)
    with pytest.raises(ValueError, match="keep"):
        sp.layer_subset_draft(model, [2, 1])


def test_layer_subset_draft_keeps_greedy_identity(model):
    ids = prompt(5)
    res = sp.speculative_generate(model, sp.layer_subset_draft(model, [0, 3]), ids, 10, k=2)
    assert res.tokens == hf_greedy(model, ids, 10)


def test_mismatched_vocabulary_raises(model):
    other = tiny_model(vocab_size=600, num_layers=1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        sp.speculative_generate(model, other, prompt(3), 4)


def test_mismatched_tokenizers_raise(model):
    a, b = ByteTokenizer({"a": 0, "b": 1}), ByteTokenizer({"a": 1, "b": 0})
    with pytest.raises(ValueError, match="different ids"):
        sp.check_compatible(model, model, a, b)
    with pytest.raises(ValueError, match="both tokenizers"):
        sp.check_compatible(model, model, a, None)
    sp.check_compatible(model, model, a, ByteTokenizer({"a": 0, "b": 1}))


def test_rejection_sampling_follows_target_distribution():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])  # (k + 1, V), k = 1
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])  # (k, V): a poor draft, even proposes impossible token 4
    gen = torch.Generator().manual_seed(0)
    n, counts, lengths = 20000, torch.zeros(5), []
    for _ in range(n):
        draft = torch.multinomial(q[0], 1, generator=gen)
        out = sp.rejection_sample(p, q, draft, gen)
        counts[out[0]] += 1
        lengths.append(len(out))
    freq = counts / n
    assert (freq - p[0]).abs().max() < 0.015  # ~4 standard errors at n = 20000
    assert counts[4] == 0
    accept = sum(length == 2 for length in lengths) / n
    assert abs(accept - torch.minimum(p[0], q[0]).sum()) < 0.015  # acceptance = sum min(p, q) = 0.6


def test_sampled_speculative_runs_and_self_draft_accepts_all(model):
    gen = torch.Generator().manual_seed(0)
    res = sp.speculative_generate(model, model, prompt(4), 10, k=3, temperature=1.0, generator=gen)
    assert len(res.tokens) == 10 and res.acceptance_rate == 1.0


def test_expected_speedup_formula():
    assert sp.expected_speedup(1.0, 4, 0.0) == 5.0
    assert sp.expected_speedup(0.0, 4, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sp.expected_speedup(1.5, 4, 0.1)


# ---------------------------------------------------------------- prompt lookup


@pytest.mark.parametrize("k", [1, 4])
def test_prompt_lookup_is_greedy_token_for_token(model, k):
    ids = repeating_prompt()
    decoder = fd.StaticDecoder(model, 64)
    ref = decoder.generate(ids, 20).tokens
    result = sp.prompt_lookup_generate(decoder, ids, 20, k=k)
    assert result.tokens == ref
    assert result.proposed > 0 and 0 <= result.accepted <= result.proposed
    assert result.target_passes <= len(ref)


def test_lookup_draft_takes_the_latest_longest_match():
    assert sp.lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest occurrence of (1, 2, 3)
    assert sp.lookup_draft([5, 1, 2, 8, 2], 3) == [8, 2]  # only the 1-gram (2,) matches
    assert sp.lookup_draft([1, 2, 3], 4) == []
    assert sp.lookup_draft([4], 4) == []


# ---------------------------------------------------------------- a quantized twin as the draft


def int4_twin(model):
    twin = copy.deepcopy(model)
    Q.quantize_linears_rtn(twin, 4, 32, symmetric=False)
    return twin


def test_quantized_twin_drafts_on_static_decoders_greedy_identical(model):
    ids = prompt(6, seed=3)
    target = fd.StaticDecoder(model, 40)
    drafter = sp.ModelDrafter(fd.StaticDecoder(int4_twin(model), 40))
    ref = target.generate(ids, 20).tokens
    for k in (2, 5):  # rounds accepted in full (the draft catches up on its last token) and rejected ones
        res = sp.speculate(target, drafter, ids, 20, k=k)
        assert res.tokens == ref
        assert res.proposed == k * res.target_passes and res.accepted > 0


def test_packed_twin_is_a_draft_too(model):
    if not K.packed_support()["int4"]:
        pytest.skip("this torch has no packed int4 kernel")
    twin = K.packed_int4_model(model, 32)  # packed linears and the int4 tied table
    ids = prompt(6, seed=4)
    target = fd.StaticDecoder(model, 40)
    res = sp.speculate(target, sp.ModelDrafter(fd.StaticDecoder(twin, 40)), ids, 12, k=3)
    assert res.tokens == target.generate(ids, 12).tokens


def test_stop_token_ends_the_output(model):
    ids = prompt(5)
    ref = hf_greedy(model, ids, 12)
    res = sp.speculative_generate(model, model, ids, 12, k=3, stop_token_id=ref[5])
    assert res.tokens == ref[: ref.index(ref[5]) + 1]


def test_round_arguments_are_checked(model):
    target = fd.StaticDecoder(model, 16)
    drafter = sp.ModelDrafter(fd.StaticDecoder(model, 16))
    with pytest.raises(ValueError, match="need 19"):
        sp.speculate(target, drafter, prompt(5), 10, k=4)
    with pytest.raises(ValueError, match="k \\(draft tokens"):
        sp.speculate(target, drafter, prompt(5), 4, k=0)
    with pytest.raises(ValueError, match="max_ngram"):
        sp.prompt_lookup_generate(target, prompt(5), 4, k=2, max_ngram=0)
    with pytest.raises(ValueError, match="temperature=0"):
        sp.speculate(target, sp.LookupDrafter(), repeating_prompt()[:, :8], 4, k=2, temperature=1.0)
    small_draft = sp.ModelDrafter(fd.StaticDecoder(model, 8))
    with pytest.raises(ValueError, match="draft's StaticDecoder holds 8"):
        sp.speculate(target, small_draft, prompt(5), 4, k=2)
