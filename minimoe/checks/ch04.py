"""Checks for chapter 04 (a zoo of routers): one function per task.

4.1 noisy_top_k_gate(logits, noise_logits, standard_normal, k)
                                   gates [T, E]: H = logits + standard_normal * softplus(noise_logits),
                                   softmax over each row's k largest H, zero elsewhere (Shazeer et al. 2017)
4.2 expert_choice(logits, capacity)
                                   (token_idx [E, C] int64, weights [E, C]): each expert's C tokens with
                                   the highest softmax-over-experts score, best first (Zhou et al. 2022)
4.3 sigmoid_bias_route(logits, bias, k)
                                   (expert_idx [T, k] int64, weights [T, k]): select the k largest
                                   sigmoid(logits) + bias, best first; weights = the chosen sigmoid scores
                                   (no bias) renormalised to sum 1 (DeepSeek-V3)
4.4 update_bias(bias, tokens_per_expert, rate)
                                   new bias [E] = bias + rate * sign(mean load - load)

The references are minimoe's own routers, given the learner's inputs exactly: a router's linear
map is set to the identity (or to [I | 0] and [0 | I] for NoisyTopKRouter's two maps) so that its
logits are the given ones, and NoisyTopKRouter's N(0, 1) draw is replaced by the given sample.
All scores are continuous random numbers, so ties have probability zero and "best first" is unique.
"""

from unittest import mock

import numpy as np
import torch

from minimoe.checks import run_check
from minimoe.checks._inputs import random_floats
from minimoe.checks.ch05 import updated_bias
from minimoe.routing import ExpertChoiceRouter, NoisyTopKRouter, TopKRouter

__all__ = ["check_expert_choice", "check_noisy_top_k_gate", "check_sigmoid_bias_route", "check_update_bias"]


def _identity_weight(router_weight: torch.nn.Parameter, columns: slice) -> None:
    """Set an [E, d] linear weight to the identity on the given input columns, zero elsewhere."""
    with torch.no_grad():
        router_weight.zero_()
        router_weight[:, columns] = torch.eye(router_weight.shape[0])


def _sizes(rng: np.random.Generator) -> tuple[int, int, int]:
    """(T, E, k) with 2 <= k < E, so that renormalising over k experts matters."""
    num_experts = int(rng.integers(4, 13))
    return int(rng.integers(6, 41)), num_experts, int(rng.integers(2, num_experts))


def noisy_inputs(rng: np.random.Generator) -> tuple:
    """Task 4.1's arguments: (logits, noise_logits, standard_normal) [T, E] each, and k."""
    num_tokens, num_experts, k = _sizes(rng)
    return (random_floats(rng, num_tokens, num_experts, scale=1.5), random_floats(rng, num_tokens, num_experts),
            random_floats(rng, num_tokens, num_experts), k)


def expert_choice_inputs(rng: np.random.Generator) -> tuple:
    """Task 4.2's arguments: logits [T, E] and a capacity C near T * factor / E, factor in [0.6, 1.2]."""
    num_tokens, num_experts = int(rng.integers(16, 41)), int(rng.integers(4, 9))
    capacity = max(1, round(num_tokens * rng.uniform(0.6, 1.2) / num_experts))
    return random_floats(rng, num_tokens, num_experts, scale=1.5), capacity


def sigmoid_bias_inputs(rng: np.random.Generator) -> tuple:
    """Task 4.3's arguments: logits [T, E], a bias [E] small enough to move some choices, and k."""
    num_tokens, num_experts, k = _sizes(rng)
    return random_floats(rng, num_tokens, num_experts, scale=1.5), random_floats(rng, num_experts, scale=0.2), k


