"""The cost model: parameters, per-device memory for parameters, gradients and optimizer states, bytes
communicated and compute per device, for a `ModelShape` given as config numbers (Gemma 3 270M, Llama-2 7B
and 70B)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .sharding import STRATEGIES, check_divisible, ring_wire_bytes

# ---------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its cost (no weights needed)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True
    gated_mlp: bool = True
    norms_per_layer: int = 2  # RMSNorm vectors of size `hidden` per layer
    qk_norm: bool = False  # per-head RMSNorm on queries and keys (Gemma 3)

    @classmethod
    def from_config(cls, config, name: str = "") -> ModelShape:
        return cls(name or getattr(config, "model_type", "model"), config.num_hidden_layers, config.hidden_size,
                   config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", True)), True,
                   4 if config.model_type.startswith("gemma3") else 2,
                   config.model_type.startswith("gemma3"))

    def attention_params(self) -> dict[str, int]:
        d, hd = self.hidden, self.head_dim
        return {"q": d * self.heads * hd, "k": d * self.kv_heads * hd, "v": d * self.kv_heads * hd,
                "o": self.heads * hd * d, "qk_norm": 2 * hd if self.qk_norm else 0}

    def mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    def layer_params(self) -> int:
        return sum(self.attention_params().values()) + self.mlp_params() + self.norms_per_layer * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden  # + final norm

    def tp_layer_params(self, tp: int) -> int:
        """Parameters of one layer on one rank under tensor parallelism of degree `tp`: query heads, o_proj
        and the MLP split; KV heads split while tp <= kv_heads, else replicated (each rank keeps a full copy)."""
        check_divisible(self.heads, tp, f"{self.name}: the number of attention heads")
        check_divisible(self.intermediate, tp, f"{self.name}: the MLP intermediate size")
        a = self.attention_params()
        kv = (a["k"] + a["v"]) // min(tp, self.kv_heads)
        return (a["q"] + a["o"] + self.mlp_params()) // tp + kv + a["qk_norm"] + self.norms_per_layer * self.hidden


# Config numbers of public models (from their config.json), for projections only: nothing is downloaded.
GEMMA3_270M = ModelShape("Gemma 3 270M", 18, 640, 2048, 4, 1, 256, 262144, True, True, 4, True)
LLAMA2_7B = ModelShape("Llama-2 7B", 32, 4096, 11008, 32, 32, 128, 32000, False)
LLAMA2_70B = ModelShape("Llama-2 70B", 80, 8192, 28672, 64, 8, 128, 32000, False)


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter for weights, gradients and optimizer states. Default: fp32 + Adam (2 moments)."""

    param: int = 4
    grad: int = 4
    optimizer: int = 8
    activation: int = 4

    @property
    def per_param(self) -> int:
        return self.param + self.grad + self.optimizer


FP32_ADAM = Precision()
MIXED_BF16_ADAM = Precision(param=2, grad=2, optimizer=12, activation=2)  # bf16 weights/grads, fp32 master + 2 moments


def params_per_device(shape: ModelShape, strategy: str, world_size: int) -> float:
    """Parameters whose weights, gradients and optimizer states one device holds.

    single / ddp: everything (DDP replicates). fsdp (ZeRO-3): 1 / p of everything. tp: the layers as in
    `tp_layer_params`, the embedding split by vocabulary (Megatron's vocab-parallel embedding). pp: the largest
    stage, i.e. layers / p plus the embedding (and the LM head, if untied, which sits on the last stage).
    """
    p = world_size
    if strategy in ("single", "ddp"):
        return shape.params()
    if strategy == "fsdp":
        return shape.params() / p
    if strategy == "tp":
        return shape.layers * shape.tp_layer_params(p) + shape.embedding_params() / p + shape.hidden
    if strategy == "pp":
        per_stage = check_divisible(shape.layers, p, f"{shape.name}: the number of layers")
        if p == 1:
            return shape.params()
        return per_stage * shape.layer_params() + shape.vocab * shape.hidden + shape.hidden  # last stage: head, norm
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def memory_per_device(shape: ModelShape, strategy: str, world_size: int,
                      precision: Precision = FP32_ADAM) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states per device (activations are not included)."""
    n = params_per_device(shape, strategy, world_size)
    out = {"params": n * precision.param, "grads": n * precision.grad, "optimizer": n * precision.optimizer}
    out["total"] = sum(out.values())
    return out


def comm_bytes_per_device(shape: ModelShape, strategy: str, world_size: int, tokens: int,
                          precision: Precision = FP32_ADAM, num_microbatches: int = 1) -> float:
    """Bytes one device sends per training step of `tokens` tokens (global batch x sequence), ring algorithms.

    ddp: one all-reduce of all gradients. fsdp: all-gather the weights for forward and again for backward,
    reduce-scatter the gradients. tp: per layer, two all-reduces of the (tokens, hidden) activations forward and
    two backward. pp: an interior stage sends the (tokens, hidden) activations forward and their gradients back.
    """
    p = world_size
    if strategy == "single" or p == 1:
        return 0.0
    grads = shape.params() * precision.grad
    if strategy == "ddp":
        return ring_wire_bytes("all_reduce", grads, p)
    if strategy == "fsdp":
        weights = shape.params() * precision.param
        return 2 * ring_wire_bytes("all_gather", weights, p) + ring_wire_bytes("reduce_scatter", grads, p)
    activations = tokens * shape.hidden * precision.activation
    if strategy == "tp":
        return shape.layers * 4 * ring_wire_bytes("all_reduce", activations, p)
    if strategy == "pp":
        return (2 if p > 2 else 1) * activations
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def train_flops_per_device(shape: ModelShape, strategy: str, world_size: int, tokens: int,
                           num_microbatches: int = 1) -> float:
    """Matmul FLOPs one device spends per step (6 per parameter per token; attention scores left out), scaled
    for pipelines by the time the bubble wastes: (m + p - 1) / m."""
    p = world_size
    matmul = shape.params() - shape.embedding_params() + shape.vocab * shape.hidden  # the lookup is free
    if strategy in ("single", "ddp", "fsdp"):
        return 6 * matmul * tokens / (1 if strategy == "single" else p)
    if strategy == "tp":
        return 6 * tokens * (shape.layers * shape.tp_layer_params(p) + shape.vocab * shape.hidden / p)
    if strategy == "pp":
        stage = 6 * tokens * matmul / p
        return stage * (num_microbatches + p - 1) / num_microbatches
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")


def devices_needed(shape: ModelShape, strategy: str, device_bytes: float, sizes: Sequence[int],
                   precision: Precision = FP32_ADAM) -> int | None:
    """The smallest world size in `sizes` at which the model's states fit in `device_bytes` per device."""
    for p in sizes:
        try:
            if memory_per_device(shape, strategy, p, precision)["total"] <= device_bytes:
                return p
        except ValueError:  # this strategy cannot split the model p ways
            continue
    return None
