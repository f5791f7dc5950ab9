"""minimoe.checks.ch05: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import heapq

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_contract import contract_tests

from minimoe.checks import case_rng, ch05, collapse

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


# ---- task 5.3: curing the collapse ----

def cure_with_switch_loss(router_logits, expert):
    """The learner's own Switch loss of task 5.1, at a coefficient of 0.2."""
    return 0.2 * switch_aux_loss(router_logits.softmax(-1), expert[:, None])


def cure_with_one_hot_switch_loss(router_logits, expert):
    """Also correct: task 5.1's one-hot form at a coefficient of 0.3."""
    return 0.3 * switch_aux_loss_one_hot(router_logits.double().softmax(-1), expert[:, None])


def balance_the_counts(router_logits, expert):
    """The counts are balanced, but they carry no gradient: the router never hears of it."""
    share = torch.bincount(expert, minlength=router_logits.shape[1]).double() / len(expert)
    return 10 * router_logits.shape[1] * (share * share).sum()


def router_logits_to_zero(router_logits, expert):
    """A uniform router: the chosen weight shrinks to 1/E, and the choice stays biased."""
    return 10 * router_logits.pow(2).mean()


def random_expert_targets(router_logits, expert):
    """Balanced by decree: each token is told to go to expert (position mod E)."""
    return F.cross_entropy(router_logits, torch.arange(len(router_logits)) % router_logits.shape[1])


def per_token_entropy(router_logits, expert):
    """Maximises each token's routing entropy instead of balancing the load across tokens."""
    return (router_logits.softmax(-1) * router_logits.log_softmax(-1)).sum(-1).mean()


# ---- task 5.4: the frequency-balanced hash table ----

def greedy(counts, num_experts, order):
    """Give the ids, in `order`, each to the expert with the fewest tokens so far."""
    table = torch.zeros(len(counts), dtype=torch.int64)
    load = [0] * num_experts
    for v in order:
        e = min(range(num_experts), key=load.__getitem__)
        table[v] = e
        load[e] += int(counts[v])
    return table


def largest_first_greedy(counts, num_experts):
    return greedy(counts, num_experts, counts.argsort(descending=True, stable=True).tolist())


def largest_first_heap(counts, num_experts):
    """Also correct: the same rule with a heap of (load, expert)."""
    heap = [(0, e) for e in range(num_experts)]
    table = torch.zeros(len(counts), dtype=torch.int64)
    for v in sorted(range(len(counts)), key=lambda v: -int(counts[v])):
        load, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (load + int(counts[v]), e))
    return table


def round_robin_by_frequency(counts, num_experts):
    table = torch.empty(len(counts), dtype=torch.int64)
    table[counts.argsort(descending=True)] = torch.arange(len(counts)) % num_experts
    return table


def equal_ids_per_expert(counts, num_experts):
    """The same number of ids per expert, in order of frequency: the head lands on expert 0."""
    table = torch.empty(len(counts), dtype=torch.int64)
    table[counts.argsort(descending=True)] = torch.arange(len(counts)) * num_experts // len(counts)
    return table


def max_load(table, counts, num_experts):
    return int(torch.zeros(num_experts, dtype=torch.int64).index_add_(0, table.long(), counts).max())


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
    (ch05.check_cured_collapse, "5.3", [cure_with_switch_loss, cure_with_one_hot_switch_loss], [
        lambda router_logits, expert: 0.0 * router_logits.sum(),                 # nothing: the collapse
        lambda logits, expert: switch_aux_loss(logits.softmax(-1), expert[:, None]) / 100,    # too weak
        lambda logits, expert: 10 * switch_aux_loss(logits.softmax(-1), expert[:, None]),     # costs accuracy
        balance_the_counts,
        router_logits_to_zero,
        random_expert_targets,
        per_token_entropy,
    ]),
    (ch05.check_balanced_hash_table, "5.4", [largest_first_greedy, largest_first_heap], [
        lambda counts, E: torch.arange(len(counts)) % E,                          # Hash Layers' plain hash
        lambda counts, E: torch.randint(E, counts.shape, generator=torch.Generator().manual_seed(0)),
        lambda counts, E: greedy(counts, E, range(len(counts))),                  # greedy in id order
        lambda counts, E: greedy(counts, E, counts.argsort().tolist()),           # smallest first
        round_robin_by_frequency,
        equal_ids_per_expert,
        lambda counts, E: largest_first_greedy(counts, E) + 1,                    # experts 1..E
        lambda counts, E: largest_first_greedy(counts, E).double(),               # not ints
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


def testcollapse_inputscollapse_without_a_cure():
    """Cross-entropy alone leaves every check seed far below the entropy bound."""
    for case in range(3):
        (seed,) = ch05.collapse_inputs(case_rng(case))
        assert collapse.collapsed(seed)["load entropy"] < 0.75


def testcollapse_setup_is_the_lesson_s():
    """The lesson's seed-2 run: its step-0 load, printed in course/05 section 1."""
    task = collapse.make_task()
    params = collapse.init_params(2, task)
    _, _, expert = collapse.forward(params, task.sample(256, seed=0)["x"])
    assert torch.bincount(expert, minlength=8).tolist() == [19, 79, 35, 29, 64, 3, 5, 22]


def test_hash_bound_is_reached_by_largest_first_and_missed_by_the_plain_hash():
    for case in range(3):
        counts, num_experts = ch05.hash_inputs(case_rng(case))
        bound = ch05._max_load_bound(counts, num_experts)
        assert counts.sum() > 10**5 and len(counts) >= 200
        assert max_load(largest_first_greedy(counts, num_experts), counts, num_experts) <= 1.002 * bound
        assert max_load(torch.arange(len(counts)) % num_experts, counts, num_experts) > 1.1 * bound


def test_hash_bound_is_a_lower_bound():
    """No assignment beats it: brute force on tiny cases."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        counts = torch.from_numpy(rng.integers(1, 50, int(rng.integers(2, 8))))
        num_experts = int(rng.integers(2, 4))
        best = min(max_load(torch.tensor(t), counts, num_experts)
                   for t in np.ndindex(*(num_experts,) * len(counts)))
        assert best >= ch05._max_load_bound(counts, num_experts)
