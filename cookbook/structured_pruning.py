"""Structured pruning from scratch: remove whole MLP channels, attention heads or decoder layers and rebuild smaller
`nn.Linear` modules, so the parameter count, bytes and latency really drop (unlike the masks of `cookbook.pruning`,
which keep the shapes); then a short recovery fine-tune.

Scores (lower = removed first), from calibration input norms ||X_j||_2 of the layer that reads the removed rows:
- an MLP channel c: ||X_c|| * ||W_down[:, c]||  (down_proj's input norm and column)
- an attention head: the same over the head's slice of o_proj's input
- a decoder layer: 1 - cos(input, output) of the layer on calibration text (ShortGPT's block influence)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .core import capture_layer_inputs, decoder_layers, layer_types, linear_key, run_layer
from .core.layout import set_layers
from .core.train import adamw_loop
from .pruning import check_sparsity


@torch.no_grad()
def shrink_linear(linear: nn.Linear, keep_out: torch.Tensor | None = None,
                  keep_in: torch.Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear holding only the kept output rows and/or input columns."""
    w = linear.weight  # (out, in)
    if keep_out is not None:
        w = w[keep_out]  # (out', in)
    if keep_in is not None:
        w = w[:, keep_in]  # (out', in')
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if keep_out is None else linear.bias[keep_out])
    return new


