"""Shared by the unit tests (tests/) and nbval's notebook runs (notebooks/).

`pytest` runs in two pytest-xdist workers (see pyproject.toml), one notebook or one test module per worker at a
time. Most of the suite is single-batch decoding and small matrix work that a second thread barely speeds up,
so two workers with half of the cores each finish the suite in about 60% of the time of one worker with all
of them. The split is set here, before a worker imports torch, and the notebooks' kernels inherit it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker_threads(cores: int, workers: int) -> int:
    """Intra-op threads for each of `workers` processes sharing `cores`: an even share, at least one."""
    return max(1, cores // max(1, workers))


def _pin_threads() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # a thread count set by the user wins
        os.environ["OMP_NUM_THREADS"] = str(worker_threads(len(os.sched_getaffinity(0)), workers))


_pin_threads()
