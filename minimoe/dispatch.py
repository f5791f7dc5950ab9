"""Sort-based dispatch: group token copies by expert, and put the results back.

An *assignment* is one (token t, slot j) pair, numbered a = t * k + j in the flattened [T*k]
view of `expert_idx`. A plan sorts the kept assignments by expert so each expert sees one
contiguous block of rows; `permute` gathers those rows, `unpermute` scatters the expert outputs
back to their tokens, scaled by the combine weights. Dropped assignments contribute zero: the
token still flows through the residual stream around the MoE layer.
"""

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from minimoe import _checks

DROP_POLICIES = ("position", "score")  # which assignments an expert over capacity keeps


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(k * T * capacity_factor / E) (GShard, Switch)."""
    num_tokens = _checks.positive_int("num_tokens", num_tokens, minimum=0)
    num_experts = _checks.positive_int("num_experts", num_experts)
    k = _checks.positive_int("k", k)
    _checks.positive("capacity_factor", capacity_factor)
    # exact arithmetic on the factor as written: in floats 1.1 * 100 = 110.00000000000001 -> 111
    return math.ceil(k * num_tokens * Fraction(repr(float(capacity_factor))) / num_experts)


@dataclass
class DispatchPlan:
    """Where every assignment goes.

    order              [S] int64 kept assignment ids (a = t * k + j), grouped by expert
    tokens_per_expert  [E] int64 rows each expert receives, after capacity (sums to S); what the
                       router sent, before capacity, is `MoEStats.load`
    kept               [T, k] bool, False for assignments dropped by capacity or empty slots
    capacity           int or None (dropless)
    """

    order: torch.Tensor
    tokens_per_expert: torch.Tensor
    kept: torch.Tensor
    capacity: int | None

    @functools.cached_property
    def token_idx(self) -> torch.Tensor:
        """[S] the token each dispatched row came from (computed once per plan)."""
        return self.order // self.kept.shape[1]


def make_plan(expert_idx: torch.Tensor, num_experts: int, capacity: int | None = None,
              policy: str = "position", weights: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> DispatchPlan:
    """Plan the dispatch of expert_idx [T, k] to num_experts experts.

    capacity=None is dropless. Otherwise each expert keeps at most `capacity` assignments,
    filled in priority order:
      policy="position": slot by slot (every token's first choice before any second choice,
                         GShard), and by token position within a slot;
      policy="score":    highest combine weight first (needs weights [T, k]); ties by position.
    mask [T, k] bool marks the slots in use (None: all); unused slots are neither dispatched
    nor counted as dropped.
    """
    num_experts = _checks.positive_int("num_experts", num_experts)
    _checks.expert_ids("expert_idx", expert_idx, num_experts)
    if capacity is not None:
        capacity = _checks.positive_int("capacity", capacity, minimum=0)
    _checks.choice("policy", policy, DROP_POLICIES)
    if policy == "score":
        if weights is None:
            raise ValueError("policy='score' needs weights [T, k], got weights=None")
        _checks.same_shape("weights", weights, expert_idx.shape, "expert_idx")
    if mask is not None:
        _checks.tensor("mask", mask)
        _checks.same_shape("mask", mask, expert_idx.shape, "expert_idx")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    return _make_plan(expert_idx, num_experts, capacity, policy, weights, mask)


def _make_plan(expert_idx: torch.Tensor, num_experts: int, capacity: int | None, policy: str,
               weights: torch.Tensor | None, mask: torch.Tensor | None) -> DispatchPlan:
    """make_plan on checked arguments (what MoELayer.forward calls). No check here. Dropless
    without a mask, nothing waits for the device: every assignment is kept, S = T * k. Otherwise
    the host syncs are the data-dependent shapes: `nonzero` (S, the kept assignments) and, with
    a capacity, the boolean selections."""
    T, k = expert_idx.shape
    flat_expert = expert_idx.reshape(-1).long()
    if capacity is None and mask is None:
        order = flat_expert.argsort(stable=True)
        return DispatchPlan(order, _counts(flat_expert, num_experts), torch.ones_like(expert_idx, dtype=torch.bool),
                            None)
    in_use = torch.ones_like(flat_expert, dtype=torch.bool) if mask is None else mask.reshape(-1)

    if capacity is None:
        kept = in_use
    else:
        # assignment ids in priority order, then stably grouped by expert: the rank of an
        # assignment inside its expert's group is how many higher-priority ones came first
        slot_major = torch.arange(T * k, device=flat_expert.device).view(T, k).t().reshape(-1)
        if policy == "score":
            by_score = weights.detach().t().reshape(-1).argsort(descending=True, stable=True)
            priority = slot_major[by_score]
        else:
            priority = slot_major
        priority = priority[in_use[priority]]
        grouped = priority[flat_expert[priority].argsort(stable=True)]
        counts = _counts(flat_expert[grouped], num_experts)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(grouped.numel(), device=grouped.device) - group_start[flat_expert[grouped]]
        kept = torch.zeros_like(in_use)
        kept[grouped[rank < capacity]] = True

    kept_ids = kept.nonzero().squeeze(1)
    order = kept_ids[flat_expert[kept_ids].argsort(stable=True)]
    return DispatchPlan(order, _counts(flat_expert[order], num_experts), kept.view(T, k), capacity)


def _counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 occurrences of each id in ids [N] (bincount, which on CUDA syncs to read the
    largest id, without the sync)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [T, d] -> [S, d]: one row per kept assignment, grouped by expert."""
    _checks.tensor("x", x, ndim=2)
    if x.shape[0] != plan.kept.shape[0]:
        raise ValueError(f"x must have {plan.kept.shape[0]} rows (the plan's tokens), got {x.shape[0]}")
    return x.index_select(0, plan.token_idx)  # its backward (index_add) beats x[idx]'s index_put


def sorted_weights(weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """weights [T, k] -> [S], the combine weight of each dispatched row."""
    _checks.tensor("weights", weights)
    _checks.same_shape("weights", weights, plan.kept.shape, "the plan's [T, k]")
    return weights.reshape(-1).index_select(0, plan.order)


def unpermute(y: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None) -> torch.Tensor:
    """y [S, d] expert outputs -> [T, d], sum over each token's kept assignments of weight * row.
    weights=None: the rows are already weighted (e.g. by `Experts(..., row_weights=...)`)."""
    _checks.tensor("y", y, ndim=2)
    if y.shape[0] != plan.order.numel():
        raise ValueError(f"y must have {plan.order.numel()} rows (the plan's kept assignments), got {y.shape[0]}")
    if weights is not None:
        y = y * sorted_weights(weights, plan).to(y.dtype)[:, None]
    return y.new_zeros(plan.kept.shape[0], y.shape[1]).index_add(0, plan.token_idx, y)
