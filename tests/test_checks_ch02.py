"""minimoe.checks.ch02: every check passes the reference, fails on common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub; the references of
2.3 and 2.4 agree with autograd, finite differences and a simulation."""

import math

import numpy as np
import pytest
import torch
from check_contract import contract_tests

from minimoe.checks import CheckFailure, case_rng, ch02
from minimoe.numpy_ref import gate, softmax, top_k


def softmax_then_zero(logits, k):
    """Forgets to renormalise: the kept probabilities of the full softmax."""
    return gate(logits, k, renormalize=False)


def divide_logits_by_their_sum(logits, k):
    """Renormalises the logits instead of the probabilities."""
    mask = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(mask, top_k(logits, k), True, axis=1)
    kept = np.where(mask, logits, 0.0)
    return kept / kept.sum(axis=1, keepdims=True)


def softmax_of_all_logits(logits, k):
    return softmax(logits)


# ---- task 2.3: the gate's backward -------------------------------------------------------------

def chosen_mask(logits, k):
    mask = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(-logits, axis=1)[:, :k], True, axis=1)
    return mask


def softmax_backward(probs, grad):
    return probs * (grad - (probs * grad).sum(axis=1, keepdims=True))


def top_k_gate_backward(logits, grad_gates, k, renormalize):
    """Renormalised: a softmax over the kept logits, so the unchosen get nothing. Raw: the
    kept entries of the full softmax, whose denominator reaches every logit."""
    mask = chosen_mask(logits, k)
    if renormalize:
        return softmax_backward(softmax(np.where(mask, logits, -np.inf)), grad_gates)
    return softmax_backward(softmax(logits), np.where(mask, grad_gates, 0.0))


def top_k_gate_backward_autograd(logits, grad_gates, k, renormalize):
    """Also correct: torch autograd through the forward."""
    z = torch.tensor(logits, requires_grad=True)
    mask = torch.from_numpy(chosen_mask(logits, k))
    gates = (z.masked_fill(~mask, -torch.inf).softmax(-1) if renormalize else z.softmax(-1) * mask)
    (gates * torch.from_numpy(grad_gates)).sum().backward()
    return z.grad.numpy().astype(logits.dtype)


def backward_raw_unchosen_zero(logits, grad_gates, k, renormalize):
    """Raw convention, but the unchosen logits are given no gradient."""
    return np.where(chosen_mask(logits, k), top_k_gate_backward(logits, grad_gates, k, renormalize), 0.0)


def backward_never_renormalised(logits, grad_gates, k, renormalize):
    return top_k_gate_backward(logits, grad_gates, k, False)


def backward_always_renormalised(logits, grad_gates, k, renormalize):
    return top_k_gate_backward(logits, grad_gates, k, True)


def backward_full_softmax(logits, grad_gates, k, renormalize):
    """The soft gate's backward: the top-k mask forgotten."""
    return softmax_backward(softmax(logits), grad_gates)


def backward_renormaliser_held_constant(logits, grad_gates, k, renormalize):
    """Renormalised as p_i / S with S = the sum of the kept p_j, but S treated as a constant:
    the gradient then leaks to the unchosen logits through p's denominator."""
    if not renormalize:
        return top_k_gate_backward(logits, grad_gates, k, False)
    probs, mask = softmax(logits), chosen_mask(logits, k)
    kept_sum = np.where(mask, probs, 0.0).sum(axis=1, keepdims=True)
    return softmax_backward(probs, np.where(mask, grad_gates, 0.0)) / kept_sum


# ---- task 2.4: expected experts touched --------------------------------------------------------

def expected_experts_touched(num_tokens, num_experts, k):
    return num_experts * (1 - (1 - k / num_experts) ** num_tokens)


