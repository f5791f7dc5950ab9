"""Grade learners' exercise notebooks, trusting nothing that the student's notebook or kernel says.

For each student notebook: find its reference in solutions/ (by file name, else by the
`minimoe.exercise` metadata that tools/make_exercises.py writes); put back every locked check
cell (cells tagged `task-N.M`) from the reference, keeping the student's other cells; scan the
code for answers that use minimoe's own implementation of their task (minimoe.grading.scan);
then run the code cells in order in a fresh kernel (minimoe.grading.kernel: a temporary working
folder, optionally a bubblewrap sandbox, a timeout per cell). Right before each check cell, the
grader generates the task's seeded inputs in its own process and hands them to the kernel, where
the learner's function runs on them with minimoe's implementations of the task guarded
(minimoe.grading.harness); its outputs come back as data and are compared with the reference's,
computed here, by minimoe.checks.run_check. A task passes when that comparison passes, its check
cell replies "ok" (whatever it printed), and neither the scan nor the guard found minimoe's
implementation of the task in use (with --package-use warn, those are warnings instead). The
student's file is only read, the reference notebooks are shown to no kernel, and all of them are
read, with the checks they use, before any student's code runs.
"""

import argparse
import ast
import contextlib
import csv
import importlib
import io
import json
import pickle
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from minimoe.checks import Check, CheckFailure, case_rng, read_check, run_check
from minimoe.grading import harness
from minimoe.grading.implementations import IMPLEMENTATIONS, resolve
from minimoe.grading.kernel import Kernel, KernelError, sandbox_available, sandbox_folders
from minimoe.grading.scan import Cell, scan

TASK_TAG = re.compile(r"^task-(\d+\.\d+)$")
SOLUTION_TAG = re.compile(r"^solution-(\d+\.\d+)$")
HARNESS = "__minimoe_grader__"  # the harness module's name in the kernel's namespace
HARNESS_SETUP = (f"import types as _types\n{HARNESS} = _types.ModuleType({HARNESS!r})\n"
                 f"exec(compile({Path(harness.__file__).read_text()!r}, {harness.__file__!r}, 'exec'), "
                 f"{HARNESS}.__dict__)\ndel _types\n")


@dataclass
class TaskResult:
    notebook: str
    task: str
    passed: bool
    detail: str


class UsageError(Exception):
    """Bad command-line input: missing files, no reference to grade against, a reference whose
    check cells the grader cannot read."""


@dataclass(frozen=True)
class TaskCheck:
    """A task's locked check, `from minimoe.checks import chNN; chNN.check_x(learner)` in the
    reference, and what it compares (read in this process)."""
    task: str
    module: str
    function: str
    learner: str
    check: Check
    implementations: tuple  # minimoe's objects that implement the task (IMPLEMENTATIONS, resolved)


@dataclass(frozen=True)
class Options:
    timeout: float
    sandbox: bool = False
    package_use: str = "fail"  # or "warn"


def _task(cell: dict) -> str | None:
    for tag in cell.get("metadata", {}).get("tags", []):
        if match := TASK_TAG.match(tag):
            return match.group(1)
    return None


def _task_order(notebook: dict) -> list[str]:
    return list(dict.fromkeys(t for cell in notebook["cells"] if (t := _task(cell))))


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def find_reference(student: Path, student_nb: dict | None, reference_dir: Path) -> Path:
    by_name = reference_dir / student.name
    if by_name.exists():
        return by_name
    exercise = ((student_nb or {}).get("metadata", {}).get("minimoe") or {}).get("exercise")
    if isinstance(exercise, str) and (reference_dir / f"{exercise}.ipynb").exists():
        return reference_dir / f"{exercise}.ipynb"
    raise UsageError(f"no reference for {student} in {reference_dir}: expected {by_name} "
                     "or notebook metadata minimoe.exercise naming one")


