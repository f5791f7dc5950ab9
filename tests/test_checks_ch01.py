"""minimoe.checks.ch01: every check passes the reference implementation, fails with the task id for
genuinely wrong answers (wrong axis, forgotten bias or term, hard-coded output) and says "not
implemented" for the exercise's stub."""

import re

import numpy as np
import pytest

from minimoe import numpy_ref
from minimoe.checks import CheckFailure, case_rng, ch01

# ---- correct answers, written the way a learner would ------------------------------------------


def softmax_gate(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def mixture_input_grad(x, W_gate, b_gate, W, b, grad_y):
    gates = softmax_gate(x @ W_gate + b_gate)                         # [N, E]
    expert_out = np.einsum("nd,edo->neo", x, W) + b                   # [N, E, o]
    grad_logits = gate_logits_backward(gates, expert_out, grad_y)     # through the gate
    through_experts = np.einsum("ne,no,edo->nd", gates, grad_y, W)    # sum_e g_e W_e delta
    return grad_logits @ W_gate.T + through_experts


def mixture_input_grad_loop(x, W_gate, b_gate, W, b, grad_y):
    """Also correct: one input at a time, the Jacobian of y written out."""
    out = np.zeros_like(x)
    for n in range(len(x)):
        g = softmax_gate((x[n] @ W_gate + b_gate)[None])[0]
        f = np.array([x[n] @ W[e] + b[e] for e in range(len(g))])     # [E, o]
        jac_gates = (np.diag(g) - np.outer(g, g)) @ W_gate.T          # dg/dx [E, d]
        jac_y = sum(g[e] * W[e].T for e in range(len(g))) + f.T @ jac_gates   # dy/dx [o, d]
        out[n] = grad_y[n] @ jac_y
    return out


def gate_logits_backward(gates, expert_out, grad_y):
    grad_gates = np.einsum("no,neo->ne", grad_y, expert_out)
    return gates * (grad_gates - (gates * grad_gates).sum(axis=1, keepdims=True))


def switch_gate(logits):
    probs = softmax_gate(logits)
    chosen = logits.argmax(axis=1)
    gates = np.zeros_like(probs)
    rows = np.arange(len(logits))
    gates[rows, chosen] = probs[rows, chosen]
    return gates


# ---- wrong answers -----------------------------------------------------------------------------


def hard_coded(correct):
    """Returns the first case's right answer for every case, as if pasted in."""
    first = []

    def hard_coded_first_case(*args):
        if not first:
            first.append(correct(*args))
        return first[0]

    return hard_coded_first_case


def softmax_wrong_axis(logits):
    z = np.exp(logits - logits.max(axis=0, keepdims=True))
    return z / z.sum(axis=0, keepdims=True)


def softmax_not_normalised(logits):
    with np.errstate(over="ignore"):
        return np.exp(logits)


def softmax_sigmoid(logits):
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-logits))


def softmax_naive(logits):
    """The formula as printed: exp overflows to inf (inf / inf = nan) or underflows to 0 / 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def softmax_shift_by_mean(logits):
    """Shifting by the row mean: still overflows when one logit is far above the others."""
    with np.errstate(over="ignore", invalid="ignore"):
        return softmax_naive(logits - logits.mean(axis=1, keepdims=True))


def softmax_shift_by_global_max(logits):
    """One shift for the whole batch: rows far below the batch's maximum underflow to 0 / 0."""
    with np.errstate(invalid="ignore"):
        return softmax_naive(logits - logits.max())


def softmax_clipped(logits):
    """Clipping the logits into a safe range changes the answer for large ones."""
    return softmax_naive(np.clip(logits, -50, 50))


def input_grad_experts_only(x, W_gate, b_gate, W, b, grad_y):
    """The gate path forgotten: as if the gate did not depend on x."""
    return np.einsum("ne,no,edo->nd", softmax_gate(x @ W_gate + b_gate), grad_y, W)


def input_grad_gate_only(x, W_gate, b_gate, W, b, grad_y):
    args = (x, W_gate, b_gate, W, b, grad_y)
    return mixture_input_grad(*args) - input_grad_experts_only(*args)


def input_grad_no_softmax_jacobian(x, W_gate, b_gate, W, b, grad_y):
    """dL/dg sent to the logits without the softmax's backward."""
    grad_gates = np.einsum("no,neo->ne", grad_y, np.einsum("nd,edo->neo", x, W) + b)
    return grad_gates @ W_gate.T + input_grad_experts_only(x, W_gate, b_gate, W, b, grad_y)


def input_grad_unweighted_experts(x, W_gate, b_gate, W, b, grad_y):
    """The expert path summed over experts without the gate weights."""
    gate_path = input_grad_gate_only(x, W_gate, b_gate, W, b, grad_y)
    return gate_path + np.einsum("no,edo->nd", grad_y, W)


def input_grad_forgot_expert_bias(x, W_gate, b_gate, W, b, grad_y):
    return mixture_input_grad(x, W_gate, b_gate, W, np.zeros_like(b), grad_y)


def backward_no_softmax_term(gates, expert_out, grad_y):
    return gates * np.einsum("no,neo->ne", grad_y, expert_out)


def backward_no_gate_factor(gates, expert_out, grad_y):
    grad_gates = np.einsum("no,neo->ne", grad_y, expert_out)
    return grad_gates - (gates * grad_gates).sum(axis=1, keepdims=True)


