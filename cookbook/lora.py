"""LoRA from scratch: low-rank adapters on chosen Linear layers, merging, saving, and a small fine-tune.

LoRA (Hu et al., 2021) freezes a pretrained weight W (out, in) and learns a low-rank update
    y = x W^T + scale * (x A^T) B^T,   A: (r, in), B: (out, r), scale = alpha / r,
with B initialised to zero so the adapted model starts exactly at the base model. Only A and B
(r * (in + out) numbers per layer instead of in * out) get gradients and optimizer states.
After training, W + scale * B @ A can be merged back into one Linear: zero extra inference cost.

QLoRA (Dettmers et al., 2023) is the same adapter on a frozen base stored in 4-bit NF4: `LoRALinear`
wraps any module with `in_features`/`out_features` and a forward, e.g. the quantization track's
`NF4Linear`. Everything here is plain PyTorch; `copy_lora_to_peft` cross-checks it against `peft`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core.train import adamw_loop
from .data import data_dir

TASK_FILE = "lora_task.jsonl"

# ---------------------------------------------------------------- the adapter


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update: base(x) + scale * (x A^T) B^T."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        _check_lora_args(rank, alpha, dropout)
        in_features, out_features = _features(base)
        if rank > min(in_features, out_features):
            raise ValueError(
                f"rank={rank} is larger than the layer ({out_features} x {in_features}); "
                f"use rank <= {min(in_features, out_features)}."
            )
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        dtype, device = _float_dtype_and_device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the same init as nn.Linear and peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        out = frozen_base_forward(self.base, x)  # (..., out)
        x = self.dropout(x).to(self.lora_A.dtype)
        update = (x @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., out)
        return out + (self.scale * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to W: scale * B @ A, shape (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A: the same outputs (up to rounding), no adapter cost."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError(
                f"Cannot merge into a {type(self.base).__name__} base: merging into quantized weights would "
                "re-quantize them and lose the update. Keep the adapter separate, or dequantize the base first."
            )
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


class _DequantizeTwiceLinear(torch.autograd.Function):
    """y = x W^T for a frozen quantized layer that dequantizes W again in backward instead of saving it.

    A plain `F.linear(x, layer.dequantized_weight())` makes autograd keep every layer's dequantized
    float weight alive until backward: the full-precision model again, which QLoRA is meant to avoid.
    bitsandbytes' 4-bit matmul does the same recompute.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x: (..., in)
        ctx.layer = layer
        w = layer.dequantized_weight(x.dtype)  # (out, in), freed after this call
        bias = getattr(layer, "bias", None)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out: (..., out)
        w = ctx.layer.dequantized_weight(grad_out.dtype)  # (out, in), dequantized again
        return grad_out @ w, None  # (..., in): the frozen weight itself gets no gradient


def frozen_base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen layer's output; quantized layers (with `dequantized_weight`) go through the recompute path."""
    if hasattr(base, "dequantized_weight") and torch.is_grad_enabled() and x.requires_grad:
        return _DequantizeTwiceLinear.apply(x, base)
    return base(x)


def _features(module: nn.Module) -> tuple[int, int]:
    try:
        return int(module.in_features), int(module.out_features)
    except AttributeError:
        raise TypeError(
            f"LoRA wraps layers with in_features and out_features (nn.Linear, NF4Linear); got {type(module).__name__}."
        ) from None


def _float_dtype_and_device(module: nn.Module) -> tuple[torch.dtype, torch.device | None]:
    """The dtype and device of a layer's float weight (a quantized layer keeps float scales as buffers)."""
    tensors = [*module.parameters(), *module.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype if floats and isinstance(module, nn.Linear) else torch.float32
    return dtype, tensors[0].device if tensors else None


def _check_lora_args(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r} (the update is scaled by alpha / rank).")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")


