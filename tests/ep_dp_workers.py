"""Worker of tests/test_ep_dp.py: 4 gloo ranks run minimoe.parallel.ep_dp's check (see gloo_ranks)."""

from gloo_ranks import run_jobs

from minimoe.parallel.ep_dp import check_against_one_process, ep_dp_groups


def worker(rank, world, store, out_dir):
    run_jobs(rank, world, store, out_dir, {
        "ep2 x dp2": lambda: check_against_one_process(2),
        "ep2, no dp all-reduce": lambda: check_against_one_process(2, dp_all_reduce=False),
        "ep4 x dp1": lambda: check_against_one_process(4),
        "ep1 x dp4": lambda: check_against_one_process(1),
        "ep3": lambda: ep_dp_groups(3),
    })