def restore_checks(student_nb: dict, reference_nb: dict) -> tuple[dict, dict[str, list[int]]]:
    """The student's notebook with every locked check cell put back from the reference, and
    task -> code-cell numbers (0-based) of its check cells in the copy."""
    reference_cells = {}
    for cell in reference_nb["cells"]:
        if (task := _task(cell)) is not None:
            reference_cells.setdefault(task, cell)
    graded = json.loads(json.dumps(student_nb))
    cells_of_task: dict[str, list[int]] = {task: [] for task in reference_cells}
    code_number = 0
    for cell in graded["cells"]:
        task = _task(cell)
        if task in reference_cells:
            cell.clear()
            cell.update(json.loads(json.dumps(reference_cells[task])))
            cells_of_task[task].append(code_number)
        if cell.get("cell_type") == "code":
            code_number += 1
    return graded, cells_of_task


def _probe(*args):
    raise AssertionError("the grader's probe is never called")


def read_task_checks(reference_nb: dict, reference: Path) -> dict[str, TaskCheck]:
    """task -> TaskCheck for each locked check cell of the reference; UsageError for one that
    does not call a check of minimoe.checks on the learner's function by name."""
    checks = {}
    for cell in reference_nb["cells"]:
        task = _task(cell)
        if task is None or task in checks:
            continue
        modules, call = {}, None
        for node in ast.walk(ast.parse(_source(cell))):
            if isinstance(node, ast.ImportFrom) and node.module == "minimoe.checks":
                modules.update({a.asname or a.name: f"minimoe.checks.{a.name}" for a in node.names})
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and len(node.args) == 1
                  and isinstance(node.args[0], ast.Name)):
                call = node
        if call is None or call.func.value.id not in modules:
            raise UsageError(f"{reference}: the check cell of task {task} must call a check of minimoe.checks "
                             "on the learner's function, as in `ch01.check_softmax_gate(softmax_gate)`")
        module, function, learner = modules[call.func.value.id], call.func.attr, call.args[0].id
        check = read_check(getattr(importlib.import_module(module), function), _probe)
        if check.task != task:
            raise UsageError(f"{reference}: the check cell of task {task} calls {module}.{function}, "
                             f"which checks task {check.task}")
        implementations = tuple(resolve(path) for path in IMPLEMENTATIONS.get(task, ()))
        checks[task] = TaskCheck(task, module, function, learner, check, implementations)
    return checks


def scan_cells(code_cells: list[dict], reference_nb: dict, checks: dict[str, TaskCheck]) -> dict[str, list[str]]:
    """The static findings per task; cells that copy a lesson cell of the reference are the
    course's, the restored check cells too."""
    lessons = {_source(c) for c in reference_nb["cells"] if c.get("cell_type") == "code"
               and not any(TASK_TAG.match(t) or SOLUTION_TAG.match(t) for t in c.get("metadata", {}).get("tags", []))}
    cells = [Cell(_source(c), _task(c) in checks or _source(c) in lessons, _task(c)) for c in code_cells]
    return scan(cells, {task: c.learner for task, c in checks.items()},
                {task: list(c.implementations) for task, c in checks.items()})


def compare_in_kernel(kernel: Kernel, task_check: TaskCheck, number: int, options: Options) -> tuple[list, list]:
    """(failures, warnings) of the learner's function on the grader's inputs for one check cell."""
    check, exchange = task_check.check, kernel.exchange
    inputs = [check.make_inputs(case_rng(case)) for case in range(check.cases)]
    inputs_path, result_path = exchange / f"inputs-{number}.pkl", exchange / f"result-{number}.npz"
    inputs_path.write_bytes(pickle.dumps(inputs))
    arguments = [task_check.task, task_check.learner, task_check.module, task_check.function,
                 list(IMPLEMENTATIONS.get(task_check.task, ())), options.package_use == "fail", str(inputs_path),
                 str(result_path)]
    reply = kernel.execute(f"{HARNESS}.run_task(globals(), {', '.join(map(repr, arguments))})", options.timeout,
                           silent=True)
    if not reply.ok:
        return [f"{reply.error} (calling {task_check.learner} on the grader's inputs)"], []
    try:
        result = harness.read_result(result_path)
    except ValueError as error:
        return [f"no outputs of {task_check.learner} came back from the kernel: {error}"], []
    used = [f"uses minimoe's implementation of the task: {task_check.learner} called {name}"
            for name in dict.fromkeys(result["called"])]
    if used and options.package_use == "fail":
        return used, []
    if result["error"] is not None:
        return [result["error"]], used
    if len(result["outputs"]) != check.cases:
        return [f"{len(result['outputs'])} outputs came back from the kernel for {check.cases} cases"], used
    sent, got = iter(inputs), iter(result["outputs"])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            run_check(check.task, lambda *args: next(got), check.reference_fn, lambda rng: next(sent), check.cases,
                      check.atol, check.rtol)
    except CheckFailure as failure:
        return [f"CheckFailure: {failure}"], used
    return [], used


