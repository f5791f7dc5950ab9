"""`minimoe grade` and tools/make_exercises.py: the grader runs the student's code against the
reference's locked checks, compares the learner's outputs in its own process, cannot be talked
into points (saved outputs, edited checks, patched checks, hidden tracebacks, minimoe's own
implementation, the solutions read from disk), survives broken notebooks, and never touches the
student's file.

Grading starts a kernel per notebook, so notebooks are graded in batches, one `minimoe grade`
call per module-scoped fixture: a two-task demo course built here, attacks on the shipped
exercise 01, and every shipped exercise and solution."""

import contextlib
import copy
import csv
import hashlib
import importlib.util
import io
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from textwrap import dedent

import pytest

from minimoe.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "tools" / "make_exercises.py")
make_exercises = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_exercises)

SOFTMAX = "z = np.exp(logits - logits.max(axis=1, keepdims=True))\n    return z / z.sum(axis=1, keepdims=True)"
SWITCH = ("z = np.exp(logits - logits.max(axis=1, keepdims=True))\n    p = z / z.sum(axis=1, keepdims=True)\n"
          "    return np.where(np.arange(p.shape[1]) == logits.argmax(axis=1)[:, None], p, 0.0)")
TASKS = {"1.1": ("softmax_gate", SOFTMAX), "1.4": ("switch_gate", SWITCH)}


def code(source: str, tags=(), outputs=(), count=None) -> dict:
    metadata = {"tags": list(tags)} if tags else {}
    return {"cell_type": "code", "execution_count": count, "metadata": metadata, "outputs": list(outputs),
            "source": source}


def stdout(text: str) -> dict:
    return {"name": "stdout", "output_type": "stream", "text": text}


def reference_notebook() -> dict:
    """A solved, executed two-task notebook in the course's format (tasks 1.1 and 1.4 of chapter 01)."""
    cells, count = [code("import numpy as np", count=1)], 1
    for task, (name, body) in TASKS.items():
        count += 1
        cells.append(code(f"def {name}(logits):\n    ### BEGIN SOLUTION\n    {body}\n    ### END SOLUTION",
                          tags=[f"solution-{task}"], count=count))
        count += 1
        check = f"# NBVAL_CHECK_OUTPUT\nfrom minimoe.checks import ch01\nch01.check_{name}({name})"
        cells.append(code(check, tags=[f"task-{task}"], outputs=[stdout(f"task {task}: PASS (3 random cases)\n")],
                          count=count))
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}},
            "nbformat": 4, "nbformat_minor": 4}


def answer(exercise: dict, answers: dict[str, str]) -> dict:
    """The exercise with the solution cell of each task replaced by the given source."""
    answered = copy.deepcopy(exercise)
    for cell in answered["cells"]:
        for task, source in answers.items():
            if f"solution-{task}" in cell["metadata"].get("tags", []):
                cell["source"] = source
    return answered


def solve(exercise: dict, *tasks: str) -> dict:
    """The demo exercise with the given tasks answered the way a student would."""
    return answer(exercise, {t: f"def {TASKS[t][0]}(logits):\n    {TASKS[t][1]}\n" for t in tasks})


def insert_after(notebook: dict, tag: str, source: str) -> dict:
    """The notebook with a code cell inserted after the cell tagged `tag`."""
    changed = copy.deepcopy(notebook)
    index = next(i for i, c in enumerate(changed["cells"]) if tag in c["metadata"].get("tags", []))
    changed["cells"].insert(index + 1, code(source))
    return changed


