"""Shared by the unit tests (tests/) and nbval's notebook runs (notebooks/).

`pytest` runs in two pytest-xdist workers (see pyproject.toml), one notebook or one test module per worker at a
time. Most of the suite is single-batch decoding and small matrix work that a second thread barely speeds up,
so two workers with half of the cores each finish the suite in about 60% of the time of one worker with all
of them. The split is set here, before a worker imports torch, and the notebooks' kernels inherit it. The
longest notebooks are handed out first (`pytest_collection_modifyitems`), so neither worker ends the run alone.
"""

import json
import os
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker_threads(cores: int, workers: int) -> int:
    """Intra-op threads for each of `workers` processes sharing `cores`: an even share, at least one."""
    return max(1, cores // max(1, workers))


def _pin_threads() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # a thread count set by the user wins
        os.environ["OMP_NUM_THREADS"] = str(worker_threads(len(os.sched_getaffinity(0)), workers))


_pin_threads()


def recorded_seconds(notebook: Path) -> float:
    """How long a notebook's cells ran when its committed outputs were written (nbclient stores each cell's
    start and end in its metadata); 0 for a cell without them."""
    total = 0.0
    for cell in json.loads(notebook.read_text()).get("cells", []):
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            total += (end - start).total_seconds()
    return total


def pytest_collection_modifyitems(config, items):
    """Longest work first. pytest-xdist hands out whole notebooks and test modules in collection order
    (`--no-loadscope-reorder` in pyproject.toml; by default it would order them by their number of items), and a
    long notebook started last leaves the other worker idle until it ends. So the notebooks go first, the one
    that ran longest when its outputs were written first, then the test modules, which are short."""
    seconds: dict[Path, float] = {}
    for item in items:
        path = Path(item.path)
        if path not in seconds:
            seconds[path] = recorded_seconds(path) if path.suffix == ".ipynb" else -1.0
    items.sort(key=lambda item: -seconds[Path(item.path)])  # stable: cells and tests keep their order
