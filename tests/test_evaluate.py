import math
from types import SimpleNamespace

import pytest
import torch

from cookbook import encode, load_text
from cookbook.data import with_bos
from cookbook.evaluate import (DEFAULT_PROTOCOL, PerplexityProtocol, fusable_head, fused_head_nll, nll_sum, perplexity,
                               relative_change, window_nll, window_nll_reference)


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/vocab: perplexity must be exactly vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.seen_lengths: list[int] = []
        self.training = False

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids):
        self.seen_lengths.append(input_ids.shape[1])
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_equal_to_vocab(tokenizer):
    model = UniformModel(len(tokenizer))
    ppl = perplexity(model, tokenizer, PerplexityProtocol(seq_len=64, stride=64, max_tokens=200))
    assert ppl == pytest.approx(len(tokenizer), rel=1e-4)
    assert model.seen_lengths == [64, 64, 64, 8]  # BOS + all but the last token of each window


class OverflowingModel(UniformModel):
    """Logits that overflow (NaN), as fp16 inference of Gemma does (notebook 01)."""

    def forward(self, input_ids):
        out = super().forward(input_ids)
        return SimpleNamespace(logits=out.logits + float("nan"))


def test_a_non_finite_window_ends_the_evaluation(tokenizer):
    model = OverflowingModel(len(tokenizer))
    ppl = perplexity(model, tokenizer, PerplexityProtocol(seq_len=64, stride=64, max_tokens=200))
    assert math.isnan(ppl)
    assert model.seen_lengths == [64]  # the sum cannot become finite again: no need to run the other windows


@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 32), (50, 7)])
def test_every_token_scored_exactly_once(tokenizer, seq_len, stride):
    ids = encode(tokenizer, load_text("shakespeare_eval"), 300)
    _, scored = nll_sum(UniformModel(len(tokenizer)), tokenizer, ids, seq_len, stride)
    assert scored == 300


def test_protocol_validation():
    with pytest.raises(ValueError, match="stride"):
        PerplexityProtocol(seq_len=128, stride=256)
    with pytest.raises(ValueError, match="max_tokens"):
        PerplexityProtocol(max_tokens=1)
    assert "seq_len=512" in DEFAULT_PROTOCOL.describe()


def test_real_model_perplexity_is_sane(real_model):
    model, tok = real_model
    ppl = perplexity(model, tok, PerplexityProtocol(max_tokens=256, seq_len=128, stride=128))
    assert 5 < ppl < 200  # far below the uniform 262144: the model knows English
    assert math.isfinite(ppl)


def test_relative_change():
    assert relative_change(101.0, 100.0) == pytest.approx(0.01)


def float64_nll(hidden, weight, bias, targets):
    z = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    keep = targets != -100
    return (torch.logsumexp(z[keep], -1) - z[keep, targets[keep]]).sum().item()


@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_nll_matches_a_float64_cross_entropy(chunk, with_bias):
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 16), torch.randn(203, 16)  # 203 rows: the last block is partial
    bias = torch.randn(203) if with_bias else None
    targets = torch.randint(0, 203, (20,))
    targets[:5] = -100  # context only
    got = fused_head_nll(hidden, weight, bias, targets, chunk=chunk)
    assert got == pytest.approx(float64_nll(hidden, weight, bias, targets), rel=1e-5)


def test_fused_head_nll_stays_non_finite():
    hidden = torch.full((3, 4), float("nan"))
    assert math.isnan(fused_head_nll(hidden, torch.randn(10, 4), None, torch.tensor([1, 2, 3])))


def test_fused_window_matches_the_reference_on_the_real_model(real_model):
    model, tok = real_model
    ids = encode(tok, load_text("shakespeare_eval"), 64)[None]  # (1, 64)
    targets = ids.clone()
    targets[:, :10] = -100
    inputs = with_bos(tok, ids)[:, :-1]
    assert fusable_head(model) is model.lm_head
    with torch.no_grad():
        fused, reference = window_nll(model, inputs, targets), window_nll_reference(model, inputs, targets)
        hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state[0]  # (64, d)
    exact = float64_nll(hidden, model.lm_head.weight, None, targets[0])
    # float32 cross-entropy over 262,144 logits is itself off by ~1e-5 (1.4e-5 under ATEN_CPU_CAPABILITY=default):
    # the fused sum is held to float64 more tightly than the reference it replaces
    assert fused == pytest.approx(exact, rel=1e-5)
    assert reference == pytest.approx(exact, rel=1e-4)


def test_heads_the_fused_path_cannot_take_use_the_reference(real_model):
    model, _ = real_model
    handle = model.lm_head.register_forward_hook(lambda *args: None)  # e.g. an activation capture
    try:
        assert fusable_head(model) is None
    finally:
        handle.remove()
    assert fusable_head(UniformModel(10)) is None
    original = model.lm_head
    model.lm_head = torch.nn.Sequential(original)  # e.g. a quantized or factorized head
    try:
        assert fusable_head(model) is None
    finally:
        model.lm_head = original
    assert fusable_head(model) is original


def test_fused_head_nll_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        fused_head_nll(torch.randn(2, 4), torch.randn(10, 4), None, torch.tensor([3, 10]))