def grade(folder: Path, notebooks: dict[str, dict | str], reference: Path, *extra: str, timeout="30"):
    """Write the student notebooks, grade them in one CLI call; (exit code, {notebook: {task: row}}, stdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in notebooks.items():
        path = folder / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        paths.append(str(path))
    report = folder / "grades.csv"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exit_code = cli(["grade", *paths, "--reference", str(reference), "--csv", str(report), "--timeout", timeout,
                         *extra])
    rows = list(csv.DictReader(report.open())) if report.exists() else []
    by_notebook: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_notebook.setdefault(row["notebook"], {})[row["task"]] = row
    return exit_code, by_notebook, out.getvalue()


def passed(rows: dict[str, dict]) -> dict[str, bool]:
    return {task: row["passed"] == "True" for task, row in rows.items()}


# ---- make_exercises ---------------------------------------------------------------------------

def test_make_exercise_stubs_solution_blocks_and_clears_outputs():
    exercise = make_exercises.make_exercise(reference_notebook(), "01_demo")
    sources = [cell["source"] for cell in exercise["cells"]]
    assert sources[1] == 'def softmax_gate(logits):\n    raise NotImplementedError("task 1.1")\n'
    assert "BEGIN SOLUTION" not in "".join(sources) and "np.exp" not in sources[1]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in exercise["cells"])
    assert exercise["metadata"]["minimoe"] == {"exercise": "01_demo"}
    assert exercise["cells"][2]["metadata"]["tags"] == ["task-1.1"]  # the check cell stays, tagged


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
    (solutions / "01_demo.ipynb").write_text(json.dumps(reference_notebook()))
    args = ["--solutions", str(solutions), "--exercises", str(exercises)]
    assert make_exercises.main([*args, "--check"]) == 1  # missing
    assert make_exercises.main(args) == 0
    assert make_exercises.main([*args, "--check"]) == 0
    stale = exercises / "01_demo.ipynb"
    stale.write_text(stale.read_text().replace("task 1.1", "task 1.9"))
    assert make_exercises.main([*args, "--check"]) == 1
    make_exercises.main(args)
    (exercises / "10_orphan.ipynb").write_text("{}")
    assert make_exercises.main([*args, "--check"]) == 1
    assert "no solution for" in capsys.readouterr().err


def test_shipped_exercises_are_generated_from_shipped_solutions():
    assert make_exercises.main(["--check"]) == 0


# ---- the grader on the two-task demo course: one batch -------------------------------------------

@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """solutions/01_demo.ipynb and the exercise generated from it; returns (reference_dir, exercise dict)."""
    solutions = tmp_path_factory.mktemp("course") / "solutions"
    solutions.mkdir()
    (solutions / "01_demo.ipynb").write_text(json.dumps(reference_notebook()))
    return solutions, make_exercises.make_exercise(reference_notebook(), "01_demo")


def counting_softmax(right_while: str) -> str:
    """A softmax_gate that counts its calls and answers right only while `right_while` holds: the
    grader's comparison makes calls 1 to 3, the check cell the next three."""
    return (f"calls = 0\ndef softmax_gate(logits):\n    global calls\n    calls += 1\n"
            f"    if not ({right_while}):\n        return logits\n    {SOFTMAX}\n")


