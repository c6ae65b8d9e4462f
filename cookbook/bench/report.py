"""The report: the machine it ran on, markdown and JSON, and `python -m cookbook bench`."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..evaluate import PerplexityProtocol
from ..measure import BANDWIDTH_METHOD, memory_bandwidth
from .pareto import label, pareto_front, plot_pareto
from .settings import COLUMNS, make_settings
from .suite import TECHNIQUES, check_techniques, finish_rows, run_bench

# ---------------------------------------------------------------- the report


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU or GPU name, cores, memory, versions."""
    import psutil
    import transformers

    info = {"device": device.type, "cpu": _cpu_name(), "cpu vector extensions": _cpu_vector_flags(),
            "cpu threads used by torch": torch.get_num_threads(),
            "logical cpus": psutil.cpu_count(), "ram GiB": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "os": platform.platform(),
            "load average (1, 5, 15 min) at the end": _load_average()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu memory GiB": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


def _load_average() -> str:
    """The machine's load average: other work running beside the bench slows every timing down."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):  # not on every platform
        return "unknown"


def _cpu_vector_flags() -> str:
    """The CPU's AVX / AMX flags that decide which kernels run (e.g. native bf16), or 'unknown'."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = sorted(f for f in flags.split()[2:] if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                          "amx_bf16", "amx_int8"))
    return ", ".join(wanted) or "none of avx2 / avx512 / amx"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_name(device: torch.device) -> str:
    """'cpu', or 'cuda-<gpu name>' as a file-name-safe slug."""
    if device.type != "cuda":
        return device.type
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@dataclass
class BenchReport:
    """Rows plus everything needed to read them: machine, versions, model, protocol, settings, date."""

    rows: list[dict]
    model: str
    machine: dict
    settings: dict
    assumptions: str
    wall_s: float
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    techniques: list[str] | None = None  # what was run (None: all of TECHNIQUES)

    def command(self) -> str:
        """The command line that measures this report again."""
        s, only = self.settings, self.techniques
        subset = f" --only {','.join(only)}" if only is not None and set(only) != set(TECHNIQUES) else ""
        return (f"python -m cookbook bench{' --quick' if s['quick'] else ''} --device {self.machine['device']}"
                f" --model {self.model}{subset}")

    def table(self):
        from ..report import ResultsTable

        shown = [{k: r.get(k) for k in COLUMNS} for r in self.rows]
        return ResultsTable(shown, f"Every technique on {self.model} ({self.machine['device']})", digits=2)

    def markdown(self, png_name: str) -> str:
        s = self.settings
        lines = [
            f"# Cookbook bench: {self.model} on {self.machine.get('gpu', self.machine['cpu'])}",
            "",
            f"Measured {self.date} by `{self.command()}` in {self.wall_s / 60:.1f} minutes. Every number below was measured "
            "in that run, except tokens/J and $/M tokens, which are estimates from the stated assumptions.",
            "", "## Machine", "", "| | |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in self.machine.items()],
            "", "## Protocol", "",
            f"- Perplexity: {s['protocol']} (lower is better; every row on the same tokens).",
            f"- Decode and prefill speed: `measure_generation` on one prompt of {s['prompt_tokens']} tokens (BOS + "
            f"the eval text): prefill is one forward over the prompt; decode is `generate` of {s['new_tokens']} greedy "
            f"tokens minus `generate` of one, over the {s['new_tokens'] - 1} extra steps; best of {s['repeats']} "
            f"runs after {s['warmup']} warm-up. Rows marked 'our loop' time cookbook.decoding's loops instead "
            f"({s['loop_new_tokens']} tokens, prefill included); serving rows are aggregate tokens/s of many requests.",
            f"- Calibration (GPTQ, AWQ, Wanda, structured): {s['calib_samples']} windows of {s['calib_seq_len']} "
            f"tokens of the training text; quantization groups of {s['group_size']}.",
            "- Bytes held: parameters + persistent buffers (packed codes and scales count), tied weights once. "
            "Bytes/token: what one decode step reads (`measure.decode_bytes_per_token`: bytes held less an untied "
            "input embedding, of which a lookup reads one row). % roofline: decode tok/s over the memory-bound "
            "ceiling, measured bandwidth / bytes per token (one-stream rows only; serving rows are aggregates); "
            "the bandwidth is read before and after each technique, and its rows take the better of the two "
            "(the row's \"bandwidth\" in the JSON).",
            "", "## Energy and cost assumptions", "",
            f"{self.assumptions}",
            f"tokens/J = decode tokens/s / {s['watts']:g} W; $/M tokens = ${s['usd_per_hour']:g}/hour / "
            "(3600 x tokens/s) x 1e6.",
            "", "## Results", "", self.table().markdown(), "",
            f"![Pareto plot]({png_name})", "",
            "Pareto front (no other row has both lower perplexity and fewer bytes): "
            + ", ".join(label(r) for r in pareto_front(self.rows, "bytes held")) + ".",
            "",
            "Pareto front (no other row has both lower perplexity and more decode tokens/s): "
            + ", ".join(label(r) for r in pareto_front(self.rows, "decode tok/s", higher_is_better=True)) + ".",
            "", "## Regenerate", "",
            "```bash", self.command(), "```", "",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"model": self.model, "date": self.date, "wall_s": self.wall_s, "machine": self.machine,
                "settings": self.settings, "assumptions": self.assumptions, "techniques": self.techniques,
                "rows": self.rows}

    def write(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        """Write `<name>.md`, `<name>.json` and `<name>.png` into `out_dir`; returns their paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {ext: out / f"{name}.{ext}" for ext in ("md", "json", "png")}
        fig = plot_pareto(self.rows, f"{self.model} on {self.machine.get('gpu', self.machine['cpu'])}")
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
        paths["json"].write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        paths["md"].write_text(self.markdown(paths["png"].name))
        return paths


def load_report(path: str | Path) -> BenchReport:
    """A report written by `BenchReport.write`, read back from its `.json`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No bench report at {path}: run `python -m cookbook bench` to write one.")
    d = json.loads(path.read_text())
    return BenchReport(d["rows"], d["model"], d["machine"], d["settings"], d["assumptions"], d["wall_s"], d["date"],
                       d.get("techniques"))


def report_protocol(report: BenchReport) -> PerplexityProtocol:
    """The perplexity protocol a report's rows were measured on (to measure new rows comparably)."""
    fields = dict(part.split("=", 1) for part in report.settings["protocol"].split(", "))
    return PerplexityProtocol(**{k: v if k == "text" else int(v) for k, v in fields.items()})


def bench_command(model_name: str | None, device: str | None, quick: bool, out_dir: str, techniques=None,
                  watts: float | None = None, usd_per_hour: float | None = None, name: str | None = None,
                  compile: bool = True) -> dict:
    """Load the model, run the suite, write the report; what `python -m cookbook bench` calls."""
    import transformers

    from ..models import load_model, resolve_device, set_seed
    from ..models import model_name as resolve_name

    names = check_techniques(techniques)
    dev = resolve_device(device)  # a clear ModelLoadError for cuda without a GPU
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    settings = make_settings(dev, quick, watts, usd_per_hour, compile=compile)
    set_seed(0)
    start = time.perf_counter()
    model, tok = load_model(model_name, device=dev)
    readings = []  # bytes/s, read before and after each technique: each row's roofline takes its technique's

    def read_bandwidth() -> float:
        readings.append(memory_bandwidth(device=dev))
        return readings[-1]

    rows = run_bench(model, tok, dev, settings, names, log=lambda m: print(m, file=sys.stderr, flush=True),
                     read_bandwidth=read_bandwidth)
    rows = finish_rows(rows, settings)
    method = BANDWIDTH_METHOD.get(dev.type, "device copy")  # how measure.memory_bandwidth measured the ceiling
    gb = [r / 1e9 for r in readings]
    machine = machine_info(dev) | {
        f"memory bandwidth, measured ({method}), GB/s": f"{min(gb):.1f} to {max(gb):.1f}, median "
                                                          f"{statistics.median(gb):.1f}, over {len(gb)} readings",
        "memory bandwidth at the start / end of the run, GB/s": f"{readings[0] / 1e9:.1f} / {readings[-1] / 1e9:.1f}"}
    report = BenchReport(rows, resolve_name(model_name), machine, settings.describe(), settings.assumptions,
                         time.perf_counter() - start, techniques=names)
    paths = report.write(out_dir, name or report_name(dev))
    print(report.table().text())
    print("\nwrote", ", ".join(str(p) for p in paths.values()))
    return paths
