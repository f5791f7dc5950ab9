"""Grade learners' exercise notebooks, trusting nothing they saved.

For each student notebook: find its reference in solutions/ (by file name, else by the
`minimoe.exercise` metadata that tools/make_exercises.py writes); on a copy in a temporary
folder, put back every locked check cell (cells tagged `task-N.M`: source, outputs and
execution count) from the reference, keeping the student's other cells; run nbval on the copy
(--nbval-lax, current environment, a per-cell timeout, the sanitiser); a task passes when all
of its check cells run and print the reference output. The student's file is only read.
"""

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

TASK_TAG = re.compile(r"^task-(\d+\.\d+)$")
SANITIZER = Path(__file__).with_name("nbval_sanitize.cfg")
ANSI = re.compile(r"(?:\x1b|#x1B)\[[0-9;]*m")  # junit XML escapes ESC as "#x1B"


@dataclass
class TaskResult:
    notebook: str
    task: str
    passed: bool
    detail: str


class UsageError(Exception):
    """Bad command-line input: missing files, no reference to grade against."""


def _task(cell: dict) -> str | None:
    for tag in cell.get("metadata", {}).get("tags", []):
        if match := TASK_TAG.match(tag):
            return match.group(1)
    return None


def _task_order(notebook: dict) -> list[str]:
    return list(dict.fromkeys(t for cell in notebook["cells"] if (t := _task(cell))))


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
    task -> code-cell numbers (nbval's 'Cell N') of its check cells in the copy."""
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
    graded.setdefault("metadata", {})["kernelspec"] = reference_nb.get("metadata", {}).get("kernelspec", {})
    return graded, cells_of_task


def _reason(failure: ET.Element) -> str:
    """One line on why nbval failed a cell: the exception, a timeout or an output mismatch."""
    text = ANSI.sub("", (failure.get("message") or "") + "\n" + (failure.text or ""))
    if "Timeout" in text:
        return next(line.strip() for line in text.splitlines() if "Timeout" in line)
    exceptions = re.findall(r"^(\w*(?:Error|Exception|Failure|Interrupt)\b.*)$", text, re.M)
    if exceptions:
        return exceptions[-1].strip()[:300]
    if "mismatch" in text.lower() or "outputs" in text.lower():
        return "the check printed something other than the reference output"
    return text.strip().splitlines()[0][:300] if text.strip() else "failed"


def run_nbval(notebook: Path, timeout: float, num_code_cells: int) -> tuple[dict[int, str | None], str]:
    """Run nbval on `notebook`: ({code cell number: None if passed else reason}, problem or '')."""
    report = notebook.with_suffix(".xml")
    ini = notebook.parent / "pytest.ini"
    ini.write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", str(notebook), "-c", str(ini), "--rootdir", str(notebook.parent),
               "--nbval-lax", "--nbval-current-env", f"--nbval-cell-timeout={timeout}",
               "--nbval-sanitize-with", str(SANITIZER), "-p", "no:cacheprovider", "-q",
               f"--junitxml={report}"]
    overall = timeout * (num_code_cells + 2) + 120
    try:
        subprocess.run(command, cwd=notebook.parent, capture_output=True, text=True, timeout=overall)
        problem = ""
    except subprocess.TimeoutExpired:
        problem = f"grading stopped after {overall:.0f} s"
    results: dict[int, str | None] = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            match = re.search(r"Cell (\d+)$", case.get("name", ""))
            if match is None:
                continue
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            skipped = case.find("skipped") is not None
            results[int(match.group(1))] = _reason(failure) if failure is not None else (
                "skipped" if skipped else None)
    return results, problem


def grade_notebook(student: Path, reference_dir: Path, timeout: float) -> list[TaskResult]:
    """Grade one student notebook (read only) against its reference."""
    name = student.name
    try:
        student_nb = json.loads(student.read_bytes())
        if not isinstance(student_nb, dict) or not isinstance(student_nb.get("cells"), list):
            raise ValueError("no list of cells")
    except (ValueError, UnicodeDecodeError) as error:
        reference = json.loads(find_reference(student, None, reference_dir).read_text())
        return [TaskResult(name, t, False, f"not a valid notebook: {error}"[:200]) for t in _task_order(reference)]
    reference = json.loads(find_reference(student, student_nb, reference_dir).read_text())
    graded, cells_of_task = restore_checks(student_nb, reference)
    num_code_cells = sum(cell.get("cell_type") == "code" for cell in graded["cells"])
    with tempfile.TemporaryDirectory(prefix="minimoe-grade-") as folder:
        copy = Path(folder) / "graded.ipynb"
        copy.write_text(json.dumps(graded))
        results, problem = run_nbval(copy, timeout, num_code_cells)
    graded_tasks = []
    for task in _task_order(reference):
        cells = cells_of_task[task]
        if not cells:
            graded_tasks.append(TaskResult(name, task, False, f"the locked check cell of task {task} was deleted"))
            continue
        outcome = [results.get(c, problem or "not run: the kernel died or nbval stopped early") for c in cells]
        failures = [reason for reason in outcome if reason is not None]
        graded_tasks.append(TaskResult(name, task, not failures, failures[0] if failures else ""))
    return graded_tasks


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
        results = [r for path in args.notebooks for r in grade_notebook(path, args.reference, args.timeout)]
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
