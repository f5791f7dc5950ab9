"""minimoe.checks.ch01: every check passes the reference implementation, fails with the task id for
genuinely wrong answers (wrong axis, forgotten bias or term, hard-coded output) and says "not
implemented" for the exercise's stub."""

import re

import numpy as np
import pytest

from minimoe import numpy_ref
from minimoe.checks import CheckFailure, ch01

# ---- correct answers, written the way a learner would ------------------------------------------


def softmax_gate(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def mixture_forward(x, W_gate, b_gate, W, b):
    gates = softmax_gate(x @ W_gate + b_gate)
    expert_out = np.einsum("nd,edo->neo", x, W) + b
    return np.einsum("ne,neo->no", gates, expert_out)


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
    return np.exp(logits)


def softmax_sigmoid(logits):
    return 1 / (1 + np.exp(-logits))


def mixture_forgot_gate_bias(x, W_gate, b_gate, W, b):
    return mixture_forward(x, W_gate, np.zeros_like(b_gate), W, b)


def mixture_forgot_expert_bias(x, W_gate, b_gate, W, b):
    return mixture_forward(x, W_gate, b_gate, W, np.zeros_like(b))


def mixture_uniform_average(x, W_gate, b_gate, W, b):
    return (np.einsum("nd,edo->neo", x, W) + b).mean(axis=1)


def mixture_gate_over_tokens(x, W_gate, b_gate, W, b):
    logits = x @ W_gate + b_gate
    gates = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    return np.einsum("ne,neo->no", gates, np.einsum("nd,edo->neo", x, W) + b)


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
            [softmax_wrong_axis, softmax_not_normalised, softmax_sigmoid, hard_coded(softmax_gate)]),
    "1.2": (ch01.check_mixture_forward, mixture_forward,
            [mixture_forgot_gate_bias, mixture_forgot_expert_bias, mixture_uniform_average,
             mixture_gate_over_tokens, hard_coded(mixture_forward)]),
    "1.3": (ch01.check_gate_logits_backward, gate_logits_backward,
            [backward_no_softmax_term, backward_no_gate_factor, backward_sum_over_tokens,
             hard_coded(gate_logits_backward)]),
    "1.4": (ch01.check_switch_gate, switch_gate,
            [switch_renormalised, switch_argmin, switch_full_softmax, hard_coded(switch_gate)]),
}
WRONG = [(task, wrong) for task, (_, _, wrongs) in TASKS.items() for wrong in wrongs]
REFERENCES = {
    "1.1": numpy_ref.softmax,
    "1.2": lambda x, W_gate, b_gate, W, b: numpy_ref.mixture_forward(
        {"W_gate": W_gate, "b_gate": b_gate, "W": W, "b": b}, x)[0],
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


def test_softmax_without_max_subtraction_passes():
    # a design decision: the check uses moderate logits, so the naive formula is not marked wrong;
    # the exercise text explains why subtracting the max matters
    ch01.check_softmax_gate(lambda logits: np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))


def test_function_that_returns_nothing_fails():
    with pytest.raises(CheckFailure, match="did the function forget to return"):
        ch01.check_mixture_forward(lambda *args: None)


def test_cases_have_different_shapes():
    shapes = []
    ch01.check_switch_gate(lambda logits: shapes.append(logits.shape) or switch_gate(logits))
    assert len(set(shapes)) == 3
