"""minimoe.dispatch: capacity arithmetic, the dispatch plan (checked against the naive
`minimoe.reference.kept_assignments` and against the properties a plan must have), the
permute/unpermute round trip, and input validation."""

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.dispatch import DROP_POLICIES, expert_capacity, make_plan, permute, unpermute
from minimoe.reference import kept_assignments
from minimoe.routing import Routing

PROPERTY = settings(max_examples=100)


# ---------------------------------------------------------------------------------------------
# expert_capacity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_tokens", "num_experts", "k", "capacity_factor", "expected"), [
    (4096, 8, 2, 1.25, 1280),  # 2 * 4096 * 1.25 / 8, exact
    (10, 3, 1, 1.0, 4),        # 10 / 3 = 3.33 -> rounds up
    (10, 4, 2, 1.0, 5),        # exact, no rounding
    (7, 2, 1, 0.5, 2),         # 1.75 -> 2
    (1, 64, 1, 1.0, 1),        # a single token still gets a seat
    (0, 8, 2, 1.25, 0),        # no tokens, no seats
    (100, 1, 1, 1.1, 110),     # 1.1 * 100 = 110.00000000000001 in floats: must not become 111
    (1000, 10, 1, 1.1, 110),
    (100, 1, 1, 0.3, 30),      # 0.3 * 100 = 30.000000000000004
    (3, 1, 1, 0.1, 1),         # 0.30000000000000004 -> 1, a genuine fraction still rounds up
])
def test_expert_capacity_hand_computed(num_tokens, num_experts, k, capacity_factor, expected):
    assert expert_capacity(num_tokens, num_experts, k, capacity_factor) == expected


@PROPERTY
@given(num_tokens=st.integers(0, 100_000), num_experts=st.integers(1, 256), k=st.integers(1, 8),
       hundredths=st.integers(1, 1000))
def test_expert_capacity_is_ceil_of_the_decimal_value(num_tokens, num_experts, k, hundredths):
    """capacity_factor = hundredths / 100 as a decimal: the answer is an exact integer ceiling."""
    exact = Fraction(k * num_tokens * hundredths, 100 * num_experts)
    assert expert_capacity(num_tokens, num_experts, k, hundredths / 100) == math.ceil(exact)


@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
    (dict(capacity_factor=-1.25), ValueError, "capacity_factor"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
    (dict(capacity_factor="1.25"), TypeError, "capacity_factor"),
    (dict(num_tokens=4096.0), TypeError, "num_tokens"),
    (dict(num_tokens=-1), ValueError, "num_tokens"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(k=0), ValueError, "k"),
    (dict(k=1.5), TypeError, "k"),
], ids=["cf_zero", "cf_negative", "cf_nan", "cf_str", "tokens_float", "tokens_negative", "experts_zero",
        "k_zero", "k_float"])
def test_expert_capacity_rejects_bad_input(kwargs, error, argument):
    args = dict(num_tokens=4096, num_experts=8, k=2, capacity_factor=1.25) | kwargs
    with pytest.raises(error, match=rf"\b{argument}\b"):
        expert_capacity(**args)


