"""Checks for chapter 01's exercises (`solutions/01_numpy_gate.ipynb`): experts and a gate in NumPy.

Each check runs the learner's function on three seeded random cases of different shapes and compares
it with `minimoe.numpy_ref`; it prints `task 1.M: PASS (3 random cases)` or raises CheckFailure.
"""

import numpy as np

from minimoe import numpy_ref
from minimoe.checks import run_check

__all__ = ["check_gate_logits_backward", "check_mixture_forward", "check_softmax_gate", "check_switch_gate"]


def _logits(rng):
    n, e = int(rng.integers(2, 10)), int(rng.integers(2, 9))
    return (2.0 * rng.standard_normal((n, e)),)


def check_softmax_gate(softmax_gate):
    """Task 1.1: softmax_gate(logits [N, E]) -> probabilities [N, E], a softmax over each row."""
    run_check("1.1", softmax_gate, numpy_ref.softmax, _logits)


def _mixture_inputs(rng):
    n, d, e, o = (int(v) for v in (rng.integers(3, 11), rng.integers(1, 5), rng.integers(2, 6), rng.integers(1, 4)))
    return (rng.standard_normal((n, d)), rng.standard_normal((d, e)), rng.standard_normal(e),
            rng.standard_normal((e, d, o)), rng.standard_normal((e, o)))


def _mixture_reference(x, W_gate, b_gate, W, b):
    params = {"W_gate": W_gate, "b_gate": b_gate, "W": W, "b": b}
    return numpy_ref.mixture_forward(params, x)[0]


def check_mixture_forward(mixture_forward):
    """Task 1.2: mixture_forward(x [N, d], W_gate [d, E], b_gate [E], W [E, d, o], b [E, o]) -> y [N, o]."""
    run_check("1.2", mixture_forward, _mixture_reference, _mixture_inputs)


def _backward_inputs(rng):
    n, e, o = int(rng.integers(2, 10)), int(rng.integers(2, 7)), int(rng.integers(1, 4))
    gates = numpy_ref.softmax(rng.standard_normal((n, e)))
    return gates, rng.standard_normal((n, e, o)), rng.standard_normal((n, o))


def _backward_reference(gates, expert_out, grad_y):
    grad_gates = np.einsum("no,neo->ne", grad_y, expert_out)
    return numpy_ref.softmax_backward(gates, grad_gates)


def check_gate_logits_backward(gate_logits_backward):
    """Task 1.3: gate_logits_backward(gates [N, E], expert_out [N, E, o], grad_y [N, o]) -> dL/dlogits [N, E]."""
    run_check("1.3", gate_logits_backward, _backward_reference, _backward_inputs)


def check_switch_gate(switch_gate):
    """Task 1.4: switch_gate(logits [N, E]) -> gates [N, E]: the top-1 softmax probability, zeros elsewhere."""
    run_check("1.4", switch_gate, lambda logits: numpy_ref.gate(logits, k=1, renormalize=False), _logits)
