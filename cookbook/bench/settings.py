"""Bench settings and the assumptions every report states: protocol, prompt, repeats, power and price."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..evaluate import PerplexityProtocol

COLUMNS = ("technique", "variant", "format", "params", "bytes held", "bytes/token", "perplexity", "rel. change",
           "decode tok/s", "% roofline", "prefill tok/s", "tokens/J", "$/M tokens", "notes")


# ---------------------------------------------------------------- settings and assumptions


@dataclass(frozen=True)
class BenchSettings:
    """Everything that fixes what the bench measures; recorded in the report.

    protocol: the one perplexity protocol of every row. prompt_tokens / new_tokens: the one prompt
    (BOS + the first tokens of the eval text) and the greedy tokens generated from it for decode
    speed, timed `repeats` times after `warmup` runs (best of the repeats, see `measure_model`). calib_*: calibration windows of the
    training text for GPTQ, AWQ, Wanda and structured pruning. recipe_*: AdamW steps and window length
    of the combined recipe's distillation recovery (`cookbook.recipe`). serving_requests / serving_output_range: the
    serving workload (KV memory rows, HTTP load test); saturation_requests: how many requests wait at once in the
    batching rows (enough that the queue outlasts the batch's first refills). attention_window: the sliding window the
    attention row puts on the model's global layers. watts, usd_per_hour: the ASSUMED
    power draw and price behind tokens/J and $/M tokens (see `default_power_and_price`). compile: also measure
    the `torch.compile` rows (each compile costs tens of seconds and needs a C++ compiler on CPU).
    """

    protocol: PerplexityProtocol = PerplexityProtocol(seq_len=256, stride=256, max_tokens=1024)
    prompt_tokens: int = 32
    new_tokens: int = 64
    loop_new_tokens: int = 16
    warmup: int = 1
    repeats: int = 2
    calib_samples: int = 4
    calib_seq_len: int = 256
    group_size: int = 128
    serving_requests: int = 16
    saturation_requests: int = 64
    serving_output_range: tuple[int, int] = (4, 32)
    max_batch: int = 8
    recipe_steps: int = 16
    recipe_seq_len: int = 128
    attention_window: int = 128
    watts: float = 20.0
    usd_per_hour: float = 0.10
    assumptions: str = ""
    quick: bool = False
    compile: bool = True

    def __post_init__(self) -> None:
        if self.new_tokens < 2 or self.loop_new_tokens < 2:
            raise ValueError("new_tokens and loop_new_tokens must be >= 2 to separate decode from prefill.")
        if self.prompt_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("Need prompt_tokens >= 1, repeats >= 1 and warmup >= 0.")
        if not (self.watts > 0 and self.usd_per_hour >= 0):
            raise ValueError(f"watts must be > 0 and usd_per_hour >= 0, got {self.watts} and {self.usd_per_hour}.")

    def describe(self) -> dict:
        d = asdict(self)
        d["protocol"] = self.protocol.describe()
        return d


QUICK = dict(protocol=PerplexityProtocol(seq_len=256, stride=256, max_tokens=512), new_tokens=8, loop_new_tokens=8,
             warmup=1, repeats=2, calib_samples=2, calib_seq_len=128, serving_requests=8, saturation_requests=8,
             max_batch=4, recipe_steps=8)

# Board power from the vendors' spec sheets (maximum TDP): an UPPER BOUND on what a decode loop draws.
GPU_TDP_W = {"h200": 700.0, "h100 sxm": 700.0, "h100 80gb hbm3": 700.0, "h100 pcie": 350.0, "h100": 700.0,
             "a100": 400.0, "l40s": 350.0, "l4": 72.0, "a10": 150.0, "t4": 70.0, "rtx 4090": 450.0}
CPU_WATTS_PER_THREAD = 10.0
CPU_USD_PER_HOUR = 0.10  # roughly a 2-vCPU general-purpose cloud instance on demand
GPU_USD_PER_HOUR = 3.00  # roughly one H100 / H200 rented by the hour


def default_power_and_price(device: torch.device) -> tuple[float, float, str]:
    """The assumed power draw (W), price ($/hour) and the sentence stating both, for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in GPU_TDP_W if k in name.lower()), None)
        watts = GPU_TDP_W[key] if key else 300.0
        source = (f"the board TDP of the {name} from the vendor's spec sheet ({watts:.0f} W)" if key else
                  f"a generic 300 W (no spec-sheet TDP known for {name}; pass --watts)")
        return watts, GPU_USD_PER_HOUR, (
            f"Power: {source}, an UPPER BOUND, not a measurement (a batch-1 decode loop draws less). "
            f"Price: ${GPU_USD_PER_HOUR:.2f}/hour, a typical on-demand rental of one such GPU. "
            "Pass --watts and --usd-per-hour for your own figures.")
    threads = torch.get_num_threads()
    watts = CPU_WATTS_PER_THREAD * threads
    return watts, CPU_USD_PER_HOUR, (
        f"Power: {CPU_WATTS_PER_THREAD:.0f} W per busy CPU thread x {threads} threads = {watts:.0f} W, a stated "
        "assumption (a server core under load draws roughly 5-15 W), not a measurement. "
        f"Price: ${CPU_USD_PER_HOUR:.2f}/hour, roughly a {threads}-vCPU cloud instance on demand. "
        "Pass --watts and --usd-per-hour for your own figures.")


def make_settings(device: torch.device, quick: bool = False, watts: float | None = None,
                  usd_per_hour: float | None = None, **overrides) -> BenchSettings:
    """Settings for `device`: the full or `quick` sizes, the stated power and price unless given."""
    default_w, default_usd, text = default_power_and_price(device)
    if watts is not None or usd_per_hour is not None:
        text = (f"Power {watts if watts is not None else default_w:g} W and price "
                f"${usd_per_hour if usd_per_hour is not None else default_usd:g}/hour as given on the command line "
                f"(defaults would have been: {text})")
    base = dict(QUICK, quick=True) if quick else {}
    return BenchSettings(**(base | overrides), watts=default_w if watts is None else watts,
                         usd_per_hour=default_usd if usd_per_hour is None else usd_per_hour, assumptions=text)


def tokens_per_joule(tokens_per_s: float | None, watts: float) -> float | None:
    """Tokens per joule at an assumed constant power draw: (tokens/s) / W."""
    return None if tokens_per_s is None else tokens_per_s / watts


def usd_per_million_tokens(tokens_per_s: float | None, usd_per_hour: float) -> float | None:
    """Dollars per million tokens at `usd_per_hour` for a machine producing `tokens_per_s`."""
    if tokens_per_s is None or tokens_per_s <= 0:
        return None
    return usd_per_hour / (3600.0 * tokens_per_s) * 1e6


INT4_HEAD_GROUP = 32  # the int4 tied table's groups: the finest the kernel takes (the head's error costs most)