# ---------------------------------------------------------------------------------------------
# make_plan: random routings, checked against the naive reference and plan properties
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One random routing decision and the plan make_plan builds for it."""

    expert_idx: torch.Tensor  # [T, k]
    num_experts: int
    weights: torch.Tensor     # [T, k]
    mask: torch.Tensor | None
    capacity: int | None
    policy: str

    def __post_init__(self):
        self.plan = make_plan(self.expert_idx, self.num_experts, self.capacity, self.policy,
                              self.weights, self.mask)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.expert_idx.shape)

    @property
    def in_use(self) -> torch.Tensor:
        return torch.ones(self.shape, dtype=torch.bool) if self.mask is None else self.mask

    @property
    def dropped(self) -> torch.Tensor:
        return self.in_use & ~self.plan.kept

    def routing(self) -> Routing:
        T, _ = self.shape
        zeros = torch.zeros(T, self.num_experts)
        return Routing(zeros, zeros, self.expert_idx, self.weights, self.mask)

    def assignments(self, selected: torch.Tensor):
        """(token, slot, expert, weight) of every assignment where `selected` [T, k] is True."""
        for t, j in selected.nonzero().tolist():
            yield t, j, int(self.expert_idx[t, j]), float(self.weights[t, j])


@st.composite
def cases(draw, *, capacity=True, mask="maybe", policy=None, unit_weights=False):
    """A random Case: T in 0..40, E in 1..9, k in 1..min(E, 4); experts distinct per row or with
    repeats; weights continuous or from {0, 1/3, 2/3} (ties exercise the tie-break); a mask
    "never", "maybe" or "always"; a capacity in 0..T*k or None unless capacity=False."""
    T = draw(st.integers(0, 40))
    E = draw(st.integers(1, 9))
    k = draw(st.integers(1, min(E, 4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        expert_idx = torch.rand(T, E, generator=g).argsort(-1)[:, :k]  # distinct experts per row
    else:
        expert_idx = torch.randint(E, (T, k), generator=g)             # repeats allowed
    expert_idx = expert_idx.to(draw(st.sampled_from([torch.int64, torch.int32])))
    weights = torch.rand(T, k, generator=g)
    if unit_weights:
        weights = torch.ones(T, k)
    elif draw(st.booleans()):
        weights = (weights * 3).floor() / 3
    in_use = torch.rand(T, k, generator=g) < 0.7
    return Case(
        expert_idx=expert_idx,
        num_experts=E,
        weights=weights,
        mask=in_use if mask == "always" or (mask == "maybe" and draw(st.booleans())) else None,
        capacity=draw(st.none() | st.integers(0, T * k)) if capacity else None,
        policy=policy or draw(st.sampled_from(DROP_POLICIES)),
    )


@PROPERTY
@given(cases())
def test_kept_matches_naive_reference(case):
    expected = kept_assignments(case.routing(), case.num_experts, case.capacity, case.policy)
    assert set(map(tuple, case.plan.kept.nonzero().tolist())) == expected


@PROPERTY
@given(cases())
def test_tokens_per_expert_counts_the_kept_assignments(case):
    plan = case.plan
    kept_experts = case.expert_idx[plan.kept].long()
    assert plan.tokens_per_expert.dtype == torch.int64
    assert int(plan.tokens_per_expert.sum()) == int(plan.kept.sum()) == plan.order.numel()
    assert torch.equal(plan.tokens_per_expert, torch.bincount(kept_experts, minlength=case.num_experts))


@PROPERTY
@given(cases())
def test_no_expert_over_capacity_and_drops_only_when_full(case):
    plan = case.plan
    assert plan.capacity == case.capacity
    if case.capacity is None:
        return
    assert int(plan.tokens_per_expert.max()) <= case.capacity
    for t, j, e, _ in case.assignments(case.dropped):
        assert plan.tokens_per_expert[e] == case.capacity, f"({t}, {j}) dropped but expert {e} not full"


def _per_expert(case, selected, key):
    """{expert: [key(t, j, weight) for each selected assignment of that expert]}."""
    groups = {e: [] for e in range(case.num_experts)}
    for t, j, e, w in case.assignments(selected):
        groups[e].append(key(t, j, w))
    return groups


@PROPERTY
@given(cases(policy="score"))
def test_score_policy_keeps_the_highest_weights(case):
    weight = lambda t, j, w: w  # noqa: E731
    kept, dropped = _per_expert(case, case.plan.kept, weight), _per_expert(case, case.dropped, weight)
    for e in range(case.num_experts):
        assert min(kept[e], default=math.inf) >= max(dropped[e], default=-math.inf), f"expert {e}"


@PROPERTY
@given(cases(policy="position"))
def test_position_policy_keeps_earlier_slots_then_tokens(case):
    T, _ = case.shape
    slot_major = lambda t, j, w: j * T + t  # noqa: E731
    kept, dropped = _per_expert(case, case.plan.kept, slot_major), _per_expert(case, case.dropped, slot_major)
    for e in range(case.num_experts):
        assert max(kept[e], default=-1) < min(dropped[e], default=math.inf), f"expert {e}"


@PROPERTY
@given(cases(capacity=False))
def test_dropless_keeps_every_slot_in_use(case):
    assert torch.equal(case.plan.kept, case.in_use)
    assert case.plan.capacity is None


@PROPERTY
@given(cases())
def test_order_lists_each_kept_assignment_once_grouped_by_expert(case):
    plan = case.plan
    T, k = case.shape
    assert plan.kept.shape == (T, k) and plan.kept.dtype == torch.bool
    assert sorted(plan.order.tolist()) == plan.kept.reshape(-1).nonzero().squeeze(1).tolist()
    experts_in_order = case.expert_idx.reshape(-1)[plan.order]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])
    assert torch.equal(plan.token_idx, plan.order // k)


@PROPERTY
@given(cases(mask="always"))
def test_masked_out_slots_are_neither_dispatched_nor_dropped(case):
    plan = case.plan
    assert not plan.kept[~case.mask].any()
    assert int(plan.tokens_per_expert.sum()) + int(case.dropped.sum()) == int(case.mask.sum())
    if case.capacity is None:
        assert torch.equal(plan.kept, case.mask)


# ---------------------------------------------------------------------------------------------
# permute / unpermute
# ---------------------------------------------------------------------------------------------

def _tokens(case, d=3):
    return torch.randn(case.shape[0], d, generator=torch.Generator().manual_seed(case.shape[0]))


@PROPERTY
@given(cases(capacity=False, mask="never", unit_weights=True))
def test_round_trip_with_unit_weights_dropless_is_k_times_x(case):
    x = _tokens(case)
    out = unpermute(permute(x, case.plan), case.plan, case.weights)
    torch.testing.assert_close(out, case.shape[1] * x)


@PROPERTY
@given(cases())
def test_round_trip_scales_each_token_by_its_kept_weights(case):
    x = _tokens(case)
    out = unpermute(permute(x, case.plan), case.plan, case.weights)
    kept_weight = (case.weights * case.plan.kept).sum(1, keepdim=True)
    torch.testing.assert_close(out, kept_weight * x)


@PROPERTY
@given(cases())
def test_round_trip_without_weights_sums_the_kept_copies(case):
    """weights=None: the rows come already weighted, so each kept copy counts once."""
    x = _tokens(case)
    out = unpermute(permute(x, case.plan), case.plan, weights=None)
    torch.testing.assert_close(out, case.plan.kept.sum(1, keepdim=True) * x)


@PROPERTY
@given(cases())
def test_each_expert_block_goes_back_to_its_own_assignments(case):
    """Expert e multiplies its block of rows (sizes from tokens_per_expert) by e + 1: every
    token must get back sum_j kept * weight * (expert + 1) * x, whatever the row order."""
    plan = case.plan
    x = _tokens(case)
    expert_of_row = torch.repeat_interleave(torch.arange(case.num_experts), plan.tokens_per_expert)
    out = unpermute(permute(x, plan) * (expert_of_row[:, None] + 1.0), plan, case.weights)
    scale = (case.weights * plan.kept * (case.expert_idx + 1.0)).sum(1, keepdim=True)
    torch.testing.assert_close(out, scale * x)


def test_permute_and_unpermute_pass_gradients():
    expert_idx = torch.tensor([[0, 1], [1, 2], [0, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]], requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    plan = make_plan(expert_idx, 3, capacity=1)
    # slot 0 first: t0 -> e0, t1 -> e1 kept, t2 -> e0 full; slot 1: t0 -> e1 full, t1 -> e2, t2 -> e2 full
    assert plan.kept.tolist() == [[True, False], [True, True], [False, False]]
    unpermute(permute(x, plan), plan, weights).sum().backward()
    kept_weight = (weights * plan.kept).sum(1, keepdim=True)
    torch.testing.assert_close(x.grad, kept_weight.detach().expand(3, 4))
    torch.testing.assert_close(weights.grad, plan.kept * x.detach().sum(1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

EXPERT_IDX = torch.tensor([[0, 1], [1, 2], [2, 0]])
WEIGHTS = torch.full((3, 2), 0.5)


@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    (dict(expert_idx=EXPERT_IDX.float()), TypeError, "expert_idx"),
    (dict(expert_idx=EXPERT_IDX.bool()), TypeError, "expert_idx"),
    (dict(expert_idx=EXPERT_IDX.tolist()), TypeError, "expert_idx"),
    (dict(expert_idx=EXPERT_IDX[:, 0]), ValueError, "expert_idx"),
    (dict(expert_idx=EXPERT_IDX + 1), ValueError, "expert_idx"),
    (dict(expert_idx=EXPERT_IDX - 1), ValueError, "expert_idx"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(capacity=-1), ValueError, "capacity"),
    (dict(capacity=2.0), TypeError, "capacity"),
    (dict(policy="foo"), ValueError, "policy"),
    (dict(policy="score", weights=None), ValueError, "weights"),
    (dict(policy="score", weights=WEIGHTS[:2]), ValueError, "weights"),
    (dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(3, 2)), TypeError, "mask"),
], ids=["float_ids", "bool_ids", "list_ids", "1d_ids", "id_too_large", "negative_id", "num_experts",
        "negative_capacity", "float_capacity", "unknown_policy", "score_without_weights",
        "score_weights_shape", "mask_shape", "mask_dtype"])
def test_make_plan_rejects_bad_input(kwargs, error, argument):
    args = dict(expert_idx=EXPERT_IDX, num_experts=3, capacity=1, policy="position",
                weights=WEIGHTS, mask=None) | kwargs
    with pytest.raises(error, match=rf"\b{argument}\b"):
        make_plan(**args)


@pytest.mark.parametrize(("call", "argument"), [
    (lambda plan: permute(torch.zeros(4, 5), plan), "x"),
    (lambda plan: permute(torch.zeros(3), plan), "x"),
    (lambda plan: unpermute(torch.zeros(7, 5), plan, WEIGHTS), "y"),
    (lambda plan: unpermute(torch.zeros(6), plan, WEIGHTS), "y"),
    (lambda plan: unpermute(torch.zeros(6, 5), plan, WEIGHTS.reshape(-1)), "weights"),
    (lambda plan: unpermute(torch.zeros(6, 5), plan, WEIGHTS[:, :1]), "weights"),
], ids=["permute_rows", "permute_1d", "unpermute_rows", "unpermute_1d", "weights_1d", "weights_cols"])
def test_permute_unpermute_reject_bad_shapes(call, argument):
    plan = make_plan(EXPERT_IDX, 3)  # dropless: 6 rows
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call(plan)
