"""Mixture of experts from scratch: top-k routing, capacity, load balancing, and sparse upcycling.

An MoE feed-forward layer holds E expert MLPs and a router, a Linear (d -> E). Each token's router
logits go through a softmax; the token is sent to its top-k experts, and their outputs are mixed
with the top-k probabilities, renormalised to sum to 1 (Mixtral) or left as they are (Switch, k=1):

    p = softmax(x W_r^T)            (n, E)
    y = sum_{e in topk(p)} w_e * expert_e(x),   w = p[topk] / sum p[topk]

Only k of the E experts run per token: parameters grow with E, compute per token with k.

Capacity (Switch, GShard): each expert takes at most C = ceil(capacity_factor * n * k / E) of the
n * k assignments of a batch (fixed-size buffers on accelerators); the rest are dropped and the token
passes through the block's residual connection alone (the MoE adds 0 for it).

Two auxiliary losses keep routing healthy:
- load balancing (Switch, eq. 4): E * sum_e f_e * P_e, with f_e the fraction of assignments sent to
  expert e and P_e the mean router probability of e. It equals 1 when routing is uniform;
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, which keeps logits small.

Sparse upcycling (Komatsuzaki et al., 2022) turns a trained dense MLP into E experts that start as
copies of it (plus optional noise): with identical experts and renormalised weights, the upcycled
model computes exactly the dense function, whatever the router does.

Dispatch sorts the kept assignments by expert and runs each expert once on its contiguous slice
(the CPU/GPU-friendly form of a grouped GEMM): a loop over experts, never over tokens.
`mixtral_block_from` and `qwen3_moe_block_from` copy a layer into transformers' own MoE blocks to
cross-check it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .core import decoder_layers
from .errors import require_module

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")

# ---------------------------------------------------------------- argument checks


def check_moe_args(num_experts: int, top_k: int, capacity_factor: float | None = None) -> None:
    """Raise a ValueError that says what to choose for a bad E, k or capacity factor."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (each token goes to at least one expert), got {top_k!r}.")
    if top_k > num_experts:
        raise ValueError(
            f"top_k={top_k} > num_experts={num_experts}: a token cannot go to more experts than exist; "
            f"choose top_k <= {num_experts}."
        )
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0 (1.0 = exactly the average load, 1.25 is common), "
            f"or None for no capacity limit; got {capacity_factor!r}."
        )


# ---------------------------------------------------------------- routing


@dataclass
class Routing:
    """What the router decided for n tokens."""

    logits: torch.Tensor  # (n, E) router logits
    probs: torch.Tensor  # (n, E) softmax of the logits, float32
    weights: torch.Tensor  # (n, k) combine weights of the chosen experts, float32
    experts: torch.Tensor  # (n, k) chosen expert ids, best first


def route(logits: torch.Tensor, top_k: int, normalize: bool = True) -> Routing:
    """Softmax over experts, then top-k; `normalize` rescales the k weights to sum to 1 (Mixtral).

    With normalize=False the weights are the raw probabilities (Switch, Qwen3-MoE's default): they sum
    to less than 1, and identical experts then do not reproduce the dense output.
    """
    check_moe_args(logits.shape[-1], top_k)
    probs = F.softmax(logits.float(), dim=-1)  # (n, E), float32 for a stable softmax
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (n, k), (n, k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, weights, experts)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per expert: ceil(capacity_factor * n * k / E), or n (nothing can drop) when the factor is None."""
    check_moe_args(num_experts, top_k, capacity_factor)
    if capacity_factor is None:
        return num_tokens  # top-k picks distinct experts, so an expert gets at most one assignment per token
    return min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def queue_positions(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each assignment's place in its expert's queue: (n, k) -> (n, k), counting from 0.

    Priority as in GShard/Switch: every token's first choice before any second choice, then token order.
    """
    n, k = experts.shape
    flat = experts.T.reshape(-1)  # (k * n,) choice-major
    onehot = F.one_hot(flat, num_experts)  # (k * n, E)
    position = (onehot.cumsum(dim=0) - 1).gather(1, flat[:, None]).squeeze(1)  # (k * n,)
    return position.reshape(k, n).T  # (n, k)


