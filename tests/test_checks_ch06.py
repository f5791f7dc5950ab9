"""minimoe.checks.ch06: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub; the inputs make
each rule of the task matter, and the references agree with the rules written out by hand."""

import math
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from check_contract import contract_tests

from minimoe import dispatch
from minimoe.checks import CheckFailure, ch06
from minimoe.dispatch import make_plan

SEEDS = [1000 * case + 7 for case in range(3)]  # run_check's case seeds

# ---- correct answers, written as a learner would ----

def expert_capacity(num_tokens, num_experts, k, capacity_factor):
    return math.ceil(k * num_tokens * Fraction(str(capacity_factor)) / num_experts)


def expert_capacity_decimal(num_tokens, num_experts, k, capacity_factor):
    """Also correct: decimal arithmetic, rounded towards +infinity."""
    exact = Decimal(k * num_tokens) * Decimal(str(capacity_factor)) / Decimal(num_experts)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def keep_mask(expert_idx, num_experts, capacity, priority):
    """Fill each expert in the order of `priority`, a list of (t, j) assignments."""
    kept = torch.zeros(expert_idx.shape, dtype=torch.bool)
    fill = [0] * num_experts
    for t, j in priority:
        e = int(expert_idx[t, j])
        if fill[e] < capacity:
            fill[e] += 1
            kept[t, j] = True
    return kept


def slot_major(expert_idx):
    num_tokens, k = expert_idx.shape
    return [(t, j) for j in range(k) for t in range(num_tokens)]


def keep_mask_position(expert_idx, num_experts, capacity):
    return keep_mask(expert_idx, num_experts, capacity, slot_major(expert_idx))


def keep_mask_position_vectorised(expert_idx, num_experts, capacity):
    """Also correct: the rank of each assignment within its expert, by a cumulative count over
    the slot-major order."""
    flat = expert_idx.t().reshape(-1)                                     # slot-major
    one_hot = torch.nn.functional.one_hot(flat, num_experts)
    rank = ((one_hot.cumsum(0) - 1) * one_hot).sum(1)                     # earlier ones, same expert
    return (rank < capacity).view(expert_idx.shape[1], -1).t()


def keep_mask_score(expert_idx, weights, num_experts, capacity):
    by_weight = sorted(slot_major(expert_idx), key=lambda tj: -float(weights[tj]))
    return keep_mask(expert_idx, num_experts, capacity, by_weight)


def keep_mask_score_per_expert(expert_idx, weights, num_experts, capacity):
    """Also correct: for each expert, a topk over the weights of its assignments."""
    kept = torch.zeros_like(expert_idx, dtype=torch.bool)
    for e in range(num_experts):
        rows, slots = (expert_idx == e).nonzero(as_tuple=True)
        best = weights[rows, slots].topk(min(capacity, rows.numel())).indices
        kept[rows[best], slots[best]] = True
    return kept


def dropless_capacity_factor(expert_idx, num_experts):
    num_tokens, k = expert_idx.shape
    load = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    return load.max().item() / (num_tokens * k / num_experts)


def dropless_capacity_factor_numpy(expert_idx, num_experts):
    """Also correct: in NumPy, busiest load over mean load."""
    load = np.bincount(expert_idx.numpy().ravel(), minlength=num_experts)
    return load.max() / (expert_idx.numel() / num_experts)


# ---- wrong answers ----

def token_major(expert_idx):
    num_tokens, k = expert_idx.shape
    return [(t, j) for t in range(num_tokens) for j in range(k)]


def bpr_order(expert_idx, weights):
    """V-MoE's batch prioritised routing: tokens by their largest weight, then slot by slot."""
    tokens = sorted(range(expert_idx.shape[0]), key=lambda t: -float(weights[t].max()))
    return [(t, j) for j in range(expert_idx.shape[1]) for t in tokens]


def keep_mask_per_slot(expert_idx, num_experts, capacity):
    """Each slot column gets its own `capacity` seats per expert."""
    columns = [keep_mask(expert_idx[:, j:j + 1], num_experts, capacity, slot_major(expert_idx[:, j:j + 1]))
               for j in range(expert_idx.shape[1])]
    return torch.cat(columns, dim=1)


