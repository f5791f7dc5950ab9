"""Router losses and routing metrics against hand-computed cases and the papers' formulas."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import Routing, load_balancing_loss, make_plan, router_z_loss
from minimoe.metrics import (
    coefficient_of_variation,
    dead_expert_ids,
    dead_experts,
    expert_load,
    load_entropy,
    max_violation,
    mutual_information,
    routing_stats,
    specialization,
)

# ---- load_balancing_loss: E * sum_i f_i * P_i --------------------------------------------------

def test_load_balancing_loss_hand_computed():
    # T=2, E=2, k=1: token 0 -> expert 0, token 1 -> expert 0. f = (1, 0), P = (0.7, 0.3)
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    expert_idx = torch.tensor([[0], [0]])
    assert load_balancing_loss(probs, expert_idx).item() == pytest.approx(2 * (1.0 * 0.7 + 0.0 * 0.3))


def test_load_balancing_loss_k2_hand_computed():
    # T=2, E=3, k=2: assignments 0,1 | 1,2 -> f = (1/4, 2/4, 1/4); P = mean rows = (0.3, 0.45, 0.25)
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.5, 0.4]])
    expert_idx = torch.tensor([[0, 1], [1, 2]])
    expected = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    assert load_balancing_loss(probs, expert_idx).item() == pytest.approx(expected)


@settings(max_examples=40)
@given(T=st.integers(1, 30), E=st.integers(1, 10), data=st.data())
def test_load_balancing_loss_is_one_for_a_uniform_router_at_any_k(T, E, data):
    k = data.draw(st.integers(1, E))
    seed = data.draw(st.integers(0, 2**16))
    expert_idx = torch.rand(T, E, generator=torch.Generator().manual_seed(seed)).topk(k, dim=-1).indices
    probs = torch.full((T, E), 1.0 / E)
    assert load_balancing_loss(probs, expert_idx).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_normalises_sigmoid_scores():
    # sigmoid scores 0.5 everywhere are a uniform router once rows are normalised (DeepSeek-V3)
    probs = torch.full((6, 4), 0.5)
    expert_idx = torch.tensor([[0], [0], [0], [1], [2], [3]])
    assert load_balancing_loss(probs, expert_idx).item() == pytest.approx(1.0)


def test_load_balancing_loss_gradient_flows_through_probs_only():
    logits = torch.randn(8, 4, requires_grad=True)
    probs = logits.softmax(-1)
    expert_idx = probs.topk(2, dim=-1).indices
    load_balancing_loss(probs, expert_idx).backward()
    # d/dP_i of E * sum f_i P_i is E * f_i: the gradient pushes down the overloaded experts
    f = torch.bincount(expert_idx.reshape(-1), minlength=4).float() / 16
    P = probs.mean(0)
    grad_P = torch.autograd.functional.vjp(lambda z: z.softmax(-1).mean(0), logits.detach(), 4 * f)[1]
    torch.testing.assert_close(logits.grad, grad_P)
    assert P.sum().item() == pytest.approx(1.0)


def test_load_balancing_loss_mask_counts_only_filled_slots():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    expert_idx = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[True, False], [True, False]])
    # f = (1/2, 1/2) from the two filled slots; P = (1/2, 1/2) -> 2 * 0.5 = 1
    assert load_balancing_loss(probs, expert_idx, mask).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    only_first = torch.tensor([[True, False], [False, True]])  # both filled slots go to expert 0
    assert load_balancing_loss(skewed, expert_idx, only_first).item() == pytest.approx(2 * 0.9)


@pytest.mark.parametrize("probs, expert_idx, match", [
    (torch.ones(4), torch.zeros(4, 1, dtype=torch.long), "probs"),
    (torch.ones(4, 2), torch.zeros(4, 1), "expert_idx"),             # float ids
    (torch.ones(4, 2), torch.full((4, 1), 2), "expert_idx"),          # id out of range
    (torch.ones(4, 2), torch.zeros(3, 1, dtype=torch.long), "expert_idx"),  # wrong T
])
def test_load_balancing_loss_rejects_bad_input(probs, expert_idx, match):
    with pytest.raises((ValueError, TypeError), match=match):
        load_balancing_loss(probs, expert_idx)


# ---- router_z_loss: mean_t logsumexp(logits_t)^2 ----------------------------------------------

def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_router_z_loss_is_computed_in_float32_for_half_logits():
    logits = torch.full((4, 8), 60.0, dtype=torch.float16)  # logsumexp^2 ~ 3866 is fine in fp32
    expected = (60.0 + math.log(8.0)) ** 2
    assert router_z_loss(logits).dtype == torch.float32
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_router_z_loss_rejects_1d_logits():
    with pytest.raises(ValueError, match="logits"):
        router_z_loss(torch.zeros(5))


# ---- metrics ------------------------------------------------------------------------------------

def test_expert_load_counts_assignments():
    expert_idx = torch.tensor([[0, 2], [2, 1], [2, 0]])
    assert expert_load(expert_idx, 4).tolist() == [2, 1, 3, 0]
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    assert expert_load(expert_idx, 4, mask).tolist() == [1, 1, 1, 0]


@given(T=st.integers(1, 40), E=st.integers(1, 8), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=30)
def test_expert_load_sums_to_T_times_k(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    expert_idx = torch.rand(T, E, generator=torch.Generator().manual_seed(seed)).topk(k, -1).indices
    assert int(expert_load(expert_idx, E).sum()) == T * k


def test_load_entropy_hand_computed():
    assert load_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert load_entropy([9, 0, 0]) == pytest.approx(0.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 bits, divided by log2(3)
    assert load_entropy([2, 1, 1]) == pytest.approx(1.5 / math.log2(3))


def test_dead_experts_counts_and_dead_expert_ids_lists_the_empty_ones():
    load = torch.tensor([3, 0, 1, 0])
    assert dead_experts(load) == 2 and dead_expert_ids(load).tolist() == [1, 3]
    assert dead_experts(torch.tensor([1, 1])) == 0 and dead_expert_ids(torch.tensor([1, 1])).tolist() == []


def _routing(logits, expert_idx, mask=None) -> Routing:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    weights = torch.full(expert_idx.shape, 0.5)
    return Routing(logits, logits.softmax(-1), expert_idx, weights, mask)


def test_routing_stats_hand_computed():
    # T=3, E=4, k=2: assignments 0,1 | 0,2 | 0,1 -> load (3, 2, 1, 0); capacity 2 drops expert 0's third
    expert_idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    routing = _routing([[3.0, 1, 0, -1], [2, 0, 1, 0], [4, 2, 0, 0]], expert_idx)
    stats = routing_stats(routing, make_plan(expert_idx, 4, capacity=2))
    assert stats.tokens == 3 and stats.load.tolist() == [3, 2, 1, 0]
    assert stats.load_share.tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0])
    assert (stats.dropped, stats.dropped_fraction) == (1, pytest.approx(1 / 6))
    entropy = (0.5 * math.log(2) + math.log(3) / 3 + math.log(6) / 6) / math.log(4)  # H(1/2, 1/3, 1/6) / log 4
    assert stats.load_entropy == pytest.approx(entropy)
    assert stats.dead_experts == 1
    assert stats.max_violation == pytest.approx((3 - 1.5) / 1.5)
    assert stats.cv == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4) / 1.5)
    assert stats.logit_max == 4.0
    assert stats.logit_rms == pytest.approx(math.sqrt((9 + 1 + 1 + 4 + 1 + 16 + 4) / 12))
    assert routing_stats(routing).dropped == 0  # no plan: nothing dropped


def test_routing_stats_count_only_the_used_slots_of_a_mask():
    expert_idx = torch.tensor([[1, 0], [1, 1]])
    mask = torch.tensor([[True, False], [True, False]])  # expert choice: token 0 and 1 got expert 1 only
    stats = routing_stats(_routing([[0.0, 1.0], [0.0, 2.0]], expert_idx, mask))
    assert stats.load.tolist() == [0, 2] and stats.dead_experts == 1 and stats.load_entropy == 0.0


def test_routing_stats_of_no_tokens_is_even_and_drops_nothing():
    stats = routing_stats(_routing(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)))
    assert stats.tokens == 0 and stats.load.tolist() == [0] * 4 and stats.load_share.tolist() == [0.25] * 4
    assert (stats.dropped, stats.dropped_fraction, stats.load_entropy, stats.dead_experts) == (0, 0.0, 1.0, 0)
    assert math.isnan(stats.logit_max) and math.isnan(stats.logit_rms)
    with pytest.raises(TypeError, match="routing must be a minimoe.routing.Routing"):
        routing_stats(torch.zeros(3, 4))


def test_max_violation_and_cv_hand_computed():
    load = torch.tensor([4.0, 2.0, 2.0, 0.0])  # mean 2
    assert max_violation(load) == pytest.approx(1.0)
    assert coefficient_of_variation(load) == pytest.approx(math.sqrt((4 + 0 + 0 + 4) / 4) / 2)
    assert max_violation([3, 3, 3]) == 0.0 and coefficient_of_variation([3, 3, 3]) == 0.0


def test_specialization_counts_class_expert_pairs():
    labels = torch.tensor([0, 0, 1])
    expert_idx = torch.tensor([[1, 2], [1, 0], [2, 2]])
    assert specialization(labels, expert_idx, 2, 3).tolist() == [[1, 2, 1], [0, 0, 2]]


def test_mutual_information_hand_computed():
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)  # 1 bit
    assert mutual_information(torch.tensor([[2, 2], [3, 3]])) == pytest.approx(0.0, abs=1e-12)
    # joint (1/2, 1/4 | 0, 1/4): I = sum p log2(p / (p_c p_e))
    joint = {(0, 0): 0.5, (0, 1): 0.25, (1, 1): 0.25}
    pc, pe = {0: 0.75, 1: 0.25}, {0: 0.5, 1: 0.5}
    expected = sum(p * math.log2(p / (pc[c] * pe[e])) for (c, e), p in joint.items())
    assert mutual_information(torch.tensor([[2, 1], [0, 1]])) == pytest.approx(expected)


@pytest.mark.parametrize("fn, arg, match", [
    (load_entropy, [0, 0], "load"),
    (load_entropy, [1, -1], "load"),
    (max_violation, torch.ones(2, 2), "load"),
    (mutual_information, torch.zeros(2, 2), "counts"),
])
def test_metrics_reject_bad_input(fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(arg)


def test_specialization_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        specialization(torch.tensor([0, 1]), torch.zeros(3, 1, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="labels"):
        specialization(torch.tensor([0, 5, 1]), torch.zeros(3, 1, dtype=torch.long), 2, 2)
