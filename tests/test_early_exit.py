"""cookbook.early_exit on the tiny random Gemma 3: exits that never fire give the full model's tokens, the shortlist
bound is the full test when the list is the whole vocabulary and reads the head less otherwise, bad arguments are
refused."""

from __future__ import annotations

import pytest
import torch

from cookbook import decoding as dec
from cookbook import early_exit as ee
from cookbook.core import softcap_logits
from cookbook.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_layers=4)


def prompt(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def test_early_exit_threshold_one_never_exits_and_matches_full(model):
    ids = prompt(10)
    res = ee.early_exit_teacher_forced(model, ids, exit_layers=[1, 2], threshold=1.0)
    assert set(res.exit_layers) == {4}
    assert res.tokens == dec.forward(model, ids)[0, :-1].argmax(-1).tolist()


def test_early_exit_low_threshold_exits_first_point(model):
    res = ee.early_exit_teacher_forced(model, prompt(10), exit_layers=[2], threshold=1e-6)
    assert set(res.exit_layers) == {2}
    assert len(res.nll) == 9


@pytest.mark.parametrize("layers,thr", [([0], 0.9), ([4], 0.9), ([2], 0.0), ([2], 1.5)])
def test_early_exit_bad_arguments(model, layers, thr):
    cache = dec.KVCache.allocate(model.config, 4)
    with pytest.raises(ValueError):
        ee.early_exit_step(model, prompt(1), cache, layers, thr)


def test_exit_agreement_labels_are_the_head_top1_against_the_full_model(model):
    ids = prompt(24, seed=2)
    hidden, agree = ee.exit_agreement(model, ids, [1, 3])
    assert hidden.shape == (2, 24, model.config.hidden_size) and agree.shape == (2, 24)
    final = dec.forward(model, ids)[0].argmax(-1)  # (t,)
    torch.testing.assert_close(agree[1], model.lm_head(hidden[1]).argmax(-1) == final)


def test_shortlist_of_the_whole_vocabulary_is_the_full_test(model):
    ids = prompt(12, seed=4)
    everything = ee.ShortlistTest(model, torch.arange(model.config.vocab_size))
    for thr in (0.0031, 0.0032):  # the tiny random model is nearly uniform: top probabilities about 0.003
        full = ee.early_exit_teacher_forced(model, ids, [1, 2], thr)
        bounded = ee.early_exit_teacher_forced(model, ids, [1, 2], thr, shortlist=everything)
        assert 1 in full.exit_layers and 4 in full.exit_layers  # some exit, some do not
        assert bounded.exit_layers == full.exit_layers and bounded.tokens == full.tokens
        assert full.head_reads == [min(2, sum(e <= layer for e in (1, 2))) for layer in full.exit_layers]


def test_a_short_list_reads_the_head_less(model):
    ids = prompt(12, seed=5)
    short = ee.ShortlistTest(model, ee.frequent_tokens(prompt(64, seed=6), 16))
    thr = 0.08  # about the top probability among 16 near-uniform candidates: the bound passes for some tokens only
    res = ee.early_exit_teacher_forced(model, ids, [1, 2], thr, shortlist=short)
    full = ee.early_exit_teacher_forced(model, ids, [1, 2], thr)
    assert 0 < sum(res.head_reads) < sum(full.head_reads) and res.tokens == full.tokens
    assert ee.early_exit_teacher_forced(model, ids, [1, 2], 1.0, shortlist=short).tokens == \
        dec.forward(model, ids)[0, :-1].argmax(-1).tolist()  # nothing exits at threshold 1


def test_frequent_tokens_and_shortlist_input_checks(model):
    assert ee.frequent_tokens(torch.tensor([[5, 3, 5, 7, 3, 5]]), 2).tolist() == [5, 3]
    with pytest.raises(ValueError, match="integer ids in \\[0, 512\\)"):
        ee.ShortlistTest(model, torch.tensor([model.config.vocab_size]))
    with pytest.raises(ValueError, match="bias-free nn.Linear head"):
        ee.ShortlistTest(type("M", (), {"lm_head": torch.nn.Identity()})(), torch.tensor([1]))


def test_the_shortlist_bound_passes_wherever_the_full_test_does(model):
    gen = torch.Generator().manual_seed(7)
    head = model.lm_head.weight.detach()  # (V, D)
    for _ in range(20):
        h = 3 * torch.randn(1, 1, model.config.hidden_size, generator=gen)  # confident enough to matter
        probs = torch.softmax(softcap_logits(model, h.reshape(-1) @ head.T), -1)  # (V,)
        others = torch.randint(0, model.config.vocab_size, (30,), generator=gen)
        short = ee.ShortlistTest(model, torch.cat([others, probs.argmax()[None]]))  # holds the top-1
        top = probs.max().item()
        assert short.passes(h, top * 0.999)  # the bound is at least the full top probability
    assert not ee.ShortlistTest(model, torch.arange(model.config.vocab_size)).passes(h, min(1.0, top * 1.001))


def test_shortlist_ids_are_a_set_and_exit_points_are_required(model):
    h = torch.randn(1, 1, model.config.hidden_size)
    once, twice = ee.ShortlistTest(model, torch.tensor([3, 4])), ee.ShortlistTest(model, torch.tensor([3, 3, 4]))
    assert torch.equal(once.rows, twice.rows) and once.passes(h, 0.5) == twice.passes(h, 0.5)
    with pytest.raises(ValueError, match="1-D set of integer ids"):
        ee.ShortlistTest(model, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="at least one exit point"):
        ee.exit_agreement(model, prompt(4), [])


def test_break_even_exit_rate():
    assert ee.break_even_exit_rate(1.0, 3.0) == 0.25  # 0.25 x 3 saved = 0.75 x 1 paid
    assert ee.break_even_exit_rate(0.0, 1.0) == 0.0
    with pytest.raises(ValueError):
        ee.break_even_exit_rate(0.0, 0.0)
