"""Checks for chapter 06 (capacity and token dropping): one function per task.

6.1 expert_capacity(num_tokens, num_experts, k, capacity_factor)
                                   int: ceil(k * T * capacity_factor / E), computed exactly (the
                                   factor taken as the decimal it is written as)
6.2 keep_mask_position(expert_idx, num_experts, capacity)
                                   kept [T, k] bool: each expert takes at most `capacity`
                                   assignments, slot by slot (every token's first choice before any
                                   second choice), in token order within a slot (GShard, Switch)
6.3 keep_mask_score(expert_idx, weights, num_experts, capacity)
                                   kept [T, k] bool: each expert keeps its `capacity` assignments
                                   with the largest combine weights
6.4 dispatch_and_combine(expert_idx, weights, num_experts, capacity)
                                   (dispatch, combine), both [T, E, C] (GShard, Lepikhin et al.
                                   2020): token t's assignment to expert e sits in one seat c of
                                   e's buffer (position priority, as 6.2); combine holds its weight
                                   there. Compared by what they do: the kept assignments, their
                                   weights, one token per seat, and the output of
                                   combine(experts(dispatch(x))) for random linear experts

The references are minimoe's own: `minimoe.dispatch.expert_capacity` and `make_plan(...).kept`
with policy "position" or "score"; 6.4's is `make_plan`'s kept mask and the per-token sum
y_t = sum_j kept_tj w_tj x_t A_(e_tj), written out.
Inputs: k distinct experts per token with uneven expert popularity (some experts overflow, some
do not, and sometimes the last expert gets nothing), capacities from factors 0.75 to 1.25, and
continuous random combine weights (no ties). Task 6.1's cases are tables of rows, each row
checked on its own, and include rows where the exact value is a whole number but floating-point
arithmetic, in any of the usual orders of operations, lands just above it.
"""

import math
import numbers
from functools import partial

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.checks._inputs import random_expert_idx
from minimoe.dispatch import expert_capacity, make_plan

__all__ = ["check_dispatch_and_combine", "check_expert_capacity", "check_keep_mask_position",
           "check_keep_mask_score"]

# The float formulas a learner may write; a case row "traps" them all when each one's ceiling is
# one more than the exact ceiling.
_FLOAT_FORMULAS = (
    lambda T, E, k, cf: k * T * cf / E,
    lambda T, E, k, cf: cf * k * T / E,
    lambda T, E, k, cf: T * k / E * cf,
    lambda T, E, k, cf: T / E * cf * k,
    lambda T, E, k, cf: k * (T * cf) / E,
    lambda T, E, k, cf: cf * (k * T / E),
)

# uneven loads; in about half the cases the last expert gets no token
_expert_idx = partial(random_expert_idx, concentration=1.5, idle=1, idle_probability=0.5)


def _capacity_row(rng: np.random.Generator) -> tuple[int, int, int, float]:
    """(T, E, k, capacity_factor) with 2 <= E <= 64, 1 <= k <= min(E, 8) and a factor with two
    decimals in [0.25, 3]."""
    num_experts = int(rng.integers(2, 65))
    k = int(rng.integers(1, min(num_experts, 8) + 1))
    return int(rng.integers(1, 5001)), num_experts, k, int(rng.integers(25, 301)) / 100


