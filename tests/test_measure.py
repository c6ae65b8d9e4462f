import contextlib
import math
import mmap
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cookbook import measure
from cookbook.core import kv_cache_bytes_per_token
from cookbook.measure import (
    GenerationSpeed,
    PeakMemory,
    count_parameters,
    format_bytes,
    measure_generation,
    model_bytes,
    parameter_breakdown,
    time_function,
)
from cookbook.models import tiny_model


def test_tied_weights_are_counted_once():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    naive = sum(p.numel() for p in model.parameters())  # parameters() already dedups tied tensors
    assert count_parameters(model) == naive
    assert sum(parameter_breakdown(model).values()) == count_parameters(model)


def test_decode_reads_a_tied_table_whole_and_an_untied_embedding_one_row_at_a_time():
    from cookbook import quantization as Q

    model = tiny_model()  # tied: the head reads the whole table every token
    assert measure.decode_bytes_per_token(model) == model_bytes(model)
    table = model.model.embed_tokens.weight
    model.lm_head.weight = nn.Parameter(table.detach().clone())  # untied: the lookup table leaves the count
    assert measure.decode_bytes_per_token(model) == model_bytes(model) - table.numel() * 4
    tied = tiny_model()
    Q.quantize_tied_embedding_int8(tied)  # one int8 table behind both views, read by the head
    assert measure.decode_bytes_per_token(tied) == model_bytes(tied)
    assert measure.roofline_tokens_per_s(1_000, 2e9) == 2e6


def test_model_bytes_counts_persistent_buffers_only():
    m = nn.Linear(4, 4, bias=False)
    m.register_buffer("codes", torch.zeros(10, dtype=torch.uint8))
    m.register_buffer("scratch", torch.zeros(100), persistent=False)
    assert model_bytes(m) == 16 * 4 + 10


def test_trainable_only():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    m[0].requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 12


def test_model_bytes_counts_what_a_tensor_subclass_wraps():
    # torchao's quantized weights are tensor subclasses wrapping codes and scales; torch's TwoTensor wraps two
    from torch.testing._internal.two_tensor import TwoTensor

    linear = nn.Linear(4, 3, bias=False)
    linear.weight = nn.Parameter(TwoTensor(torch.zeros(3, 4), torch.ones(3, 4)), requires_grad=False)
    assert model_bytes(linear) == 2 * 3 * 4 * 4 and count_parameters(linear) == 12


def test_kv_cache_bytes_per_token_from_config():
    cfg = tiny_model().config  # 2 layers, 1 kv head, head_dim 16
    assert kv_cache_bytes_per_token(cfg, torch.float32) == 2 * 2 * 1 * 16 * 4
    assert kv_cache_bytes_per_token(cfg, torch.bfloat16) == 2 * 2 * 1 * 16 * 2