def backward_sum_over_tokens(gates, expert_out, grad_y):
    grad_gates = np.einsum("no,neo->ne", grad_y, expert_out)
    return gates * (grad_gates - (gates * grad_gates).sum(axis=0, keepdims=True))


def switch_renormalised(logits):
    gates = np.zeros_like(logits)
    gates[np.arange(len(logits)), logits.argmax(axis=1)] = 1.0
    return gates


def switch_argmin(logits):
    probs, chosen = softmax_gate(logits), logits.argmin(axis=1)
    gates = np.zeros_like(probs)
    gates[np.arange(len(logits)), chosen] = probs[np.arange(len(logits)), chosen]
    return gates


def switch_full_softmax(logits):
    return softmax_gate(logits)


TASKS = {
    "1.1": (ch01.check_softmax_gate, softmax_gate,
            [softmax_wrong_axis, softmax_not_normalised, softmax_sigmoid, softmax_naive, softmax_shift_by_mean,
             softmax_shift_by_global_max, softmax_clipped, hard_coded(softmax_gate)]),
    "1.2": (ch01.check_mixture_input_grad, mixture_input_grad,
            [input_grad_experts_only, input_grad_gate_only, input_grad_no_softmax_jacobian,
             input_grad_unweighted_experts, input_grad_forgot_expert_bias, hard_coded(mixture_input_grad)]),
    "1.3": (ch01.check_gate_logits_backward, gate_logits_backward,
            [backward_no_softmax_term, backward_no_gate_factor, backward_sum_over_tokens,
             hard_coded(gate_logits_backward)]),
    "1.4": (ch01.check_switch_gate, switch_gate,
            [switch_renormalised, switch_argmin, switch_full_softmax, hard_coded(switch_gate)]),
}
WRONG = [(task, wrong) for task, (_, _, wrongs) in TASKS.items() for wrong in wrongs]
REFERENCES = {
    "1.1": numpy_ref.softmax,
    "1.2": ch01._input_grad_reference,
    "1.3": lambda gates, expert_out, grad_y: numpy_ref.softmax_backward(
        gates, np.einsum("no,neo->ne", grad_y, expert_out)),
    "1.4": lambda logits: numpy_ref.gate(logits, k=1, renormalize=False),
}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("source", ["learner-style", "numpy_ref"])
def test_correct_answer_passes_with_one_stable_line(task, source, capsys):
    check, correct, _ = TASKS[task]
    check(correct if source == "learner-style" else REFERENCES[task])
    assert capsys.readouterr().out == f"task {task}: PASS (3 random cases)\n"


@pytest.mark.parametrize(("task", "wrong"), WRONG, ids=[f"{t}-{getattr(w, '__name__', 'fn')}" for t, w in WRONG])
def test_wrong_answer_fails_naming_the_task(task, wrong, capsys):
    check = TASKS[task][0]
    with pytest.raises(CheckFailure, match=rf"task {re.escape(task)}: case \d of 3 .*(differ|shape)"):
        check(wrong)
    assert "PASS" not in capsys.readouterr().out


@pytest.mark.parametrize("task", list(TASKS))
def test_hard_coded_answer_fails_on_a_later_case(task):
    check, correct, _ = TASKS[task]
    with pytest.raises(CheckFailure, match=rf"task {re.escape(task)}: case [23] of 3"):
        check(hard_coded(correct))


@pytest.mark.parametrize("task", list(TASKS))
def test_stub_says_not_implemented(task):
    def stub(*args):
        raise NotImplementedError(f"task {task}")

    with pytest.raises(CheckFailure, match=rf"task {re.escape(task)}: not implemented"):
        TASKS[task][0](stub)


def test_check_failure_reports_shapes_and_first_index():
    with pytest.raises(CheckFailure) as info:
        ch01.check_softmax_gate(softmax_wrong_axis)
    message = str(info.value)
    assert "input shapes" in message and "max abs difference" in message and "first at index" in message


def test_softmax_inputs_break_the_naive_formula_in_every_case():
    for case in range(3):
        (logits,) = ch01.large_logits(case_rng(case))
        assert not np.isfinite(softmax_naive(logits)).all()
        assert np.isfinite(softmax_gate(logits)).all() and np.abs(logits).max() > 500


def test_input_grad_agrees_with_finite_differences_and_both_paths_matter():
    """Central differences of L = sum(y * grad_y) with respect to x, in float64."""
    for case in range(3):
        x, W_gate, b_gate, W, b, grad_y = ch01._input_grad_inputs(case_rng(case))
        params = {"W_gate": W_gate, "b_gate": b_gate, "W": W, "b": b}

        def loss(x, params=params, grad_y=grad_y):
            return (numpy_ref.mixture_forward(params, x)[0] * grad_y).sum()

        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[i] = 1e-6
            numeric[i] = (loss(x + step) - loss(x - step)) / 2e-6
        np.testing.assert_allclose(ch01._input_grad_reference(*ch01._input_grad_inputs(case_rng(case))), numeric,
                                   atol=1e-6)
        gate_path = input_grad_gate_only(x, W_gate, b_gate, W, b, grad_y)
        assert np.abs(gate_path).max() > 0.1 * np.abs(numeric).max()


def test_function_that_returns_nothing_fails():
    with pytest.raises(CheckFailure, match="did the function forget to return"):
        ch01.check_mixture_input_grad(lambda *args: None)


def test_cases_have_different_shapes():
    shapes = []
    ch01.check_switch_gate(lambda logits: shapes.append(logits.shape) or switch_gate(logits))
    assert len(set(shapes)) == 3
