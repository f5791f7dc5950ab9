"""minimoe.checks.ch05: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import math

import pytest
import torch
from check_contract import contract_tests

from minimoe.checks import CheckFailure, ch05

# ---- correct answers, written as a learner would ----

def switch_aux_loss(probs, expert_idx):
    num_tokens, num_experts = probs.shape
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    f = counts / expert_idx.numel()
    P = (probs / probs.sum(-1, keepdim=True)).mean(0)
    return num_experts * (f * P).sum()


def switch_aux_loss_one_hot(probs, expert_idx):
    """Also correct: f from one-hot masks averaged over tokens and slots."""
    num_experts = probs.shape[1]
    f = torch.nn.functional.one_hot(expert_idx, num_experts).double().mean((0, 1))
    P = (probs / probs.sum(1, keepdim=True)).mean(0)
    return num_experts * torch.dot(f, P)


def z_loss(logits):
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def z_loss_max_trick(logits):
    """Also correct: subtract each row's max before exp."""
    m = logits.max(-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(-1))
    return (lse * lse).mean()


def bias_update(bias, tokens_per_expert, rate):
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.mean() - load)


def bias_update_three_cases(bias, tokens_per_expert, rate):
    """Also correct: shares instead of counts, and the three cases spelled out."""
    share = tokens_per_expert / tokens_per_expert.sum()
    target = 1 / len(share)
    step = torch.where(share < target, rate, torch.where(share > target, -rate, 0.0))
    return bias + step


def load_entropy(tokens_per_expert):
    p = tokens_per_expert.double() / tokens_per_expert.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(tokens_per_expert)))


def load_entropy_bits(tokens_per_expert):
    """Also correct: bits over log2 E (the base cancels), 0 log 0 via torch.special.entr."""
    p = tokens_per_expert / tokens_per_expert.sum()
    return (torch.special.entr(p).sum() / math.log(2)).item() / math.log2(len(p))


# ---- wrong answers ----

def aux_loss_divided_by_tokens(probs, expert_idx):
    """f_i = count / T: sums to k, so the loss is k at uniform routing."""
    num_tokens, num_experts = probs.shape
    f = torch.bincount(expert_idx.reshape(-1), minlength=num_experts) / num_tokens
    return num_experts * (f * (probs / probs.sum(-1, keepdim=True)).mean(0)).sum()


def aux_loss_without_renormalising(probs, expert_idx):
    num_experts = probs.shape[1]
    f = torch.bincount(expert_idx.reshape(-1), minlength=num_experts) / expert_idx.numel()
    return num_experts * (f * probs.mean(0)).sum()


def aux_loss_soft_f(probs, expert_idx):
    """f from the probabilities instead of the counts: E * sum P_i^2."""
    P = (probs / probs.sum(-1, keepdim=True)).mean(0)
    return probs.shape[1] * (P * P).sum()


def aux_loss_without_E(probs, expert_idx):
    return switch_aux_loss(probs, expert_idx) / probs.shape[1]


def aux_loss_first_slot_only(probs, expert_idx):
    return switch_aux_loss(probs, expert_idx[:, :1])


def aux_loss_detached_row_sums(probs, expert_idx):
    """The right value, but the renormalisation is cut out of the gradient."""
    num_experts = probs.shape[1]
    f = torch.bincount(expert_idx.reshape(-1), minlength=num_experts) / expert_idx.numel()
    P = (probs / probs.sum(-1, keepdim=True).detach()).mean(0)
    return num_experts * (f * P).sum()


def aux_loss_as_float(probs, expert_idx):
    return switch_aux_loss(probs, expert_idx).item()


def z_loss_naive(logits):
    return torch.log(torch.exp(logits).sum(-1)).pow(2).mean()


def z_loss_not_squared(logits):
    return torch.logsumexp(logits, -1).mean()


def z_loss_square_of_mean(logits):
    return torch.logsumexp(logits, -1).mean() ** 2


def z_loss_summed_over_tokens(logits):
    return torch.logsumexp(logits, -1).pow(2).sum()


def z_loss_over_experts(logits):
    """logsumexp over the tokens (dim 0) instead of the experts."""
    return torch.logsumexp(logits, 0).pow(2).mean()


def z_loss_of_max_logit(logits):
    return logits.max(-1).values.pow(2).mean()


def bias_update_flipped_sign(bias, tokens_per_expert, rate):
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load - load.mean())


def bias_update_ties_raised(bias, tokens_per_expert, rate):
    """An expert exactly at the mean load still gets +rate."""
    load = tokens_per_expert.float()
    return bias + torch.where(load <= load.mean(), rate, -rate)


