"""Generate exercises/ from solutions/: every solution block becomes a stub.

    python tools/make_exercises.py           # write exercises/NN_*.ipynb
    python tools/make_exercises.py --check   # exit 1 if exercises/ differs from what it would write

In a solution notebook, a code cell tagged `solution-N.M` holds the answer between a line
`### BEGIN SOLUTION` and a line `### END SOLUTION`; the generated exercise replaces those lines
and everything between them with `raise NotImplementedError("task N.M")`, indented like the
BEGIN line. Outputs and execution counts are cleared (they would give answers away), and the
notebook's metadata records which solution it came from, so the grader can match a renamed file.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SOLUTION_TAG = re.compile(r"^solution-(\d+\.\d+)$")


class ExerciseError(ValueError):
    """A solution notebook that cannot be turned into an exercise."""


def _task_of(cell: dict) -> str | None:
    tasks = [m.group(1) for tag in cell.get("metadata", {}).get("tags", []) if (m := SOLUTION_TAG.match(tag))]
    if len(tasks) > 1:
        raise ExerciseError(f"a cell has several solution tags: {tasks}")
    return tasks[0] if tasks else None


def stub_source(source: str, task: str) -> str:
    """Replace each BEGIN..END block of `source` with a NotImplementedError for `task`."""
    out, inside = [], False
    for line in source.splitlines(keepends=True):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ExerciseError(f"task {task}: nested {BEGIN}")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f'{indent}raise NotImplementedError("task {task}")\n')
        elif stripped == END:
            if not inside:
                raise ExerciseError(f"task {task}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ExerciseError(f"task {task}: {BEGIN} without {END}")
    return "".join(out)


def make_exercise(solution: dict, name: str) -> dict:
    """The exercise notebook (a new dict) generated from a solution notebook's JSON."""
    exercise = json.loads(json.dumps(solution))
    exercise.setdefault("metadata", {})["minimoe"] = {"exercise": name}
    for cell in exercise["cells"]:
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        task = _task_of(cell)
        if task is None and BEGIN in source:
            raise ExerciseError(f"{name}: a cell has {BEGIN} but no `solution-N.M` tag")
        if task is not None:
            if cell["cell_type"] != "code" or BEGIN not in source:
                raise ExerciseError(f"{name}: the cell tagged solution-{task} has no {BEGIN} block")
            source = stub_source(source, task)
        cell["source"] = source
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return exercise


def render(notebook: dict) -> str:
    """Notebook JSON as Jupyter writes it (1-space indent, trailing newline)."""
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def expected_exercises(solutions: Path) -> dict[str, str]:
    """exercise file name -> its text, for every solutions/*.ipynb."""
    return {path.name: render(make_exercise(json.loads(path.read_text()), path.stem))
            for path in sorted(solutions.glob("*.ipynb"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions")
    parser.add_argument("--exercises", type=Path, default=ROOT / "exercises")
    args = parser.parse_args(argv)
    expected = expected_exercises(args.solutions)
    if args.check:
        present = {p.name for p in args.exercises.glob("*.ipynb")}
        problems = [f"missing: {args.exercises / n}" for n in sorted(expected.keys() - present)]
        problems += [f"no solution for: {args.exercises / n}" for n in sorted(present - expected.keys())]
        problems += [f"out of date: {args.exercises / n}" for n in sorted(expected.keys() & present)
                     if (args.exercises / n).read_text() != expected[n]]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python tools/make_exercises.py", file=sys.stderr)
        return 1 if problems else 0
    args.exercises.mkdir(exist_ok=True)
    for name, text in expected.items():
        (args.exercises / name).write_text(text)
        print(f"wrote {args.exercises / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
