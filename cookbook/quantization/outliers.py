"""Activation outliers: LLM.int8 (outlier input columns kept in float) and SmoothQuant (difficulty moved from
activations to weights), with the per-tensor activation ranges they calibrate on."""

from __future__ import annotations

import torch
from torch import nn

from ..core import decoder_linears
from .formats import int8_rowwise


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices of input features (columns of x (n, in)) whose magnitude reaches `threshold` anywhere."""
    return torch.nonzero(x.abs().amax(dim=0) >= threshold).flatten()


class Int8MixedLinear(nn.Module):
    """LLM.int8 (Dettmers et al. 2022): int8 weights (one scale per output row); at run time the input
    columns holding outliers (|x| > threshold) are multiplied in floating point, all the others as
    int8 x int8 with per-token and per-row scales. With threshold=inf it is plain W8A8 (vector-wise)."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        self.threshold = threshold
        codes, scale = int8_rowwise(linear.weight.detach().float())  # (out, in), (out, 1)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.half())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.last_outlier_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (tokens, in)
        w = self.weight_codes.float()  # (out, in) integer values
        w_scale = self.weight_scale.float()  # (out, 1)
        cols = outlier_columns(x2, self.threshold)
        self.last_outlier_count = cols.numel()
        regular = x2.clone()
        regular[:, cols] = 0.0
        xq, x_scale = int8_rowwise(regular)  # (tokens, in) int8, (tokens, 1)
        # int8 x int8 -> int32 in the library; here in float32, exact while sums stay below 2**24
        y = (xq.float() @ w.T) * x_scale * w_scale.T  # (tokens, out)
        if cols.numel():
            y = y + x2[:, cols] @ (w[:, cols] * w_scale).T  # the outlier part in floating point
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s = max|X_j|^alpha / max|W_j|^(1-alpha): (in,).
    Dividing X by s and multiplying W by s leaves X W^T unchanged but moves difficulty to the weights."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # (in,)
    return (act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


class W8A8Linear(nn.Module):
    """int8 weights (per output row) and int8 activations with ONE static scale per tensor, calibrated
    from `act_absmax` (the SmoothQuant 'O3' setting, the fastest and the hardest). With `smooth` the
    input is divided by the smoothing factor, which is folded into the weight before quantizing."""

    def __init__(self, linear: nn.Linear, act_absmax: torch.Tensor, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        if smooth is not None:
            w = w * smooth  # (out, in) W * s
            act_absmax = act_absmax / smooth
        codes, scale = int8_rowwise(w)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale.half())
        self.register_buffer("act_scale", (act_absmax.max().clamp(min=1e-8) / 127).reshape(1))
        self.register_buffer("smooth", None if smooth is None else smooth.float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.float()
        if self.smooth is not None:
            x2 = x2 / self.smooth  # in a deployed model this division is folded into the previous norm
        xq = torch.round(x2 / self.act_scale).clamp(-127, 127)  # (..., in) int8 values
        y = (xq @ self.weight_codes.float().T) * self.act_scale * self.weight_scale.float().T  # (..., out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


@torch.no_grad()
def activation_absmax(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by every decoder linear on `input_ids`: name -> (in,)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, args, _o):
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()  # (in,)
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in decoder_linears(model).items()]
    try:  # the decoder stack only: the lm_head's logits (n, t, 262144) would cost 1 GiB per 1024 tokens
        model.model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats
