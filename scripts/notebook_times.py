"""The README's "runs in" column from one test run, so that no notebook time in it is typed:

    PYTEST_ADDOPTS="--durations=0" .ci/run > LOG 2>&1
    python scripts/notebook_times.py LOG            # prints each notebook's minutes
    python scripts/notebook_times.py LOG --write    # and puts them in README.md's notebook table

A notebook's time is the sum of its cells' setup, call and teardown durations as pytest reports them (nbval makes
each code cell a test item); pytest hides durations under 5 ms, which cannot move a figure given to 0.1 min.
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DURATION = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+notebooks/(\w+)\.ipynb::", re.MULTILINE)
ROW = re.compile(r"^(\| \[(\w+)\]\(notebooks/\w+\.ipynb\) \|.*\| )([0-9.]+ min)( \|)$", re.MULTILINE)


def notebook_minutes(log: str) -> dict[str, float]:
    """{notebook name: minutes} summed over its cells' durations in a `pytest --durations=0` log."""
    seconds: dict[str, float] = defaultdict(float)
    for value, name in DURATION.findall(log):
        seconds[name] += float(value)
    if not seconds:
        raise ValueError("No notebook cell durations in this log: run pytest with --durations=0 "
                         "(PYTEST_ADDOPTS=\"--durations=0\" .ci/run > LOG 2>&1).")
    return {name: s / 60 for name, s in sorted(seconds.items())}


def with_times(readme: str, minutes: dict[str, float]) -> str:
    """README text with each notebook row's last column replaced by its minutes; every row must have a time."""
    missing = [name for _, name, _, _ in ROW.findall(readme) if name not in minutes]
    if missing:
        raise ValueError(f"The log has no durations for {', '.join(missing)}: was the whole suite run?")
    return ROW.sub(lambda m: f"{m.group(1)}{minutes[m.group(2)]:.1f} min{m.group(4)}", readme)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    minutes = notebook_minutes(Path(argv[0]).read_text())
    for name, value in minutes.items():
        print(f"{name:28s} {value:5.1f} min")
    if "--write" in argv[1:]:
        README.write_text(with_times(README.read_text(), minutes))
        print("wrote the 'runs in' column of", README)


if __name__ == "__main__":
    main(sys.argv[1:])