def run_notebook(code_cells: list[dict], checks: dict[str, TaskCheck], options: Options) -> dict[str, tuple]:
    """Run the cells in order in a fresh kernel, each check cell after the grader's own
    comparison; task -> (failures, warnings)."""
    outcome = {task: ([], []) for task in checks}
    with tempfile.TemporaryDirectory(prefix="minimoe-grade-") as folder:
        try:
            with Kernel(Path(folder), sandbox=options.sandbox) as kernel:
                setup = kernel.execute(HARNESS_SETUP, options.timeout, silent=True)
                for number, cell in enumerate(code_cells):
                    task = _task(cell)
                    if task in checks:
                        failures, warnings = (compare_in_kernel(kernel, checks[task], number, options) if setup.ok
                                              else ([f"the grader could not start in the kernel: {setup.error}"], []))
                        outcome[task][0].extend(failures)
                        outcome[task][1].extend(warnings)
                    reply = kernel.execute(_source(cell), options.timeout)
                    if task in checks and not reply.ok:
                        outcome[task][0].append(f"{reply.error} (in the check cell)")
        except KernelError as error:
            for failures, _ in outcome.values():
                failures.append(str(error))
    return outcome


@dataclass(frozen=True)
class Submission:
    """A student notebook read and matched to its reference, before any code runs."""
    name: str
    notebook: dict | None  # None: not a valid notebook, for `problem`
    problem: str
    reference: dict
    checks: dict[str, TaskCheck]


def load_submissions(students: list[Path], reference_dir: Path) -> list[Submission]:
    """Read every student notebook (read only) and its reference, each reference and the check
    modules it uses once, all before any student's code runs: a kernel that rewrites files cannot
    change what the later notebooks are graded against."""
    references: dict[Path, tuple[dict, dict[str, TaskCheck]]] = {}
    submissions = []
    for student in students:
        try:
            notebook, problem = json.loads(student.read_bytes()), ""
            if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
                raise ValueError("no list of cells")
        except (ValueError, UnicodeDecodeError) as error:
            notebook, problem = None, f"not a valid notebook: {error}"[:200]
        path = find_reference(student, notebook, reference_dir)
        if path not in references:
            reference = json.loads(path.read_text())
            references[path] = reference, read_task_checks(reference, path)
        submissions.append(Submission(student.name, notebook, problem, *references[path]))
    return submissions


def grade_submission(submission: Submission, options: Options) -> list[TaskResult]:
    """Scan and run one student notebook; a TaskResult per task of its reference."""
    name, reference, checks = submission.name, submission.reference, submission.checks
    if submission.notebook is None:
        return [TaskResult(name, task, False, submission.problem) for task in _task_order(reference)]
    graded, cells_of_task = restore_checks(submission.notebook, reference)
    code_cells = [cell for cell in graded["cells"] if cell.get("cell_type") == "code"]
    findings = scan_cells(code_cells, reference, checks)
    outcome = run_notebook(code_cells, checks, options)
    results = []
    for task in _task_order(reference):
        if not cells_of_task[task]:
            results.append(TaskResult(name, task, False, f"the locked check cell of task {task} was deleted"))
            continue
        failures, warnings = outcome[task]
        if options.package_use == "fail":
            failures = findings[task] + failures
        else:
            warnings = findings[task] + warnings
        detail = "; ".join(failures[:1] + [f"warning: {w}" for w in dict.fromkeys(warnings)])
        results.append(TaskResult(name, task, not failures, detail))
    return results