def demo_batch(exercise: dict) -> dict[str, dict | str]:
    """Student notebooks, each showing one behaviour of the grader (see the tests below)."""
    forged = copy.deepcopy(reference_notebook())  # all PASS outputs saved ...
    for cell, stubbed in zip(forged["cells"], exercise["cells"], strict=True):
        cell["source"] = stubbed["source"]  # ... but the code is still the stubs
    forged["metadata"] = exercise["metadata"]
    edited = copy.deepcopy(exercise)
    for cell in edited["cells"]:
        if cell["metadata"].get("tags") == ["task-1.1"]:
            cell["source"] = "# NBVAL_CHECK_OUTPUT\nprint('task 1.1: PASS (3 random cases)')"
    deleted = solve(exercise, "1.1", "1.4")
    deleted["cells"] = [c for c in deleted["cells"] if c["metadata"].get("tags") != ["task-1.4"]]
    inserted = solve(exercise, "1.1", "1.4")
    inserted["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "source": "my notes"})
    inserted["cells"].insert(2, code("shift = 0.0"))
    inserted["cells"][3]["source"] = f"def softmax_gate(logits):\n    logits = logits + shift\n    {SOFTMAX}\n"
    solved = reference_notebook()
    solved["metadata"] = exercise["metadata"]
    return {
        "stub.ipynb": exercise,
        "solved.ipynb": solved,
        "alice.ipynb": solve(exercise, "1.4"),
        "forged.ipynb": forged,
        "edited.ipynb": edited,
        "wrong.ipynb": answer(solve(exercise, "1.4"), {"1.1": "def softmax_gate(logits):\n    return np.exp(logits)"}),
        "deleted.ipynb": deleted,
        "inserted.ipynb": inserted,
        "crash.ipynb": insert_after(solve(exercise, "1.1", "1.4"), "task-1.1", "import os\nos._exit(1)"),
        "01_demo.ipynb": "{ not json",  # found by its name
        "bob_final_v2.ipynb": solve(exercise, "1.1"),
        # right for the grader's three calls, wrong in the check cell: the cell's reply fails it
        "right_then_wrong.ipynb": answer(exercise, {"1.1": counting_softmax(right_while="calls <= 3")}),
        # wrong for the grader's three calls, right in the check cell: the grader's comparison fails it
        "wrong_then_right.ipynb": answer(exercise, {"1.1": counting_softmax(right_while="calls > 3")}),
    }


@pytest.fixture(scope="module")
def demo(course, tmp_path_factory):
    """The demo batch graded once: (exit code, rows by notebook, stdout, JUnit root, sha256 of each
    file before, after)."""
    reference, exercise = course
    folder = tmp_path_factory.mktemp("demo")
    files = {name: nb if isinstance(nb, str) else json.dumps(nb, indent=3) for name, nb in demo_batch(exercise).items()}
    before = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}
    exit_code, rows, out = grade(folder, files, reference, "--junit-xml", str(folder / "report.xml"))
    after = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files}
    return exit_code, rows, out, ET.parse(folder / "report.xml").getroot(), before, after


def test_unsolved_exercise_scores_zero_and_solutions_score_full(demo):
    exit_code, rows, *_ = demo
    assert exit_code == 0
    assert passed(rows["stub.ipynb"]) == {"1.1": False, "1.4": False}
    assert "not implemented" in rows["stub.ipynb"]["1.1"]["detail"]
    assert passed(rows["solved.ipynb"]) == {"1.1": True, "1.4": True}


def test_one_solved_task_scores_exactly_that_task(demo):
    assert passed(demo[1]["alice.ipynb"]) == {"1.1": False, "1.4": True}


def test_pasted_pass_outputs_score_zero(demo):
    assert passed(demo[1]["forged.ipynb"]) == {"1.1": False, "1.4": False}


def test_edited_check_cell_scores_zero(demo):
    assert passed(demo[1]["edited.ipynb"]) == {"1.1": False, "1.4": False}


def test_wrong_answer_fails_with_the_comparisons_reason(demo):
    rows = demo[1]["wrong.ipynb"]
    assert passed(rows) == {"1.1": False, "1.4": True}
    assert "CheckFailure: task 1.1: case 1 of 3" in rows["1.1"]["detail"] and "differ" in rows["1.1"]["detail"]


def test_deleted_check_cell_fails_that_task_and_says_so(demo):
    rows = demo[1]["deleted.ipynb"]
    assert passed(rows) == {"1.1": True, "1.4": False}
    assert "deleted" in rows["1.4"]["detail"]


def test_inserted_cells_are_kept_and_run(demo):
    assert passed(demo[1]["inserted.ipynb"]) == {"1.1": True, "1.4": True}


def test_kernel_crash_fails_the_remaining_tasks_without_crashing_the_grader(demo):
    rows = demo[1]["crash.ipynb"]
    assert passed(rows) == {"1.1": True, "1.4": False}
    assert "the kernel died" in rows["1.4"]["detail"]


