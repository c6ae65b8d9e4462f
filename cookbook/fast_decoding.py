"""A static-shape decode step that `torch.compile` captures whole (notebook 10, section 5), and what compilation
changes: operators per token, graph breaks. `speculative` runs its target and draft models on this step.

The step is `decoding`'s own forward (same layers, same KV cache class) with three changes that make every shape
fixed: the cache is written at a position tensor (`KVCache.write_at`, index_copy) instead of a Python-int slice,
attention reads the whole preallocated buffer under a mask built from that position, and the rotary tables are
computed once for every position and indexed. One compiled graph then serves every token (gpt-fast's design);
eager and compiled runs of the same `StaticDecoder` share its code, so they can be compared token for token.
Compiled one-token steps of a float model take the hand-fused head (`matvec_head`, checked against the linear)
where it reads the head faster than BLAS on this machine (`fused_head_pays`, measured once per head shape).
Shapes: t new tokens, L = max_len cache slots, d head_dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from cookbook import decoding as dec
from cookbook.core import (KVCache, StepContext, attention_mask, check_model, decoder_layer, decoder_layers,
                           final_logits, layer_types, layer_window, rope_cos_sin, softcap_logits)
from cookbook.measure import time_function


def static_context(config, pos: torch.Tensor, max_len: int,
                   rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> StepContext:
    """What the layers share for new tokens at positions pos (t,) over all L cache slots: rotary rows, masks."""
    slots = torch.arange(max_len, device=pos.device)  # (L,)
    # (t, L) per layer type; a slot not written yet sits after pos, so causality hides it too
    masks = {lt: attention_mask(pos, slots, layer_window(config, lt)) for lt in rope}
    rows = {lt: (cos[pos], sin[pos]) for lt, (cos, sin) in rope.items()}  # (t, d) each
    return StepContext(pos, rows, masks, write_pos=pos)


class StaticDecoder:
    """A model, one float KV cache of `max_len` slots, and a step over fixed shapes; `compile=True` wraps the
    step in `torch.compile(fullgraph=True)`, which refuses to run rather than split on a graph break.

    `prefill` runs `decoding.forward` (eager: the prompt is one pass, and its length varies); `step` writes t
    tokens at explicit positions. The cache's `length` is kept by the Python loop, never read inside the step.
    """

    def __init__(self, model, max_len: int, compile: bool = False, mode: str | None = None,
                 fused_head: bool | None = None) -> None:
        check_model(model)
        device, dtype = model.device, model.dtype
        self.model, self.max_len, self.compiled = model, max_len, compile
        # the hand-fused head for compiled one-token float steps: True / False, or None to time both heads here
        float_head = compile and type(model.lm_head) is nn.Linear
        self.fused_head = float_head and (fused_head_pays(model.lm_head) if fused_head is None else fused_head)
        self.cache = KVCache.allocate(model.config, max_len, dtype=dtype, device=device)
        slots = torch.arange(max_len, device=device)  # (L,)
        self.rope = {lt: rope_cos_sin(model.config, lt, slots, dtype) for lt in set(layer_types(model.config))}
        self._run = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode) if compile else self._step

    @torch.no_grad()
    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (1, t) at positions pos (t,) -> logits (1, t, V); writes their K/V into the cache."""
        model = self.model
        ctx = static_context(model.config, pos, self.max_len, self.rope)
        x = model.model.embed_tokens(tokens)  # (1, t, D)
        for i, (layer, layer_type) in enumerate(zip(decoder_layers(model), layer_types(model.config))):
            x = decoder_layer(layer, x, ctx, layer_type, self.cache, i)
        x = model.model.norm(x)  # (1, t, D)
        if self.fused_head and x.shape[1] == 1:
            return softcap_logits(model, matvec_head(model.lm_head, x))  # (1, 1, V)
        return final_logits(model, x)  # (1, t, V)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Run `tokens` after the cache's valid ones; returns logits (t, V) and advances the cache by t."""
        start = self.cache.length
        if start + len(tokens) > self.max_len:
            raise ValueError(f"StaticDecoder holds {self.max_len} tokens; {start} are used and {len(tokens)} more "
                             "were asked for. Build it with a larger max_len.")
        device = self.cache.keys[0].device
        ids = torch.tensor([tokens], device=device)  # (1, t)
        pos = torch.arange(start, start + len(tokens), device=device)  # (t,)
        with torch.no_grad():  # one grad mode for every caller: dynamo guards on it, and would compile again
            logits = self._run(ids, pos)[0]  # (t, V)
        self.cache.advance(len(tokens))
        return logits

    @torch.no_grad()
    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Empty the cache and run the prompt (1, p) in one eager pass; returns the last position's logits (V,)."""
        dec.check_prompt(prompt_ids, 1)
        if prompt_ids.shape[1] >= self.max_len:
            raise ValueError(f"The prompt has {prompt_ids.shape[1]} tokens and the cache {self.max_len} slots; build "
                             "the StaticDecoder with max_len > prompt length + new tokens.")
        self.cache.crop(0)
        return dec.forward(self.model, prompt_ids, self.cache, last_only=True)[0, -1]

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int,
                 stop_token_id: int | None = None) -> dec.Generation:
        """Greedy decoding: one prefill, then one `step` per token (compiled or not)."""
        dec.check_prompt(prompt_ids, max_new_tokens)
        start = time.perf_counter()
        logits = self.prefill(prompt_ids)  # (V,)
        tokens, times = [], []
        while True:
            tokens.append(int(logits.argmax()))
            times.append(time.perf_counter() - start)
            if dec.stopped(tokens[-1], stop_token_id) or len(tokens) == max_new_tokens:
                return dec.Generation(tokens, times)
            logits = self.step(tokens[-1:])[-1]  # (V,)