def write_csv(results: list[TaskResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["notebook", "task", "passed", "detail"])
        writer.writerows([r.notebook, r.task, r.passed, r.detail] for r in results)


def write_junit(results: list[TaskResult], path: Path) -> None:
    root = ET.Element("testsuites")
    for notebook in dict.fromkeys(r.notebook for r in results):
        mine = [r for r in results if r.notebook == notebook]
        suite = ET.SubElement(root, "testsuite", name=notebook, tests=str(len(mine)),
                              failures=str(sum(not r.passed for r in mine)))
        for r in mine:
            case = ET.SubElement(suite, "testcase", classname=notebook, name=f"task {r.task}")
            if not r.passed:
                ET.SubElement(case, "failure", message=r.detail)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def print_table(results: list[TaskResult]) -> None:
    width = max([len("notebook")] + [len(r.notebook) for r in results])
    print(f"{'notebook':<{width}}  task  result  detail")
    for r in results:
        print(f"{r.notebook:<{width}}  {r.task:<4}  {'PASS' if r.passed else 'FAIL':<6}  {r.detail}")
    for notebook in dict.fromkeys(r.notebook for r in results):
        mine = [r for r in results if r.notebook == notebook]
        print(f"score {notebook}: {sum(r.passed for r in mine)}/{len(mine)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebooks", nargs="+", type=Path, help="student notebooks (.ipynb)")
    parser.add_argument("--reference", type=Path, default=Path("solutions"),
                        help="folder of solution notebooks (default: solutions/)")
    parser.add_argument("--csv", type=Path, help="write notebook,task,passed,detail rows here")
    parser.add_argument("--junit-xml", type=Path, help="write a JUnit XML report here")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per cell (default 60)")
    parser.add_argument("--sandbox", action="store_true",
                        help="run each student's kernel in a bubblewrap sandbox (needs `bwrap`) that sees neither "
                             "the repository nor the reference nor the students' notebooks, without network")
    parser.add_argument("--package-use", choices=("fail", "warn"), default="fail",
                        help="an answer that uses minimoe's own implementation of its task: fail the task "
                             "(default), or only warn")


def _check_sandbox(reference: Path) -> None:
    if not sandbox_available():
        raise UsageError("--sandbox needs bubblewrap (`bwrap`), which is not installed (Debian: apt-get install "
                         "bubblewrap)")
    visible = [f for f in sandbox_folders() if reference.resolve().is_relative_to(Path(f).resolve())]
    if visible:
        raise UsageError(f"--sandbox cannot hide --reference {reference}: it is inside {visible[0]}, which the "
                         "sandbox shows; move the reference notebooks elsewhere")


def run(args: argparse.Namespace) -> int:
    """Grade every notebook; 0 when grading completed (whatever the score), 2 on usage errors."""
    try:
        if not args.reference.is_dir():
            raise UsageError(f"--reference must be a folder of solution notebooks, got {args.reference}")
        if args.timeout <= 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
        missing = [str(p) for p in args.notebooks if not p.is_file()]
        if missing:
            raise UsageError(f"no such notebook: {', '.join(missing)}")
        if args.sandbox:
            _check_sandbox(args.reference)
        options = Options(args.timeout, args.sandbox, args.package_use)
        submissions = load_submissions(args.notebooks, args.reference)
        results = [r for submission in submissions for r in grade_submission(submission, options)]
    except UsageError as error:
        print(f"minimoe grade: {error}", file=sys.stderr)
        return 2
    print_table(results)
    if args.csv:
        write_csv(results, args.csv)
    if args.junit_xml:
        write_junit(results, args.junit_xml)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minimoe grade", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