def _float_trap_row(rng: np.random.Generator) -> tuple[int, int, int, float]:
    """A row whose exact capacity k * T * cf / E is a whole number that every formula of
    _FLOAT_FORMULAS computes as slightly more (so its ceiling is one too many)."""
    while True:
        _, num_experts, k, factor = _capacity_row(rng)
        hundredths = round(factor * 100)
        step = 100 * num_experts // math.gcd(k * hundredths, 100 * num_experts)  # T multiple of it: whole
        num_tokens = step * int(rng.integers(1, max(2, 5000 // step)))
        exact = k * num_tokens * hundredths // (100 * num_experts)
        if all(math.ceil(f(num_tokens, num_experts, k, factor)) == exact + 1 for f in _FLOAT_FORMULAS):
            return num_tokens, num_experts, k, factor


def capacity_inputs(rng: np.random.Generator) -> tuple[list]:
    """Task 6.1's argument: a table of 12 random rows and 2 float-trap rows, shuffled."""
    rows = [_capacity_row(rng) for _ in range(12)] + [_float_trap_row(rng) for _ in range(2)]
    return ([rows[i] for i in rng.permutation(len(rows))],)


def _row_by_row(task: str, fn):
    """Table of (T, E, k, capacity_factor) rows -> {"expert_capacity(T, E, k, cf)": fn's int}."""
    def apply(rows):
        results = {}
        for num_tokens, num_experts, k, factor in rows:
            call = f"expert_capacity({num_tokens}, {num_experts}, {k}, {factor})"
            value = fn(num_tokens, num_experts, k, factor)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise CheckFailure(f"task {task}: {call} returned {value!r} ({type(value).__name__}); "
                                   "expected an int (a number of slots)")
            results[call] = value
        return results
    return apply


def check_expert_capacity(learner_expert_capacity):
    """Task 6.1: expert_capacity(num_tokens, num_experts, k, capacity_factor) -> int,
    ceil(k * T * capacity_factor / E) exactly (capacity_factor as the decimal it is written as)."""
    require_function("6.1", learner_expert_capacity)
    run_check("6.1", _row_by_row("6.1", learner_expert_capacity), _row_by_row("6.1", expert_capacity),
              capacity_inputs, atol=0, rtol=0)



def _routing_inputs(rng: np.random.Generator) -> tuple[torch.Tensor, int, int]:
    """(expert_idx [T, k], E, capacity) with 6 <= E <= 12, k = 2 or 3 and the capacity of a
    factor in [0.75, 1.25]: the popular experts overflow, and slot order matters."""
    num_experts = int(rng.integers(6, 13))
    num_tokens, k = int(rng.integers(24, 65)), int(rng.integers(2, 4))
    expert_idx = _expert_idx(rng, num_tokens, num_experts, k)
    return expert_idx, num_experts, expert_capacity(num_tokens, num_experts, k, float(rng.uniform(0.75, 1.25)))


def position_inputs(rng: np.random.Generator) -> tuple[torch.Tensor, int, int]:
    """Task 6.2's arguments: expert_idx [T, k], num_experts, capacity."""
    return _routing_inputs(rng)


def score_inputs(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Task 6.3's arguments: expert_idx [T, k], weights [T, k] (float32, rows sum to 1, best
    first, as a renormalised top-k router gives them), num_experts, capacity."""
    expert_idx, num_experts, capacity = _routing_inputs(rng)
    weights = -np.sort(-rng.dirichlet(np.ones(expert_idx.shape[1]), size=expert_idx.shape[0]), axis=1)
    return expert_idx, torch.from_numpy(weights.astype(np.float32)), num_experts, capacity


def check_keep_mask_position(learner_keep_mask_position):
    """Task 6.2: keep_mask_position(expert_idx [T, k], num_experts, capacity) -> kept [T, k] bool,
    position priority: assignments (t, j) in the order j = 0 for t = 0..T-1, then j = 1, ...;
    each expert keeps the first `capacity` that reach it."""
    def reference(expert_idx, num_experts, capacity):
        return make_plan(expert_idx, num_experts, capacity, policy="position").kept

    run_check("6.2", learner_keep_mask_position, reference, position_inputs, atol=0, rtol=0)


def check_keep_mask_score(learner_keep_mask_score):
    """Task 6.3: keep_mask_score(expert_idx [T, k], weights [T, k], num_experts, capacity) ->
    kept [T, k] bool, score priority: each expert keeps its `capacity` assignments with the
    largest weights (all of them if it has no more)."""
    def reference(expert_idx, weights, num_experts, capacity):
        return make_plan(expert_idx, num_experts, capacity, policy="score", weights=weights).kept

    run_check("6.3", learner_keep_mask_score, reference, score_inputs, atol=0, rtol=0)


def einsum_inputs(rng: np.random.Generator) -> tuple:
    """Task 6.4's arguments (expert_idx [T, k], weights [T, k], num_experts, capacity), the draws
    of task 6.3, followed by what the check runs through the tensors: x [T, d] and one random
    linear expert per expert, A [E, d, d] (float64)."""
    expert_idx, weights, num_experts, capacity = score_inputs(rng)
    d = int(rng.integers(3, 7))
    x = torch.from_numpy(rng.standard_normal((expert_idx.shape[0], d)))
    experts = torch.from_numpy(rng.standard_normal((num_experts, d, d)) / np.sqrt(d))
    return expert_idx, weights, num_experts, capacity, x, experts


def _as_seats(value, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckFailure(f"task 6.4: {name} must be a torch tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise CheckFailure(f"task 6.4: {name} must have shape [T, E, C] = {list(shape)}, got {list(value.shape)}")
    return value.detach().double()


def _what_the_tensors_do(dispatch_and_combine):
    """A function of einsum_inputs' arguments -> {what is compared: value}, for a function
    (expert_idx, weights, num_experts, capacity) -> (dispatch, combine)."""
    def run(expert_idx, weights, num_experts, capacity, x, experts):
        result = dispatch_and_combine(expert_idx, weights, num_experts, capacity)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise CheckFailure(f"task 6.4: expected a pair (dispatch, combine), got {type(result).__name__}")
        shape = (expert_idx.shape[0], num_experts, capacity)
        dispatch, combine = (_as_seats(v, n, shape) for v, n in zip(result, ("dispatch", "combine"), strict=True))
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)                    # [E, C, d]
        expert_out = torch.einsum("ecd,edf->ecf", expert_in, experts)
        return {"seats each token holds at each expert [T, E]": dispatch.sum(-1),
                "combine weight of each token at each expert [T, E]": combine.sum(-1),
                "most tokens in one seat": dispatch.sum(0).max(),
                "combine weight outside the dispatched seats": (combine * (dispatch == 0)).abs().sum(),
                "output combine(experts(dispatch(x))) [T, d]": torch.einsum("tec,ecf->tf", combine, expert_out)}
    return run


def _what_the_plan_does(expert_idx, weights, num_experts, capacity, x, experts):
    """The same quantities from make_plan's kept mask, without any [T, E, C] tensor."""
    kept = make_plan(expert_idx, num_experts, capacity, policy="position").kept
    one_hot = torch.nn.functional.one_hot(expert_idx, num_experts).double() * kept[..., None]   # [T, k, E]
    kept_weight = weights.double()[..., None] * one_hot
    y = torch.einsum("tk,td,tkdf->tf", (weights.double() * kept), x, experts[expert_idx])
    return {"seats each token holds at each expert [T, E]": one_hot.sum(1),
            "combine weight of each token at each expert [T, E]": kept_weight.sum(1),
            "most tokens in one seat": torch.tensor(1.0, dtype=torch.float64),
            "combine weight outside the dispatched seats": torch.tensor(0.0, dtype=torch.float64),
            "output combine(experts(dispatch(x))) [T, d]": y}


def check_dispatch_and_combine(learner_dispatch_and_combine):
    """Task 6.4: dispatch_and_combine(expert_idx [T, k], weights [T, k], num_experts, capacity) ->
    (dispatch, combine), torch tensors [T, E, C]: position priority as in task 6.2, one token per
    seat, combine = the assignment's weight in its seat. Seats may be in any order within an expert."""
    require_function("6.4", learner_dispatch_and_combine)
    run_check("6.4", _what_the_tensors_do(learner_dispatch_and_combine), _what_the_plan_does, einsum_inputs,
              atol=1e-6, rtol=1e-5)