def test_invalid_json_fails_every_task(demo):
    rows = demo[1]["01_demo.ipynb"]
    assert passed(rows) == {"1.1": False, "1.4": False}
    assert all("not a valid notebook" in r["detail"] for r in rows.values())


def test_renamed_notebook_is_matched_by_its_metadata(demo):
    assert passed(demo[1]["bob_final_v2.ipynb"]) == {"1.1": True, "1.4": False}
    assert "score bob_final_v2.ipynb: 1/2" in demo[2]


def test_a_check_cell_that_fails_fails_the_task_though_the_grader_saw_right_outputs(demo):
    rows = demo[1]["right_then_wrong.ipynb"]
    assert passed(rows) == {"1.1": False, "1.4": False}
    assert rows["1.1"]["detail"].startswith("CheckFailure: task 1.1") and "(in the check cell)" in rows["1.1"]["detail"]


def test_wrong_outputs_for_the_grader_fail_the_task_though_the_check_cell_passes(demo):
    rows = demo[1]["wrong_then_right.ipynb"]
    assert passed(rows) == {"1.1": False, "1.4": False}
    assert "CheckFailure: task 1.1: case 1 of 3" in rows["1.1"]["detail"] and "check cell" not in rows["1.1"]["detail"]


def test_batch_gives_a_csv_row_per_notebook_and_task_and_junit(demo, course):
    _, rows, _, junit, *_ = demo
    assert list(rows) == list(demo_batch(course[1]))
    assert all(list(r) == ["1.1", "1.4"] for r in rows.values())
    assert list(next(iter(rows["stub.ipynb"].values()))) == ["notebook", "task", "passed", "detail"]
    suites = {s.get("name"): (s.get("tests"), s.get("failures")) for s in junit.findall("testsuite")}
    assert suites["solved.ipynb"] == ("2", "0") and suites["alice.ipynb"] == ("2", "1")
    assert suites["stub.ipynb"] == ("2", "2") and len(suites) == len(rows)


def test_student_files_are_never_modified(demo):
    *_, before, after = demo
    assert before == after


def test_infinite_loop_times_out_and_later_tasks_are_still_graded(tmp_path, course):
    reference, exercise = course
    looping = answer(solve(exercise, "1.4"), {"1.1": "def softmax_gate(logits):\n    while True:\n        pass\n"})
    start = time.monotonic()
    _, rows, _ = grade(tmp_path, {"loop.ipynb": looping}, reference, timeout="5")
    assert time.monotonic() - start < 60
    assert passed(rows["loop.ipynb"]) == {"1.1": False, "1.4": True}
    assert "Timeout" in rows["loop.ipynb"]["1.1"]["detail"]


@pytest.mark.parametrize("args, message", [
    (["missing.ipynb"], "no such notebook"),
    (["STUDENT", "--timeout", "0"], "--timeout"),
    (["STUDENT", "--reference", "nowhere"], "--reference"),
    (["UNMATCHED"], "no reference"),
    (["STUDENT", "--sandbox", "--reference", sys.prefix], "cannot hide"),
    (["STUDENT", "--package-use", "ignore"], "invalid choice"),
])
def test_usage_errors_exit_non_zero(tmp_path, course, capsys, args, message):
    reference, exercise = course
    if "--sandbox" in args and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    (tmp_path / "STUDENT").write_text(json.dumps(exercise))
    unmatched = copy.deepcopy(exercise)
    unmatched["metadata"].pop("minimoe")
    (tmp_path / "UNMATCHED").write_text(json.dumps(unmatched))
    args = [str(tmp_path / a) if a in ("STUDENT", "UNMATCHED", "missing.ipynb") else a for a in args]
    if "--reference" not in args:
        args += ["--reference", str(reference)]
    try:
        code_ = cli(["grade", *args])
    except SystemExit as exit_:  # argparse's own errors
        code_ = exit_.code
    assert code_ == 2
    assert message in capsys.readouterr().err


