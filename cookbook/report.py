"""The results table and the plots every notebook ends with.

`show_results` displays a table and tags it, so `python -m cookbook run` can print each notebook's
results after executing it headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RESULTS_METADATA_KEY = "cookbook_results"


def _fmt(value, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


@dataclass(repr=False)
class ResultsTable:
    """Rows of dicts with the same keys, rendered as Markdown (notebook) or aligned text (terminal)."""

    rows: list[dict]
    title: str = ""
    digits: int = 2

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("A results table needs at least one row.")
        self.columns = list(dict.fromkeys(k for row in self.rows for k in row))

    def cells(self) -> list[list[str]]:
        return [[_fmt(row.get(c), self.digits) for c in self.columns] for row in self.rows]

    def markdown(self) -> str:
        head = f"**{self.title}**\n\n" if self.title else ""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.cells()]
        return head + "\n".join(lines)

    def text(self) -> str:
        body = [self.columns, *self.cells()]
        widths = [max(len(r[i]) for r in body) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return (f"{self.title}\n" if self.title else "") + "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.markdown()

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:  # rounded, so a notebook that echoes the table shows stable text
        return self.text()


def show_results(rows: Sequence[dict], title: str = "Results", digits: int = 2) -> ResultsTable:
    """Display the table in the notebook, tagged as this notebook's results, and return it."""
    from IPython.display import display

    table = ResultsTable(list(rows), title, digits)
    display(
        {"text/markdown": table.markdown(), "text/plain": table.text()},
        raw=True,
        metadata={RESULTS_METADATA_KEY: title},
    )
    return table


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A figure with `ncols` axes side by side, in the cookbook's one style."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def plot_series(ax, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                title: str = "", logx: bool = False, logy: bool = False, marker: str = "o") -> None:
    """One line per entry of `series` ({label: (xs, ys)}) on `ax`."""
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()


def plot_bars(ax, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str = "",
              annotate: str = "{:.0f}") -> None:
    """A labelled bar chart with each value written above its bar."""
    bars = ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    for bar, v in zip(bars, values):
        ax.annotate(annotate.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
