"""Routing health metrics. `load` arguments are per-expert counts [E] (fractions work too: every
metric here is scale-free).

`routing_stats(routing, plan)` is the one place that turns a routing decision into statistics
(`MoEStats`): MoELayer.stats, the monitor, the Trainer and the experiments all read it.
specialization and mutual_information measure how much an expert's identity tells about the
token's class (domain, language, cluster): 0 bits for class-blind routing.
"""

import math
from dataclasses import dataclass

import torch

from minimoe import _checks
from minimoe.dispatch import DispatchPlan
from minimoe.routing import Routing


def _load(load) -> torch.Tensor:
    load = torch.as_tensor(load).double()
    _checks.tensor("load", load, ndim=1)
    if (load < 0).any():
        raise ValueError(f"load must be non-negative, got min {float(load.min())}")
    if load.sum() == 0:
        raise ValueError("load must have a positive total, got all zeros")
    return load


def expert_load(expert_idx: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """expert_idx [T, k] -> [E] int64 assignments per expert (sums to T * k, or mask.sum())."""
    num_experts = _checks.positive_int("num_experts", num_experts)
    _checks.expert_ids("expert_idx", expert_idx, num_experts)
    return _count(expert_idx, num_experts, mask)


def _count(expert_idx: torch.Tensor, num_experts: int, mask: torch.Tensor | None) -> torch.Tensor:
    """expert_load without its checks."""
    ids = expert_idx if mask is None else expert_idx[mask]
    return torch.bincount(ids.reshape(-1).long(), minlength=num_experts)


def load_entropy(load) -> float:
    """Entropy of the load distribution divided by log(E): 1 = perfectly even, 0 = one expert."""
    p = _load(load)
    p = p / p.sum()
    if p.numel() == 1:
        return 1.0
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(p.numel()))


def dead_experts(load) -> int:
    """How many experts received nothing."""
    return int((_load(load) == 0).sum())


def dead_expert_ids(load) -> torch.Tensor:
    """[n] int64 ids of the experts that received nothing."""
    return (_load(load) == 0).nonzero().squeeze(1)


def max_violation(load) -> float:
    """MaxVio (Wang et al. 2024): (max load - mean load) / mean load; 0 when perfectly even."""
    load = _load(load)
    return float((load.max() - load.mean()) / load.mean())


def coefficient_of_variation(load) -> float:
    """Population std / mean of the load (Shazeer et al. 2017 penalise its square)."""
    load = _load(load)
    return float(load.std(correction=0) / load.mean())


@dataclass
class MoEStats:
    """Detached routing statistics of one routing decision over T tokens and E experts.

    tokens            T
    load              [E] int64 assignments the router sent to each expert (before capacity)
    load_share        [E] float64 load / its sum (sums to 1)
    dropped           assignments dropped by capacity
    dropped_fraction  dropped / all assignments (0 when dropless)
    load_entropy      entropy of load_share / log E: 1 = perfectly even, 0 = one expert takes all
    dead_experts      how many experts got no assignment
    max_violation     MaxVio, (max load - mean load) / mean load (Wang et al. 2024)
    cv                coefficient of variation of the load, std / mean
    logit_max         largest router logit
    logit_rms         root mean square of the router logits
    A call without assignments drops nothing and is even (shares 1/E, entropy 1, no dead expert,
    MaxVio and cv 0); without tokens its logit statistics are NaN.
    """

    tokens: int
    load: torch.Tensor
    load_share: torch.Tensor
    dropped: int
    dropped_fraction: float
    load_entropy: float
    dead_experts: int
    max_violation: float
    cv: float
    logit_max: float
    logit_rms: float


def routing_stats(routing: Routing, plan: DispatchPlan | None = None) -> MoEStats:
    """The MoEStats of routing (and of plan, its dispatch: None when nothing was dropped)."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a minimoe.routing.Routing, got {type(routing).__name__}")
    logits = routing.logits.detach()
    tokens, num_experts = logits.shape
    _checks.expert_ids("routing.expert_idx", routing.expert_idx, num_experts)
    load, dropped = _routed_load(routing, plan)
    routed = int(load.sum())
    kept = routed - dropped
    nan = float("nan")
    logit_max, logit_rms = ((float(logits.max()), float(logits.double().square().mean().sqrt())) if tokens
                            else (nan, nan))
    if routed == 0:
        even = torch.full((num_experts,), 1 / num_experts, dtype=torch.float64)
        return MoEStats(tokens, load, even, 0, 0.0, 1.0, 0, 0.0, 0.0, logit_max, logit_rms)
    return MoEStats(tokens, load, load.double() / routed, routed - kept, 1.0 - kept / routed, load_entropy(load),
                    dead_experts(load), max_violation(load), coefficient_of_variation(load), logit_max, logit_rms)


def _routed_load(routing: Routing, plan: DispatchPlan | None) -> tuple[torch.Tensor, int]:
    """(load [E] int64 the router sent to each expert, assignments that capacity dropped): the
    part of `routing_stats` that the Trainer logs every step, without its checks and metrics."""
    load = _count(routing.expert_idx, routing.logits.shape[1], routing.mask)
    return load, 0 if plan is None or plan.capacity is None else int(load.sum()) - plan.order.numel()


def specialization(labels: torch.Tensor, expert_idx: torch.Tensor, num_classes: int,
                   num_experts: int) -> torch.Tensor:
    """labels [T] ints in [0, C), expert_idx [T, k] -> [C, E] int64 counts of (class, expert) pairs."""
    num_classes = _checks.positive_int("num_classes", num_classes)
    num_experts = _checks.positive_int("num_experts", num_experts)
    _checks.expert_ids("expert_idx", expert_idx, num_experts)
    _checks.tensor("labels", labels, ndim=1)
    _checks.expert_ids("labels", labels[:, None], num_classes)
    if labels.shape[0] != expert_idx.shape[0]:
        raise ValueError(f"labels must have {expert_idx.shape[0]} entries (one per token), got {labels.shape[0]}")
    pair = labels.long()[:, None] * num_experts + expert_idx.long()
    return torch.bincount(pair.reshape(-1), minlength=num_classes * num_experts).view(num_classes, num_experts)


def mutual_information(counts: torch.Tensor) -> float:
    """I(class; expert) in bits from a [C, E] count table (e.g. from `specialization`)."""
    counts = torch.as_tensor(counts).double()
    _checks.tensor("counts", counts, ndim=2)
    if (counts < 0).any() or counts.sum() == 0:
        raise ValueError("counts must be non-negative with a positive total")
    joint = counts / counts.sum()
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / independent[nz]).log2()).sum())
