"""`minimoe grade` and tools/make_exercises.py: the grader runs the student's code against the
reference's locked checks, cannot be fooled by saved outputs or edited checks, survives broken
notebooks, and never touches the student's file.

Most tests use a two-task reference built here (fast); the last ones grade the shipped
exercises and solutions."""

import copy
import csv
import hashlib
import importlib.util
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from minimoe.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "tools" / "make_exercises.py")
make_exercises = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_exercises)

TASKS = {"9.1": ("double", "2 * x"), "9.2": ("square", "x * x")}


def code(source: str, tags=(), outputs=(), count=None) -> dict:
    metadata = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "execution_count": count, "metadata": metadata, "outputs": list(outputs),
            "source": source}


def stdout(text: str) -> dict:
    return {"name": "stdout", "output_type": "stream", "text": text}


def reference_notebook() -> dict:
    """A solved, executed two-task notebook in the course's format."""
    cells, count = [code("import numpy as np", count=1)], 1
    for task, (name, formula) in TASKS.items():
        count += 1
        cells.append(code(f"def {name}(x):\n    ### BEGIN SOLUTION\n    return {formula}\n    ### END SOLUTION",
                          tags=[f"solution-{task}"], count=count))
        count += 1
        check = (f"# NBVAL_CHECK_OUTPUT\nfrom minimoe.checks import run_check\n"
                 f"run_check('{task}', {name}, lambda x: {formula}, lambda rng: (rng.normal(size=3),))")
        cells.append(code(check, tags=[f"task-{task}"], outputs=[stdout(f"task {task}: PASS (3 random cases)\n")],
                          count=count))
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 4}


@pytest.fixture
def course(tmp_path):
    """solutions/09_demo.ipynb and the exercise generated from it; returns (reference_dir, exercise dict)."""
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    (solutions / "09_demo.ipynb").write_text(json.dumps(reference_notebook()))
    exercise = make_exercises.make_exercise(reference_notebook(), "09_demo")
    return solutions, exercise


def solve(exercise: dict, *tasks: str) -> dict:
    """The exercise with the given tasks answered the way a student would."""
    solved = copy.deepcopy(exercise)
    for cell in solved["cells"]:
        for task in tasks:
            if f"solution-{task}" in cell["metadata"].get("tags", []):
                name, formula = TASKS[task]
                cell["source"] = f"def {name}(x):\n    return {formula}\n"
    return solved


def grade(tmp_path, notebooks: dict[str, dict | str], reference: Path, *extra: str, timeout="20"):
    """Write the student notebooks, grade them via the CLI; returns (exit code, rows of the CSV)."""
    paths = []
    for name, content in notebooks.items():
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        paths.append(str(path))
    report = tmp_path / "grades.csv"
    code_ = cli(["grade", *paths, "--reference", str(reference), "--csv", str(report), "--timeout", timeout, *extra])
    rows = list(csv.DictReader(report.open())) if report.exists() else []
    return code_, rows


def passed(rows) -> dict[str, bool]:
    return {r["task"]: r["passed"] == "True" for r in rows}


# ---- make_exercises ---------------------------------------------------------------------------

def test_make_exercise_stubs_solution_blocks_and_clears_outputs():
    exercise = make_exercises.make_exercise(reference_notebook(), "09_demo")
    sources = [cell["source"] for cell in exercise["cells"]]
    assert sources[1] == 'def double(x):\n    raise NotImplementedError("task 9.1")\n'
    assert "BEGIN SOLUTION" not in "".join(sources) and "2 * x\n" not in sources[1]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in exercise["cells"])
    assert exercise["metadata"]["minimoe"] == {"exercise": "09_demo"}
    assert exercise["cells"][2]["metadata"]["tags"] == ["task-9.1"]  # the check cell stays, tagged


