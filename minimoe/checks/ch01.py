"""Checks for chapter 01's exercises (`solutions/01_numpy_gate.ipynb`): experts and a gate in NumPy.

1.1 softmax_gate(logits)                     probabilities [N, E], exact also for logits near +-1000
1.2 mixture_input_grad(x, W_gate, b_gate, W, b, grad_y)
                                             dL/dx [N, d] of the soft mixture: through the experts
                                             and through the gate
1.3 gate_logits_backward(gates, expert_out, grad_y)
                                             dL/dlogits [N, E]
1.4 switch_gate(logits)                      the top-1 gate with its raw softmax probability

Each check runs the learner's function on three seeded random cases of different shapes and compares
it with `minimoe.numpy_ref`; it prints `task 1.M: PASS (3 random cases)` or raises CheckFailure.
"""

import numpy as np

from minimoe import numpy_ref
from minimoe.checks import run_check

__all__ = ["check_gate_logits_backward", "check_mixture_input_grad", "check_softmax_gate", "check_switch_gate"]


def _logits(rng):
    n, e = int(rng.integers(2, 10)), int(rng.integers(2, 9))
    return (2.0 * rng.standard_normal((n, e)),)


def large_logits(rng):
    """Task 1.1's argument: [N, E] logits, N >= 5, whose first rows are moderate and whose last
    rows are shifted by about +700 to +1000 (exp overflows), by about -700 to -1000 (every exp
    underflows to 0), and spread over +-1000 within one row; rows in shuffled order."""
    (logits,) = _logits(rng)
    e = logits.shape[1]
    extreme = np.stack([2.0 * rng.standard_normal(e) + rng.uniform(700, 1000),
                        2.0 * rng.standard_normal(e) - rng.uniform(700, 1000),
                        rng.uniform(-1000, 1000, e)])
    rows = np.concatenate([logits, extreme])
    return (rows[rng.permutation(len(rows))],)


def check_softmax_gate(softmax_gate):
    """Task 1.1: softmax_gate(logits [N, E]) -> probabilities [N, E], a softmax over each row,
    correct for logits in the thousands of either sign."""
    run_check("1.1", softmax_gate, numpy_ref.softmax, large_logits)


def _input_grad_inputs(rng):
    """(x [N, d], W_gate [d, E], b_gate [E], W [E, d, o], b [E, o], grad_y [N, o]) with d != E,
    and a gate far from uniform, so that both paths to x carry a sizeable gradient."""
    n, d, o = int(rng.integers(3, 11)), int(rng.integers(2, 6)), int(rng.integers(1, 4))
    e = int(rng.choice([v for v in range(2, 7) if v != d]))
    return (rng.standard_normal((n, d)), 1.5 * rng.standard_normal((d, e)), rng.standard_normal(e),
            rng.standard_normal((e, d, o)), rng.standard_normal((e, o)), rng.standard_normal((n, o)))


def _input_grad_reference(x, W_gate, b_gate, W, b, grad_y):
    params = {"W_gate": W_gate, "b_gate": b_gate, "W": W, "b": b}
    _, cache = numpy_ref.mixture_forward(params, x)
    return numpy_ref.mixture_backward(params, cache, grad_y)["x"]


def check_mixture_input_grad(mixture_input_grad):
    """Task 1.2: mixture_input_grad(x [N, d], W_gate [d, E], b_gate [E], W [E, d, o], b [E, o],
    grad_y [N, o]) -> dL/dx [N, d] for y = sum_e softmax(x W_gate + b_gate)_e (x W_e + b_e)."""
    run_check("1.2", mixture_input_grad, _input_grad_reference, _input_grad_inputs)


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