def update_bias_inputs(rng: np.random.Generator) -> tuple:
    """Task 4.4's arguments: bias [E], tokens_per_expert [E] int64 with one load exactly at the
    mean, and a rate."""
    num_experts = int(rng.integers(5, 13))
    loads = rng.integers(0, 300, size=num_experts - 1)
    loads[0] += -loads.sum() % (num_experts - 1)  # their mean is an integer ...
    loads = rng.permutation(np.append(loads, loads.sum() // (num_experts - 1)))  # ... and one expert has it
    return (random_floats(rng, num_experts, scale=0.05), torch.from_numpy(loads.astype(np.int64)),
            float(rng.uniform(0.001, 0.1)))


def check_noisy_top_k_gate(learner_noisy_top_k_gate):
    """Task 4.1: noisy_top_k_gate(logits [T, E], noise_logits [T, E], standard_normal [T, E], k)
    -> gates [T, E], equal to NoisyTopKRouter in training mode drawing this noise sample."""
    def reference(logits, noise_logits, standard_normal, k):
        num_experts = logits.shape[1]
        router = NoisyTopKRouter(2 * num_experts, num_experts, k).train()
        _identity_weight(router.proj.weight, slice(0, num_experts))          # x W_g = logits
        _identity_weight(router.noise_proj.weight, slice(num_experts, None))  # x W_noise = noise_logits
        with torch.no_grad(), mock.patch.object(torch, "randn_like", lambda t: standard_normal.to(t.dtype)):
            routing = router(torch.cat([logits, noise_logits], dim=1))
        return torch.zeros_like(logits).scatter(1, routing.expert_idx, routing.weights)

    run_check("4.1", learner_noisy_top_k_gate, reference, noisy_inputs)


def check_expert_choice(learner_expert_choice):
    """Task 4.2: expert_choice(logits [T, E], capacity C) -> (token_idx [E, C] int64, weights [E, C]):
    scores = softmax(logits) over the experts; row e lists the C tokens with the largest scores[:, e],
    best first, and weights[e] their scores. The same choice as ExpertChoiceRouter."""
    def reference(logits, capacity):
        num_tokens, num_experts = logits.shape
        # ceil(T * factor / E) = capacity exactly, for factor = (capacity - 1/2) * E / T
        router = ExpertChoiceRouter(num_experts, num_experts, (capacity - 0.5) * num_experts / num_tokens)
        _identity_weight(router.proj.weight, slice(None))
        with torch.no_grad():
            routing = router(logits)
        token_idx, weights = [], []
        for e in range(num_experts):  # the router returns token-major slots: regroup them by expert
            tokens, slots = torch.nonzero(routing.mask & (routing.expert_idx == e), as_tuple=True)
            w = routing.weights[tokens, slots]
            best_first = w.argsort(descending=True)
            token_idx.append(tokens[best_first])
            weights.append(w[best_first])
        return torch.stack(token_idx), torch.stack(weights)

    run_check("4.2", learner_expert_choice, reference, expert_choice_inputs)


def check_sigmoid_bias_route(learner_sigmoid_bias_route):
    """Task 4.3: sigmoid_bias_route(logits [T, E], bias [E], k) -> (expert_idx [T, k] int64,
    weights [T, k]), equal to TopKRouter(score="sigmoid") with expert_bias = bias."""
    def reference(logits, bias, k):
        num_experts = logits.shape[1]
        router = TopKRouter(num_experts, num_experts, k, score="sigmoid", bias_update_rate=1.0)
        _identity_weight(router.proj.weight, slice(None))
        router.expert_bias.copy_(bias)
        with torch.no_grad():
            routing = router(logits)
        return routing.expert_idx, routing.weights

    run_check("4.3", learner_sigmoid_bias_route, reference, sigmoid_bias_inputs)


def check_update_bias(learner_update_bias):
    """Task 4.4: update_bias(bias [E], tokens_per_expert [E] int64, rate) -> the new bias [E],
    equal to TopKRouter.update_bias. One expert's load equals the mean exactly (sign 0)."""
    run_check("4.4", learner_update_bias, updated_bias, update_bias_inputs)