def tokens_per_expert(experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """How many assignments each expert got: (n, k) ids [and (n, k) keep mask] -> (E,) counts."""
    ids = experts.reshape(-1) if keep is None else experts[keep]
    return torch.bincount(ids, minlength=num_experts)  # (E,)


# ---------------------------------------------------------------- auxiliary losses


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e; f_e: share of the n*k assignments, P_e: mean prob.

    probs (n, E), experts (n, k). Exactly 1 when assignments are uniform (f_e = 1/E, whatever P is); an
    expert that gets more tokens *and* more probability raises it (E when every token picks one expert
    with certainty). The gradient flows through P only (f is a count). transformers'
    `load_balancing_loss_func` returns k times this value (its f sums to k).
    """
    num_experts = probs.shape[-1]
    f = tokens_per_expert(experts, num_experts).to(probs.dtype) / experts.numel()  # (E,), sums to 1
    p_mean = probs.mean(dim=0)  # (E,), sums to 1
    return num_experts * (f * p_mean).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2, (n, E) -> scalar."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# ---------------------------------------------------------------- utilisation metrics


def load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
    counts = counts.float()
    return (counts.std(unbiased=False) / counts.mean()).item()


def load_entropy(counts: torch.Tensor) -> float:
    """Entropy of the tokens-per-expert distribution over log E: 1 = uniform, 0 = one expert takes all."""
    p = counts.float() / counts.sum()
    if len(p) < 2:
        return 1.0
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return (h / math.log(len(p))).item()


def capacity_needed(counts: torch.Tensor) -> float:
    """The smallest capacity factor that drops nothing: busiest expert's load over the mean load."""
    counts = counts.float()
    return (counts.max() / counts.mean()).item()


def drop_rate_from_counts(counts: torch.Tensor, top_k: int, capacity_factor: float | None) -> float:
    """Share of assignments a capacity factor would drop, from the routed tokens per expert (E,)."""
    total = int(counts.sum())
    capacity = expert_capacity(total // top_k, len(counts), top_k, capacity_factor)
    return ((counts - capacity).clamp(min=0).sum() / total).item()


def group_expert_shares(experts: torch.Tensor, groups: torch.Tensor, num_groups: int, num_experts: int) -> torch.Tensor:
    """Joint counts of (token group, expert) over all assignments: experts (n, k), groups (n,) -> (G, E)."""
    n, k = experts.shape
    g = groups[:, None].expand(n, k).reshape(-1)  # (n * k,)
    flat = g * num_experts + experts.reshape(-1)  # (n * k,)
    return torch.bincount(flat, minlength=num_groups * num_experts).reshape(num_groups, num_experts).float()


def normalized_mutual_information(joint: torch.Tensor) -> float:
    """I(group; expert) / H(expert) from a (G, E) table of counts: 0 = routing ignores the group."""
    p = joint / joint.sum()  # (G, E)
    pg, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)  # (G, 1), (1, E)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pg * pe).expand_as(p)[nz]).log()).sum()
    h_e = -(pe[pe > 0] * pe[pe > 0].log()).sum()
    return (mi / h_e).item() if h_e > 0 else 0.0


# ---------------------------------------------------------------- the experts and the layer


def _activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(activation):
        return activation
    transformers = require_module("transformers", purpose="looking up activation functions by name")
    try:
        return transformers.activations.ACT2FN[activation]
    except KeyError:
        raise ValueError(f"Unknown activation {activation!r}; use a transformers ACT2FN name such as 'silu' "
                         "or 'gelu_pytorch_tanh', or pass a callable.") from None


class GatedExperts(nn.Module):
    """E gated MLPs (GeGLU / SwiGLU), stored as 3D tensors: down(act(gate(x)) * up(x)) per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu_pytorch_tanh",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_moe_args(num_experts, 1)
        kw = {"dtype": dtype, "device": device}
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **kw))  # (E, f, d)
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **kw))  # (E, f, d)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))  # (E, d, f)
        self.act_fn = _activation(activation)
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: (m, d) -> (m, d)."""
        h = self.act_fn(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e])  # (m, f)
        return F.linear(h, self.down_proj[e])  # (m, d)

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Tokens sorted by expert, `counts[e]` rows for expert e: (m, d) -> (m, d)."""
        outputs = [self.expert(e, chunk) for e, chunk in enumerate(x.split(list(counts))) if len(chunk)]
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.hidden_size)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d={self.hidden_size}, f={self.intermediate_size}"


@dataclass
class MoEStats:
    """The routing of the last forward pass (detached), for histograms and drop rates."""

    experts: torch.Tensor  # (n, k) chosen experts
    keep: torch.Tensor  # (n, k) True where the assignment fit in its expert's capacity
    capacity: int
    num_experts: int

    @property
    def routed(self) -> torch.Tensor:
        """Assignments per expert before the capacity cut: (E,)."""
        return tokens_per_expert(self.experts, self.num_experts)

    @property
    def kept(self) -> torch.Tensor:
        """Assignments per expert that were computed: (E,)."""
        return tokens_per_expert(self.experts, self.num_experts, self.keep)

    @property
    def drop_rate(self) -> float:
        """Share of the n*k assignments dropped for lack of capacity."""
        return 1.0 - self.keep.float().mean().item()

    @property
    def tokens_fully_dropped(self) -> float:
        """Share of tokens whose every assignment was dropped (the MoE adds 0 for them)."""
        return (~self.keep.any(dim=1)).float().mean().item()


class MoEFeedForward(nn.Module):
    """A sparse MoE feed-forward block: router + E gated experts, top-k, optional capacity.

    forward maps (..., d) -> (..., d), so it replaces a dense MLP in place. After each call,
    `aux_loss` (load balancing) and `z_loss` hold differentiable scalars and `last` the routing.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 capacity_factor: float | None = None, normalize: bool = True,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = "gelu_pytorch_tanh",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_moe_args(num_experts, top_k, capacity_factor)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.capacity_factor, self.normalize = capacity_factor, normalize
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)  # W_r: (E, d)
        self.experts = GatedExperts(num_experts, hidden_size, intermediate_size, activation, dtype, device)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.last: MoEStats | None = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int, capacity_factor: float | None = None,
                   noise: float = 0.0, router_std: float = 0.02, normalize: bool = True,
                   generator: torch.Generator | None = None) -> MoEFeedForward:
        """Upcycle a gated MLP (gate_proj, up_proj, down_proj, act_fn): E copies of it plus a new router.

        noise: each expert weight gets noise * std(W) * N(0, 1) added (0 = exact copies).
        router_std: the router starts as N(0, router_std^2), like a freshly initialised Linear.
        """
        check_gated_mlp(mlp)
        w_gate, w_up, w_down = (getattr(mlp, n).weight for n in MLP_NAMES)  # (f, d), (f, d), (d, f)
        layer = cls(w_gate.shape[1], w_gate.shape[0], num_experts, top_k, capacity_factor, normalize,
                    activation=mlp.act_fn, dtype=w_gate.dtype, device=w_gate.device)
        with torch.no_grad():
            for param, w in zip((layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj),
                                (w_gate, w_up, w_down)):
                param.copy_(w.expand(num_experts, *w.shape))  # (E, out, in)
                if noise > 0:
                    param.add_(noise * w.std() * _randn(param.shape, generator, w))
            layer.router.weight.copy_(router_std * _randn(layer.router.weight.shape, generator, w_gate))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoEFeedForward expects hidden size {self.hidden_size} in the last dimension, "
                             f"got input of shape {tuple(x.shape)}.")
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)  # (n, d)
        routing = route(self.router(x), self.top_k, self.normalize)  # (n, E) logits, (n, k) choices
        capacity = expert_capacity(len(x), self.num_experts, self.top_k, self.capacity_factor)
        keep = queue_positions(routing.experts, self.num_experts) < capacity  # (n, k)
        out = self.combine(x, routing, keep)  # (n, d)
        self.aux_loss = load_balancing_loss(routing.probs, routing.experts)
        self.z_loss = router_z_loss(routing.logits)
        self.last = MoEStats(routing.experts.detach(), keep, capacity, self.num_experts)
        return out.reshape(shape)

    def combine(self, x: torch.Tensor, routing: Routing, keep: torch.Tensor) -> torch.Tensor:
        """Gather the kept assignments by expert, run each expert once, scatter-add the weighted outputs."""
        n, k = routing.experts.shape
        token = torch.arange(n, device=x.device).repeat_interleave(k)  # (n * k,) token of each assignment
        expert, weight = routing.experts.reshape(-1), routing.weights.reshape(-1)  # (n * k,), (n * k,)
        kept = keep.reshape(-1).nonzero().squeeze(1)  # (m,) assignments that fit
        order = kept[torch.argsort(expert[kept], stable=True)]  # (m,) sorted by expert
        counts = torch.bincount(expert[order], minlength=self.num_experts)  # (E,)
        y = self.experts(x[token[order]], counts.tolist())  # (m, d)
        y = y * weight[order, None].to(y.dtype)  # (m, d)
        return torch.zeros_like(x).index_add_(0, token[order], y)  # (n, d); dropped tokens stay 0

    def inactive_parameters(self) -> int:
        """Expert parameters a token does not use: (E - k) of the E experts."""
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        return (self.num_experts - self.top_k) * per_expert

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"normalize={self.normalize}")


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (reproducible everywhere), then moved next to `like`."""
    return torch.randn(tuple(shape), generator=generator).to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------- upcycling a real model


def check_gated_mlp(mlp: nn.Module) -> None:
    """Raise a TypeError unless `mlp` is a gated MLP: Linear gate_proj, up_proj, down_proj and an act_fn."""
    missing = [n for n in MLP_NAMES if not isinstance(getattr(mlp, n, None), nn.Linear)]
    if missing or not callable(getattr(mlp, "act_fn", None)):
        raise TypeError(
            f"Upcycling needs gated MLPs with Linear {', '.join(MLP_NAMES)} and an act_fn (Gemma, Llama, Qwen, "
            f"Mistral); {type(mlp).__name__} lacks {', '.join(missing) or 'act_fn'}. For other MLPs, build "
            "MoEFeedForward directly."
        )
    if any(getattr(mlp, n).bias is not None for n in MLP_NAMES):
        raise TypeError(f"{type(mlp).__name__} has biased projections; the experts here have none.")


def upcycle_mlps(model: nn.Module, num_experts: int, top_k: int, layers: Iterable[int] | None = None,
                 noise: float = 0.0, seed: int = 0, capacity_factor: float | None = None,
                 router_std: float = 0.02, normalize: bool = True) -> nn.Module:
    """Replace the dense MLP of each chosen decoder layer (default all) by an upcycled MoEFeedForward, in place.

    With noise=0 and normalize=True the model's outputs are unchanged (up to float rounding). Returns the model.
    """
    check_moe_args(num_experts, top_k, capacity_factor)
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else list(layers)
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"Layer index {i} out of range: the model has {len(blocks)} decoder layers.")
        check_gated_mlp(blocks[i].mlp)
    generator = torch.Generator().manual_seed(seed)
    for i in chosen:
        blocks[i].mlp = MoEFeedForward.from_dense(blocks[i].mlp, num_experts, top_k, capacity_factor, noise,
                                                  router_std, normalize, generator)
    return model


def moe_layers(model: nn.Module) -> dict[str, MoEFeedForward]:
    """Every MoEFeedForward in the model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}


