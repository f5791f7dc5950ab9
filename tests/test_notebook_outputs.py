"""The committed notebooks are executed, in order, without errors, and every figure was rendered
as an image (a Figure left as text means the notebook lacks `%matplotlib inline`)."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = sorted([*ROOT.glob("course/*.ipynb"), *ROOT.glob("solutions/*.ipynb")])


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebook_is_executed_in_order_with_rendered_figures(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    counts = [cell.execution_count for cell in code]
    assert None not in counts, f"{path.name}: unexecuted code cells"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: not run in order: {counts}"
    for index, cell in enumerate(code):
        for output in cell.outputs:
            assert output.output_type != "error", f"{path.name}: code cell {index} has an error output"
            data = output.get("data", {})
            text = data.get("text/plain", "")
            assert not (text.startswith("<Figure size") and "image/png" not in data), (
                f"{path.name}: code cell {index} shows a Figure as text, not an image")