def _keep_indices(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the `n_keep` highest scores, in their original order."""
    return torch.topk(scores, n_keep).indices.sort().values


def mlp_channel_scores(down_input_norm: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """Importance of each MLP hidden channel j: ||a_j|| * ||W_down[:, j]||  ((inter,), (d, inter) -> (inter,))."""
    return down_input_norm.float() * down_weight.float().norm(dim=0)


def head_scores(o_input_norm: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Importance of each query head: the norm of its contribution through o_proj, (heads,)."""
    per_dim = o_input_norm.float() * o_weight.float().norm(dim=0)  # (heads * head_dim,)
    return per_dim.reshape(-1, head_dim).norm(dim=1)  # (heads,)


@torch.no_grad()
def prune_mlp_channels(model: nn.Module, input_norms: dict[str, torch.Tensor], fraction: float) -> int:
    """Remove the same `fraction` of MLP hidden channels in every layer, lowest importance first.

    Rebuilds gate/up (fewer rows) and down (fewer columns). Returns the new intermediate size.
    """
    check_sparsity(fraction)
    new_size = None
    for i, block in enumerate(decoder_layers(model)):
        mlp = block.mlp
        inter = mlp.down_proj.in_features
        n_keep = inter - round(fraction * inter)
        scores = mlp_channel_scores(_norm_for(input_norms, linear_key(i, "mlp.down_proj"), inter), mlp.down_proj.weight)
        keep = _keep_indices(scores, n_keep)  # (n_keep,)
        mlp.gate_proj = shrink_linear(mlp.gate_proj, keep_out=keep)
        mlp.up_proj = shrink_linear(mlp.up_proj, keep_out=keep)
        mlp.down_proj = shrink_linear(mlp.down_proj, keep_in=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_keep
        new_size = n_keep
    model.config.intermediate_size = new_size
    return new_size


@torch.no_grad()
def prune_heads(model: nn.Module, input_norms: dict[str, torch.Tensor], n_remove: int) -> int:
    """Remove the `n_remove` least important query heads of every layer (key/value heads are kept).

    Gemma 3 270M has 4 query heads sharing 1 KV head, so this is coarse: one head is 25% of the
    attention's q/o weights. Returns the number of query heads left per layer.
    """
    blocks = decoder_layers(model)
    attn0 = blocks[0].self_attn
    n_heads = attn0.q_proj.out_features // attn0.head_dim
    n_kv = attn0.k_proj.out_features // attn0.head_dim
    if not isinstance(n_remove, int) or not 0 <= n_remove < n_heads:
        raise ValueError(f"n_remove must be an integer in [0, {n_heads}) (the model has {n_heads} query heads).")
    n_keep = n_heads - n_remove
    if n_keep % n_kv:
        raise ValueError(f"{n_keep} query heads cannot be shared evenly by {n_kv} key/value heads.")
    for i, block in enumerate(blocks):
        attn = block.self_attn
        hd = attn.head_dim
        norm = _norm_for(input_norms, linear_key(i, "self_attn.o_proj"), attn.o_proj.in_features)
        heads = _keep_indices(head_scores(norm, attn.o_proj.weight, hd), n_keep)  # (n_keep,)
        dims = (heads.unsqueeze(1) * hd + torch.arange(hd)).flatten()  # (n_keep * hd,)
        attn.q_proj = shrink_linear(attn.q_proj, keep_out=dims)
        attn.o_proj = shrink_linear(attn.o_proj, keep_in=dims)
        attn.num_key_value_groups = n_keep // n_kv  # GQA repeat factor used by eager and SDPA attention
    model.config.num_attention_heads = n_keep
    return n_keep


def _norm_for(input_norms: dict[str, torch.Tensor], name: str, width: int) -> torch.Tensor:
    if name not in input_norms or input_norms[name].shape != (width,):
        raise ValueError(f"No calibration norm of width {width} for {name}: run collect_input_norms on this "
                         "model (after any earlier structured pruning) first.")
    return input_norms[name]


@torch.no_grad()
def layer_scores(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Block influence of each decoder layer: 1 - cos(input, output), averaged over tokens: (layers,).

    A layer whose output is nearly its input changes little and is the cheapest to drop (ShortGPT).
    """
    inputs = capture_layer_inputs(model, input_ids)
    hidden = inputs.hidden  # (n, t, d)
    scores = []
    for block, kw in zip(decoder_layers(model), inputs.kwargs):
        out = run_layer(block, hidden, kw)  # (n, t, d)
        scores.append(1 - F.cosine_similarity(hidden.float(), out.float(), dim=-1).mean())
        hidden = out
    return torch.stack(scores).cpu()


@torch.no_grad()
def drop_layers(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Remove whole decoder layers and renumber the rest (config, KV-cache indices). Returns the kept ones."""
    blocks = decoder_layers(model)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 <= i < len(blocks) for i in drop):
        raise ValueError(f"Layer indices must lie in [0, {len(blocks)}), got {drop}.")
    if len(drop) >= len(blocks):
        raise ValueError("Cannot drop every decoder layer; keep at least one.")
    kept = [i for i in range(len(blocks)) if i not in drop]
    set_layers(model, [blocks[i] for i in kept], [layer_types(model.config)[i] for i in kept])
    return kept


# ---------------------------------------------------------------- recovery fine-tune


def recovery_finetune(model: nn.Module, train_ids: torch.Tensor, steps: int = 20, batch_size: int = 2,
                      lr: float = 1e-4, train: Callable[[str], bool] | None = None) -> list[float]:
    """A short next-token fine-tune on the rows of `train_ids` (N, t); returns the loss of every step.

    Step s uses rows [s * batch_size, (s + 1) * batch_size) modulo N. Only parameters whose name passes
    `train` are updated (default: the decoder's MLP weights), which keeps AdamW's state small; the tied
    embedding always stays frozen.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("recovery_finetune needs steps >= 1 and batch_size >= 1.")
    if train_ids.dim() != 2 or train_ids.shape[1] < 2:
        raise ValueError(f"train_ids must be (rows, seq_len >= 2) token ids, got shape {tuple(train_ids.shape)}.")
    train = train or (lambda name: ".mlp." in name)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(train(name) and "embed" not in name)
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError("The `train` filter selected no parameters.")

    def step_loss(step: int) -> torch.Tensor:
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % train_ids.shape[0]
        ids = train_ids[rows].to(model.device)  # (b, t)
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    model.train()
    try:
        losses, _ = adamw_loop(params, step_loss, steps, lr, clip=1.0)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return losses