def bias_update_proportional(bias, tokens_per_expert, rate):
    share = tokens_per_expert / tokens_per_expert.sum()
    return bias + rate * (1 / len(share) - share)


def bias_update_delta_only(bias, tokens_per_expert, rate):
    load = tokens_per_expert.float()
    return rate * torch.sign(load.mean() - load)


def bias_update_against_median(bias, tokens_per_expert, rate):
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.median() - load)


def entropy_in_nats(tokens_per_expert):
    p = tokens_per_expert.double() / tokens_per_expert.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def entropy_with_nan(tokens_per_expert):
    """0 * log 0 = nan when the experts with no load are kept in the sum."""
    p = tokens_per_expert.double() / tokens_per_expert.sum()
    return float(-(p * p.log()).sum() / math.log(len(p)))


def entropy_over_live_experts(tokens_per_expert):
    p = tokens_per_expert.double() / tokens_per_expert.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(p)))


def entropy_of_counts(tokens_per_expert):
    """Counts used as if they were probabilities."""
    c = tokens_per_expert.double()
    c = c[c > 0]
    return float(-(c * c.log()).sum() / math.log(len(tokens_per_expert)))


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch05.check_switch_aux_loss, "5.1", [switch_aux_loss, switch_aux_loss_one_hot], [
        aux_loss_divided_by_tokens, aux_loss_without_renormalising, aux_loss_soft_f, aux_loss_without_E,
        aux_loss_first_slot_only, aux_loss_detached_row_sums, aux_loss_as_float,
    ]),
    (ch05.check_router_z_loss, "5.2", [z_loss, z_loss_max_trick], [
        z_loss_naive, z_loss_not_squared, z_loss_square_of_mean, z_loss_summed_over_tokens,
        z_loss_over_experts, z_loss_of_max_logit,
    ]),
    (ch05.check_bias_update, "5.3", [bias_update, bias_update_three_cases], [
        bias_update_flipped_sign, bias_update_ties_raised, bias_update_proportional, bias_update_delta_only,
        bias_update_against_median,
    ]),
    (ch05.check_load_entropy, "5.4", [load_entropy, load_entropy_bits], [
        entropy_in_nats, entropy_with_nan, entropy_over_live_experts, entropy_of_counts,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def recorded_inputs(check, answer):
    """The arguments `check` passes to a learner's function, one tuple per case."""
    seen = []

    def record(*args):
        seen.append(args)
        return answer(*args)

    check(record)
    assert len(seen) == 3
    return seen


def test_aux_loss_inputs_cover_k_above_one_sigmoid_rows_and_unused_experts():
    cases = recorded_inputs(ch05.check_switch_aux_loss, switch_aux_loss)
    assert any(idx.shape[1] > 1 for _, idx in cases)
    row_sums_one = [torch.allclose(p.sum(-1), torch.ones(len(p), dtype=p.dtype)) for p, _ in cases]
    assert any(row_sums_one) and not all(row_sums_one)
    for probs, idx in cases:
        assert idx.shape[1] < probs.shape[1]
        assert int(torch.bincount(idx.reshape(-1), minlength=probs.shape[1])[-1]) == 0


def test_aux_loss_is_one_for_uniform_probabilities_at_any_k():
    torch.manual_seed(0)
    uniform = torch.full((50, 8), 1 / 8, dtype=torch.float64)
    for k in (1, 2, 4):
        idx = torch.rand(50, 8).argsort(-1)[:, :k]
        assert switch_aux_loss(uniform, idx).item() == pytest.approx(1.0)
        assert aux_loss_divided_by_tokens(uniform, idx).item() == pytest.approx(k)


def test_z_loss_inputs_overflow_the_naive_formula_in_every_case():
    for (logits,) in recorded_inputs(ch05.check_router_z_loss, z_loss):
        assert logits.dtype == torch.float32
        assert not torch.isfinite(z_loss_naive(logits))
        assert torch.isfinite(z_loss(logits))


def test_bias_update_inputs_have_loads_at_the_mean_and_dead_experts():
    dead = []
    for _, load, _ in recorded_inputs(ch05.check_bias_update, bias_update):
        assert load.dtype == torch.int64 and int(load.sum()) % len(load) == 0
        assert (load == load.sum() // len(load)).any()
        dead.append(bool((load == 0).any()))
    assert any(dead)


def test_load_entropy_inputs_have_dead_experts():
    for (load,) in recorded_inputs(ch05.check_load_entropy, load_entropy):
        assert (load == 0).any() and load.sum() > 0


def test_hard_coded_answer_fails():
    remembered = torch.tensor(0.5)
    with pytest.raises(CheckFailure, match="task 5.4"):
        ch05.check_load_entropy(lambda tokens_per_expert: remembered)