def auxiliary_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean load-balancing loss and mean z-loss over the model's MoE layers, from the last forward pass."""
    layers = [m for m in moe_layers(model).values() if m.aux_loss is not None]
    if not layers:
        raise ValueError("No MoE layer has run a forward pass yet: call the model first (or upcycle_mlps it).")
    aux = torch.stack([m.aux_loss for m in layers]).mean()
    z = torch.stack([m.z_loss for m in layers]).mean()
    return aux, z


def set_capacity_factor(model: nn.Module, capacity_factor: float | None) -> None:
    """Set the capacity factor of every MoE layer (None = no limit)."""
    for m in moe_layers(model).values():
        check_moe_args(m.num_experts, m.top_k, capacity_factor)
        m.capacity_factor = capacity_factor


# ---------------------------------------------------------------- parameters and FLOPs, counted from shapes


def moe_parameter_counts(config, num_experts: int, top_k: int, layers: Iterable[int] | None = None) -> dict[str, int]:
    """Total and per-token-active parameters of a Gemma/Llama-style config with the chosen layers' MLPs upcycled.

    Counted from shapes, so a model never needs to be built: dense MLP 3 d f; MoE layer E * 3 d f + E d (router),
    of which k * 3 d f + E d are used per token. The embedding (tied LM head) is counted once.
    """
    check_moe_args(num_experts, top_k)
    d, f, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    moe = set(range(n_layers) if layers is None else layers)
    mlp = 3 * d * f
    dense_total = _dense_parameters(config)
    total = dense_total + len(moe) * ((num_experts - 1) * mlp + num_experts * d)
    active = total - len(moe) * (num_experts - top_k) * mlp
    return {"dense": dense_total, "total": total, "active": active}


