"""minimoe.checks.ch04: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub; the references
agree with the papers' formulas written out independently."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_contract import contract_tests

from minimoe.checks import CheckFailure, ch04
from minimoe.routing import ExpertChoiceRouter, NoisyTopKRouter

# ---- correct answers, written as a learner would ----

def noisy_top_k_gate(logits, noise_logits, standard_normal, k, noise_std=F.softplus, select_clean=False,
                     weights_from="noisy", renormalize=True):
    noisy = logits + standard_normal * noise_std(noise_logits)
    top = (logits if select_clean else noisy).topk(k, dim=-1)
    source = {"noisy": noisy, "clean": logits}[weights_from]
    if renormalize:
        weights = source.gather(-1, top.indices).softmax(-1)
    else:
        weights = source.softmax(-1).gather(-1, top.indices)
    return torch.zeros_like(logits).scatter(1, top.indices, weights)


def noisy_top_k_gate_masked(logits, noise_logits, standard_normal, k):
    """Also correct: the paper's KeepTopK sets the others to -inf, then one softmax over all E."""
    h = logits + standard_normal * torch.log1p(torch.exp(noise_logits))
    kth = h.topk(k, dim=-1).values[:, -1:]
    return torch.where(h >= kth, h, float("-inf")).softmax(-1)


def expert_choice(logits, capacity, score_dim=-1, descending=True, by="probs"):
    probs = logits.softmax(score_dim)
    ranking = {"probs": probs, "logits": logits}[by]
    token_idx = ranking.topk(capacity, dim=0, largest=descending).indices.T  # [E, C]
    return token_idx, probs.T.gather(1, token_idx)


def expert_choice_sorted(logits, capacity):
    """Also correct: sort each expert's column and keep the first C."""
    probs = logits.softmax(dim=1)
    order = torch.argsort(probs, dim=0, descending=True)[:capacity]  # [C, E]
    return order.T.contiguous(), torch.take_along_dim(probs, order, dim=0).T


def sigmoid_bias_route(logits, bias, k):
    scores = torch.sigmoid(logits)
    expert_idx = (scores + bias).topk(k, dim=-1).indices
    chosen = scores.gather(-1, expert_idx)
    return expert_idx, chosen / chosen.sum(-1, keepdim=True)