# ---------------------------------------------------------------- putting adapters into a model


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the Linear-like layers whose name is, or ends with '.' + one of, `targets`.

    Raises ValueError naming the layer names that exist when a target matches nothing.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("targets is empty; name at least one layer, e.g. ['q_proj', 'v_proj'].")
    linear_names = [n for n, m in model.named_modules() if _is_linear_like(m)]
    found: list[str] = []
    for target in targets:
        hits = [n for n in linear_names if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(
                f"No Linear layer named {target!r} in {type(model).__name__}. "
                f"Layer names that can take an adapter: {suffixes}."
            )
        found += [h for h in hits if h not in found]
    return found


def _is_linear_like(module: nn.Module) -> bool:
    return not isinstance(module, LoRALinear) and hasattr(module, "in_features") and hasattr(module, "out_features")


def add_lora(model: nn.Module, targets: Sequence[str], rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> list[str]:
    """Freeze every parameter of `model` and wrap each target layer in a LoRALinear (in place).

    Returns the names of the wrapped layers. Only the adapters' A and B stay trainable.
    """
    _check_lora_args(rank, alpha, dropout)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("This model already has LoRA adapters; merge_lora() or reload the model first.")
    names = find_target_modules(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapters by layer name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> nn.Module:
    """Put each adapted layer's frozen base back, dropping the adapters (in place); returns the model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA adapters to remove.")
    for name, layer in layers.items():
        _set_module(model, name, layer.base)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding W + scale * B @ A (in place); returns the model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA adapters to merge; call add_lora() first.")
    for name, layer in layers.items():
        _set_module(model, name, layer.merged())
    return model


# ---------------------------------------------------------------- saving and loading adapters


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: {'<layer>.lora_A': (r, in), '<layer>.lora_B': (out, r)}."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
    if not out:
        raise ValueError("The model has no LoRA adapters to save; call add_lora() first.")
    return out


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (a safetensors file) with their rank and alpha in its metadata."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    state = lora_state_dict(model)
    first = next(iter(layers.values()))
    meta = {"rank": str(first.rank), "alpha": str(first.alpha), "layers": json.dumps(sorted(layers))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Add adapters to a fresh base `model` and fill them from a file written by save_adapter.

    Returns the adapted layer names. Errors say which layer or shape does not match.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No adapter file at {path}; write one with save_adapter(model, path).")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if not {"rank", "alpha", "layers"} <= meta.keys():
        raise ValueError(f"{path} has no LoRA metadata (rank, alpha, layers); was it written by save_adapter?")
    names = json.loads(meta["layers"])
    missing = [n for n in names if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"The adapter file targets layers this model does not have: {missing[:5]}.")
    add_lora(model, names, rank=int(meta["rank"]), alpha=float(meta["alpha"]))
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            saved, param = state[f"{name}.{part}"], getattr(layer, part)
            if saved.shape != param.shape:
                raise ValueError(f"{name}.{part}: the file holds {tuple(saved.shape)}, the model needs "
                                 f"{tuple(param.shape)}; the adapter was trained on a different model.")
            with torch.no_grad():
                param.copy_(saved)
    return names


# ---------------------------------------------------------------- the peft cross-check


def import_peft():
    """Import peft with bitsandbytes' CPU-kernel warning silenced (it is harmless on CPU)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from .errors import require_module

    return require_module("peft", purpose="the LoRA cross-check")


def copy_lora_to_peft(state: dict[str, torch.Tensor], peft_model: nn.Module, adapter: str = "default") -> int:
    """Copy adapters saved by `lora_state_dict` into the matching layers of a peft LoRA model.

    peft names a layer `base_model.model.<our name>` and stores lora_A[adapter].weight (r, in) and
    lora_B[adapter].weight (out, r): the same layout as ours. Returns how many layers were copied.
    """
    ours = sorted({k.rsplit(".", 1)[0] for k in state})
    copied = 0
    for name, module in peft_model.named_modules():
        if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        key = name.removeprefix("base_model.model.")
        if key not in ours:
            raise ValueError(f"peft adapted {key!r}, which has no adapter in `state`; use the same targets.")
        with torch.no_grad():
            module.lora_A[adapter].weight.copy_(state[f"{key}.lora_A"])
            module.lora_B[adapter].weight.copy_(state[f"{key}.lora_B"])
        copied += 1
    if copied != len(ours):
        raise ValueError(f"peft has {copied} adapted layers, `state` has {len(ours)}; use the same targets.")
    return copied


def peft_qlora_on_gpu(model_path: str, targets: Sequence[str], rank: int = 8, alpha: float = 16.0):
    """The library route to QLoRA: transformers + bitsandbytes NF4 (double quant, bf16 compute) + peft LoRA.

    Needs a CUDA GPU (bitsandbytes' 4-bit training path); raises GPURequiredError otherwise.
    """
    from .errors import require_cuda, require_module

    require_cuda("QLoRA with bitsandbytes load_in_4bit")
    transformers = require_module("transformers", purpose="loading the 4-bit model")
    peft = import_peft()
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant,
                                                              device_map={"": 0}, dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return peft.get_peft_model(model, config)


# ---------------------------------------------------------------- the task and its batches


@dataclass(frozen=True)
class Example:
    """One task example: the model reads `prompt` and should write `completion`."""

    prompt: str
    completion: str


def load_task(split: str, path: str | Path | None = None) -> list[Example]:
    """The examples of one split ('train' or 'eval') of the shipped task file (data/lora_task.jsonl)."""
    path = Path(path) if path is not None else data_dir() / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} not found; it ships in the repository's data/ folder.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    splits = sorted({r["split"] for r in rows})
    if split not in splits:
        raise ValueError(f"No split {split!r} in {path.name}; it has {splits}.")
    return [Example(r["prompt"], r["completion"]) for r in rows if r["split"] == split]


@dataclass
class Batch:
    """Right-padded token ids, their attention mask, and labels (-100 except on completion tokens)."""

    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    labels: torch.Tensor  # (b, t)

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def completion_tokens(self) -> int:
        return int((self.labels != -100).sum())


def make_batch(tokenizer, examples: Sequence[Example], max_len: int = 128) -> Batch:
    """BOS + prompt + completion + EOS per example, right-padded; the loss sees completion and EOS only."""
    if not examples:
        raise ValueError("make_batch needs at least one example.")
    rows, label_rows = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        completion = tokenizer(ex.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id, *prompt, *completion]
        if len(ids) > max_len:
            raise ValueError(f"An example has {len(ids)} tokens, more than max_len={max_len}; raise max_len "
                             f"or shorten it: {ex.prompt[:40]!r}")
        rows.append(ids)
        label_rows.append([-100] * (1 + len(prompt)) + completion)
    t = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (t - len(r)) for r in rows])  # (b, t)
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])  # (b, t)
    labels = torch.tensor([r + [-100] * (t - len(r)) for r in label_rows])  # (b, t)
    return Batch(input_ids, mask, labels)


