"""Perplexity on a fixed protocol, so every notebook's numbers can be compared.

The protocol (`PerplexityProtocol`): take the first `max_tokens` tokens of a shipped text (no special
tokens), cut them into windows of `seq_len` tokens starting every `stride` tokens, put a BOS token in
front of each window, and score every token exactly once: a token already scored by an earlier
window is only context. With the default stride == seq_len the windows do not overlap, so each
token is predicted from the tokens before it in its own window. Perplexity = exp(mean NLL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import EVAL_TEXT, SECOND_EVAL_TEXT, encode, load_text, with_bos


@dataclass(frozen=True)
class PerplexityProtocol:
    text: str = EVAL_TEXT
    seq_len: int = 512
    stride: int = 512
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.seq_len:
            raise ValueError(f"Need 0 < stride <= seq_len, got stride={self.stride}, seq_len={self.seq_len}.")
        if self.max_tokens < 2:
            raise ValueError("max_tokens must be at least 2.")

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


DEFAULT_PROTOCOL = PerplexityProtocol()
SECOND_PROTOCOL = PerplexityProtocol(text=SECOND_EVAL_TEXT)


@torch.no_grad()
def nll_sum(model, tokenizer, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood of `ids` (n,) under the protocol's windows, and tokens scored."""
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end].unsqueeze(0).to(model.device)  # (1, t)
        targets = window.clone()
        targets[:, : max(prev_end - begin, 0)] = -100  # already scored: context only
        inputs = with_bos(tokenizer, window)[:, :-1]  # (1, t): BOS + all but the last token
        logits = model(input_ids=inputs).logits.float()  # (1, t, vocab)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
        scored += int((targets != -100).sum())
        prev_end = end
        if end == len(ids) or not math.isfinite(total):  # a non-finite sum (fp16 overflow) stays non-finite
            break
    return total, scored


def perplexity(model, tokenizer, protocol: PerplexityProtocol = DEFAULT_PROTOCOL) -> float:
    """Perplexity of `model` on the protocol's text (lower is better)."""
    was_training = model.training
    model.eval()
    ids = encode(tokenizer, load_text(protocol.text), protocol.max_tokens)
    total, scored = nll_sum(model, tokenizer, ids, protocol.seq_len, protocol.stride)
    model.train(was_training)
    return math.exp(total / scored)


def perplexities(model, tokenizer, protocols=(DEFAULT_PROTOCOL, SECOND_PROTOCOL)) -> dict[str, float]:
    """Perplexity on each protocol's text, keyed by text name."""
    return {p.text: perplexity(model, tokenizer, p) for p in protocols}


def relative_change(new: float, base: float) -> float:
    """(new - base) / base, e.g. 0.01 means 1% higher than the baseline."""
    return (new - base) / base
