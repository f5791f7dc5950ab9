"""Auxiliary router losses.

load_balancing_loss: Switch Transformer (Fedus et al. 2021, eq. 4), generalised to k slots:
    L = E * sum_i f_i * P_i,
    f_i = (assignments routed to expert i) / (number of assignments)    [counts, no gradient]
    P_i = mean over tokens of the router probability of expert i        [carries the gradient]
Both f and P sum to 1, so L = 1 exactly when P is uniform (for any f) or f is uniform (for any
P), at any k; it grows to E when one expert takes every token with probability 1. It is not
bounded below by 1: f and P of one finite batch can anti-correlate slightly (L < 1), so treat 1
as the balanced target, not a floor. Rows of `probs` are renormalised to sum to 1 first:
a no-op for softmax scores, DeepSeek-V3's convention for sigmoid scores.

gshard_aux_loss: GShard (Lepikhin et al. 2020, Algorithm 1): (1/E) sum_e (c_e/S) m_e with c_e the
    tokens whose first choice is e; Switch's loss on the first choices / E^2.

router_z_loss: ST-MoE (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.
"""

import torch

from minimoe import _checks


def load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """probs [T, E], expert_idx [T, k] (mask [T, k]: slots in use) -> scalar loss."""
    _checks.tensor("probs", probs, ndim=2)
    num_experts = probs.shape[1]
    _checks.expert_ids("expert_idx", expert_idx, num_experts)
    if expert_idx.shape[0] != probs.shape[0]:
        raise ValueError(f"expert_idx must have {probs.shape[0]} rows like probs, got {expert_idx.shape[0]}")
    _checks.same_shape("mask", expert_idx if mask is None else mask, expert_idx.shape, "expert_idx")
    return _load_balancing_loss(probs, expert_idx, mask)


def _load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """load_balancing_loss on checked arguments (what MoELayer.forward calls). No check here,
    and no host sync: the counts are an index_add (a mask weights the slots by 0 or 1)."""
    if probs.shape[0] == 0:  # no tokens (an empty batch or rank): no loss, still in the graph
        return probs.sum() * 0.0
    ids = expert_idx.reshape(-1).long()
    used = torch.ones_like(ids, dtype=probs.dtype) if mask is None else mask.reshape(-1).to(probs.dtype)
    counts = probs.new_zeros(probs.shape[1]).index_add_(0, ids, used.detach())
    f = counts / counts.sum().clamp(min=1)
    P = (probs / probs.sum(-1, keepdim=True)).mean(0)
    return probs.shape[1] * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [T, E] raw router logits -> scalar mean of logsumexp(logits)^2."""
    _checks.tensor("logits", logits, ndim=2)
    if logits.shape[0] == 0:  # no tokens: no loss, still in the graph
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def gshard_aux_loss(probs: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """GShard (Lepikhin et al. 2020, Algorithm 1): l_aux = (1/E) sum_e (c_e / S) m_e over a group
    of S tokens, c_e = tokens whose FIRST choice (expert_idx[:, 0]) is e, counted before any
    capacity or random drop [no gradient], m_e = mean over the tokens of probs[:, e] [the gradient].
    probs [S, E], expert_idx [S, k >= 1] best first -> scalar. It is 1/E^2 for a uniform router
    and 1/E when one expert takes every token with probability 1: Switch's loss on the first
    choices divided by E^2 (GShard's lingvo code multiplies by E^2, which is Switch's scale)."""
    _checks.tensor("probs", probs, ndim=2)
    _checks.expert_ids("expert_idx", expert_idx, probs.shape[1])
    if expert_idx.shape[0] != probs.shape[0] or expert_idx.shape[1] == 0:
        raise ValueError(f"expert_idx must have shape ({probs.shape[0]}, k >= 1) like probs' rows, "
                         f"got {tuple(expert_idx.shape)}")
    if probs.shape[0] == 0:  # no tokens: no loss, still in the graph
        return probs.sum() * 0.0
    first = torch.bincount(expert_idx[:, 0].long(), minlength=probs.shape[1]).to(probs.dtype)
    return (first / probs.shape[0] * probs.mean(0)).mean()
