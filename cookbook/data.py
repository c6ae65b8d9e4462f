"""The shipped texts (see data/README.md) and the token samples cut from them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DATA_ENV_VAR = "COOKBOOK_DATA"
TRAIN_TEXT = "shakespeare_train"
EVAL_TEXT = "shakespeare_eval"
SECOND_EVAL_TEXT = "python_reference_eval"


def data_dir() -> Path:
    """$COOKBOOK_DATA, else the repository's data/ folder (the package is installed editable)."""
    path = Path(os.environ.get(DATA_ENV_VAR) or Path(__file__).resolve().parents[1] / "data")
    if not path.is_dir():
        raise FileNotFoundError(
            f"Data folder {path} not found. Install the cookbook from its repository with "
            f"`pip install -e .`, or point ${DATA_ENV_VAR} at a copy of its data/ folder."
        )
    return path


def available_texts() -> list[str]:
    return sorted(p.stem for p in data_dir().glob("*.txt"))


def load_text(name: str) -> str:
    """One shipped text by name, e.g. 'shakespeare_eval'."""
    path = data_dir() / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"No text named {name!r}; available: {available_texts()}")
    return path.read_text(encoding="utf-8")


def encode(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of `text` without special tokens, cut to `max_tokens`: shape (n,)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens is not None else ids


def with_bos(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Prefix a BOS token to each row, as the model saw in training: (b, t) -> (b, t + 1)."""
    if tokenizer.bos_token_id is None:
        return ids
    bos = torch.full((ids.shape[0], 1), tokenizer.bos_token_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([bos, ids], dim=1)


def calibration_batch(
    tokenizer, n_samples: int = 16, seq_len: int = 256, seed: int = 0, text: str = TRAIN_TEXT
) -> torch.Tensor:
    """`n_samples` random windows of the training text, each BOS + (seq_len - 1) tokens: (n, seq_len)."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError("calibration_batch needs n_samples >= 1 and seq_len >= 2.")
    ids = encode(tokenizer, load_text(text))
    if len(ids) < seq_len:
        raise ValueError(f"Text {text!r} has {len(ids)} tokens, fewer than seq_len={seq_len}.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    windows = torch.stack([ids[s : s + seq_len - 1] for s in starts.tolist()])  # (n, seq_len - 1)
    return with_bos(tokenizer, windows)  # (n, seq_len)


def copy_task(tokenizer, passage_tokens: int = 160, cue_tokens: int = 16, start: int = 0,
              text: str = SECOND_EVAL_TEXT) -> torch.Tensor:
    """A prompt whose continuation copies from it: BOS + a passage of `text` + a blank line + the passage's first
    `cue_tokens` tokens again, (1, n). A language model continues by repeating the passage, as in editing or
    quoting a document: the case prompt-lookup decoding is built for."""
    if not 1 <= cue_tokens < passage_tokens:
        raise ValueError(f"copy_task needs 1 <= cue_tokens < passage_tokens, got {cue_tokens} and {passage_tokens}.")
    ids = encode(tokenizer, load_text(text))
    if start < 0 or start + passage_tokens > len(ids):
        raise ValueError(f"{text} has {len(ids)} tokens: start={start} + passage_tokens={passage_tokens} is too far.")
    passage = ids[start:start + passage_tokens]  # (passage_tokens,)
    blank = encode(tokenizer, "\n\n")
    return with_bos(tokenizer, torch.cat([passage, blank, passage[:cue_tokens]])[None])  # (1, n)
