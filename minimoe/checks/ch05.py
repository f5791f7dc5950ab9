"""Checks for chapter 05 (load balancing and collapse): one function per task.

5.1 switch_aux_loss(probs, expert_idx)        scalar: E * sum_i f_i * P_i (Switch Transformer),
                                              f_i = assignments to i / (T * k), P_i = mean over
                                              tokens of the row-renormalised probs; differentiable
                                              w.r.t. probs
5.2 router_z_loss(logits)                     scalar: mean over tokens of logsumexp(logits)^2 (ST-MoE),
                                              finite for logits in the hundreds
5.3 bias_update(bias, tokens_per_expert, rate)
                                              [E]: bias + rate * sign(mean load - load) (DeepSeek-V3)
5.4 load_entropy(tokens_per_expert)           float: entropy of the load shares / log E, in [0, 1]

The references are minimoe's own: `minimoe.losses.load_balancing_loss` (value and gradient),
`minimoe.losses.router_z_loss`, `minimoe.routing.TopKRouter.update_bias` and
`minimoe.metrics.load_entropy`. Inputs are seeded random tensors of varying T, E and k, with
experts that receive nothing, rows of scores that do not sum to 1 (sigmoid routers), logits in
the hundreds, and loads exactly equal to the mean.
"""

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.metrics import load_entropy
from minimoe.routing import TopKRouter

__all__ = ["check_bias_update", "check_load_entropy", "check_router_z_loss", "check_switch_aux_loss"]


def _router_scores(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [T, E] float64, expert_idx [T, k] int64 = the top-k of probs). The scores are a
    softmax (rows sum to 1) or, about half the time, sigmoids (rows do not); per-expert offsets
    make the load uneven, and the last expert's offset of -8 keeps it from being chosen."""
    num_tokens, num_experts = int(rng.integers(16, 65)), int(rng.integers(3, 11))
    k = int(rng.integers(1, min(3, num_experts - 1) + 1))
    offsets = rng.normal(0.0, 1.0, num_experts)
    offsets[-1] = -8.0
    logits = torch.from_numpy(rng.normal(0.0, 1.5, (num_tokens, num_experts)) + offsets)
    probs = logits.sigmoid() if rng.random() < 0.5 else logits.softmax(-1)
    return probs, probs.topk(k, dim=-1).indices


def _value_and_gradient(loss_fn):
    """loss_fn(probs, expert_idx) -> a function returning {"loss", "gradient w.r.t. probs"}."""
    def run(probs, expert_idx):
        probs = probs.clone().requires_grad_(True)
        loss = loss_fn(probs, expert_idx)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise CheckFailure(f"task 5.1: the loss must be a torch tensor with a gradient w.r.t. probs "
                               f"(P carries it), got a {type(loss).__name__} without one: build it from "
                               "probs with torch operations, without .detach() or .item()")
        (grad,) = torch.autograd.grad(loss.sum(), probs, allow_unused=True)
        return {"loss": loss.detach(), "gradient w.r.t. probs": torch.zeros_like(probs) if grad is None else grad}
    return run


def check_switch_aux_loss(learner_switch_aux_loss):
    """Task 5.1: switch_aux_loss(probs [T, E], expert_idx [T, k]) -> scalar tensor
    E * sum_i f_i * P_i; compares the value and its gradient w.r.t. probs."""
    require_function("5.1", learner_switch_aux_loss)
    run_check("5.1", _value_and_gradient(learner_switch_aux_loss), _value_and_gradient(load_balancing_loss),
              _router_scores)


def check_router_z_loss(learner_router_z_loss):
    """Task 5.2: router_z_loss(logits [T, E] float32) -> scalar mean_t logsumexp(logits_t)^2.
    A few rows of every case sit near +-100 to +-300, where exp() overflows or underflows float32."""
    def make_inputs(rng):
        num_tokens, num_experts = int(rng.integers(8, 49)), int(rng.integers(2, 17))
        logits = rng.normal(0.0, rng.uniform(0.5, 4.0), (num_tokens, num_experts))
        hot = rng.choice(num_tokens, size=4, replace=False)
        logits[hot] += rng.uniform(100.0, 300.0, (4, 1)) * np.array([[1.0], [1.0], [-1.0], [-1.0]])
        return (torch.from_numpy(logits.astype(np.float32)),)

    run_check("5.2", learner_router_z_loss, router_z_loss, make_inputs)


def _loads_around_mean(rng: np.random.Generator, num_experts: int) -> np.ndarray:
    """[E] int64 loads whose mean is a whole number m, with one or two experts at exactly m and,
    from the skewed split of the rest, experts at 0."""
    mean = int(rng.integers(4, 41))
    at_mean = rng.choice(num_experts, size=int(rng.integers(1, 3)), replace=False)
    rest = np.setdiff1d(np.arange(num_experts), at_mean)
    load = np.full(num_experts, mean, dtype=np.int64)
    load[rest] = rng.multinomial(mean * rest.size, rng.dirichlet(np.full(rest.size, 0.4)))
    return load


def updated_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """bias after one TopKRouter.update_bias step (the reference of tasks 4.4 and 5.3)."""
    router = TopKRouter(1, bias.shape[0], k=1, bias_update_rate=rate)
    router.expert_bias.copy_(bias)
    router.update_bias(tokens_per_expert)
    return router.expert_bias


def check_bias_update(learner_bias_update):
    """Task 5.3: bias_update(bias [E] float32, tokens_per_expert [E] int64, rate) -> new bias [E],
    bias + rate * sign(mean load - load): equal to TopKRouter.update_bias."""
    def make_inputs(rng):
        num_experts = int(rng.integers(4, 13))
        bias = torch.from_numpy(rng.normal(0.0, 0.05, num_experts).astype(np.float32))
        load = torch.from_numpy(_loads_around_mean(rng, num_experts))
        return bias, load, float(rng.choice([0.001, 0.01, 0.05]))

    run_check("5.3", learner_bias_update, updated_bias, make_inputs, atol=1e-7, rtol=1e-6)


def check_load_entropy(learner_load_entropy):
    """Task 5.4: load_entropy(tokens_per_expert [E] int64) -> float, the entropy of the shares
    divided by log E (0 log 0 = 0). Every case has experts with no assignment."""
    def make_inputs(rng):
        num_experts = int(rng.integers(3, 17))
        shares = rng.dirichlet(np.full(num_experts, rng.uniform(0.3, 3.0)))
        shares[rng.choice(num_experts, size=int(rng.integers(1, num_experts)), replace=False)] = 0.0
        load = rng.multinomial(int(rng.integers(50, 2001)), shares / shares.sum())
        return (torch.from_numpy(load.astype(np.int64)),)

    run_check("5.4", learner_load_entropy, load_entropy, make_inputs)
