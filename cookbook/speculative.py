"""Speculative decoding (notebook 10, sections 4 and 6): a cheap drafter proposes k tokens, the target checks them
all in one pass, and we keep the longest prefix it agrees with plus one token of its own.

One round loop, `speculate`, serves every drafter (anything with `check`, `start` and `propose`): `ModelDrafter` (a second model, e.g. a truncated copy of the
target or its packed int4 twin) and `LookupDrafter` (prompt lookup: the tokens that followed the same n-gram earlier
in the context). Target and draft are `fast_decoding.StaticDecoder`s, eager or compiled. Greedy (temperature 0) the
output is the target's greedy output token for token; with sampling `rejection_sample` keeps the target's
distribution. Shapes: k drafts per round, V vocabulary.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from cookbook import decoding as dec
from cookbook.core import check_model, decoder_layers
from cookbook.core.layout import subset_config
from cookbook.fast_decoding import StaticDecoder

# ---------------------------------------------------------------- draft models


def truncated_draft(model, num_layers: int):
    """A draft model made of the first `num_layers` blocks of `model` plus its final norm and tied head.

    Nothing is copied: the draft shares every weight with the target, so it costs no memory. It is a
    real `Gemma3ForCausalLM`-class object, so transformers' assisted generation accepts it too.
    """
    check_model(model)
    total = len(decoder_layers(model))
    if not 1 <= num_layers < total:
        raise ValueError(f"num_layers must be in [1, {total - 1}] for a {total}-layer model, got {num_layers}.")
    return layer_subset_draft(model, list(range(num_layers)))


def layer_subset_draft(model, keep: list[int]):
    """A draft that runs only the blocks listed in `keep` (in order), sharing all weights with `model`.

    Skipping middle layers (self-speculative decoding, Zhang et al. 2023) keeps the last layers that map the
    residual stream onto the head. Only a prefix (`truncated_draft`) also works in transformers' assisted
    generation, whose cache indexes layers by their original number; our loops index by position.
    """
    check_model(model)
    total = len(decoder_layers(model))
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= total or len(keep) == total:
        raise ValueError(f"keep must be a strictly increasing, proper subset of range({total}), got {keep}.")
    config = subset_config(model.config, keep)
    draft = copy.copy(model)  # shallow: shares every submodule, then we swap the few that differ
    draft._modules = dict(model._modules)
    draft.model = copy.copy(model.model)
    draft.model._modules = dict(model.model._modules)
    draft.model.layers = nn.ModuleList([decoder_layers(model)[i] for i in keep])
    draft.config = draft.model.config = config
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft


def check_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ValueError unless draft and target share a vocabulary (and, if given, the same tokenizer)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"Draft and target vocabularies differ ({dv} vs {tv} tokens): speculative decoding "
                         "here needs a draft with the target's tokenizer (token ids must mean the same text).")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise ValueError("Pass both tokenizers (target_tokenizer and draft_tokenizer) or neither.")
    if target_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("Draft and target tokenizers map tokens to different ids: use a draft trained with the "
                         "target's tokenizer (or transformers' universal assisted generation for different ones).")


# ---------------------------------------------------------------- drafters: who proposes the k tokens


class ModelDrafter:
    """Drafts from a second model, one token per step of its own `StaticDecoder`, whose cache follows the accepted
    sequence: rejected drafts are cropped away, and a draft accepted in full is run before the next round."""

    def __init__(self, decoder: StaticDecoder) -> None:
        self.decoder = decoder

    def check(self, need: int, temperature: float) -> None:
        if self.decoder.max_len < need:
            raise ValueError(f"The draft's StaticDecoder holds {self.decoder.max_len} tokens; this request needs "
                             f"{need} (prompt + new tokens + k). Build it with a larger max_len.")

    def start(self, prompt_ids: torch.Tensor) -> None:
        """Fill the draft's cache with the prompt but its last token (the loop's invariant for both models)."""
        self.decoder.cache.crop(0)
        if prompt_ids.shape[1] > 1:
            dec.forward(self.decoder.model, prompt_ids[:, :-1], self.decoder.cache)

    def propose(self, seq: list[int], k: int, temperature: float,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        """k draft tokens after `seq` and, when sampling, the draft's probabilities q (V,) for each."""
        cache = self.decoder.cache
        cache.crop(min(cache.length, len(seq) - 1))  # forget the K/V of rejected drafts
        for tok in seq[cache.length:-1]:  # after a round accepted in full, its last draft was never run
            self.decoder.step([tok])
        drafted, q_rows, tok = [], [], seq[-1]
        for _ in range(k):
            tok = _pick(self.decoder.step([tok])[-1], temperature, q_rows, generator)
            drafted.append(tok)
        return drafted, q_rows


