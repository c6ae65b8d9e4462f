"""Pareto fronts, speed against the baseline, and the plot of both."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(rows: Sequence[dict], cost: str, higher_is_better: bool = False) -> list[dict]:
    """Rows no other row beats on both perplexity (lower) and `cost` (lower, or higher if `higher_is_better`)."""
    pts = [r for r in rows if r.get("perplexity") is not None and r.get(cost) is not None]
    sign = -1 if higher_is_better else 1

    def dominates(a, b) -> bool:
        return (a["perplexity"] <= b["perplexity"] and sign * a[cost] <= sign * b[cost]
                and (a["perplexity"] < b["perplexity"] or sign * a[cost] < sign * b[cost]))
    return [r for r in pts if not any(dominates(o, r) for o in pts if o is not r)]


def label(row: dict) -> str:
    return row["variant"] if row["technique"] != "baseline" else f"baseline ({row['format']})"


def speed_vs_baseline(rows: Sequence[dict]) -> list[dict]:
    """The rows with "decode x baseline": decode tok/s over the same run's baseline row (None if either is missing).

    Speeds measured on different machines or runs are comparable only as such ratios.
    """
    base = next((r["decode tok/s"] for r in rows if r["technique"] == "baseline"), None)
    return [r | {"decode x baseline": None if base is None or r.get("decode tok/s") is None
                 else r["decode tok/s"] / base} for r in rows]


def plot_pareto(rows: Sequence[dict], title: str = "", path: Sequence[dict] = (), speed_key: str = "decode tok/s",
                speed_label: str = "decode tokens/s (one stream)"):
    """Two panels: perplexity vs bytes held, and perplexity vs `speed_key`; one point per row, coloured by technique.

    Stars mark the Pareto front of `rows` + `path` and only they are labelled (the table names the rest);
    `path` (e.g. the recipe's stages, in order) is also drawn as a green line from stage to stage.
    """
    import matplotlib

    from ..report import new_figure

    fig, (ax_b, ax_s) = new_figure(2, width=7.0, height=5.5)
    pts = [r for r in [*rows, *path] if r.get("perplexity") is not None]
    techniques = list(dict.fromkeys(r["technique"] for r in pts))
    palette = matplotlib.colormaps["tab20"].colors  # dark shades first, then the light ones: 20 distinct colours
    colour = {t: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, t in enumerate(techniques)}
    for ax, key, scale, xlabel in ((ax_b, "bytes held", 2**-20, "MiB held (whole model)"),
                                   (ax_s, speed_key, 1.0, speed_label)):
        front = {id(r) for r in pareto_front(pts, key, higher_is_better=key != "bytes held")}
        labels: dict[tuple[float, float], list[str]] = {}
        for r in pts:
            if r.get(key) is None:
                continue
            x, on_front = r[key] * scale, id(r) in front
            ax.scatter(x, r["perplexity"], s=110 if on_front else 35, marker="*" if on_front else "o",
                       color=colour[r["technique"]], edgecolors="black" if on_front else "none", zorder=3)
            if on_front:  # points at the same place share one label
                labels.setdefault((round(x, 6), round(r["perplexity"], 6)), []).append(label(r))
        for (x, y), names in labels.items():
            ax.annotate(" / ".join(dict.fromkeys(names)), (x, y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        line = [(r[key] * scale, r["perplexity"]) for r in path if r.get(key) is not None and r.get("perplexity")]
        if line:
            ax.plot(*zip(*line), color="C2", lw=1.5, alpha=0.8, zorder=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
    handles = [ax_b.scatter([], [], s=35, color=colour[t], label=t) for t in techniques]
    if path:
        handles += ax_b.plot([], [], color="C2", lw=1.5, label="the recipe, stage by stage")
    ax_b.legend(handles=handles, loc="upper right", fontsize=7, title="technique", title_fontsize=7)
    ax_b.set_title("quality vs memory (stars: Pareto front)")
    ax_s.set_title("quality vs speed (stars: Pareto front)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
