"""The README's results table is the one `scripts/readme_results.py` prints from the report the README names,
so no figure in it is typed: rerun the script after a new bench run and paste its output."""

import importlib.util
import re
from pathlib import Path

import pytest

from cookbook.bench import load_report

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """scripts/<name>.py imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_its_report():
    readme = (ROOT / "README.md").read_text()
    named = re.search(r"`python scripts/readme_results\.py (\S+)`", readme)
    assert named, "the README names the report its results table was copied from"
    report_path = ROOT / named.group(1)
    table = script("readme_results").table(str(report_path))
    assert table in readme, f"README's results table differs from {named.group(1)}: paste `python " \
                            f"scripts/readme_results.py {named.group(1)}` into it"
    report = load_report(report_path)
    assert f"wrote on {report.date} in {report.wall_s / 60:.1f} minutes" in readme, "the date and run time stated"


def test_readme_states_each_linked_reports_date_and_run_time():
    """Every bench report the README links (the AMD EPYC's of the table, the Xeon's of the paragraph after it) is
    quoted with the date and run time it records: after a rerun of either bench this fails until the README's
    figures from that report are reread (the Xeon paragraph's and the bullets' are copied by hand, not printed by
    the script)."""
    readme = (ROOT / "README.md").read_text()
    linked = sorted(set(re.findall(r"\]\((reports/[\w.-]+)\.md\)", readme)))
    assert linked, "the README links its bench reports"
    for name in linked:
        report = load_report(ROOT / f"{name}.json")
        stated = f"on {report.date} in {report.wall_s / 60:.1f} minutes"
        assert stated in readme, f"README should say the run of {name}.md was {stated}"


def test_the_runs_in_column_is_written_from_a_test_log():
    """Every notebook row of the README has a "runs in" time, and `scripts/notebook_times.py` fills that column from
    a `pytest --durations=0` log: the sum of each notebook's cell durations, in minutes."""
    nt = script("notebook_times")
    readme = (ROOT / "README.md").read_text()
    names = [name for _, name, _, _ in nt.ROW.findall(readme)]
    assert len(names) == len(list((ROOT / "notebooks").glob("*.ipynb"))), "one timed row per notebook"
    log = "\n".join(f"{s:.2f}s {kind}     notebooks/{name}.ipynb::Cell {i}"
                    for name in names for i, (s, kind) in enumerate([(30.0, "call"), (29.0, "call"), (1.0, "setup")]))
    log += "\n12.00s call     tests/test_models.py::test_something\n"
    minutes = nt.notebook_minutes(log)
    assert minutes == {name: 1.0 for name in names}
    written = nt.with_times(readme, minutes)
    assert [t for *_, t, _ in nt.ROW.findall(written)] == ["1.0 min"] * len(names)
    with pytest.raises(ValueError, match="durations=0"):
        nt.notebook_minutes("3.00s call     tests/test_models.py::test_something")
    with pytest.raises(ValueError, match=names[0]):
        nt.with_times(readme, {name: 1.0 for name in names[1:]})