def keep_mask_global_top(expert_idx, weights, num_experts, capacity):
    """The num_experts * capacity largest weights overall, whatever their expert."""
    flat = weights.reshape(-1)
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[flat.topk(num_experts * capacity).indices] = True
    return kept.view(weights.shape)


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch06.check_expert_capacity, "6.1", [expert_capacity, expert_capacity_decimal], [
        lambda T, E, k, cf: math.ceil(k * T * cf / E),                    # float arithmetic
        lambda T, E, k, cf: int(np.ceil(cf * k * T / E)),                 # float, another order
        lambda T, E, k, cf: math.floor(k * T * Fraction(str(cf)) / E),    # floor instead of ceil
        lambda T, E, k, cf: round(k * T * Fraction(str(cf)) / E),         # round instead of ceil
        lambda T, E, k, cf: int(k * T * Fraction(str(cf)) / E) + 1,       # one too many when exact
        lambda T, E, k, cf: math.ceil(T * Fraction(str(cf)) / E),         # k ignored
        lambda T, E, k, cf: float(expert_capacity(T, E, k, cf)),          # right value, not an int
    ]),
    (ch06.check_keep_mask_position, "6.2", [keep_mask_position, keep_mask_position_vectorised], [
        lambda idx, E, C: keep_mask(idx, E, C, token_major(idx)),         # token by token
        lambda idx, E, C: keep_mask(idx, E, C + 1, slot_major(idx)),      # <= capacity
        lambda idx, E, C: keep_mask(idx, E, C - 1, slot_major(idx)),      # one seat short
        lambda idx, E, C: keep_mask(idx, E, C, slot_major(idx)[::-1]),    # latest first
        lambda idx, E, C: torch.ones_like(idx, dtype=torch.bool),         # capacity ignored
        keep_mask_per_slot,
    ]),
    (ch06.check_keep_mask_score, "6.3", [keep_mask_score, keep_mask_score_per_expert], [
        lambda idx, w, E, C: keep_mask_position(idx, E, C),               # weights ignored
        lambda idx, w, E, C: keep_mask(idx, E, C, sorted(slot_major(idx), key=lambda tj: float(w[tj]))),  # smallest
        lambda idx, w, E, C: keep_mask(idx, E, C, bpr_order(idx, w)),     # tokens ranked, not assignments
        lambda idx, w, E, C: keep_mask_score(idx, w, E, C + 1),           # <= capacity
        keep_mask_global_top,
    ]),
    (ch06.check_dropless_capacity_factor, "6.4", [dropless_capacity_factor, dropless_capacity_factor_numpy], [
        lambda idx, E: dropless_capacity_factor(idx, E) * idx.shape[1],   # k ignored: max load / (T / E)
        lambda idx, E: dropless_capacity_factor(idx, E) - 1,              # MaxVio, (max - mean) / mean
        lambda idx, E: dropless_capacity_factor(idx, E) * idx.shape[1] / E,  # max load / T
        lambda idx, E: torch.bincount(idx.reshape(-1)).max().item() * len(torch.bincount(idx.reshape(-1)))
        / idx.numel(),                                                    # E from bincount, no minlength
        lambda idx, E: torch.bincount(idx[:, 0], minlength=E).max().item() * E / idx.shape[0],  # first slot only
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_capacity_failure_names_the_row_and_a_non_function_is_refused():
    with pytest.raises(CheckFailure, match=r"task 6\.1: .*expert_capacity\(\d+, \d+, \d+, [\d.]+\).*got \d+, expected"):
        ch06.check_expert_capacity(lambda T, E, k, cf: math.ceil(k * T * cf / E))
    with pytest.raises(CheckFailure, match="task 6.1: expected a function"):
        ch06.check_expert_capacity(42)


def test_capacity_rows_need_exact_arithmetic_and_every_rounding_rule():
    """Every case has rows where the exact value is whole (int(x) + 1 fails) and fractional
    (floor and round fail), k > 1, and float traps where each usual float formula is one too many."""
    for seed in SEEDS:
        (rows,) = ch06.capacity_inputs(np.random.default_rng(seed))
        exact = [Fraction(k * T, E) * Fraction(str(cf)) for T, E, k, cf in rows]
        assert any(x.denominator == 1 for x in exact)
        assert any(x - math.floor(x) < Fraction(1, 2) and x.denominator > 1 for x in exact)
        assert any(k > 1 for _, _, k, _ in rows)
        for formula in ch06._FLOAT_FORMULAS:
            assert any(math.ceil(formula(*row)) != math.ceil(x) for row, x in zip(rows, exact, strict=True))


def test_routing_inputs_make_capacity_and_order_matter():
    """In every case some expert overflows and some does not; token-major and slot-major order
    keep different assignments; score and position priority differ; weights have no ties."""
    for seed in SEEDS:
        expert_idx, weights, num_experts, capacity = ch06.score_inputs(np.random.default_rng(seed))
        load = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
        assert capacity >= 1 and (load > capacity).any() and ((load > 0) & (load < capacity)).any()
        position = keep_mask_position(expert_idx, num_experts, capacity)
        assert not torch.equal(position, keep_mask(expert_idx, num_experts, capacity, token_major(expert_idx)))
        assert not torch.equal(position, keep_mask_score(expert_idx, weights, num_experts, capacity))
        assert weights.unique().numel() == weights.numel()
        torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)))
        assert (weights[:, :-1] >= weights[:, 1:]).all()
        # the same draws as task 6.2's inputs
        idx_62, _, capacity_62 = ch06.position_inputs(np.random.default_rng(seed))
        assert torch.equal(idx_62, expert_idx) and capacity_62 == capacity


def test_dropless_inputs_sometimes_leave_the_last_expert_empty():
    last_empty = []
    for seed in SEEDS:
        expert_idx, num_experts = ch06.dropless_inputs(np.random.default_rng(seed))
        last_empty.append(not (expert_idx == num_experts - 1).any())
    assert any(last_empty)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_references_match_the_rules_written_out(policy):
    """make_plan's kept mask equals filling each expert in the documented priority order."""
    for seed in range(20):
        expert_idx, weights, num_experts, capacity = ch06.score_inputs(np.random.default_rng(seed))
        plan = make_plan(expert_idx, num_experts, capacity, policy=policy, weights=weights)
        mine = (keep_mask_position(expert_idx, num_experts, capacity) if policy == "position"
                else keep_mask_score(expert_idx, weights, num_experts, capacity))
        assert torch.equal(plan.kept, mine)


def test_dropless_factor_keeps_every_assignment():
    """At the dropless capacity factor no assignment is dropped."""
    for seed in SEEDS:
        expert_idx, num_experts = ch06.dropless_inputs(np.random.default_rng(seed))
        factor = dropless_capacity_factor(expert_idx, num_experts)
        num_tokens, k = expert_idx.shape
        capacity = dispatch.expert_capacity(num_tokens, num_experts, k, factor)
        assert make_plan(expert_idx, num_experts, capacity).kept.all()