def completion_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy on the completion tokens, computing the vocabulary logits only where scored.

    The same value as `model(..., labels=...).loss` but the (262144-wide) LM head runs on the few
    labelled positions instead of every position: most of the cost of a small-vocabulary-heavy model.
    """
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (b, t, d)
    targets = batch.labels[:, 1:]  # (b, t-1): position i predicts token i + 1
    keep = targets != -100  # (b, t-1)
    h = hidden[:, :-1][keep]  # (n, d)
    logits = model.lm_head(h).float()  # (n, vocab)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep])


@torch.no_grad()
def heldout_loss(model, batch: Batch) -> float:
    """Completion loss on a held-out batch, in eval mode (no gradients)."""
    was_training = model.training
    model.eval()
    loss = completion_loss(model, batch).item()
    model.train(was_training)
    return loss


def train(model, batches: Iterable[Batch], steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
          autocast_dtype: torch.dtype | None = None, on_step: Callable[[int, float], None] | None = None,
          ) -> tuple[list[float], torch.optim.Optimizer]:
    """AdamW on the trainable parameters for `steps` steps over `batches` (cycled). Returns losses, optimizer.

    autocast_dtype: e.g. torch.bfloat16 for mixed precision (weights stay float32, matmuls run in bf16).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; call add_lora() or unfreeze some layers.")
    batches = list(batches)
    if not batches:
        raise ValueError("train needs at least one batch.")
    device_type = next(model.parameters()).device.type

    def step_loss(step: int) -> torch.Tensor:
        mixed = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with mixed:
            return completion_loss(model, batches[step % len(batches)])

    model.train()
    try:
        return adamw_loop(params, step_loss, steps, lr, weight_decay, on_step=on_step)
    finally:
        model.eval()


# ---------------------------------------------------------------- what training holds in memory


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (AdamW: exp_avg and exp_avg_sq per parameter, a scalar step)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def gradient_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes one set of gradients takes for these parameters (what .grad holds after backward)."""
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def set_gradient_checkpointing(model, enabled: bool = True) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant).

    Saves activation memory (only each layer's input is kept) for about one extra forward pass.
    Uses transformers' `activation_checkpointing_enable` (5.x) or `gradient_checkpointing_enable`.
    """
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


class SavedActivations:
    """Context manager: bytes autograd saves for the backward pass of the graph built inside it.

    Counts each distinct storage once via saved-tensor hooks; frozen weights that autograd saves are
    not activations, so parameters are left out. Gradient checkpointing shows up here as fewer bytes.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._param_ptrs = {p.data_ptr() for p in model.parameters()} if model is not None else set()
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.untyped_storage().nbytes())
        if ptr not in self._param_ptrs and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# ---------------------------------------------------------------- generation for before/after samples


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy completions of several prompts at once (left padding), stopped at EOS or a newline."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)  # (b, t + new)
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [t.split("\n")[0] for t in texts]


def parse_record(text: str) -> dict | None:
    """The JSON object the task asks for ({"capital": ...}), or None if the text is not exactly that."""
    try:
        record = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or set(record) != {"capital"}:
        return None
    return record