def sigmoid_bias_route_numpy(logits, bias, k):
    """Also correct, in NumPy: a stable descending argsort of the biased scores."""
    scores = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    idx = np.argsort(-(scores + bias.numpy()), axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(scores, idx, axis=1)
    return idx, chosen / chosen.sum(1, keepdims=True)


def update_bias(bias, tokens_per_expert, rate):
    load = tokens_per_expert.float()
    return bias + rate * torch.sign(load.mean() - load)


def update_bias_loop(bias, tokens_per_expert, rate):
    """Also correct: one expert at a time, in plain Python numbers."""
    loads = tokens_per_expert.tolist()
    mean = sum(loads) / len(loads)
    return torch.tensor([b + (rate if n < mean else -rate if n > mean else 0.0)
                         for b, n in zip(bias.tolist(), loads, strict=True)])


# ---- wrong answers ----

def expert_choice_weights_softmax_over_chosen(logits, capacity):
    """Right tokens, but each expert's weights renormalised over its C tokens."""
    token_idx, weights = expert_choice(logits, capacity)
    return token_idx, weights / weights.sum(1, keepdim=True)


def sigmoid_bias_route_wrong(logits, bias, k, select="sigmoid+bias", weights="sigmoid", renormalize=True):
    scores = torch.sigmoid(logits)
    selection = {"sigmoid+bias": scores + bias, "sigmoid": scores,
                 "sigmoid(logits+bias)": torch.sigmoid(logits + bias)}[select]
    expert_idx = selection.topk(k, dim=-1).indices
    source = {"sigmoid": scores, "sigmoid+bias": scores + bias, "softmax": logits.softmax(-1)}[weights]
    chosen = source.gather(-1, expert_idx)
    return expert_idx, chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch04.check_noisy_top_k_gate, "4.1", [noisy_top_k_gate, noisy_top_k_gate_masked], [
        lambda *args: noisy_top_k_gate(*args, noise_std=lambda n: n),           # std without softplus
        lambda *args: noisy_top_k_gate(*args, noise_std=torch.exp),             # exp instead of softplus
        lambda *args: noisy_top_k_gate(*args, select_clean=True),               # noise forgotten in the choice
        lambda *args: noisy_top_k_gate(*args, weights_from="clean"),            # weights from the clean logits
        lambda *args: noisy_top_k_gate(*args, renormalize=False),               # softmax over all E, then cut
        lambda lo, n, s, k: noisy_top_k_gate(lo, n, s, k - 1),                  # off by one in k
    ]),
    (ch04.check_expert_choice, "4.2", [expert_choice, expert_choice_sorted], [
        lambda lo, c: expert_choice(lo, c, score_dim=0),                        # softmax over the tokens
        lambda lo, c: expert_choice(lo, c, by="logits"),                        # ranked by raw logits
        lambda lo, c: expert_choice(lo, c, descending=False),                   # the C worst tokens
        lambda lo, c: tuple(t.T for t in expert_choice(lo, c)),                 # [C, E] instead of [E, C]
        lambda lo, c: (expert_choice(lo, c)[0].sort(1).values, expert_choice(lo, c)[1]),  # tokens by index
        expert_choice_weights_softmax_over_chosen,
    ]),
    (ch04.check_sigmoid_bias_route, "4.3", [sigmoid_bias_route, sigmoid_bias_route_numpy], [
        lambda *args: sigmoid_bias_route_wrong(*args, select="sigmoid"),        # bias ignored
        lambda *args: sigmoid_bias_route_wrong(*args, select="sigmoid(logits+bias)"),  # bias inside sigmoid
        lambda *args: sigmoid_bias_route_wrong(*args, weights="sigmoid+bias"),  # bias leaks into the weights
        lambda *args: sigmoid_bias_route_wrong(*args, renormalize=False),       # raw sigmoid scores
        lambda *args: sigmoid_bias_route_wrong(*args, weights="softmax"),       # softmax weights
    ]),
    (ch04.check_update_bias, "4.4", [update_bias, update_bias_loop], [
        lambda b, n, r: b + r * torch.sign(n.float() - n.float().mean()),       # sign flipped
        lambda b, n, r: r * torch.sign(n.float().mean() - n.float()),           # forgets the old bias
        lambda b, n, r: b + torch.where(n < n.float().mean(), r, -r),           # no zero step at the mean
        lambda b, n, r: b + r * (n.float().mean() - n.float()) / n.float().mean(),  # proportional, not sign
        lambda b, n, r: b + r * torch.sign(n.float().median() - n.float()),     # median instead of mean
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_noisy_reference_is_the_router_drawing_from_its_rng():
    """Without the patched draw: NoisyTopKRouter with its own N(0, 1) sample equals the formula
    fed the same sample (the patch in the check changes nothing but where the sample comes from)."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(6, 5, k=2).train()
    with torch.no_grad():
        router.noise_proj.weight.normal_()
        x = torch.randn(30, 6)
        logits, noise_logits = router.proj(x), router.noise_proj(x)
        torch.manual_seed(1)
        routing = router(x)
        torch.manual_seed(1)
        sample = torch.randn(30, 5)
    dense = torch.zeros(30, 5).scatter(1, routing.expert_idx, routing.weights)
    torch.testing.assert_close(dense, noisy_top_k_gate(logits, noise_logits, sample, 2))


def test_expert_choice_reference_gives_each_expert_capacity_tokens():
    """The check's capacity factor makes ExpertChoiceRouter take exactly C tokens per expert, for
    every (T, E, C) the check can draw."""
    torch.manual_seed(0)
    for num_tokens in range(16, 41):
        for num_experts in range(4, 9):
            for capacity in range(1, round(num_tokens * 1.2 / num_experts) + 1):
                router = ExpertChoiceRouter(num_experts, num_experts, (capacity - 0.5) * num_experts / num_tokens)
                assert int(router(torch.randn(num_tokens, num_experts)).mask.sum()) == capacity * num_experts


def test_inputs_make_every_part_of_the_formula_matter():
    """In every case: the noise changes some choices (4.1); some token gets no expert and some
    several (4.2); the bias changes some choices, and sigmoid(l + b) differs from sigmoid(l) + b
    (4.3); one load sits exactly at the mean, others above and below it (4.4)."""
    for case in range(3):
        seed = 1000 * case + 7
        logits, noise_logits, sample, k = ch04.noisy_inputs(np.random.default_rng(seed))
        assert not torch.equal(noisy_top_k_gate(logits, noise_logits, sample, k) > 0,
                               noisy_top_k_gate(logits, noise_logits, sample, k, select_clean=True) > 0)

        logits, capacity = ch04.expert_choice_inputs(np.random.default_rng(seed))
        token_idx, _ = expert_choice(logits, capacity)
        experts_per_token = torch.bincount(token_idx.reshape(-1), minlength=logits.shape[0])
        assert (experts_per_token == 0).any() and (experts_per_token > 1).any()

        logits, bias, k = ch04.sigmoid_bias_inputs(np.random.default_rng(seed))
        with_bias, _ = sigmoid_bias_route(logits, bias, k)
        without, _ = sigmoid_bias_route(logits, torch.zeros_like(bias), k)
        inside, _ = sigmoid_bias_route_wrong(logits, bias, k, select="sigmoid(logits+bias)")
        assert not torch.equal(with_bias, without) and not torch.equal(with_bias, inside)

        _, loads, _ = ch04.update_bias_inputs(np.random.default_rng(seed))
        signs = set(torch.sign(loads.double().mean() - loads).tolist())
        assert signs == {-1.0, 0.0, 1.0}


def test_hard_coded_answer_fails():
    remembered = sigmoid_bias_route(*ch04.sigmoid_bias_inputs(np.random.default_rng(7)))
    with pytest.raises(CheckFailure, match="task 4.3"):
        ch04.check_sigmoid_bias_route(lambda logits, bias, k: remembered)