def _dense_parameters(config) -> int:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention = d * q + 2 * d * kv + q * d
    norms = _norms_per_layer(config) * d + (2 * hd if getattr(config, "model_type", "").startswith("gemma3") else 0)
    embed = v * d * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    return embed + config.num_hidden_layers * (attention + 3 * d * f + norms) + d  # + final norm


def _norms_per_layer(config) -> int:
    return 4 if getattr(config, "model_type", "").startswith("gemma") else 2


def flops_per_token(config, num_experts: int = 1, top_k: int = 1, layers: Iterable[int] | None = None,
                    context: int = 0) -> dict[str, int]:
    """Forward FLOPs per token (2 per multiply-add) of the weight matmuls, split into parts, from shapes.

    MoE layers (all layers if `layers` is None, none when num_experts == 1) run k experts and the router;
    `context` > 0 adds attention scores and weighted values over that many previous tokens.
    """
    check_moe_args(num_experts, top_k)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    n_layers = config.num_hidden_layers
    moe = set() if num_experts == 1 else set(range(n_layers) if layers is None else layers)
    attention = n_layers * 2 * (d * q + 2 * d * kv + q * d + 2 * context * q)
    mlp = 2 * 3 * d * f * ((n_layers - len(moe)) + top_k * len(moe))
    router = 2 * d * num_experts * len(moe)
    head = 2 * d * v
    return {"attention": attention, "mlp": mlp, "router": router, "lm_head": head,
            "total": attention + mlp + router + head}


