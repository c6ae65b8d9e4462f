"""Calibrated quantization, layer by layer: each layer's linear inputs on calibration text, the GPTQ
Hessian and its error-compensating column sweep, AWQ's activation-aware scale search, and the driver that
runs them over the decoder."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..core import LINEAR_NAMES, capture_layer_inputs, decoder_layers, linear_key, split_linear_key
from ..measure import single_thread
from .formats import (QuantizedWeight, QuantLinear, check_bits, check_group_size, fake_quantize, quant_params,
                      quantize_codes, quantize_weight, swap_modules)

# ---------------------------------------------------------------- calibration: layer by layer


@torch.no_grad()
def collect_linear_inputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict,
                          max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Run one decoder layer and record the input rows (tokens, in) of each of its linears."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in layer.named_modules():
        if name in LINEAR_NAMES:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: inputs.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = {k: torch.cat(v).float() for k, v in inputs.items()}  # name -> (n * t, in)
    if max_rows is not None:
        out = {k: v[:: max(1, v.shape[0] // max_rows)][:max_rows] for k, v in out.items()}
    return out


def hessian(x: torch.Tensor) -> torch.Tensor:
    """The layer-wise proxy Hessian of GPTQ, H = 2 X^T X / n, from inputs x (n, in): (in, in), float64.

    The product runs in float32, as in the GPTQ reference code (a float64 GEMM costs twice as much and
    buys nothing: x itself carries float32 rounding); the Cholesky factorisations then run in float64.
    """
    x = x.float()
    return ((2.0 / x.shape[0]) * (x.T @ x)).double()


def shared_hessians(xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`hessian` of each linear's inputs, computed once per distinct input: q/k/v read the same normed
    hidden states and gate/up the same MLP input, so a decoder layer needs 4 products, not 7."""
    out: dict[str, torch.Tensor] = {}
    for name, x in xs.items():
        twin = next((n for n in out if xs[n].shape == x.shape and torch.equal(xs[n], x)), None)
        out[name] = out[twin] if twin is not None else hessian(x)
    return out


# ---------------------------------------------------------------- GPTQ


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the dampened inverse Hessian (in, in), in float64, and the mask of dead
    inputs (in,) (always zero in calibration: their weights do not matter). GPTQ and SparseGPT both use it."""
    h, dead = dampened_hessian(h, damp)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def dampened_hessian(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """H (in, in) in float64 with dead inputs set to 1 on the diagonal and `damp` x its mean diagonal added
    (keeps H invertible), and the dead inputs' mask (in,)."""
    h = h.detach().double().clone()  # (in, in)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead


def obs_sweep_reference(w: torch.Tensor, h: torch.Tensor, column: Callable[[int, torch.Tensor], torch.Tensor],
                        damp: float = 0.01) -> torch.Tensor:
    """The column sweep of GPTQ and SparseGPT written out from the OBS formula: the readable reference the tests
    check both fast sweeps against. Slow on purpose (it inverts what is left of H at every column).

    Columns are fixed left to right. At column j, F = j..in-1 are the columns not fixed yet and finv is row j of
    (H_F)^-1. `column(j, W)` gives column j's new value (rounded or pruned) from the current weights W (out, in);
    the error it makes is spread over F so that the layer's output on the calibration inputs moves least:

        W[:, F] -= (W[:, j] - new) / finv[j] * finv          (this sets column j to `new`)

    The fast sweeps read every finv / sqrt(finv[j]) off ONE Cholesky factor of H^-1 and batch the updates of the
    columns beyond a block. Dead inputs (never active) are not special-cased here.
    """
    hd, _ = dampened_hessian(h, damp)  # (in, in)
    W = w.detach().double().clone()  # (out, in)
    for j in range(W.shape[1]):
        finv = torch.linalg.inv(hd[j:, j:])[0]  # (in - j,) row j of (H_F)^-1
        new = column(j, W).double()  # (out,)
        W[:, j:] -= ((W[:, j] - new) / finv[0])[:, None] * finv[None, :]  # (out, in - j)
        W[:, j] = new  # what the update gives up to rounding: a pruned weight must be an exact zero
    return W


def act_order(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's "act-order": the input columns by decreasing Hessian diagonal (in,), i.e. by how much
    activation energy each input carries. Quantizing those first leaves the most columns to absorb
    their rounding error; the order depends only on h, so weights that share a Hessian share it."""
    return torch.argsort(torch.diag(h), descending=True, stable=True)


GPTQ_ORDERS = ("act", "input")


def check_gptq_order(gptq_order: str) -> None:
    if gptq_order not in GPTQ_ORDERS:
        raise ValueError(f"gptq_order must be one of {GPTQ_ORDERS}, got {gptq_order!r}.")


def ordered_factor(h: torch.Tensor, order: torch.Tensor | None,
                   damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """`inverse_hessian_factor` of h with rows and columns taken in `order` (None: as they are)."""
    return inverse_hessian_factor(h if order is None else h[order][:, order], damp)


def sweep_plan(h: torch.Tensor, gptq_order: str = "act") -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """The column order (None: input order) and inverse-Hessian factor GPTQ sweeps a weight with, computed once
    per Hessian and shared by the weights that read the same inputs (q/k/v, gate/up): `gptq_quantize`'s
    `order` and `factor`. gptq_order: 'act' (`act_order`, the default of the drivers) or 'input'."""
    check_gptq_order(gptq_order)
    order = act_order(h) if gptq_order == "act" else None
    return order, ordered_factor(h, order)


def sweep_plans(hessians: Mapping[str, torch.Tensor], gptq_order: str = "act") -> dict[int, tuple]:
    """`sweep_plan` of each distinct Hessian of `shared_hessians`' result, keyed by id(h): q/k/v and gate/up share
    one, so a decoder layer needs 4 factorisations, not 7."""
    distinct = {id(h): h for h in hessians.values()}
    return {key: sweep_plan(h, gptq_order) for key, h in distinct.items()}


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None = None,
                  symmetric: bool = False, block_size: int = 128, damp: float = 0.01,
                  factor: tuple[torch.Tensor, torch.Tensor] | None = None,
                  order: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) for one weight (out, in) given the Hessian h (in, in).

    Columns are quantized left to right; each column's rounding error is spread over the columns not
    yet quantized through the inverse Hessian (its upper Cholesky factor). Updates inside a block of
    `block_size` columns are immediate; the rest of the matrix is updated once per block ("lazy batch").
    Group scales are computed from the already-updated weights when a group starts.

    `order` (in,), e.g. `act_order(h)`, sweeps the columns in that order instead ("act-order" with static
    groups): the group scales are then fixed up front from the unchanged weights, so each stored group
    still holds consecutive inputs and the packed format and kernels are unchanged. `factor` must then
    come from the permuted Hessian h[order][:, order]. `factor`, from `inverse_hessian_factor(h, damp)`,
    saves the factorisation when several weights share one Hessian.
    """
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"h must have shape ({w.shape[1]}, {w.shape[1]}) for a weight {tuple(w.shape)}, "
                         f"got {tuple(h.shape)}.")
    if order is not None and not torch.equal(torch.sort(order).values, torch.arange(w.shape[1])):
        raise ValueError(f"order must be a permutation of the {w.shape[1]} input columns, e.g. act_order(h).")
    h_inv, dead = factor if factor is not None else ordered_factor(h, order, damp)
    with single_thread():  # thousands of tiny per-column ops: one thread avoids synchronisation cost
        if order is None:
            return _gptq(w, h_inv.float(), dead, bits, group_size, symmetric, block_size)
        return _gptq_act_order(w, h_inv.float(), dead, bits, group_size, symmetric, block_size, order)


def _gptq_act_order(w: torch.Tensor, h_inv: torch.Tensor, dead: torch.Tensor, bits: int, group_size: int | None,
                    symmetric: bool, block_size: int, order: torch.Tensor) -> QuantizedWeight:
    """`_gptq` on the columns taken in `order`, with static groups: scale and zero of each group of
    consecutive inputs come from the weights before the sweep, then the codes return to input order."""
    gs = check_group_size(w.shape[1], group_size)
    grouped = w.detach().float().reshape(w.shape[0], -1, gs)  # (out, in / gs, gs)
    scales, zeros = quant_params(grouped, bits, symmetric)  # (out, in / gs) each
    group_of = order // gs  # (in,) the stored group of each column in sweep order
    q = _gptq(w[:, order], h_inv, dead, bits, gs, symmetric, block_size,
              static=(scales.T[group_of], zeros.T[group_of]))  # codes in sweep order
    codes = torch.empty_like(q.codes)  # (out, in)
    codes[:, order] = q.codes
    return QuantizedWeight(codes, scales.half(), zeros.to(torch.uint8), bits, gs, symmetric)


