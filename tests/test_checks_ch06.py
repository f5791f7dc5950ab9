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


def dispatch_and_combine(expert_idx, weights, num_experts, capacity):
    """Seats handed out in slot-major order: an assignment's seat is the number of earlier
    assignments to its expert; it is kept if that number is below the capacity."""
    num_tokens, k = expert_idx.shape
    dispatch = torch.zeros(num_tokens, num_experts, capacity)
    combine = torch.zeros(num_tokens, num_experts, capacity)
    filled = [0] * num_experts
    for t, j in slot_major(expert_idx):
        e = int(expert_idx[t, j])
        if filled[e] < capacity:
            dispatch[t, e, filled[e]] = 1.0
            combine[t, e, filled[e]] = weights[t, j]
            filled[e] += 1
    return dispatch, combine


def dispatch_and_combine_vectorised(expert_idx, weights, num_experts, capacity):
    """Also correct (GShard's way): one-hot masks, a cumulative sum over the slot-major order for
    the seat, and a bool dispatch."""
    num_tokens, k = expert_idx.shape
    one_hot = torch.nn.functional.one_hot(expert_idx.t().reshape(-1), num_experts)     # [k T, E] slot-major
    seat = (one_hot.cumsum(0) - 1) * one_hot                                            # rank within expert
    kept = one_hot.bool() & (seat < capacity)
    seats = torch.nn.functional.one_hot(seat.clamp(max=capacity - 1), capacity).bool() & kept[..., None]
    dispatch = seats.view(k, num_tokens, num_experts, capacity).any(0)
    w = weights.t().reshape(-1)[:, None, None] * seats
    return dispatch, w.view(k, num_tokens, num_experts, capacity).sum(0)


def dispatch_and_combine_reversed_seats(expert_idx, weights, num_experts, capacity):
    """Also correct: the same tokens, seats filled from the last one backwards."""
    dispatch, combine = dispatch_and_combine(expert_idx, weights, num_experts, capacity)
    return dispatch.flip(-1), combine.flip(-1)


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



def dispatch_in_order(expert_idx, weights, num_experts, capacity, order, seat_of=lambda filled: filled,
                      limit=None):
    """dispatch/combine filling each expert in `order`; seat_of(filled) picks the seat (None: drop)."""
    num_tokens, _ = expert_idx.shape
    dispatch = torch.zeros(num_tokens, num_experts, capacity)
    combine = torch.zeros(num_tokens, num_experts, capacity)
    filled = [0] * num_experts
    for t, j in order:
        e = int(expert_idx[t, j])
        seat = seat_of(filled[e])
        filled[e] += 1
        if seat is not None:
            dispatch[t, e, seat] = 1.0
            combine[t, e, seat] = weights[t, j]
    return dispatch, combine


def dispatch_token_major(expert_idx, weights, num_experts, capacity):
    return dispatch_in_order(expert_idx, weights, num_experts, capacity, token_major(expert_idx),
                             lambda filled: filled if filled < capacity else None)


def dispatch_seat_one_based(expert_idx, weights, num_experts, capacity):
    """seat = the cumulative count including itself (1-based), kept while seat < C: one seat lost."""
    return dispatch_in_order(expert_idx, weights, num_experts, capacity, slot_major(expert_idx),
                             lambda filled: filled + 1 if filled + 1 < capacity else None)


def dispatch_seats_per_slot(expert_idx, weights, num_experts, capacity):
    """Each slot column counts its own seats, so a first and a second choice share seat 0."""
    dispatch = torch.zeros(expert_idx.shape[0], num_experts, capacity)
    combine = torch.zeros_like(dispatch)
    for j in range(expert_idx.shape[1]):
        d, c = dispatch_and_combine(expert_idx[:, j:j + 1], weights[:, j:j + 1], num_experts, capacity)
        dispatch, combine = dispatch + d, combine + c
    return dispatch, combine


def dispatch_overflow_in_last_seat(expert_idx, weights, num_experts, capacity):
    """Overflowing assignments are clamped into the last seat instead of dropped."""
    return dispatch_in_order(expert_idx, weights, num_experts, capacity, slot_major(expert_idx),
                             lambda filled: min(filled, capacity - 1))


def dispatch_renormalised_after_drops(expert_idx, weights, num_experts, capacity):
    """The kept weights of each token rescaled to sum to 1 after dropping."""
    dispatch, combine = dispatch_and_combine(expert_idx, weights, num_experts, capacity)
    total = combine.sum((1, 2), keepdim=True)
    return dispatch, torch.where(total > 0, combine / total.clamp_min(1e-12), combine)

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
    (ch06.check_dispatch_and_combine, "6.4",
     [dispatch_and_combine, dispatch_and_combine_vectorised, dispatch_and_combine_reversed_seats], [
        dispatch_token_major,
        dispatch_seat_one_based,
        dispatch_seats_per_slot,
        dispatch_overflow_in_last_seat,
        dispatch_renormalised_after_drops,
        lambda idx, w, E, C: (dispatch_and_combine(idx, w, E, C)[0],) * 2,        # combine = dispatch
        lambda idx, w, E, C: dispatch_and_combine(idx, w, E, C + 1),               # C + 1 seats
        lambda idx, w, E, C: tuple(t.transpose(0, 1) for t in dispatch_and_combine(idx, w, E, C)),  # [E, T, C]
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


def test_dispatch_inputs_drop_assignments_and_drops_change_the_output():
    """In every case some assignment is dropped, so a check that ignored capacity would fail."""
    for seed in SEEDS:
        expert_idx, weights, num_experts, capacity, x, experts = ch06.einsum_inputs(np.random.default_rng(seed))
        assert not make_plan(expert_idx, num_experts, capacity).kept.all()


def test_einsum_reference_equals_the_moe_layer_with_a_capacity():
    """The check's plan-based output is what dispatch, experts and combine compute, and what
    MoELayer's sort-based path computes (linear experts written as its permute / unpermute)."""
    for seed in SEEDS:
        args = ch06.einsum_inputs(np.random.default_rng(seed))
        expert_idx, weights, num_experts, capacity, x, experts = args
        plan = make_plan(expert_idx, num_experts, capacity)
        rows = dispatch.permute(x, plan)                                       # [S, d] grouped by expert
        expert_of_row = torch.repeat_interleave(torch.arange(num_experts), plan.tokens_per_expert)
        out = torch.einsum("sd,sdf->sf", rows, experts[expert_of_row])
        y = dispatch.unpermute(out, plan, weights.double())
        reference = ch06._what_the_plan_does(*args)["output combine(experts(dispatch(x))) [T, d]"]
        torch.testing.assert_close(reference, y)
        mine = ch06._what_the_tensors_do(dispatch_and_combine)(*args)["output combine(experts(dispatch(x))) [T, d]"]
        torch.testing.assert_close(mine, y)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_references_match_the_rules_written_out(policy):
    """make_plan's kept mask equals filling each expert in the documented priority order."""
    for seed in range(20):
        expert_idx, weights, num_experts, capacity = ch06.score_inputs(np.random.default_rng(seed))
        plan = make_plan(expert_idx, num_experts, capacity, policy=policy, weights=weights)
        mine = (keep_mask_position(expert_idx, num_experts, capacity) if policy == "position"
                else keep_mask_score(expert_idx, weights, num_experts, capacity))
        assert torch.equal(plan.kept, mine)
