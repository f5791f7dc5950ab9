"""The root conftest.py's xdist scheduler: a notebook's cells and a test file's tests stay on one
worker; only tests/test_numeric_paths.py goes out test by test."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
root_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(root_conftest)
scope = root_conftest._ByFile._split_scope


def test_a_notebooks_cells_and_a_files_tests_share_one_scope():
    assert scope(None, "course/07_moe_transformer.ipynb::Cell 5") == "course/07_moe_transformer.ipynb"
    assert scope(None, "course/07_moe_transformer.ipynb::Cell 12") == "course/07_moe_transformer.ipynb"
    assert scope(None, "tests/test_grading.py::test_edited_check_cell_scores_zero") == "tests/test_grading.py"
    assert scope(None, "tests/test_layer.py::TestX::test_y[a::b]") == "tests/test_layer.py"


def test_numeric_path_runs_each_get_their_own_scope():
    a = "tests/test_numeric_paths.py::test_notebook_checked_outputs_hold_on_scalar_kernels_and_one_thread[07.ipynb]"
    b = a.replace("07", "09")
    assert scope(None, a) == a and scope(None, b) == b
