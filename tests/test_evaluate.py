import math
from types import SimpleNamespace

import pytest
import torch

from cookbook import encode, load_text
from cookbook.evaluate import DEFAULT_PROTOCOL, PerplexityProtocol, nll_sum, perplexity, relative_change


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