class LookupDrafter:
    """Prompt-lookup drafts (Saxena 2023): no model, `lookup_draft` over the context. Greedy only."""

    def __init__(self, max_ngram: int = 3) -> None:
        if max_ngram < 1:
            raise ValueError(f"Prompt lookup needs max_ngram >= 1, got {max_ngram}.")
        self.max_ngram = max_ngram

    def check(self, need: int, temperature: float) -> None:
        if temperature != 0:
            raise ValueError("Prompt lookup drafts have no probabilities to sample against: use temperature=0.")

    def start(self, prompt_ids: torch.Tensor) -> None:
        pass

    def propose(self, seq: list[int], k: int, temperature: float,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor]]:
        return lookup_draft(seq, k, self.max_ngram), []


def lookup_draft(seq: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, trying
    n = max_ngram down to 1; [] when no suffix occurs earlier."""
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):  # the most recent match first
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


# ---------------------------------------------------------------- the round loop


@dataclass
class SpeculativeResult:
    """Generated tokens, how many draft tokens were proposed and accepted, target passes, and the time."""

    tokens: list[int]
    proposed: int
    accepted: int
    target_passes: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_pass(self) -> float:
        return len(self.tokens) / max(self.target_passes, 1)


def _check_round_args(target: StaticDecoder, drafter, prompt_ids: torch.Tensor, max_new_tokens: int, k: int,
                      temperature: float) -> None:
    dec.check_prompt(prompt_ids, max_new_tokens)
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    need = prompt_ids.shape[1] + max_new_tokens + k
    if target.max_len < need:
        raise ValueError(f"The target's StaticDecoder holds {target.max_len} tokens; a prompt of "
                         f"{prompt_ids.shape[1]}, {max_new_tokens} new tokens and k={k} drafts need {need}.")
    drafter.check(need, temperature)


@torch.no_grad()
def speculate(target: StaticDecoder, drafter, prompt_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
              temperature: float = 0.0, generator: torch.Generator | None = None,
              stop_token_id: int | None = None) -> SpeculativeResult:
    """Speculative decoding: each round `drafter.propose` gives up to k tokens, the target scores the last accepted
    token plus the drafts in ONE step, and we keep the agreeing prefix plus the target's correction or bonus token.

    Invariant between rounds: the target's cache holds seq[:-1]. A compiled target always verifies k + 1 tokens
    (short drafts padded; padding is never accepted), so it compiles two shapes: 1 token (no draft) and k + 1.
    """
    _check_round_args(target, drafter, prompt_ids, max_new_tokens, k, temperature)
    start = time.perf_counter()
    seq, new = prompt_ids[0].tolist(), []
    target.cache.crop(0)
    if len(seq) > 1:
        dec.forward(target.model, prompt_ids[:, :-1], target.cache)
    drafter.start(prompt_ids)
    proposed = accepted = passes = 0
    while len(new) < max_new_tokens:
        drafted, q_rows = drafter.propose(seq, k, temperature, generator)
        pad = [seq[-1]] * (k - len(drafted)) if target.compiled and drafted else []
        base = target.cache.length
        logits = target.step([seq[-1], *drafted, *pad])[: len(drafted) + 1]  # (n + 1, V): one target pass
        kept = _verify(logits, drafted, q_rows, temperature, generator)
        passes, proposed, accepted = passes + 1, proposed + len(drafted), accepted + len(kept) - 1
        seq, new = seq + kept, new + kept
        target.cache.crop(base + len(kept))  # seq[-1] and the accepted drafts; the rest is overwritten later
        if stop_token_id is not None and stop_token_id in kept:
            new = new[: new.index(stop_token_id) + 1]
            break
    return SpeculativeResult(new[:max_new_tokens], proposed, accepted, passes, time.perf_counter() - start)


def speculative_generate(target, draft, prompt_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, generator: torch.Generator | None = None,
                         target_tokenizer=None, draft_tokenizer=None,
                         stop_token_id: int | None = None) -> SpeculativeResult:
    """Speculative decoding of two models that share a tokenizer, both eager (`speculate` over fresh
    `StaticDecoder`s sized for the request). temperature 0 is greedy: token for token the target's greedy output."""
    check_model(target)
    check_model(draft)
    check_compatible(target, draft, target_tokenizer, draft_tokenizer)
    dec.check_prompt(prompt_ids, max_new_tokens)
    slots = prompt_ids.shape[1] + max_new_tokens + k
    return speculate(StaticDecoder(target, slots), ModelDrafter(StaticDecoder(draft, slots)), prompt_ids,
                     max_new_tokens, k, temperature, generator, stop_token_id)


def prompt_lookup_generate(decoder: StaticDecoder, prompt_ids: torch.Tensor, max_new_tokens: int, k: int = 8,
                           max_ngram: int = 3, stop_token_id: int | None = None) -> SpeculativeResult:
    """Greedy prompt-lookup decoding (drafts from n-grams of the context, up to `max_ngram` tokens long)."""
    return speculate(decoder, LookupDrafter(max_ngram), prompt_ids, max_new_tokens, k, stop_token_id=stop_token_id)


# ---------------------------------------------------------------- verification


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                     generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling's accept/reject rule (Leviathan et al. 2023; Chen et al. 2023).

    p (k + 1, V): target probabilities at each draft position plus one more; q (k, V): the draft's;
    draft_tokens (k,) sampled from q. Draft token i is kept with probability min(1, p_i(x) / q_i(x)); at the
    first rejection we sample from the residual max(p_i - q_i, 0) (normalized) and stop; if all k are kept we
    add a token sampled from p_k. The returned tokens are distributed exactly as sampling from p directly.
    """
    k = draft_tokens.shape[0]
    if p.shape[0] != k + 1 or q.shape[0] != k or p.shape[1] != q.shape[1]:
        raise ValueError(f"Need p (k+1, V) and q (k, V) for k={k} draft tokens, got {tuple(p.shape)}, {tuple(q.shape)}.")
    out: list[int] = []
    for i in range(k):
        x = int(draft_tokens[i])
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i, x] <= p[i, x]:  # accept with probability min(1, p/q)
            out.append(x)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # (V,)
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _pick(logits: torch.Tensor, temperature: float, q_rows: list[torch.Tensor],
          generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    q = _probs(logits, temperature)  # (V,)
    q_rows.append(q)
    return int(torch.multinomial(q, 1, generator=generator))


def _verify(t_logits: torch.Tensor, drafted: list[int], q_rows: list[torch.Tensor], temperature: float,
            generator: torch.Generator | None) -> list[int]:
    """The tokens this round adds: accepted drafts, then the target's correction or bonus token."""
    if temperature == 0:
        greedy = t_logits.argmax(dim=-1).tolist()  # (n + 1,)
        out = []
        for i, tok in enumerate(drafted):
            if tok != greedy[i]:
                return out + [greedy[i]]
            out.append(tok)
        return out + [greedy[len(drafted)]]
    p = _probs(t_logits, temperature)  # (n + 1, V)
    return rejection_sample(p, torch.stack(q_rows), torch.tensor(drafted), generator)


def expected_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected speedup: tokens per round (1 - a^(k+1)) / (1 - a) over cost (k c + 1).

    acceptance a: chance each draft token is accepted (assumed independent); cost_ratio c: one draft pass
    over one target pass. The target's verification pass is assumed to cost one decoding step.
    """
    if not 0 <= acceptance <= 1 or k < 1 or cost_ratio < 0:
        raise ValueError("Need 0 <= acceptance <= 1, k >= 1 and cost_ratio >= 0.")
    tokens = k + 1 if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (k * cost_ratio + 1)
