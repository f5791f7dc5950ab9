"""Checks for chapter 02 (sparse top-k routing in NumPy): one function per task.

2.1 top_k(scores, k)              indices [N, k] of the k largest scores per row, best first
2.2 sparse_gate(logits, k)        gates [N, E]: softmax over each row's top-k logits (Mixtral)
2.3 top_k_gate_backward(logits, grad_gates, k, renormalize)
                                  dL/dlogits [N, E] of the top-k gate, renormalised (Mixtral) or
                                  raw (Switch), unchosen logits included; checked for both
                                  conventions in every case
2.4 expected_experts_touched(num_tokens, num_experts, k)
                                  float: the expected number of distinct experts that a batch of
                                  T tokens selects, each token picking k distinct experts
                                  uniformly at random

The references are `minimoe.numpy_ref` (2.1 to 2.3) and `expected_touched` below (2.4), which
tests/test_checks_ch02.py compares with autograd, finite differences and a simulation.
"""

import math

import numpy as np

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.numpy_ref import gate, gate_backward, top_k

__all__ = ["check_expected_experts_touched", "check_sparse_gate", "check_top_k", "check_top_k_gate_backward",
           "expected_touched"]


def _separated_scores(rng, num_rows, num_experts):
    """[N, E] scores whose values in each row are at least 0.25 apart: no ties, and no top-k
    choice that float rounding (or a finite-difference step) could flip."""
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


def backward_inputs(rng):
    """Task 2.3's arguments: logits [N, E] (separated, so the top-k is unambiguous), an upstream
    gradient grad_gates [N, E] that is non-zero on every entry, and k with 1 <= k < E (k = 1
    about a third of the time: the renormalised k = 1 gradient is exactly zero)."""
    logits, k = _scores_and_k(rng)
    return logits, rng.standard_normal(logits.shape), 1 if rng.random() < 0.3 else k


def _both_conventions(fn):
    """fn(logits, grad_gates, k, renormalize) -> a function of (logits, grad_gates, k) that
    returns {"renormalize=True": ..., "renormalize=False": ...}."""
    def both(logits, grad_gates, k):
        return {f"renormalize={r}": fn(logits.copy(), grad_gates.copy(), k, r) for r in (True, False)}
    return both


def _reference_backward(logits, grad_gates, k, renormalize):
    return gate_backward(logits, gate(logits, k, renormalize), grad_gates, k, renormalize)


def check_top_k_gate_backward(learner_top_k_gate_backward):
    """Task 2.3: top_k_gate_backward(logits [N, E], grad_gates [N, E], k, renormalize) -> dL/dlogits
    [N, E] for gates = gate(logits, k, renormalize); both conventions are compared on every case."""
    require_function("2.3", learner_top_k_gate_backward)
    run_check("2.3", _both_conventions(learner_top_k_gate_backward), _both_conventions(_reference_backward),
              backward_inputs)


def expected_touched(num_tokens: int, num_experts: int, k: int) -> float:
    """E * (1 - (1 - k/E)^T): each expert is missed by one token with probability (E - k) / E,
    by all T independently, and expectation is linear over the experts."""
    return num_experts * -math.expm1(num_tokens * math.log1p(-k / num_experts))


def touched_inputs(rng: np.random.Generator) -> tuple[list]:
    """Task 2.4's argument: a table of 12 rows (T, E, k), with T = 1 and a T much larger than E
    among them, 4 <= E <= 256, 1 <= k <= min(8, E - 1)."""
    rows = []
    for i in range(12):
        num_experts = int(rng.choice([4, 8, 16, 32, 64, 128, 160, 256]))
        k = int(rng.integers(1, min(8, num_experts - 1) + 1))
        num_tokens = 1 if i == 0 else 4 * num_experts if i == 1 else int(rng.integers(2, 65))
        rows.append((num_tokens, num_experts, k))
    return ([rows[i] for i in rng.permutation(len(rows))],)


def _row_by_row(fn):
    def apply(rows):
        results = {}
        for num_tokens, num_experts, k in rows:
            call = f"expected_experts_touched({num_tokens}, {num_experts}, {k})"
            value = fn(num_tokens, num_experts, k)
            try:
                results[call] = float(value)
            except (TypeError, ValueError):
                raise CheckFailure(f"task 2.4: {call} returned {value!r}; expected a number") from None
        return results
    return apply


def check_expected_experts_touched(learner_expected_experts_touched):
    """Task 2.4: expected_experts_touched(num_tokens, num_experts, k) -> float, the expected number
    of distinct experts a batch selects under uniformly random top-k routing; each row of a table
    is compared (relative tolerance 1e-9)."""
    require_function("2.4", learner_expected_experts_touched)
    run_check("2.4", _row_by_row(learner_expected_experts_touched), _row_by_row(expected_touched),
              touched_inputs, atol=0, rtol=1e-9)
