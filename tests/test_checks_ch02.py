"""minimoe.checks.ch02: every check passes the reference, fails on common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import numpy as np
import pytest
from check_contract import contract_tests

from minimoe.architectures import moe_ffn_counts
from minimoe.checks import CheckFailure, ch02
from minimoe.numpy_ref import gate, softmax, top_k


def ffn_reference(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts):
    return moe_ffn_counts(d_model, d_hidden, num_experts, k, num_layers, num_shared_experts)


def moe_ffn_without_shared(d, h, E, k, L, S):
    return moe_ffn_counts(d, h, E, k, L, 0)


def moe_ffn_total_with_k(d, h, E, k, L, S):
    total, active = moe_ffn_counts(d, h, E, k, L, S)
    return active, active


def moe_ffn_without_router(d, h, E, k, L, S):
    total, active = moe_ffn_counts(d, h, E, k, L, S)
    return total - L * d * E, active - L * d * E


def moe_ffn_two_matrices(d, h, E, k, L, S):
    return moe_ffn_counts(d, h, E, k, L, S, gated=False)


def moe_ffn_router_not_active(d, h, E, k, L, S):
    total, active = moe_ffn_counts(d, h, E, k, L, S)
    return total, active - L * d * E


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


CASES = [
    # (check, task, reference, wrong implementations)
    (ch02.check_top_k, "2.1", top_k, [
        lambda s, k: np.argsort(s, axis=1)[:, :k],                    # the k smallest
        lambda s, k: np.argsort(s, axis=1)[:, -k:],                   # the k largest, worst first
        lambda s, k: np.sort(np.argsort(-s, axis=1)[:, :k], axis=1),  # right set, sorted by index
        lambda s, k: np.argsort(-s, axis=1)[:, :2],                   # k fixed to 2
    ]),
    (ch02.check_sparse_gate, "2.2", lambda logits, k: gate(logits, k, renormalize=True), [
        softmax_then_zero,
        divide_logits_by_their_sum,
        softmax_of_all_logits,
        lambda logits, k: gate(logits, 1, renormalize=True),          # k ignored
    ]),
    (ch02.check_switch_gate, "2.3", lambda logits: gate(logits, 1, renormalize=False), [
        lambda logits: gate(logits, 1, renormalize=True),             # renormalised: all ones
        lambda logits: gate(-logits, 1, renormalize=False),           # the worst expert
        lambda logits: gate(logits, 2, renormalize=False),            # top-2
        lambda logits: np.take_along_axis(softmax(logits), top_k(logits, 1), axis=1),  # [N, 1], not [N, E]
    ]),
    (ch02.check_moe_ffn_params, "2.4", ffn_reference, [
        moe_ffn_without_shared,
        moe_ffn_total_with_k,
        moe_ffn_without_router,
        moe_ffn_two_matrices,
        moe_ffn_router_not_active,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests([(c[0], c[1], [c[2]], c[3]) for c in CASES])


def test_hard_coded_answers_fail():
    scores, k = ch02._scores_and_k(np.random.default_rng(7))
    remembered = top_k(scores, k)
    with pytest.raises(CheckFailure, match="task 2.1"):
        ch02.check_top_k(lambda s, k: remembered)
    with pytest.raises(CheckFailure, match="task 2.4"):
        ch02.check_moe_ffn_params(lambda *args: (123456, 7890))


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
