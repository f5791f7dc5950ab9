import os

from xdist.scheduler import LoadScopeScheduling

# pytest-xdist runs one worker per core (pyproject.toml's addopts) and every notebook's kernel
# inherits this environment: one thread per process keeps the workers from fighting over the
# cores. Each chapter's checked outputs hold under OMP_NUM_THREADS=1 (how they are executed).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the suite's longest tests (each runs a whole notebook in a subprocess, up to 4 minutes): one by
# one to whichever worker is free, where grouped by file they would all fall to one worker
SPREAD_OUT = {"tests/test_numeric_paths.py"}


class _ByFile(LoadScopeScheduling):
    """Each file's tests go to one worker, in order: a notebook's cells share one kernel and a test
    file's tests their fixtures. The files in SPREAD_OUT go out test by test."""

    def _split_scope(self, nodeid: str) -> str:
        file = nodeid.split("::", 1)[0]
        return nodeid if file in SPREAD_OUT else file


def pytest_xdist_make_scheduler(config, log):
    return _ByFile(config, log)