def test_sandbox_without_bubblewrap_is_a_usage_error(tmp_path, course, capsys, monkeypatch):
    reference, exercise = course
    monkeypatch.setattr("minimoe.grade.sandbox_available", lambda: False)
    (tmp_path / "s.ipynb").write_text(json.dumps(exercise))
    assert cli(["grade", str(tmp_path / "s.ipynb"), "--reference", str(reference), "--sandbox"]) == 2
    assert "bubblewrap" in capsys.readouterr().err


def test_a_kernel_that_does_not_start_fails_every_task_and_says_why(tmp_path, course, monkeypatch):
    reference, exercise = course
    monkeypatch.setattr("minimoe.grade.sandbox_available", lambda: True)
    monkeypatch.setattr("minimoe.grading.kernel._sandbox", lambda work, exchange: ["false"])  # exits at once
    _, rows, _ = grade(tmp_path, {"s.ipynb": solve(exercise, "1.1", "1.4")}, reference, "--sandbox")
    assert passed(rows["s.ipynb"]) == {"1.1": False, "1.4": False}
    assert rows["s.ipynb"]["1.1"]["detail"].startswith("the kernel did not start")


def test_a_reference_whose_check_cell_calls_no_check_is_a_usage_error(tmp_path, course, capsys):
    _, exercise = course
    reference = tmp_path / "solutions"
    reference.mkdir()
    broken = reference_notebook()
    broken["cells"][2]["source"] = "# NBVAL_CHECK_OUTPUT\nprint('task 1.1: PASS (3 random cases)')"
    (reference / "01_demo.ipynb").write_text(json.dumps(broken))
    (tmp_path / "s.ipynb").write_text(json.dumps(exercise))
    assert cli(["grade", str(tmp_path / "s.ipynb"), "--reference", str(reference)]) == 2
    assert "must call a check of minimoe.checks" in capsys.readouterr().err


# ---- attacks on the shipped exercise 01: one batch ------------------------------------------------

EXERCISE_01 = json.loads((ROOT / "exercises" / "01_numpy_gate.ipynb").read_text())
SOLUTION_CELLS_01 = {tag[len("solution-"):]: "".join(c["source"])
                     for c in json.loads((ROOT / "solutions" / "01_numpy_gate.ipynb").read_text())["cells"]
                     for tag in c["metadata"].get("tags", []) if tag.startswith("solution-")}
IDENTITY = "def softmax_gate(logits):\n    return logits\n"
READ_SOLUTION = """\
import json, pathlib, minimoe
path = pathlib.Path(minimoe.__file__).parents[1] / 'solutions' / '01_numpy_gate.ipynb'
cells = json.loads(path.read_text())['cells']
source = ''.join([c for c in cells if 'solution-1.1' in c['metadata'].get('tags', [])][0]['source'])
"""

