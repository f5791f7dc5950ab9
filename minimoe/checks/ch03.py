"""Checks for chapter 03 (an MoE layer in PyTorch): one function per task.

3.1 sort_by_expert(expert_idx, num_experts)  (order [T*k], tokens_per_expert [E]): the dropless plan
3.2 permute(x, order, k)                     x_sorted [T*k, d]: row i is token order[i] // k
3.3 unpermute(y, order, weights)             [T, d]: each token's rows, weighted and summed
3.4 moe_forward(x, router_weight, w_gate, w_up, w_down, k)
                                             [T, d]: the whole layer (softmax top-k router with
                                             renormalised weights, SwiGLU experts)

The references are minimoe's own: `minimoe.dispatch.make_plan` (whose `order` is the stable
sort of the assignment ids a = t * k + j by expert), `permute`, `unpermute`, and `MoELayer`.
Inputs are seeded random tensors of varying T, d, h, E and k, with uneven expert loads and,
in some cases, experts that receive no token at all.
"""

from functools import partial

import numpy as np
import torch

from minimoe.checks import run_check
from minimoe.checks._inputs import random_expert_idx, random_floats
from minimoe.dispatch import DispatchPlan, make_plan, permute, unpermute
from minimoe.layer import MoELayer
from minimoe.routing import TopKRouter

__all__ = ["check_moe_forward", "check_permute", "check_sort_by_expert", "check_unpermute"]


# uneven loads; in about half the cases the last expert gets no token
_expert_idx = partial(random_expert_idx, idle=1, idle_probability=0.5)


def _sizes(rng: np.random.Generator, min_k: int = 1) -> tuple[int, int, int]:
    """(T, E, k): enough assignments (20..256) that a sort which is not stable shows it."""
    num_experts = int(rng.integers(3, 13))
    k = int(rng.integers(min_k, min(4, num_experts - 1) + 1))
    return int(rng.integers(20, 65)), num_experts, k


def _plan_from_order(order: torch.Tensor, num_tokens: int, k: int) -> DispatchPlan:
    """The dropless DispatchPlan that `order` describes (permute / unpermute only read order and
    the [T, k] shape)."""
    return DispatchPlan(order, torch.zeros(0, dtype=torch.int64), torch.ones(num_tokens, k, dtype=torch.bool), None)


def check_sort_by_expert(learner_sort_by_expert):
    """Task 3.1: sort_by_expert(expert_idx [T, k] int64, num_experts) -> (order [T*k] int64,
    tokens_per_expert [E] int64), order = the assignment ids t * k + j stably sorted by expert."""
    def make_inputs(rng):
        num_tokens, num_experts, k = _sizes(rng)
        return _expert_idx(rng, num_tokens, num_experts, k), num_experts

    def reference(expert_idx, num_experts):
        plan = make_plan(expert_idx, num_experts)
        return plan.order, plan.tokens_per_expert

    run_check("3.1", learner_sort_by_expert, reference, make_inputs, atol=0, rtol=0)


def check_permute(learner_permute):
    """Task 3.2: permute(x [T, d], order [T*k], k) -> x_sorted [T*k, d], row i = x[order[i] // k]."""
    def make_inputs(rng):
        num_tokens, num_experts, k = _sizes(rng)
        order = make_plan(_expert_idx(rng, num_tokens, num_experts, k), num_experts).order
        return random_floats(rng, num_tokens, int(rng.integers(2, 17))), order, k

    def reference(x, order, k):
        return permute(x, _plan_from_order(order, x.shape[0], k))

    run_check("3.2", learner_permute, reference, make_inputs, atol=0, rtol=0)


def check_unpermute(learner_unpermute):
    """Task 3.3: unpermute(y [T*k, d], order [T*k], weights [T, k]) -> [T, d], token t's output
    the sum over its sorted rows i of weights.reshape(-1)[order[i]] * y[i]."""
    def make_inputs(rng):
        num_tokens, num_experts, k = _sizes(rng, min_k=2)
        order = make_plan(_expert_idx(rng, num_tokens, num_experts, k), num_experts).order
        weights = torch.from_numpy(rng.dirichlet(np.ones(k), size=num_tokens).astype(np.float32))
        return random_floats(rng, num_tokens * k, int(rng.integers(2, 17))), order, weights

    def reference(y, order, weights):
        return unpermute(y, _plan_from_order(order, weights.shape[0], weights.shape[1]), weights)

    run_check("3.3", learner_unpermute, reference, make_inputs)


def _layer_with(router_weight, w_gate, w_up, w_down, k) -> MoELayer:
    num_experts, d_model, d_hidden = w_up.shape
    layer = MoELayer(d_model, d_hidden, num_experts, k, router=TopKRouter(d_model, num_experts, k))
    layer.to(router_weight.dtype)
    with torch.no_grad():
        layer.router.proj.weight.copy_(router_weight)
        layer.experts.w_gate.copy_(w_gate)
        layer.experts.w_up.copy_(w_up)
        layer.experts.w_down.copy_(w_down)
    return layer


def check_moe_forward(learner_moe_forward):
    """Task 3.4: moe_forward(x [T, d], router_weight [E, d], w_gate [E, d, h], w_up [E, d, h],
    w_down [E, h, d], k) -> [T, d], equal to minimoe.MoELayer with these weights and a
    renormalised TopKRouter (also for k=1, where MoELayer's default is SwitchRouter)."""
    def make_inputs(rng):
        num_tokens, num_experts = int(rng.integers(8, 41)), int(rng.integers(3, 9))
        k = int(rng.integers(1, min(3, num_experts - 1) + 1))
        d, h = 4 * int(rng.integers(2, 5)), 8 * int(rng.integers(1, 4))
        scale_in, scale_hidden = d ** -0.5, h ** -0.5
        return (random_floats(rng, num_tokens, d), random_floats(rng, num_experts, d),
                random_floats(rng, num_experts, d, h) * scale_in, random_floats(rng, num_experts, d, h) * scale_in,
                random_floats(rng, num_experts, h, d) * scale_hidden, k)

    def reference(x, router_weight, w_gate, w_up, w_down, k):
        with torch.no_grad():
            return _layer_with(router_weight, w_gate, w_up, w_down, k)(x)

    run_check("3.4", learner_moe_forward, reference, make_inputs, atol=1e-5, rtol=1e-4)