def test_time_function_reports_the_median():
    calls = []
    t = time_function(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and t.repeats == 5 and t.min_s <= t.median_s <= t.max_s
    with pytest.raises(ValueError):
        time_function(lambda: None, repeats=0)


@contextlib.contextmanager
def _fresh_64_mib():
    """64 MiB of new pages, touched, unmapped on exit. Straight from mmap: a torch tensor's memory may come
    from pages the allocator kept resident after earlier tests freed them, which raise no RSS at all."""
    with mmap.mmap(-1, 64 * 2**20) as pages:
        torch.frombuffer(pages, dtype=torch.uint8).fill_(1)  # every page touched: now resident
        yield


def _allocate_and_free_64_mib() -> None:
    with _fresh_64_mib():
        pass


def test_peak_memory_sees_a_short_lived_allocation():
    # The kernel's own peak counter (Linux) cannot miss it, however fast the machine frees it again.
    if not measure.reset_peak_rss():
        pytest.skip("this OS has no resettable peak-RSS counter; the sampling fallback is tested below")
    with PeakMemory() as mem:
        _allocate_and_free_64_mib()
    assert mem.exact and mem.cpu_increase_bytes > 32 * 2**20


def test_nested_peak_memory_keeps_the_outer_peak():
    if not measure.reset_peak_rss():
        pytest.skip("this OS has no resettable peak-RSS counter")
    with PeakMemory() as outer:
        _allocate_and_free_64_mib()
        with PeakMemory() as inner:  # resets the kernel counter: the outer peak must survive it
            pass
    assert outer.cpu_increase_bytes > 32 * 2**20 and inner.cpu_increase_bytes < 32 * 2**20


def test_peak_memory_samples_where_the_kernel_does_not_count(monkeypatch):
    monkeypatch.setattr(measure, "reset_peak_rss", lambda: False)
    with contextlib.ExitStack() as held:
        with PeakMemory() as mem:
            held.enter_context(_fresh_64_mib())  # still held when the context ends: the sampler cannot miss it
    assert not mem.exact and mem.cpu_increase_bytes > 32 * 2**20


def test_generation_speed_arithmetic():
    s = GenerationSpeed(prompt_tokens=100, new_tokens=11, prefill_s=0.5, first_token_s=0.6, generate_s=1.6)
    assert s.prefill_tokens_per_s == 200
    # 10 decode steps in 1.6 - 0.6 s: generate's fixed costs in the one-token run cancel
    assert s.decode_tokens_per_s == pytest.approx(10)
    assert math.isnan(s.decode_spread)  # no range: nothing to say about the spread
    # the long run took 1.6 s at best and 2.1 s at worst: decode 10 and 6.67 tokens/s, a spread of a third of 10
    ranged = GenerationSpeed(100, 11, 0.5, 0.6, 1.6, generate_range_s=(1.6, 2.1))
    assert ranged.decode_spread == pytest.approx((10 - 10 / 1.5) / 10)


def test_generation_speed_is_nan_when_timings_cannot_separate_decode():
    # the longer run timed faster than the one-token run: not a speed, and never a huge made-up one
    s = GenerationSpeed(prompt_tokens=8, new_tokens=3, prefill_s=0.37, first_token_s=0.38, generate_s=0.36)
    assert math.isnan(s.decode_s_per_token) and math.isnan(s.decode_tokens_per_s)


def test_measure_generation_on_a_tiny_model():
    model = tiny_model()
    prompt = torch.randint(3, 500, (1, 8))
    for statistic in ("median", "min"):
        s = measure_generation(model, prompt, new_tokens=4, warmup=1, repeats=2, statistic=statistic)
        assert (s.prompt_tokens, s.new_tokens) == (8, 4)
        assert s.prefill_s > 0 and s.first_token_s > 0 and s.generate_s > 0
    with pytest.raises(ValueError, match="statistic"):
        measure_generation(model, prompt, new_tokens=4, statistic="mean")
    with pytest.raises(ValueError, match="new_tokens"):
        measure_generation(model, prompt, new_tokens=1)


def test_memory_bandwidth_times_a_read_of_every_byte(monkeypatch):
    """The CPU ceiling is a read stream over the whole buffer (bytes / best time), split over torch's threads."""
    seen = []

    def fake_max(part):
        seen.append(part.nbytes)
        return part[0]

    monkeypatch.setattr(measure.np, "max", fake_max)
    bandwidth = measure.memory_bandwidth(8 * 2**20, repeats=2)
    assert math.isfinite(bandwidth) and bandwidth > 0
    calls = 3 * torch.get_num_threads()  # one warm-up and two repeats, one part per thread
    assert len(seen) == calls and sum(seen) == 3 * 8 * 2**20
    assert measure.BANDWIDTH_METHOD["cpu"] == "read stream"


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(5 * 2**30) == "5.0 GiB"


def test_prefill_scores_only_the_last_position_and_matches_the_full_forward():
    model = tiny_model()
    prompt = torch.randint(3, 500, (1, 8))
    with torch.no_grad():
        last = measure.prefill_logits(model, prompt)  # (1, 1, vocab)
        full = model(input_ids=prompt).logits  # (1, 8, vocab)
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:])


_BF16_ATTENTION = """
import torch
from cookbook.measure import cpu_attention_that_runs, cpu_vector_kernels
q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)  # (batch, heads, tokens, head_dim)
with cpu_attention_that_runs():
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
print(cpu_vector_kernels(), tuple(out.shape))
"""


@pytest.mark.parametrize("capability", [None, "default"])
def test_bf16_attention_runs_under_any_kernel_set(capability):
    # ATEN_CPU_CAPABILITY must be set before torch is imported: a fresh interpreter. Under "default" on an AMX
    # CPU, torch's fused bf16 attention raises unless cpu_attention_that_runs picks the math kernel.
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, "-c", _BF16_ATTENTION], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    vector = "False" if capability == "default" else "True"
    assert done.stdout.split() == [vector, "(1,", "2,", "8,", "16)"]
