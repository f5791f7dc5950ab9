"""Routing health metrics. `load` arguments are per-expert counts or fractions [E] (any scale).

specialization and mutual_information measure how much an expert's identity tells about the
token's class (domain, language, cluster): 0 bits for class-blind routing.
"""

import math

import torch

from minimoe import _checks


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


def dead_experts(load) -> torch.Tensor:
    """Ids of experts that received nothing."""
    return (_load(load) == 0).nonzero().squeeze(1)


def max_violation(load) -> float:
    """MaxVio (Wang et al. 2024): (max load - mean load) / mean load; 0 when perfectly even."""
    load = _load(load)
    return float((load.max() - load.mean()) / load.mean())


def coefficient_of_variation(load) -> float:
    """Population std / mean of the load (Shazeer et al. 2017 penalise its square)."""
    load = _load(load)
    return float(load.std(correction=0) / load.mean())


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