@pytest.mark.parametrize("source, tags, match", [
    ("### BEGIN SOLUTION\nx = 1\n", ["solution-9.1"], "without"),
    ("### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION\n", ["solution-9.1"], "without"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", ["solution-9.1"], "nested"),
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", [], "no `solution-N.M` tag"),
    ("x = 1\n", ["solution-9.1"], "no ### BEGIN SOLUTION block"),
])
def test_make_exercise_rejects_malformed_solutions(source, tags, match):
    notebook = {"cells": [code(source, tags=tags)], "metadata": {}}
    with pytest.raises(make_exercises.ExerciseError, match=match):
        make_exercises.make_exercise(notebook, "bad")


def test_check_mode_detects_stale_missing_and_orphan_exercises(tmp_path, capsys):
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    (solutions / "09_demo.ipynb").write_text(json.dumps(reference_notebook()))
    args = ["--solutions", str(solutions), "--exercises", str(exercises)]
    assert make_exercises.main([*args, "--check"]) == 1  # missing
    assert make_exercises.main(args) == 0
    assert make_exercises.main([*args, "--check"]) == 0
    stale = exercises / "09_demo.ipynb"
    stale.write_text(stale.read_text().replace("task 9.1", "task 9.9"))
    assert make_exercises.main([*args, "--check"]) == 1
    make_exercises.main(args)
    (exercises / "10_orphan.ipynb").write_text("{}")
    assert make_exercises.main([*args, "--check"]) == 1
    assert "no solution for" in capsys.readouterr().err


def test_shipped_exercises_are_generated_from_shipped_solutions():
    assert make_exercises.main(["--check"]) == 0


# ---- the grader on a two-task notebook ----------------------------------------------------------

def test_unsolved_exercise_scores_zero_and_solutions_score_full(tmp_path, course):
    reference, exercise = course
    exit_code, rows = grade(tmp_path, {"stub.ipynb": exercise, "09_demo.ipynb": reference_notebook()}, reference)
    assert exit_code == 0
    by_notebook = {(r["notebook"], r["task"]): r for r in rows}
    assert [r["passed"] for k, r in by_notebook.items() if k[0] == "stub.ipynb"] == ["False", "False"]
    assert "not implemented" in by_notebook["stub.ipynb", "9.1"]["detail"]
    assert [r["passed"] for k, r in by_notebook.items() if k[0] == "09_demo.ipynb"] == ["True", "True"]


def test_one_solved_task_scores_exactly_that_task(tmp_path, course):
    reference, exercise = course
    _, rows = grade(tmp_path, {"alice.ipynb": solve(exercise, "9.2")}, reference)
    assert passed(rows) == {"9.1": False, "9.2": True}


def test_pasted_pass_outputs_score_zero(tmp_path, course):
    reference, exercise = course
    forged = copy.deepcopy(reference_notebook())  # all PASS outputs saved ...
    for cell, stubbed in zip(forged["cells"], exercise["cells"], strict=True):
        cell["source"] = stubbed["source"]  # ... but the code is still the stubs
    forged["metadata"] = exercise["metadata"]
    _, rows = grade(tmp_path, {"forged.ipynb": forged}, reference)
    assert passed(rows) == {"9.1": False, "9.2": False}


def test_edited_check_cell_scores_zero(tmp_path, course):
    reference, exercise = course
    edited = copy.deepcopy(exercise)
    for cell in edited["cells"]:
        if cell["metadata"].get("tags") == ["task-9.1"]:
            cell["source"] = "# NBVAL_CHECK_OUTPUT\nprint('task 9.1: PASS (3 random cases)')"
    _, rows = grade(tmp_path, {"edited.ipynb": edited}, reference)
    assert passed(rows) == {"9.1": False, "9.2": False}


def test_wrong_answer_fails_with_the_checks_reason(tmp_path, course):
    reference, exercise = course
    wrong = solve(exercise, "9.1")
    wrong["cells"][1]["source"] = "def double(x):\n    return 3 * x\n"
    _, rows = grade(tmp_path, {"wrong.ipynb": wrong}, reference)
    assert passed(rows)["9.1"] is False
    assert "CheckFailure: task 9.1" in rows[0]["detail"] and "differ" in rows[0]["detail"]


def test_deleted_check_cell_fails_that_task_and_says_so(tmp_path, course):
    reference, exercise = course
    solved = solve(exercise, "9.1", "9.2")
    solved["cells"] = [c for c in solved["cells"] if c["metadata"].get("tags") != ["task-9.2"]]
    _, rows = grade(tmp_path, {"deleted.ipynb": solved}, reference)
    assert passed(rows) == {"9.1": True, "9.2": False}
    assert "deleted" in rows[1]["detail"]


def test_inserted_cells_are_kept_and_run(tmp_path, course):
    reference, exercise = course
    solved = solve(exercise, "9.1", "9.2")
    solved["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": "my notes"})
    solved["cells"].insert(2, code("helper = 2"))
    solved["cells"][3]["source"] = "def double(x):\n    return helper * x\n"  # uses the inserted cell
    _, rows = grade(tmp_path, {"inserted.ipynb": solved}, reference)
    assert passed(rows) == {"9.1": True, "9.2": True}


