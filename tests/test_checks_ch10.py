"""minimoe.checks.ch10: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import numpy as np
import torch
from check_contract import contract_tests

from minimoe.checks import ch10

# ---- correct answers, written as a learner would ----

def send_splits(expert_idx, num_experts, world_size):
    rank = expert_idx.reshape(-1) // (num_experts // world_size)
    return torch.bincount(rank, minlength=world_size)


def send_splits_by_expert(expert_idx, num_experts, world_size):
    per_expert = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    return per_expert.view(world_size, -1).sum(1)


def group_by_expert(recv_counts):
    world, local = recv_counts.shape
    expert_of_row = torch.arange(local).repeat(world).repeat_interleave(recv_counts.reshape(-1))
    return torch.argsort(expert_of_row, stable=True)


def group_by_expert_with_offsets(recv_counts):
    """Another correct route: the start of each (source, expert) block, visited expert by expert."""
    starts = (recv_counts.reshape(-1).cumsum(0) - recv_counts.reshape(-1)).view(recv_counts.shape)
    world, local = recv_counts.shape
    pieces = [torch.arange(int(starts[s, j]), int(starts[s, j] + recv_counts[s, j]))
              for j in range(local) for s in range(world)]
    return torch.cat(pieces).long()


def bytes_moved(traffic, d_model, dtype):
    off_diagonal = traffic - torch.diag(traffic.diagonal())
    copies = off_diagonal.sum(1) + off_diagonal.sum(0)
    return copies * d_model * torch.tensor([], dtype=dtype).element_size()


def bytes_moved_in_numpy(traffic, d_model, dtype):
    t = traffic.numpy()
    remote = t.sum(1) + t.sum(0) - 2 * np.diag(t)
    return remote * d_model * (torch.finfo(dtype).bits // 8)


def dispatch_seconds(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    copies_out = tokens * k * (world_size - 1) / world_size
    return (world_size - 1) * latency + copies_out * d_model * dtype.itemsize / bandwidth


def dispatch_seconds_per_message(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    """Also correct: W - 1 messages of T k / W copies each, one after the other."""
    message = tokens * k / world_size * d_model * dtype.itemsize
    return sum(latency + message / bandwidth for _ in range(world_size - 1))


# ---- wrong answers ----

def send_splits_round_robin(expert_idx, num_experts, world_size):
    """Expert e on rank e % W: another valid placement, but not the one asked for."""
    return torch.bincount(expert_idx.reshape(-1) % world_size, minlength=world_size)


def send_splits_without_minlength(expert_idx, num_experts, world_size):
    return torch.bincount(expert_idx.reshape(-1) // (num_experts // world_size))


def send_splits_divide_by_world(expert_idx, num_experts, world_size):
    return torch.bincount(expert_idx.reshape(-1) // world_size, minlength=num_experts)[:world_size]


def send_splits_tokens_not_copies(expert_idx, num_experts, world_size):
    """Counts each token once per rank, even when two of its experts live there."""
    ranks = expert_idx // (num_experts // world_size)
    hit = torch.zeros(expert_idx.shape[0], world_size, dtype=torch.int64).scatter_(1, ranks, 1)
    return hit.sum(0)


def send_splits_first_slot_only(expert_idx, num_experts, world_size):
    return send_splits(expert_idx[:, :1], num_experts, world_size)


def group_by_expert_inverse(recv_counts):
    """The inverse permutation: where each arrived row goes, not which row comes next."""
    return torch.argsort(group_by_expert(recv_counts))


def group_by_expert_counts_transposed(recv_counts):
    """Reads recv_counts as [R, W] (expert-major arrival)."""
    return group_by_expert(recv_counts.T.contiguous())


def group_by_expert_identity(recv_counts):
    return torch.arange(int(recv_counts.sum()))


def group_by_expert_sources_reversed(recv_counts):
    world, local = recv_counts.shape
    expert_of_row = torch.arange(local).repeat(world).repeat_interleave(recv_counts.reshape(-1))
    n = expert_of_row.numel()
    return n - 1 - torch.argsort(expert_of_row.flip(0), stable=True).flip(0)


def bytes_moved_with_diagonal(traffic, d_model, dtype):
    return (traffic.sum(1) + traffic.sum(0)) * d_model * dtype.itemsize


def bytes_moved_dispatch_only(traffic, d_model, dtype):
    return (traffic.sum(1) - traffic.diagonal()) * d_model * dtype.itemsize


def bytes_moved_in_bits(traffic, d_model, dtype):
    return bytes_moved(traffic, d_model, dtype) * 8


def bytes_moved_always_fp32(traffic, d_model, dtype):
    return bytes_moved(traffic, d_model, torch.float32)


def dispatch_seconds_all_copies(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    """Forgets that 1 / W of the copies stay on their own rank."""
    return (world_size - 1) * latency + tokens * k * d_model * dtype.itemsize / bandwidth


def dispatch_seconds_one_latency(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    return dispatch_seconds(tokens, d_model, k, world_size, dtype, latency, bandwidth) - (world_size - 2) * latency


def dispatch_seconds_with_combine(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    return 2 * dispatch_seconds(tokens, d_model, k, world_size, dtype, latency, bandwidth)


def dispatch_seconds_without_k(tokens, d_model, k, world_size, dtype, latency, bandwidth):
    return dispatch_seconds(tokens, d_model, 1, world_size, dtype, latency, bandwidth)


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch10.check_send_splits, "10.1", [send_splits, send_splits_by_expert], [
        send_splits_round_robin, send_splits_without_minlength, send_splits_divide_by_world,
        send_splits_tokens_not_copies, send_splits_first_slot_only,
    ]),
    (ch10.check_group_by_expert, "10.2", [group_by_expert, group_by_expert_with_offsets], [
        group_by_expert_inverse, group_by_expert_counts_transposed, group_by_expert_identity,
        group_by_expert_sources_reversed,
    ]),
    (ch10.check_bytes_moved, "10.3", [bytes_moved, bytes_moved_in_numpy], [
        bytes_moved_with_diagonal, bytes_moved_dispatch_only, bytes_moved_in_bits, bytes_moved_always_fp32,
    ]),
    (ch10.check_dispatch_seconds, "10.4", [dispatch_seconds, dispatch_seconds_per_message], [
        dispatch_seconds_all_copies, dispatch_seconds_one_latency, dispatch_seconds_with_combine,
        dispatch_seconds_without_k,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_inputs_include_a_rank_that_receives_nothing():
    """Task 10.1's cases (the seeds run_check uses) include one where the last rank gets no copy
    (bincount needs minlength) and one where it gets some."""
    last_empty = []
    for case in range(3):
        expert_idx, num_experts, world = ch10.send_splits_inputs(np.random.default_rng(1000 * case + 7))
        last_empty.append(int(send_splits(expert_idx, num_experts, world)[-1]) == 0)
    assert any(last_empty) and not all(last_empty)
