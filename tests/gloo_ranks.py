"""Spawn `world` gloo ranks for a multi-process test and collect what each rank returns.

Test side: `spawn(worker, world, tmp_path, *args)` starts worker(rank, world, store, *args,
out_dir) in fresh processes and fails the test (killing them) if they are not done within the
timeout. Worker side (a module the spawned processes import, not the test module):
`run_jobs(rank, world, store, out_dir, jobs)` joins the group, runs each named job, records its
result or its traceback, and writes rank<r>.json.
"""

import json
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def spawn(worker, world: int, tmp_path, *args, timeout_s: float = 120) -> list[dict]:
    """Each rank's results (rank order), read from tmp_path/rank<r>.json."""
    context = mp.start_processes(worker, args=(world, str(tmp_path / "store"), *args, str(tmp_path)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks running {worker.__module__}.{worker.__name__} did not finish "
                        f"within {timeout_s} s")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def run_jobs(rank: int, world: int, store: str, out_dir: str, jobs: dict, stop_on_error: bool = False) -> None:
    """jobs: name -> a callable with no arguments returning JSON-able results. A job that raises
    is recorded as {"exception": traceback}; with stop_on_error the later jobs are skipped (the
    other ranks may be stuck in a collective of the failed one)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception:  # reported by the test
            results[name] = {"exception": traceback.format_exc()}
            if stop_on_error:
                break
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
