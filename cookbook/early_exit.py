"""Early exit (notebook 10, section 3): a token stops after an intermediate layer when the shared final norm and
tied head are already confident there, and those give its logits.

The textbook test, the head's top probability, reads the whole 262k-row head at every exit point: on Gemma 3 270M
more bytes than all 18 blocks, so a failed check costs more than an exit saves. `ShortlistTest` bounds the same
test from a shortlist of S frequent tokens' rows and reads the head only when the bound passes. `exit_agreement`
measures how often the head's top-1 after a layer is already the full model's. Shapes: t tokens, D hidden size,
V vocabulary, E exit points, S shortlist rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cookbook import decoding as dec
from cookbook.core import (KVCache, check_model, decoder_layer, decoder_layers, final_logits, layer_types,
                           softcap_logits, step_context)
from cookbook.core.forward import project_kv


@dataclass
class EarlyExitResult:
    """Per token: the layer whose output produced it (num_layers = no early exit), its logits' argmax, the NLL of
    the next true token, the time so far, and how often the exit checks read the whole head."""

    exit_layers: list[int]
    tokens: list[int]
    nll: list[float]
    times_s: list[float]
    head_reads: list[int]

    @property
    def tokens_per_s(self) -> float:
        """Scored tokens per second of this run (the context's prefill excluded)."""
        return len(self.times_s) / self.times_s[-1]


def _check_exit_layers(exit_layers: list[int], num_layers: int, threshold: float) -> None:
    if any(not 1 <= e < num_layers for e in exit_layers):
        raise ValueError(f"exit_layers must be layer counts in [1, {num_layers - 1}] (exit after that many "
                         f"layers; [] = never exit), got {exit_layers}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is a probability in (0, 1], got {threshold}.")


def frequent_tokens(ids: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent token ids in ids (any shape), most frequent first -> (size,) or fewer."""
    values, counts = torch.unique(ids.flatten(), return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    return values[order[:size]]


class ShortlistTest:
    """A cheap exit test: the confidence over a shortlist of S head rows (S << V) instead of all V.

    Dropping rows only shrinks the softmax's denominator, so a token's probability among the S candidates is at least
    its probability among all V: wherever the full confidence test would let a token exit and its top-1 is on the
    shortlist, the bound passes. The head is then read once, to confirm with the full test and to give the logits the
    exiting token needs anyway; a token that fails costs S rows, not V. So the bound never lets a token exit that the
    full test would keep; a confident token whose top-1 is off the list exits later, or not at all.
    """

    def __init__(self, model, token_ids: torch.Tensor) -> None:
        head = model.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            raise ValueError(f"ShortlistTest reads rows of a float, bias-free nn.Linear head; this model's head is "
                             f"{head!r}. Build the test on the float model.")
        ids = torch.unique(token_ids)  # the bound needs each candidate once: a repeated row would count twice
        if token_ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids[0] < 0 \
                or ids[-1] >= head.out_features:
            raise ValueError(f"token_ids must be a non-empty 1-D set of integer ids in [0, {head.out_features}), "
                             f"got {tuple(token_ids.shape)} {token_ids.dtype}.")
        self.model = model
        self.rows = head.weight.detach()[ids].clone()  # (S, D): S x D floats, read per check

    def passes(self, h: torch.Tensor, threshold: float) -> bool:
        """Whether the normed hidden state h (1, 1, D) is confident enough on the shortlist."""
        logits = softcap_logits(self.model, h.reshape(-1) @ self.rows.T)  # (S,)
        return torch.softmax(logits.float(), dim=-1).max().item() >= threshold


@torch.no_grad()
def exit_agreement(model, ids: torch.Tensor, exit_layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced over ids (1, t): normed hidden states after each exit point (E, t, D), and whether the head's
    top-1 token there equals the full model's (E, t). The head runs in chunks of 64 tokens (64 x V floats each)."""
    check_model(model)
    _check_exit_layers(exit_layers, len(decoder_layers(model)), 1.0)
    if not exit_layers:
        raise ValueError("exit_agreement needs at least one exit point (a layer count in exit_layers).")
    config = model.config
    x = model.model.embed_tokens(ids)  # (1, t, D)
    ctx = step_context(config, 0, ids.shape[1], x.device, x.dtype)
    states = {}
    for i, (layer, layer_type) in enumerate(zip(decoder_layers(model), layer_types(config))):
        x = decoder_layer(layer, x, ctx, layer_type, None, i)
        if i + 1 in exit_layers:
            states[i + 1] = model.model.norm(x)[0]  # (t, D)
    final = _top1(model, model.model.norm(x)[0])  # (t,)
    hidden = torch.stack([states[e] for e in exit_layers])  # (E, t, D)
    agree = torch.stack([_top1(model, states[e]) == final for e in exit_layers])  # (E, t)
    return hidden, agree


def _top1(model, h: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Argmax of the head over normed states h (t, D), chunk by chunk -> (t,)."""
    return torch.cat([model.lm_head(h[i:i + chunk]).argmax(-1) for i in range(0, h.shape[0], chunk)])


@torch.no_grad()
def early_exit_step(model, token: torch.Tensor, cache: KVCache, exit_layers: list[int], threshold: float,
                    shortlist: ShortlistTest | None = None) -> tuple[torch.Tensor, int, int]:
    """One decoding step that may stop after any layer count in `exit_layers`: token (1, 1) -> (logits (V,), layers
    run, whole-head reads by the exit checks).

    At each exit point the test is the head's top probability on the normed hidden state; reaching `threshold`
    exits. With a `shortlist` the head is read only where the shortlist's bound passes. The layers a token skipped
    still need its K and V for later tokens: we compute them from the exited hidden state (state copying, as in
    CALM), which costs only the K/V projections of the skipped layers.
    """
    layers, types = decoder_layers(model), layer_types(model.config)
    _check_exit_layers(exit_layers, len(layers), threshold)
    x = model.model.embed_tokens(token)  # (1, 1, D)
    ctx = step_context(model.config, cache.length, 1, x.device, x.dtype)
    reads = 0
    for i, layer in enumerate(layers):
        x = decoder_layer(layer, x, ctx, types[i], cache, i)
        if i + 1 not in exit_layers:
            continue
        h = model.model.norm(x)  # (1, 1, D)
        if shortlist is not None and not shortlist.passes(h, threshold):
            continue  # the bound says no: the head is not read
        logits, reads = final_logits(model, h)[0, -1], reads + 1  # (V,)
        if torch.softmax(logits.float(), dim=-1).max() >= threshold:
            for j in range(i + 1, len(layers)):  # fill the skipped layers' cache from the exited state
                cos, sin = ctx.rope[types[j]]
                k, v = project_kv(layers[j].self_attn, layers[j].input_layernorm(x), cos, sin)
                cache.update(j, k, v)
            cache.advance(1)
            return logits, i + 1, reads
    cache.advance(1)
    return final_logits(model, model.model.norm(x))[0, -1], len(layers), reads


@torch.no_grad()
def early_exit_teacher_forced(model, ids: torch.Tensor, exit_layers: list[int], threshold: float,
                              prefix: int = 1, shortlist: ShortlistTest | None = None) -> EarlyExitResult:
    """Score ids (1, t) token by token with early exit: the first `prefix` tokens are context (all but the last
    prefilled in one pass); from token `prefix - 1` on, each step feeds the true token and records its exit layer,
    the NLL of the following true token, and the time."""
    dec.check_prompt(ids, 1)
    if not 1 <= prefix < ids.shape[1]:
        raise ValueError(f"prefix must be in [1, {ids.shape[1] - 1}], got {prefix}.")
    cache = KVCache.allocate(model.config, ids.shape[1], dtype=model.dtype, device=ids.device)
    if prefix > 1:
        dec.forward(model, ids[:, : prefix - 1], cache)
    result, start = EarlyExitResult([], [], [], [], []), time.perf_counter()
    for pos in range(prefix - 1, ids.shape[1] - 1):
        logits, used, reads = early_exit_step(model, ids[:, pos:pos + 1], cache, exit_layers, threshold, shortlist)
        result.exit_layers.append(used)
        result.head_reads.append(reads)
        result.tokens.append(int(logits.argmax()))
        result.nll.append(F.cross_entropy(logits.float()[None], ids[0, pos + 1:pos + 2]).item())
        result.times_s.append(time.perf_counter() - start)
    return result


def break_even_exit_rate(check_s: float, saved_s: float) -> float:
    """The share of tokens that must exit for early exit to pay. A token that does not exit pays its checks
    (`check_s`: every exit point's test it went through) for nothing; a token that exits saves `saved_s` (the
    skipped layers less their K/V projections), its confirming head read replacing the final one. Break-even:
    rate x saved = (1 - rate) x checks."""
    if check_s < 0 or saved_s < 0 or check_s + saved_s == 0:
        raise ValueError(f"Need non-negative costs, not both zero; got check_s={check_s}, saved_s={saved_s}.")
    return check_s / (check_s + saved_s)