def _gptq(w: torch.Tensor, h_inv: torch.Tensor, dead: torch.Tensor, bits: int, group_size: int | None,
          symmetric: bool, block_size: int,
          static: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedWeight:
    """The column loop of `gptq_quantize` on the transposed weight (in, out), so that column j of w is the
    contiguous row j here and each compensation is one rank-1 update (addr_): ~3x faster than on (out, in).
    `static`: a fixed (scale, zero) per column (in, out) each, instead of one per group computed in the sweep."""
    check_bits(bits)
    out, inp = w.shape
    gs = check_group_size(inp, group_size)
    if block_size % gs and gs % block_size:
        raise ValueError(f"block_size={block_size} and group_size={gs} must divide one another.")
    wt = w.detach().float().T.contiguous()  # (in, out)
    wt[dead] = 0.0
    codes = torch.zeros(inp, out, dtype=torch.uint8)  # (in, out), transposed back at the end
    scales, zeros = torch.zeros(inp // gs, out), torch.zeros(inp // gs, out)
    scale = zero = None
    for b1 in range(0, inp, block_size):
        b2 = min(b1 + block_size, inp)
        blk = wt[b1:b2].clone()  # (B, out) working copy, updated column by column
        err_blk = torch.zeros_like(blk)  # (B, out) scaled errors, for the lazy update
        hinv_blk = h_inv[b1:b2, b1:b2]  # (B, B)
        for i in range(b2 - b1):
            col = b1 + i
            if static is not None:  # act-order: this column's group was fixed before the sweep
                scale, zero = static[0][col], static[1][col]
            elif col % gs == 0:  # a new group starts: its scale comes from the weights as updated so far
                grp = torch.cat([blk[i:], wt[b2:]])[:gs]  # (gs, out)
                scale, zero = quant_params(grp.T, bits, symmetric)  # (out,)
                scales[col // gs], zeros[col // gs] = scale, zero
            q = quantize_codes(blk[i], scale, zero, bits, symmetric)  # (out,)
            codes[col] = q.to(torch.uint8)
            err = (blk[i] - (q - zero) * scale) / hinv_blk[i, i]  # (out,) the rounding error, scaled
            blk[i + 1:].addr_(hinv_blk[i, i + 1:], err, alpha=-1.0)  # (B - i - 1, out) compensate the rest
            err_blk[i] = err
        wt[b2:].addmm_(h_inv[b1:b2, b2:].T, err_blk, alpha=-1.0)  # (in - b2, out) the lazy batch update
    return QuantizedWeight(codes.T.contiguous(), scales.T.contiguous().half(), zeros.T.contiguous().to(torch.uint8),
                           bits, gs, symmetric)


# ---------------------------------------------------------------- AWQ


def awq_search_scale(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None = None,
                     symmetric: bool = False, grid: int = 10) -> tuple[torch.Tensor, float, float]:
    """AWQ (Lin et al. 2023) scale search for one linear: s = mean|x|^alpha per input channel, alpha on a
    grid in [0, 1); pick the alpha whose quantized Q(W * s) / s gives the smallest output error on x.

    w: (out, in), x: (n, in) calibration inputs. Returns (s (in,), best alpha, best mse).
    """
    w, x = w.detach().float(), x.float()
    act = x.abs().mean(dim=0).clamp(min=1e-6)  # (in,) how large each input channel is on average
    ref = x @ w.T  # (n, out)
    best = (torch.ones_like(act), 0.0, float("inf"))
    for alpha in [i / grid for i in range(grid)]:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        w_q = fake_quantize(w * s, bits, group_size, symmetric) / s  # (out, in)
        mse = (x @ w_q.T - ref).pow(2).mean().item()
        if mse < best[2]:
            best = (s, alpha, mse)
    return best


# ---------------------------------------------------------------- the layer-wise driver


@torch.no_grad()
def quantize_model_layerwise(model: nn.Module, calib_ids: torch.Tensor, method: str, bits: int,
                             group_size: int | None = 128, symmetric: bool = False,
                             layers: Iterable[int] | None = None, awq_rows: int = 1024,
                             log: Callable[[str], None] | None = None,
                             gptq_order: str = "act") -> dict[str, nn.Module]:
    """Quantize the decoder linears with 'gptq' or 'awq', one layer at a time, in place.

    Each layer sees the calibration activations produced by the layers before it, already quantized
    (as in the GPTQ paper). `gptq_order` (GPTQ only, see `sweep_plan`): 'act' sweeps each weight's columns
    by decreasing activation energy, with static groups; 'input' left to right. Returns the original
    modules, for `restore_modules`.
    """
    if method not in ("gptq", "awq"):
        raise ValueError(f"method must be 'gptq' or 'awq', got {method!r}.")
    check_gptq_order(gptq_order)
    check_bits(bits)
    decoder = decoder_layers(model)
    chosen = set(range(len(decoder)) if layers is None else layers)
    if not chosen <= set(range(len(decoder))):
        raise ValueError(f"layers must be indices in [0, {len(decoder) - 1}], got {sorted(chosen)}.")
    inputs = capture_layer_inputs(model, calib_ids)
    hidden, kwargs = inputs.hidden, inputs.kwargs  # (n, t, d), one dict per layer
    originals: dict[str, nn.Module] = {}
    for i, layer in enumerate(decoder):
        if i in chosen:
            xs = collect_linear_inputs(layer, hidden, kwargs[i], max_rows=awq_rows if method == "awq" else None)
            new = {}
            hessians = shared_hessians(xs) if method == "gptq" else {}
            plans = sweep_plans(hessians, gptq_order)
            for name, x in xs.items():
                linear = layer.get_submodule(name)
                if method == "gptq":
                    h = hessians[name]
                    order, factor = plans[id(h)]
                    qw = gptq_quantize(linear.weight, h, bits, group_size, symmetric, factor=factor, order=order)
                    new[name] = QuantLinear(qw, linear.bias)
                else:
                    s, _, _ = awq_search_scale(linear.weight, x, bits, group_size, symmetric)
                    qw = quantize_weight(linear.weight.float() * s, bits, group_size, symmetric)
                    new[name] = QuantLinear(qw, linear.bias, input_scale=s)
            prefix = f"model.layers.{i}."
            originals.update({prefix + k: v for k, v in swap_modules(layer, new).items()})
            if log:
                log(f"layer {i}: {len(new)} linears quantized with {method}")
        hidden = layer(hidden, **kwargs[i])  # (n, t, d) inputs of the next layer
    return originals


Option = tuple[int, int | None]  # (bits, group_size); group_size None = one scale per output channel


@torch.no_grad()
def gptq_options(model: nn.Module, calib_ids: torch.Tensor, wanted: Mapping[str, Sequence[Option]],
                 symmetric: bool = False, on_layer: Callable[[int], None] | None = None,
                 gptq_order: str = "act") -> dict[tuple[str, Option], QuantizedWeight]:
    """GPTQ of chosen decoder linears at one or more (bits, group_size) each; the model is not changed.

    `wanted` maps full names ("model.layers.3.mlp.up_proj") to the options to compute. Unlike
    `quantize_model_layerwise`, every layer is calibrated on the FLOAT model's activations, so each weight's
    codes depend only on its own option: a mixed-precision search can price each linear alone and combine
    any choice afterwards. One Hessian factorisation serves every option of a linear (and its q/k/v or
    gate/up siblings); `gptq_order` as in `sweep_plan`. Returns {(name, option): QuantizedWeight}.
    """
    check_gptq_order(gptq_order)
    decoder = decoder_layers(model)
    known = {linear_key(i, n) for i in range(len(decoder)) for n in LINEAR_NAMES}
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise ValueError(f"Not decoder linears of this model: {unknown[:3]}; names look like "
                         f"'model.layers.0.{LINEAR_NAMES[0]}'.")
    inputs = capture_layer_inputs(model, calib_ids)
    hidden, kwargs = inputs.hidden, inputs.kwargs  # (n, t, d), one dict per layer
    out: dict[tuple[str, Option], QuantizedWeight] = {}
    last = max((split_linear_key(n)[0] for n in wanted), default=-1)
    for i, layer in enumerate(decoder[: last + 1]):
        names = [n for n in LINEAR_NAMES if linear_key(i, n) in wanted]
        if names:
            hessians = shared_hessians(collect_linear_inputs(layer, hidden, kwargs[i]))
            plans = sweep_plans(hessians, gptq_order)
            for name in names:
                h, w, key = hessians[name], layer.get_submodule(name).weight, linear_key(i, name)
                order, factor = plans[id(h)]
                for bits, gs in wanted[key]:
                    out[key, (bits, gs)] = gptq_quantize(w, h, bits, gs, symmetric, factor=factor, order=order)
        if on_layer:
            on_layer(i)
        hidden = layer(hidden, **kwargs[i])  # (n, t, d) the float inputs of the next layer
    return out