ATTACKS = {
    # the three
    "patch": {"1.1": dedent("""\
        import minimoe.checks, minimoe.checks.ch01
        def fake_run_check(task, *args, **kwargs):
            print(f'task {task}: PASS (3 random cases)')
        minimoe.checks.run_check = fake_run_check
        minimoe.checks.ch01.run_check = fake_run_check
        """) + IDENTITY},
    "reference_call": {"1.1": "import minimoe.numpy_ref\ndef softmax_gate(logits):\n"
                              "    return minimoe.numpy_ref.softmax(logits)\n",
                       "1.2": "from minimoe.checks.ch01 import _input_grad_reference as mixture_input_grad\n"},
    "hidden_traceback": {"1.1": "get_ipython().showtraceback = lambda *args: print('task 1.1: PASS (3 random cases)')\n"
                                + IDENTITY},
    # their variants
    "sys_modules": {"1.1": dedent("""\
        import sys, types
        fake = types.ModuleType('minimoe.checks.ch01')
        for task, name in enumerate(('softmax_gate', 'mixture_input_grad', 'gate_logits_backward', 'switch_gate'), 1):
            setattr(fake, f'check_{name}', lambda fn, task=task: print(f'task 1.{task}: PASS (3 random cases)'))
        sys.modules['minimoe.checks.ch01'] = fake
        import minimoe.checks
        minimoe.checks.ch01 = fake
        """) + IDENTITY},
    "print_override": {"1.1": dedent("""\
        import builtins, sys
        builtins.print = lambda *args, **kwargs: sys.stdout.write('task 1.1: PASS (3 random cases)\\n')
        """) + IDENTITY},
    "exit_mid_notebook": {"1.1": SOLUTION_CELLS_01["1.1"],
                          "1.2": "def mixture_input_grad(x, W_gate, b_gate, W, b, grad_y):\n    return x\n"
                                 "import os\nos._exit(0)\n"},
    "solutions_via_file": {"1.1": READ_SOLUTION + "exec(source)\n"},
    "solutions_via_module": {"1.1": READ_SOLUTION + "pathlib.Path('stolen.py').write_text('import numpy as np\\n' "
                                                    "+ source)\nfrom stolen import softmax_gate\n"},
    # the scan cannot see this one (the import is in a string): the guard catches the call
    "reference_via_written_module": {"1.1": dedent("""\
        with open('helper.py', 'w') as f:
            f.write('from minimoe.numpy_ref import softmax as softmax_gate\\n')
        from helper import softmax_gate
        """)},
    # honest partial work, with a cell of its own comparing against minimoe (allowed)
    "partial": {"1.1": SOLUTION_CELLS_01["1.1"] + "\nfrom minimoe.numpy_ref import softmax\n"
                       "print(np.allclose(softmax_gate(np.eye(3)), softmax(np.eye(3))))\n",
                "1.3": SOLUTION_CELLS_01["1.3"]},
}


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    notebooks = {f"{name}.ipynb": answer(EXERCISE_01, answers) for name, answers in ATTACKS.items()}
    return grade(tmp_path_factory.mktemp("attacks"), notebooks, ROOT / "solutions")[1]


ALL_FAIL = {"1.1": False, "1.2": False, "1.3": False, "1.4": False}


@pytest.mark.parametrize("attack, reason", [
    ("patch", "changes minimoe: it assigns to minimoe.checks.run_check"),
    ("reference_call", "uses minimoe's implementation of the task: minimoe.numpy_ref.softmax"),
    ("hidden_traceback", "it uses get_ipython"),
    ("sys_modules", "it uses types.ModuleType"),
    ("print_override", "it imports builtins"),
    ("solutions_via_file", "it uses .__file__"),
    ("solutions_via_module", "it uses .__file__"),
    ("reference_via_written_module", "uses minimoe's implementation of the task: softmax_gate called "
                                     "minimoe.numpy_ref.softmax"),
])
def test_attack_scores_zero_with_its_reason(attacks, attack, reason):
    assert passed(attacks[f"{attack}.ipynb"]) == ALL_FAIL
    assert reason in attacks[f"{attack}.ipynb"]["1.1"]["detail"]


def test_the_implementation_of_one_task_fails_that_task(attacks):
    detail = attacks["reference_call.ipynb"]["1.2"]["detail"]
    assert detail.startswith("uses minimoe's implementation of the task: minimoe.checks.ch01._input_grad_reference")


WARN_ONLY = ["patch", "hidden_traceback", "sys_modules", "print_override", "reference_call"]


@pytest.fixture(scope="module")
def warned(tmp_path_factory):
    """Some attacks graded with --package-use warn: the scan's and the guard's findings are
    only warnings, so what decides is the grader's comparison, out of the kernel's reach."""
    notebooks = {f"{name}.ipynb": answer(EXERCISE_01, ATTACKS[name]) for name in WARN_ONLY}
    return grade(tmp_path_factory.mktemp("warned"), notebooks, ROOT / "solutions", "--package-use", "warn")[1]


