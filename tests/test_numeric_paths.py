"""Every lesson and solved exercise gives the same checked outputs on a second numeric path.

Float sums change with the CPU's vector width and the thread count, so a trained value or a
float32 reduction differs in its last digits from one machine to the next. A checked output
(`# NBVAL_CHECK_OUTPUT`) must show only what is exactly reproducible; trained values are asserted
in the notebook's code within a tolerance. This test runs each notebook again under nbval, with
the same options as the main run, on ATen's scalar kernels and one thread
(`ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1`), so an output that holds only on the machine
that recorded it fails here before it lands.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted([*ROOT.glob("course/*.ipynb"), *ROOT.glob("solutions/*.ipynb")])
SECOND_PATH = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_checked_outputs_hold_on_scalar_kernels_and_one_thread(path):
    env = {**os.environ, **SECOND_PATH}
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run(  # -n 0: in this process, no workers of its own
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(path.relative_to(ROOT))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"{path.name} under {SECOND_PATH}: {summary}\n{run.stdout[-6000:]}"
    assert " passed" in summary and "failed" not in summary, summary