def matvec_head(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The head's logits for one token, x (1, 1, D) -> (1, 1, V), written as multiply-and-sum over the (V, D) weight.

    The same numbers as `head(x)` (up to the order of the sums). Eagerly it would build a (V, D) temporary, so only
    compiled steps use it: inductor turns it into one vectorized loop that streams the weight once, where the BLAS
    matrix-vector product of some CPUs runs well below the memory bandwidth (notebook 10 measures both).
    """
    logits = (head.weight * x[:, :, None, :].to(head.weight.dtype)).sum(-1)  # (1, 1, V, D) summed over D
    return logits if head.bias is None else logits + head.bias


_HEAD_CHOICES: dict[tuple, bool] = {}


def fused_head_pays(head: nn.Linear, repeats: int = 10) -> bool:
    """True when the compiled `matvec_head` computes one token's logits faster than `head(x)` (BLAS) here: the
    best of `repeats` calls of each. Which one wins is the CPU's (on a 2-core AMD EPYC the BLAS matrix-vector
    product read the 640 MiB head at 11 GB/s and the fused loop at 29; on a 2-core Intel Xeon with AMX, BLAS 34 GB/s
    and the fused loop 26), so it is measured, once per head shape, dtype, device and thread count."""
    weight = head.weight
    key = (tuple(weight.shape), weight.dtype, weight.device, torch.get_num_threads())
    if key not in _HEAD_CHOICES:
        x = torch.randn(1, 1, weight.shape[1], dtype=weight.dtype, device=weight.device)  # (1, 1, D)
        fused = torch.compile(matvec_head, fullgraph=True, dynamic=False)
        with torch.no_grad():
            blas_s = time_function(lambda: head(x), warmup=2, repeats=repeats, device=weight.device).min_s
            fused_s = time_function(lambda: fused(head, x), warmup=2, repeats=repeats, device=weight.device).min_s
        _HEAD_CHOICES[key] = fused_s < blas_s
    return _HEAD_CHOICES[key]


# ---------------------------------------------------------------- what compilation changes


@dataclass
class OpCount:
    """Operators one decode step dispatches (profiler), split into aten operators and compiled graphs."""

    aten_ops: int
    compiled_graphs: int


def ops_per_step(decoder: StaticDecoder, token: int, steps: int = 3) -> OpCount:
    """Count what `steps` single-token steps dispatch (top-level profiler events), per step. The cache must
    have room; the steps are rolled back afterwards."""
    from torch.profiler import ProfilerActivity, profile

    length = decoder.cache.length
    decoder.step([token])  # warm: a first compiled call may still be compiling
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decoder.step([token])
    decoder.cache.crop(length)
    aten = sum(e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
               for e in prof.events())  # dispatched from Python or from compiled code, not nested in an operator
    graphs = sum(e.name.startswith("## Call CompiledFxGraph") for e in prof.events())
    return OpCount(round(aten / steps), round(graphs / steps))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the block."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def graph_breaks(decoder: StaticDecoder, token: int) -> tuple[int, int]:
    """(graphs, graph breaks) `torch._dynamo.explain` finds in one step of the decoder's eager step function."""
    import torch._dynamo

    length = decoder.cache.length
    device = decoder.cache.keys[0].device
    ids, pos = torch.tensor([[token]], device=device), torch.tensor([length], device=device)
    explanation = torch._dynamo.explain(decoder._step)(ids, pos)
    decoder.cache.crop(length)
    return explanation.graph_count, explanation.graph_break_count
