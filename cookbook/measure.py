"""Measurement: parameters, bytes held, peak memory, latency, tokens/s and memory (read) bandwidth.

Timings follow one rule everywhere: warm up first, repeat, report the median (CUDA is
synchronised before each clock read).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import psutil
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

# ---------------------------------------------------------------- sizes


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors `t` stores: itself, or for a tensor subclass that wraps others (torchao's quantized
    weights: codes, scales, zero points) those tensors."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names if getattr(t, name) is not None for leaf in _leaves(getattr(t, name))]


def _storage_key(t: torch.Tensor) -> tuple:
    return tuple((x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.dtype) for x in _leaves(t))


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors with distinct storage (tied weights counted once)."""
    seen, out = set(), []
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared (tied) tensor counted once."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum(p.numel() for p in _unique(params))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes the model really holds: parameters plus persistent buffers, shared storage once.

    Quantized modules keep packed integer weights and scales as buffers, so they count here too.
    """
    return sum(tensor_bytes(t) for t in _held_tensors(model))


def _held_tensors(module: nn.Module) -> list[torch.Tensor]:
    buffers = [b for name, b in module.named_buffers() if _is_persistent(module, name)]
    return _unique([leaf for t in [*module.parameters(), *buffers] for leaf in _leaves(t)])


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step must read: what the model holds, less an input embedding table that the
    output head does not share (a lookup reads one row of it, not the table). A tied table is read whole, by the
    head. The memory-bound speed limit of batch-1 decode is bandwidth / this (`roofline_tokens_per_s`); the
    KV cache and activations add a little more traffic, negligible for short contexts."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if emb is None:
        return model_bytes(model)
    in_head = {t.untyped_storage().data_ptr() for t in (_held_tensors(head) if head is not None else [])}
    lookup_only = [t for t in _held_tensors(emb) if t.untyped_storage().data_ptr() not in in_head]
    return model_bytes(model) - sum(tensor_bytes(t) for t in lookup_only)


def roofline_tokens_per_s(bytes_per_token: int, bandwidth: float) -> float:
    """The memory-bound ceiling of batch-1 decode: bytes/s the memory delivers over bytes each token reads."""
    return bandwidth / bytes_per_token


def _is_persistent(model: nn.Module, buffer_name: str) -> bool:
    module_name, _, leaf = buffer_name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf not in module._non_persistent_buffers_set


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per part of a decoder LM: embedding, attention, MLP, norms, other (ties once)."""
    groups = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "other": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        groups[_group(name)] += p.numel()
    return groups


def _group(name: str) -> str:
    if "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
        return "embedding"
    if "attn" in name or "attention" in name:
        return "norm" if "norm" in name else "attention"
    if "mlp" in name or "feed_forward" in name or "experts" in name:
        return "mlp"
    return "norm" if "norm" in name else "other"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- time


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of `repeats` runs after `warmup` discarded runs."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_function(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device=None) -> Timing:
    """Run `fn` `warmup` times, then time `repeats` calls; CUDA is synchronised around each."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


@dataclass(frozen=True)
class GenerationSpeed:
    """Prefill (the prompt in one pass) and decode (one token per step) speeds of greedy generation.

    `prefill_s` is one bare forward over the prompt that scores its last position (`prefill_logits`).
    `first_token_s` is a whole `generate` of ONE token (prefill plus generate's own fixed costs: cache
    set-up, logits processing) and `generate_s` one of `new_tokens` tokens; their difference is
    `new_tokens - 1` decode steps and nothing else, so the fixed costs cancel instead of being charged
    to decode. `generate_range_s` is (fastest, slowest) of the `new_tokens` runs, for the spread of decode speed.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    first_token_s: float
    generate_s: float
    generate_range_s: tuple[float, float] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_s_per_token(self) -> float:
        """Seconds per decode step; NaN when the timings could not separate decode from the first token
        (the longer run timed no slower than the one-token run: noise from other work on the machine)."""
        decode_s = self.generate_s - self.first_token_s
        return decode_s / (self.new_tokens - 1) if decode_s > 0 else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token

    @property
    def decode_spread(self) -> float:
        """(fastest - slowest) / reported decode tokens/s over the repeats of the long run, the one-token run held
        at its reported time; NaN with one repeat or when a run could not separate decode."""
        if self.generate_range_s is None or self.generate_range_s[0] == self.generate_range_s[1]:
            return math.nan
        rates = [replace(self, generate_s=s).decode_tokens_per_s for s in self.generate_range_s]
        return (rates[0] - rates[1]) / self.decode_tokens_per_s


STATISTICS = ("median", "min")