def test_infinite_loop_times_out_and_later_tasks_are_still_graded(tmp_path, course):
    reference, exercise = course
    looping = solve(exercise, "9.1", "9.2")
    looping["cells"][1]["source"] = "def double(x):\n    while True:\n        pass\n"
    start = time.monotonic()
    _, rows = grade(tmp_path, {"loop.ipynb": looping}, reference, timeout="5")
    assert time.monotonic() - start < 60
    assert passed(rows) == {"9.1": False, "9.2": True}
    assert "Timeout" in rows[0]["detail"]


def test_kernel_crash_fails_the_remaining_tasks_without_crashing_the_grader(tmp_path, course):
    reference, exercise = course
    crashing = solve(exercise, "9.1", "9.2")
    crashing["cells"].insert(3, code("import os\nos._exit(1)"))  # after task 9.1's check
    exit_code, rows = grade(tmp_path, {"crash.ipynb": crashing}, reference, timeout="10")
    assert exit_code == 0
    assert passed(rows) == {"9.1": True, "9.2": False}


def test_invalid_json_fails_every_task(tmp_path, course):
    reference, _ = course
    exit_code, rows = grade(tmp_path, {"09_demo.ipynb": "{ not json"}, reference)
    assert exit_code == 0
    assert passed(rows) == {"9.1": False, "9.2": False}
    assert all("not a valid notebook" in r["detail"] for r in rows)


def test_batch_of_three_gives_a_csv_row_per_notebook_and_task_and_junit(tmp_path, course):
    reference, exercise = course
    students = {"a.ipynb": solve(exercise, "9.1", "9.2"), "b.ipynb": solve(exercise, "9.1"), "c.ipynb": exercise}
    junit = tmp_path / "report.xml"
    exit_code, rows = grade(tmp_path, students, reference, "--junit-xml", str(junit))
    assert exit_code == 0
    assert [(r["notebook"], r["task"], r["passed"]) for r in rows] == [
        ("a.ipynb", "9.1", "True"), ("a.ipynb", "9.2", "True"),
        ("b.ipynb", "9.1", "True"), ("b.ipynb", "9.2", "False"),
        ("c.ipynb", "9.1", "False"), ("c.ipynb", "9.2", "False")]
    assert list(rows[0]) == ["notebook", "task", "passed", "detail"]
    suites = ET.parse(junit).getroot().findall("testsuite")
    assert [(s.get("name"), s.get("tests"), s.get("failures")) for s in suites] == [
        ("a.ipynb", "2", "0"), ("b.ipynb", "2", "1"), ("c.ipynb", "2", "2")]


def test_student_file_is_never_modified(tmp_path, course):
    reference, exercise = course
    path = tmp_path / "mine.ipynb"
    path.write_text(json.dumps(solve(exercise, "9.1"), indent=3))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cli(["grade", str(path), "--reference", str(reference), "--timeout", "20"]) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_renamed_notebook_is_matched_by_its_metadata(tmp_path, course, capsys):
    reference, exercise = course
    _, rows = grade(tmp_path, {"bob_final_v2.ipynb": solve(exercise, "9.1")}, reference)
    assert passed(rows) == {"9.1": True, "9.2": False}
    assert "score bob_final_v2.ipynb: 1/2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["missing.ipynb"], "no such notebook"),
    (["STUDENT", "--timeout", "0"], "--timeout"),
    (["STUDENT", "--reference", "nowhere"], "--reference"),
    (["UNMATCHED"], "no reference"),
])
def test_usage_errors_exit_non_zero(tmp_path, course, capsys, args, message):
    reference, exercise = course
    (tmp_path / "STUDENT").write_text(json.dumps(exercise))
    unmatched = copy.deepcopy(exercise)
    unmatched["metadata"].pop("minimoe")
    (tmp_path / "UNMATCHED").write_text(json.dumps(unmatched))
    args = [str(tmp_path / a) if a in ("STUDENT", "UNMATCHED", "missing.ipynb") else a for a in args]
    if "--reference" not in args:
        args += ["--reference", str(reference)]
    assert cli(["grade", *args]) == 2
    assert message in capsys.readouterr().err


# ---- the shipped exercises and solutions --------------------------------------------------------

SHIPPED = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_exercise_scores_zero_and_its_solution_full(tmp_path, name):
    results = {}
    for folder in ("exercises", "solutions"):
        report = tmp_path / f"{folder}.csv"
        assert cli(["grade", str(ROOT / folder / name), "--reference", str(ROOT / "solutions"),
                    "--csv", str(report), "--timeout", "120"]) == 0
        results[folder] = [r["passed"] for r in csv.DictReader(report.open())]
    assert len(results["solutions"]) >= 3
    assert set(results["exercises"]) == {"False"} and set(results["solutions"]) == {"True"}
