"""A slow, obviously-correct MoE forward, one token and one slot at a time, for tests.

It shares only the router (routing a batch is the thing under test elsewhere) and the weights
with `MoELayer`; capacity, dispatch, the expert FFNs and the combine are written out again.
"""

import torch
import torch.nn.functional as F

from minimoe.dispatch import expert_capacity

_ACT = {"gelu": F.gelu, "relu": F.relu}


def _ffn(x, w_up, w_down, w_gate, activation):
    """One token x [d] through one FFN with weights used as x @ W."""
    if activation == "swiglu":
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down
    return _ACT[activation](x @ w_up) @ w_down


def kept_assignments(routing, num_experts: int, capacity: int | None, policy: str) -> set:
    """The (token, slot) pairs that get a seat, filling experts one assignment at a time."""
    T, k = routing.expert_idx.shape
    slots = [(t, j) for j in range(k) for t in range(T)]  # position priority: slot by slot
    if policy == "score":
        slots.sort(key=lambda tj: -float(routing.weights.detach()[tj]))  # stable: ties keep position order
    fill = [0] * num_experts
    kept = set()
    for t, j in slots:
        if routing.mask is not None and not routing.mask[t, j]:
            continue
        e = int(routing.expert_idx[t, j])
        if capacity is None or fill[e] < capacity:
            fill[e] += 1
            kept.add((t, j))
    return kept


def moe_loop(layer, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as `layer(x, token_ids)` for a `minimoe.layer.MoELayer` (use eval mode for
    noisy routers)."""
    tokens = x.reshape(-1, layer.d_model)
    routing = layer.router(x, token_ids, available_experts=layer.available_experts)
    T, k = routing.expert_idx.shape
    capacity = None
    if layer.capacity_factor is not None:
        capacity = expert_capacity(T, layer.num_experts, layer.k, layer.capacity_factor)
    kept = kept_assignments(routing, layer.num_experts, capacity, layer.drop_policy)
    ex, act = layer.experts, layer.experts.activation
    rows = []
    for t in range(T):
        y = torch.zeros_like(tokens[t])
        for j in range(k):
            if (t, j) in kept:
                e = int(routing.expert_idx[t, j])
                w_gate = ex.w_gate[e] if act == "swiglu" else None
                y = y + routing.weights[t, j].to(y.dtype) * _ffn(tokens[t], ex.w_up[e], ex.w_down[e], w_gate, act)
        if layer.shared is not None:
            sh = layer.shared
            shared = _ffn(tokens[t], sh.w_up, sh.w_down, sh.w_gate, act)
            if layer.shared_gate is not None:
                shared = torch.sigmoid(tokens[t] @ layer.shared_gate.weight[0]) * shared
            y = y + shared
        rows.append(y)
    return torch.stack(rows).view_as(x)
