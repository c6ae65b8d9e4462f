"""Assertions for the figures a notebook quotes, with tolerances that survive another CPU.

nbval compares only the cells whose output is the same on every machine (marked `# NBVAL_CHECK_OUTPUT`,
see CONTRIBUTING.md). A float such as a perplexity moves with the CPU's kernels (vector width, bf16/AMX
support, thread count change the order of the sums), so its claim is checked here instead: the measured
value must lie within a relative tolerance of the figure the notebook's text was written from. The
tolerances are set from the spread measured across machines and kernel sets (CONTRIBUTING.md lists it),
so a failure means the result moved more than another CPU moves it: a bug, or a text to rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

# Relative tolerances by how a figure is produced; the spread behind each is in CONTRIBUTING.md.
EVALUATION = 0.01  # evaluating fixed weights (float32 or bf16 rounding only), RTN included
CALIBRATED = 0.08  # a fit to calibration data (GPTQ, AWQ, SparseGPT, SmoothQuant): rounding flips codes
TRAINED = 0.15  # the result of optimizer steps: rounding differences grow with every step


def assert_close(measured: Mapping[Hashable, float], expected: Mapping[Hashable, float], rel: float) -> None:
    """Assert each measured[k] is within `rel` (relative) of expected[k]; report every figure that is not.

    measured / expected: figure name -> value (the same keys); rel: e.g. 0.02 for 2%.
    """
    if set(measured) != set(expected):
        names = sorted(map(str, set(measured) ^ set(expected)))
        raise KeyError(f"measured and expected name different figures: {names}")
    if not rel > 0:
        raise ValueError(f"rel must be a positive relative tolerance, e.g. 0.02; got {rel!r}")
    off = {k: (measured[k], v) for k, v in expected.items() if not _within(measured[k], v, rel)}
    if off:
        lines = [f"  {k}: measured {m:.6g}, expected {e:.6g} +- {rel:.0%} ({_deviation(m, e)})"
                 for k, (m, e) in off.items()]
        raise AssertionError("figures outside the cross-machine tolerance:\n" + "\n".join(lines))


def _within(value: float, expected: float, rel: float) -> bool:
    if math.isnan(expected):
        return math.isnan(value)
    return math.isfinite(value) and abs(value - expected) <= rel * abs(expected)


def _deviation(value: float, expected: float) -> str:
    if not math.isfinite(value) or expected == 0:
        return "not comparable"
    return f"{(value - expected) / abs(expected):+.1%}"
