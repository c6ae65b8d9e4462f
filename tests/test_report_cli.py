import nbformat
import pytest

from cookbook.cli import list_notebooks, main, results_tables, select_notebooks
from cookbook.report import RESULTS_METADATA_KEY, ResultsTable


def test_results_table_renders_markdown_and_text():
    t = ResultsTable([{"method": "fp32", "bytes": 1_000_000, "ppl": 55.0412}], title="T", digits=2)
    assert "| fp32 | 1,000,000 | 55.04 |" in t.markdown()
    assert t.text().splitlines()[0] == "T"
    assert repr(t) == t.text() and "55.0412" not in repr(t)  # echoed tables show rounded values only
    with pytest.raises(ValueError):
        ResultsTable([])


def test_cli_finds_tagged_tables():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show_results(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "TABLE"},
                                           metadata={RESULTS_METADATA_KEY: "x"})]
    nb.cells = [cell]
    assert results_tables(nb) == ["TABLE"]


def test_select_notebooks_by_number_and_errors(tmp_path):
    for name in ["00_baseline", "01_precision", "02_quant"]:
        (tmp_path / f"{name}.ipynb").write_text("{}")
    nbs = list_notebooks(tmp_path)
    assert [p.stem for p in select_notebooks(["01"], nbs)] == ["01_precision"]
    assert len(select_notebooks([], nbs)) == 3
    with pytest.raises(SystemExit, match="No notebook matches"):
        select_notebooks(["99"], nbs)


def test_cli_list_includes_the_baseline(capsys):
    assert main(["list"]) == 0
    assert "00_baseline" in capsys.readouterr().out


def test_cli_list_imports_no_technique_module():
    import subprocess
    import sys

    code = ("import sys; from cookbook.cli import main; main(['list']); "
            "print(sorted(m for m in sys.modules if m.startswith('cookbook.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])  # the list printed last
    light = {"cookbook.cli", "cookbook.data", "cookbook.errors", "cookbook.evaluate", "cookbook.measure",
             "cookbook.models", "cookbook.report"}
    assert set(loaded) <= light, f"`list` imported {sorted(set(loaded) - light)}"