# ---------------------------------------------------------------- cross-checks against transformers


def mixtral_block_from(layer: MoEFeedForward, hidden_act: str):
    """transformers' MixtralSparseMoeBlock holding this layer's weights (fused gate_up 3D experts).

    Mixtral renormalises the top-k weights and has no capacity limit, so compare with capacity_factor=None.
    """
    transformers = require_module("transformers", purpose="the Mixtral cross-check")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if not layer.normalize:
        raise ValueError("Mixtral renormalises the top-k weights: build the layer with normalize=True.")
    config = transformers.MixtralConfig(
        hidden_size=layer.hidden_size, intermediate_size=layer.experts.intermediate_size,
        num_local_experts=layer.num_experts, num_experts_per_tok=layer.top_k, hidden_act=hidden_act,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = "eager"  # the reference loop over experts, no fused kernels
    block = MixtralSparseMoeBlock(config).to(layer.router.weight.device, layer.router.weight.dtype).eval()
    _copy_into_hf_block(layer, block)
    return block


def qwen3_moe_block_from(layer: MoEFeedForward, hidden_act: str):
    """transformers' Qwen3MoeSparseMoeBlock with this layer's weights; norm_topk_prob follows `layer.normalize`."""
    transformers = require_module("transformers", purpose="the Qwen3-MoE cross-check")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(
        hidden_size=layer.hidden_size, moe_intermediate_size=layer.experts.intermediate_size,
        num_experts=layer.num_experts, num_experts_per_tok=layer.top_k, hidden_act=hidden_act,
        norm_topk_prob=layer.normalize,
    )
    config._experts_implementation = "eager"
    block = Qwen3MoeSparseMoeBlock(config).to(layer.router.weight.device, layer.router.weight.dtype).eval()
    _copy_into_hf_block(layer, block)
    return block


def _copy_into_hf_block(layer: MoEFeedForward, block: nn.Module) -> None:
    """transformers v5 stores experts fused: gate_up_proj (E, 2f, d) = [gate; up], down_proj (E, d, f)."""
    experts = block.experts
    if tuple(experts.gate_up_proj.shape) != (layer.num_experts, 2 * layer.experts.intermediate_size, layer.hidden_size):
        shape = tuple(experts.gate_up_proj.shape)
        raise ValueError(f"Unexpected fused expert shape {shape} in {type(block).__name__}.")
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)  # (E, d)
        experts.gate_up_proj.copy_(torch.cat([layer.experts.gate_proj, layer.experts.up_proj], dim=1))  # (E, 2f, d)
        experts.down_proj.copy_(layer.experts.down_proj)  # (E, d, f)
