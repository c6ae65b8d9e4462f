"""Print the README's results table from a bench report: `python scripts/readme_results.py reports/cpu.json`.

Every figure comes from the report's rows (what `python -m cookbook bench` measured); nothing is typed in.
Bytes read per token are in the report; for a tied model such as Gemma 3 they equal the bytes held.
"""

import sys

from cookbook.bench import load_report, speed_vs_baseline

HEADER = ("technique", "variant", "MiB held", "perplexity", "vs baseline", "decode tok/s", "x baseline", "% roofline")


def cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(path: str) -> str:
    report = load_report(path)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in speed_vs_baseline(report.rows):
        if r["variant"] == "failed" or (r["decode tok/s"] is None and r["perplexity"] is None
                                        and "not measured" in (r["notes"] or "")):
            continue  # rows the report explains and that hold no measurement
        mib = lambda key: None if r.get(key) is None else r[key] / 2**20
        rel = None if r["rel. change"] is None else 100 * r["rel. change"]
        lines.append("| " + " | ".join([
            r["technique"], r["variant"], cell(mib("bytes held"), ",.1f"),
            cell(r["perplexity"], ",.2f"), cell(rel, "+.1f") + ("%" if rel is not None else ""),
            cell(r["decode tok/s"], ".1f"), cell(r["decode x baseline"], ".2f"), cell(r.get("% roofline"), ".0f"),
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "reports/cpu.json"))