def expected_experts_touched_by_sum(num_tokens, num_experts, k):
    """Also correct: E times P(an expert is picked), with P(missed by one token) = C(E-1, k) / C(E, k)."""
    missed = math.comb(num_experts - 1, k) / math.comb(num_experts, k)
    return num_experts * (1 - missed ** num_tokens)


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch02.check_top_k, "2.1", [top_k], [
        lambda s, k: np.argsort(s, axis=1)[:, :k],                    # the k smallest
        lambda s, k: np.argsort(s, axis=1)[:, -k:],                   # the k largest, worst first
        lambda s, k: np.sort(np.argsort(-s, axis=1)[:, :k], axis=1),  # right set, sorted by index
        lambda s, k: np.argsort(-s, axis=1)[:, :2],                   # k fixed to 2
    ]),
    (ch02.check_sparse_gate, "2.2", [lambda logits, k: gate(logits, k, renormalize=True)], [
        softmax_then_zero,
        divide_logits_by_their_sum,
        softmax_of_all_logits,
        lambda logits, k: gate(logits, 1, renormalize=True),          # k ignored
    ]),
    (ch02.check_top_k_gate_backward, "2.3", [top_k_gate_backward, top_k_gate_backward_autograd], [
        backward_raw_unchosen_zero,
        backward_never_renormalised,
        backward_always_renormalised,
        backward_full_softmax,
        backward_renormaliser_held_constant,
        lambda logits, grad, k, r: top_k_gate_backward(logits, grad, 1, r),   # k ignored
        lambda logits, grad, k, r: -top_k_gate_backward(logits, grad, k, r),  # sign flipped
    ]),
    (ch02.check_expected_experts_touched, "2.4", [expected_experts_touched, expected_experts_touched_by_sum], [
        lambda T, E, k: min(E, T * k),                                    # no two tokens share an expert
        lambda T, E, k: E * (1 - (1 - 1 / E) ** (T * k)),                 # T k picks with replacement
        lambda T, E, k: E * (1 - (1 - k / E) ** (T - 1)),                 # off by one token
        lambda T, E, k: E * (1 - (k / E) ** T),                           # P(missed) taken as k / E
        lambda T, E, k: E * (1 - (1 - 1 / E) ** T),                       # k ignored: one expert per token
        lambda T, E, k: round(expected_experts_touched(T, E, k)),         # rounded to a whole expert
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_hard_coded_answers_fail():
    scores, k = ch02._scores_and_k(np.random.default_rng(7))
    remembered = top_k(scores, k)
    with pytest.raises(CheckFailure, match="task 2.1"):
        ch02.check_top_k(lambda s, k: remembered)
    with pytest.raises(CheckFailure, match="task 2.4"):
        ch02.check_expected_experts_touched(lambda T, E, k: 3.25)


def test_scores_have_no_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, k = ch02._scores_and_k(rng)
        gaps = np.diff(np.sort(scores, axis=1), axis=1)
        assert gaps.min() > 0.2 and 2 <= k < scores.shape[1]


def test_a_learner_who_modifies_the_input_cannot_fool_the_check():
    def modifies(s, k):
        out = top_k(s, k)
        s[:] = 0
        return out
    ch02.check_top_k(modifies)


def test_backward_reference_agrees_with_finite_differences():
    """Central differences of sum(gates * grad_gates) in float64, both conventions."""
    for case in range(3):
        logits, grad_gates, k = ch02.backward_inputs(case_rng(case))
        for renormalize in (True, False):
            numeric = np.zeros_like(logits)
            for i in np.ndindex(logits.shape):
                step = np.zeros_like(logits)
                step[i] = 1e-6
                numeric[i] = ((gate(logits + step, k, renormalize) - gate(logits - step, k, renormalize))
                              * grad_gates).sum() / 2e-6
            reference = ch02._reference_backward(logits, grad_gates, k, renormalize)
            np.testing.assert_allclose(reference, numeric, atol=1e-7)
            unchosen = ~chosen_mask(logits, k)
            assert (reference[unchosen] == 0).all() if renormalize else (reference[unchosen] != 0).all()


def test_backward_inputs_include_k_one_and_k_above_one():
    ks = [ch02.backward_inputs(case_rng(case))[2] for case in range(3)]
    assert 1 in ks and max(ks) > 1


def test_expected_touched_agrees_with_a_simulation():
    rng = np.random.default_rng(0)
    for num_tokens, num_experts, k in [(1, 8, 2), (5, 8, 2), (16, 64, 6), (40, 16, 1)]:
        touched = [len(np.unique(np.concatenate([rng.choice(num_experts, k, replace=False)
                                                 for _ in range(num_tokens)]))) for _ in range(4000)]
        expected = ch02.expected_touched(num_tokens, num_experts, k)
        assert abs(np.mean(touched) - expected) < 4 * np.std(touched) / np.sqrt(len(touched)) + 1e-9
    assert ch02.expected_touched(1, 8, 2) == pytest.approx(2.0)


def test_touched_rows_have_one_token_and_many_tokens():
    (rows,) = ch02.touched_inputs(case_rng(0))
    assert any(t == 1 for t, _, _ in rows) and any(t >= 4 * e for t, e, _ in rows)