def prefill_logits(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    """One forward pass over the prompt (1, t) that scores only the last position, as `generate`'s prefill
    does: (1, 1, vocab). Scoring every position would add t x vocab logits that generation never uses
    (for Gemma's 262k vocabulary that is most of a short prompt's cost)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=prompt_ids, logits_to_keep=1).logits
    return model(input_ids=prompt_ids).logits[:, -1:]


@torch.no_grad()
def measure_generation(
    model, prompt_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 1, repeats: int = 3,
    statistic: str = "median",
) -> GenerationSpeed:
    """Time the prefill of `prompt_ids` (1, t) and greedy `generate` runs of one and of `new_tokens` tokens.

    `statistic`: "median" of the repeats (the package's rule), or "min", the estimate least distorted on a
    shared machine, where other work can only slow a run down.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to separate decode from prefill.")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
    prompt_ids = prompt_ids.to(model.device)

    def generate(n: int) -> Timing:
        return time_function(lambda: model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=n, min_new_tokens=n, do_sample=False,
        ), warmup, repeats, model.device)

    prefill = time_function(lambda: prefill_logits(model, prompt_ids), warmup, repeats, model.device)
    first, whole = generate(1), generate(new_tokens)
    pick = (lambda t: t.median_s) if statistic == "median" else (lambda t: t.min_s)
    return GenerationSpeed(prompt_ids.shape[1], new_tokens, pick(prefill), pick(first), pick(whole),
                           (whole.min_s, whole.max_s))


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5, device=None) -> float:
    """Measured read bandwidth in bytes/s: the ceiling of batch-1 decode, which streams its weights once per token
    and writes next to nothing.

    On the CPU: numpy's max over a buffer larger than the last-level caches, split over torch's threads (numpy
    releases the GIL): the rate these cores can read at, whatever kernels torch dispatches to, so the ceiling does
    not move with the kernel set (ATEN_CPU_CAPABILITY=default). Not a copy: memcpy counts its writes too and
    moves bytes with instructions a load-based kernel cannot use, and a 256 MiB copy partly hits a large L3. On
    the 2-core Xeon of reports/cpu-xeon.md (300 MiB L3) a 256 MiB copy gave 47-66 GB/s (reads + writes), a 512 MiB
    one 50, while this read gives 33-37 GB/s, the rate torch's float32 matrix-vector product reads the head at.
    On a GPU: a device copy, 2 x nbytes over its time."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        timing = time_function(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)
        return 2 * nbytes / timing.median_s
    buffer = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(buffer, torch.get_num_threads())
    with ThreadPoolExecutor(len(parts)) as pool:
        timing = time_function(lambda: list(pool.map(np.max, parts)), warmup=1, repeats=repeats, device=device)
    return nbytes / timing.min_s  # the best read: other work on the machine can only slow one down


BANDWIDTH_METHOD = {"cpu": "read stream", "cuda": "device copy"}  # what memory_bandwidth times, by device type


# ---------------------------------------------------------------- the CPU


def cpu_vector_kernels() -> bool:
    """True when torch runs its vectorized CPU kernels (AVX2, AVX-512, ...); False under its scalar build, which
    ATEN_CPU_CAPABILITY=default selects (or a CPU it has no vector code for). The scalar build gives other float
    rounding and is several times slower: a claim about speed holds only where this is True."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere PyTorch's bf16 matmuls
    run converted or generic code: bf16 can be slower than fp32, and its matmul backward much slower."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_attention_that_runs() -> contextlib.AbstractContextManager:
    """Around a bf16 forward on the CPU: a context in which scaled_dot_product_attention runs.

    torch's fused CPU attention packs bf16 for AMX whenever the CPU has AMX, and that packing needs the
    AVX-512 kernels; with ATEN_CPU_CAPABILITY set below AVX-512 on such a CPU (as when a test emulates another
    CPU) it raises "pack_vnni2 is only supported when avx512 is supported". There the math attention runs
    instead (the same function, other rounding); everywhere else this changes nothing."""
    if "amx_bf16" in _cpu_flags() and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux: VmHWM) at the current RSS; False where unsupported."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        return kernel_peak_rss() is not None
    except OSError:
        return False


def kernel_peak_rss() -> int | None:
    """The kernel's own peak RSS of this process in bytes (VmHWM), or None where it does not tell."""
    try:
        with open(_STATUS) as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


_OPEN_PEAKS: list[PeakMemory] = []  # PeakMemory contexts now open, outermost first


@dataclass
class PeakMemory:
    """Context manager: peak CPU RSS and peak CUDA allocation inside it.

    `cpu_peak_bytes` is the process's peak resident memory, `cpu_increase_bytes` how far it rose above
    the level at entry; `cuda_peak_bytes` is torch's peak allocated memory (0 without a GPU).
    On Linux the peak is the kernel's own counter (VmHWM, reset on entry), so no allocation is missed
    however briefly it lived; elsewhere RSS is sampled every `interval_s` by a thread, which can miss
    a peak shorter than the interval. Nested contexts work: entering one hands the peak so far to the
    contexts already open before it resets the counter.
    """

    interval_s: float = 0.005
    cpu_start_bytes: int = 0
    cpu_peak_bytes: int = 0
    cuda_peak_bytes: int = 0
    exact: bool = False  # True when the kernel counted the peak (no sampling)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def cpu_increase_bytes(self) -> int:
        return self.cpu_peak_bytes - self.cpu_start_bytes

    def __enter__(self) -> PeakMemory:
        peak_so_far = kernel_peak_rss()
        for outer in _OPEN_PEAKS:
            outer.cpu_peak_bytes = max(outer.cpu_peak_bytes, peak_so_far or 0)
        _OPEN_PEAKS.append(self)
        self.exact = reset_peak_rss()
        self.cpu_start_bytes = self.cpu_peak_bytes = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread = None
        if not self.exact:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.cpu_peak_bytes = max(self.cpu_peak_bytes, rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = kernel_peak_rss() if self.exact else None
        self.cpu_peak_bytes = max(self.cpu_peak_bytes, rss_bytes(), peak or 0)
        _OPEN_PEAKS.remove(self)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()


@contextlib.contextmanager
def single_thread():
    """Run torch ops on one CPU thread inside the block (restores the previous setting): for loops of
    thousands of tiny ops (GPTQ's and SparseGPT's column loops), where thread hand-offs cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
