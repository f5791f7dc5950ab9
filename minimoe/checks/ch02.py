"""Checks for chapter 02 (sparse top-k routing in NumPy): one function per task.

2.1 top_k(scores, k)              indices [N, k] of the k largest scores per row, best first
2.2 sparse_gate(logits, k)        gates [N, E]: softmax over each row's top-k logits (Mixtral)
2.3 switch_gate(logits)           gates [N, E]: the top-1 expert keeps its full-softmax probability
2.4 moe_ffn_params(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts)
                                  (total, active) parameters of a stack of SwiGLU MoE FFN layers
"""

import numpy as np

from minimoe.architectures import moe_ffn_counts
from minimoe.checks import run_check
from minimoe.numpy_ref import gate, top_k

__all__ = ["check_moe_ffn_params", "check_sparse_gate", "check_switch_gate", "check_top_k"]


def _separated_scores(rng, num_rows, num_experts):
    """[N, E] scores whose values in each row are at least 0.25 apart: no ties, and no top-k
    choice that float rounding could flip."""
    ranks = rng.permuted(np.tile(np.arange(num_experts), (num_rows, 1)), axis=1)
    return (ranks + rng.uniform(0.0, 0.5, (num_rows, num_experts))) * rng.uniform(0.5, 1.5) - num_experts / 2


def _scores_and_k(rng):
    num_rows, num_experts = int(rng.integers(3, 12)), int(rng.integers(4, 17))
    return _separated_scores(rng, num_rows, num_experts), int(rng.integers(2, num_experts))


def check_top_k(learner_top_k):
    """Task 2.1: top_k(scores [N, E], k) -> int indices [N, k], best first."""
    run_check("2.1", learner_top_k, top_k, _scores_and_k, atol=0, rtol=0)


def check_sparse_gate(learner_sparse_gate):
    """Task 2.2: sparse_gate(logits [N, E], k) -> gates [N, E], renormalised over the top-k."""
    run_check("2.2", learner_sparse_gate, lambda logits, k: gate(logits, k, renormalize=True), _scores_and_k)


def check_switch_gate(learner_switch_gate):
    """Task 2.3: switch_gate(logits [N, E]) -> gates [N, E], top-1 with its raw softmax probability."""
    def make_inputs(rng):
        return (_separated_scores(rng, int(rng.integers(3, 12)), int(rng.integers(3, 17))),)

    run_check("2.3", learner_switch_gate, lambda logits: gate(logits, 1, renormalize=False), make_inputs)


def check_moe_ffn_params(learner_moe_ffn_params):
    """Task 2.4: moe_ffn_params(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts)
    -> (total, active) for SwiGLU experts and a bias-free router per layer, counted exactly."""
    def make_inputs(rng):
        num_experts = int(rng.integers(4, 65))
        return (int(rng.integers(8, 513)), int(rng.integers(8, 2049)), num_experts,
                int(rng.integers(2, min(num_experts, 9))), int(rng.integers(2, 33)), int(rng.integers(1, 4)))

    def reference(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts):
        return moe_ffn_counts(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts, gated=True)

    run_check("2.4", learner_moe_ffn_params, reference, make_inputs, atol=0, rtol=0)
