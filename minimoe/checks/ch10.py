"""Checks for chapter 10 (expert parallelism): one function per task.

10.1 send_splits(expert_idx, num_experts, world_size)      [W] int64: token copies this rank sends
                                                            to each rank (rank r owns the E / W
                                                            consecutive experts r*E/W ...)
10.2 group_by_expert(recv_counts)                           order [N] int64: the received rows
                                                            (source-major) regrouped expert-major
10.3 bytes_moved(traffic, d_model, dtype)                   [W] bytes each rank sends to other
                                                            ranks in dispatch + combine
10.4 dispatch_seconds(tokens, d_model, k, world_size, dtype, latency, bandwidth)
                                                            alpha-beta time of one flat all-to-all
                                                            inside a node (uniform routing)

The references are minimoe's own: `minimoe.dispatch.make_plan` with
`minimoe.parallel.split_by_rank`, `minimoe.parallel.expert_major_order`,
`minimoe.parallel.traffic_bytes` and `minimoe.parallel.all_to_all_cost`. Inputs are seeded and
random: world sizes 2 to 4 (up to 8 for the cost), uneven loads, ranks that receive nothing.
"""

import numpy as np
import torch

from minimoe.checks import run_check
from minimoe.checks._inputs import random_expert_idx
from minimoe.dispatch import make_plan
from minimoe.parallel import all_to_all_cost, expert_major_order, split_by_rank, traffic_bytes

__all__ = ["check_bytes_moved", "check_dispatch_seconds", "check_group_by_expert", "check_send_splits"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def send_splits_inputs(rng: np.random.Generator) -> tuple:
    """Task 10.1's arguments: expert_idx [T, k], num_experts, world_size; in about half the cases
    the last rank's experts get no token."""
    world, local = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    num_experts = world * local
    k = int(rng.integers(1, min(3, num_experts - local) + 1))
    idle = local if rng.random() < 0.5 else 0  # the last rank gets nothing
    return random_expert_idx(rng, int(rng.integers(10, 61)), num_experts, k, idle=idle), num_experts, world


def check_send_splits(learner_send_splits):
    """Task 10.1: send_splits(expert_idx [T, k] int64, num_experts, world_size) -> [W] int64,
    entry r = the token copies whose expert lives on rank r (experts r*E/W .. (r+1)*E/W - 1)."""
    def reference(expert_idx, num_experts, world_size):
        return split_by_rank(make_plan(expert_idx, num_experts).tokens_per_expert, world_size)

    run_check("10.1", learner_send_splits, reference, send_splits_inputs, atol=0, rtol=0)


def check_group_by_expert(learner_group_by_expert):
    """Task 10.2: group_by_expert(recv_counts [W, R] int64) -> order [N] int64 (N = the sum):
    rows arrive source-major (rank 0's rows for its local experts 0..R-1, then rank 1's ...);
    rows[order] must be expert-major, sources in rank order within each expert."""
    def make_inputs(rng):
        world, local = int(rng.integers(2, 5)), int(rng.integers(2, 5))
        counts = rng.integers(0, 6, size=(world, local))
        counts[int(rng.integers(world))] = 0  # a rank that sent nothing
        counts[:, int(rng.integers(local))] *= rng.random() < 0.5  # sometimes an idle expert
        return (torch.from_numpy(counts.astype(np.int64)),)

    run_check("10.2", learner_group_by_expert, expert_major_order, make_inputs, atol=0, rtol=0)


def check_bytes_moved(learner_bytes_moved):
    """Task 10.3: bytes_moved(traffic [W, W] int64, d_model, dtype) -> [W]: bytes rank r sends to
    other ranks: its copies out in dispatch (row r) plus the results back in combine (column r),
    the diagonal excluded, d_model * dtype.itemsize bytes per copy."""
    def make_inputs(rng):
        world = int(rng.integers(2, 5))
        traffic = rng.integers(0, 50, size=(world, world))
        traffic[:, int(rng.integers(world))] = 0  # a rank that receives nothing
        return (torch.from_numpy(traffic.astype(np.int64)), int(rng.choice([16, 64, 512, 4096])),
                DTYPES[int(rng.integers(len(DTYPES)))])

    def reference(traffic, d_model, dtype):
        return traffic_bytes(traffic, d_model * dtype.itemsize)

    run_check("10.3", learner_bytes_moved, reference, make_inputs, atol=0, rtol=0)


def check_dispatch_seconds(learner_dispatch_seconds):
    """Task 10.4: dispatch_seconds(tokens, d_model, k, world_size, dtype, latency, bandwidth) ->
    float: (W - 1) * latency + tokens * k * (W - 1) / W * d_model * itemsize / bandwidth (pairwise
    exchange: one message after the other, `concurrency=1` of the cost model)."""
    def make_inputs(rng):
        return (int(rng.integers(128, 8193)), int(rng.choice([512, 1024, 4096, 7168])), int(rng.integers(1, 9)),
                int(rng.integers(2, 9)), DTYPES[int(rng.integers(len(DTYPES)))], float(rng.uniform(1e-6, 2e-5)),
                float(rng.uniform(50e9, 900e9)))

    def reference(tokens, d_model, k, world_size, dtype, latency, bandwidth):
        return all_to_all_cost(tokens, d_model, k, world_size, dtype=dtype, gpus_per_node=world_size,
                               intra_bandwidth=bandwidth, intra_latency=latency, concurrency=1).dispatch_seconds

    run_check("10.4", learner_dispatch_seconds, reference, make_inputs, atol=0, rtol=1e-9)