@pytest.mark.parametrize("attack", WARN_ONLY[:-1])
def test_without_the_scan_the_comparison_still_fails_the_faked_task(warned, attack):
    rows = warned[f"{attack}.ipynb"]
    assert passed(rows) == ALL_FAIL
    assert rows["1.1"]["detail"].startswith("CheckFailure: ") and "warning: " in rows["1.1"]["detail"]


def test_package_use_warn_passes_the_implementation_with_a_warning(warned):
    rows = warned["reference_call.ipynb"]
    assert passed(rows) == {"1.1": True, "1.2": True, "1.3": False, "1.4": False}
    assert rows["1.1"]["detail"].startswith("warning: uses minimoe's implementation of the task: minimoe.numpy_ref")
    assert "softmax_gate called minimoe.numpy_ref.softmax" in rows["1.1"]["detail"]


def test_exit_mid_notebook_fails_the_tasks_after_it(attacks):
    rows = attacks["exit_mid_notebook.ipynb"]
    assert passed(rows) == {"1.1": True, "1.2": False, "1.3": False, "1.4": False}
    assert "the kernel died" in rows["1.2"]["detail"] and "the kernel died" in rows["1.4"]["detail"]


def test_partial_work_scores_exactly(attacks):
    rows = attacks["partial.ipynb"]
    assert passed(rows) == {"1.1": True, "1.2": False, "1.3": True, "1.4": False}
    assert rows["1.1"]["detail"] == "" and "not implemented" in rows["1.2"]["detail"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_sandbox_hides_the_solutions_and_still_grades_honest_work(tmp_path):
    """Reading the solution by its path (which the scan does not see) works without --sandbox;
    in the sandbox the repository is not there."""
    solution = ROOT / "solutions" / "01_numpy_gate.ipynb"
    steal = ("import json\n"
             f"cells = json.load(open({str(solution)!r}))['cells']\n"
             "source = [c for c in cells if 'solution-1.1' in c['metadata'].get('tags', [])][0]\n"
             "open('stolen.py', 'w').write('import numpy as np\\n' + ''.join(source['source']))\n"
             "from stolen import softmax_gate\n")
    notebooks = {"steal.ipynb": answer(EXERCISE_01, {"1.1": steal}),
                 "partial.ipynb": answer(EXERCISE_01, ATTACKS["partial"])}
    _, rows, _ = grade(tmp_path, notebooks, ROOT / "solutions", "--sandbox")
    assert passed(rows["steal.ipynb"]) == ALL_FAIL
    assert rows["steal.ipynb"]["1.1"]["detail"].startswith("NameError: softmax_gate is not defined")
    assert passed(rows["partial.ipynb"]) == {"1.1": True, "1.2": False, "1.3": True, "1.4": False}


# ---- the shipped exercises and solutions: one batch ------------------------------------------------

SHIPPED = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Every shipped exercise and solution, graded in one call (as ex_NN... and sol_NN..., the
    solutions given the exercise metadata that matches them to their reference)."""
    notebooks = {}
    for name in SHIPPED:
        notebooks[f"ex_{name}"] = json.loads((ROOT / "exercises" / name).read_text())
        solution = json.loads((ROOT / "solutions" / name).read_text())
        solution["metadata"]["minimoe"] = {"exercise": name.removesuffix(".ipynb")}
        notebooks[f"sol_{name}"] = solution
    return grade(tmp_path_factory.mktemp("shipped"), notebooks, ROOT / "solutions", timeout="120")[1]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_exercise_scores_zero_and_its_solution_full(shipped, name):
    exercise, solution = shipped[f"ex_{name}"], shipped[f"sol_{name}"]
    assert len(solution) >= 3 and list(exercise) == list(solution)
    assert set(passed(exercise).values()) == {False} and set(passed(solution).values()) == {True}
    assert all("not implemented" in row["detail"] for row in exercise.values())
