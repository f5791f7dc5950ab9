"""GShard's top-2 gating (Lepikhin et al. 2020, Algorithm 1) in GShardRouter and gshard_aux_loss,
against the algorithm written out one token at a time, with seeded draws, hand-computed losses,
and the keep rate of the second expert measured against its probability 2 g2 / (g1 + g2)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.dispatch import expert_capacity
from minimoe.experiments import ZOO, compare_routers
from minimoe.layer import MoELayer
from minimoe.losses import gshard_aux_loss
from minimoe.reference import moe_loop
from minimoe.routing import ROUTERS, GShardRouter, TopKRouter, make_router

D, E = 6, 5


def algorithm_1(logits: list, rnd: list, capacity: int):
    """GShard's Algorithm 1 on one group of S tokens, in Python floats: the combine weights
    G [S][E] and l_aux. rnd[s] is token s's uniform draw. As in GShard's lingvo code, a second
    expert dropped at random takes no seat in its expert's buffer."""
    S, num_experts = len(logits), len(logits[0])
    gates = []
    for row in logits:
        z = sum(math.exp(v) for v in row)
        gates.append([math.exp(v) / z for v in row])
    mean_gate = [sum(g[e] for g in gates) / S for e in range(num_experts)]
    top2 = [sorted(range(num_experts), key=lambda e: -g[e])[:2] for g in gates]
    G = [[0.0] * num_experts for _ in range(S)]
    count = [0] * num_experts  # first the first choices, then the second choices that are kept
    for s, (e1, e2) in enumerate(top2):
        c = count[e1]
        if c < capacity:
            G[s][e1] = gates[s][e1] / (gates[s][e1] + gates[s][e2])
        count[e1] = c + 1
    l_aux = sum(count[e] / S * mean_gate[e] for e in range(num_experts)) / num_experts
    for s, (e1, e2) in enumerate(top2):
        g2 = gates[s][e2] / (gates[s][e1] + gates[s][e2])
        if 2 * g2 > rnd[s]:
            c = count[e2]
            if c < capacity:
                G[s][e2] = g2
            count[e2] = c + 1
    return G, l_aux


def swiglu_expert_outputs(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """[T, E, d]: every expert's output for every token, written out again."""
    ex = layer.experts
    hidden = F.silu(torch.einsum("td,edh->teh", x, ex.w_gate)) * torch.einsum("td,edh->teh", x, ex.w_up)
    return torch.einsum("teh,ehd->ted", hidden, ex.w_down)


def gshard_layer(seed: int, capacity_factor=None) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, 4, E, router=GShardRouter(D, E), capacity_factor=capacity_factor).double()
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 1.0)
    return layer


@pytest.mark.parametrize("capacity_factor", [None, 0.6, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_in_training_computes_algorithm_1(seed, capacity_factor):
    layer = gshard_layer(seed, capacity_factor).train()
    T = 40
    x = torch.randn(T, D, dtype=torch.float64)
    torch.manual_seed(100 + seed)
    out = layer(x)
    torch.manual_seed(100 + seed)
    rnd = torch.rand(T, dtype=torch.float64).tolist()  # the router's one draw
    capacity = T if capacity_factor is None else expert_capacity(T, E, 2, capacity_factor)
    logits = (x @ layer.router.proj.weight.t()).tolist()
    G, l_aux = algorithm_1(logits, rnd, capacity)
    G = torch.tensor(G, dtype=torch.float64)
    expected = torch.einsum("te,ted->td", G, swiglu_expert_outputs(layer, x))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    routing = layer.last_routing
    dropped = int((~routing.mask[:, 1]).sum())
    assert 0 < dropped < T  # the random drop happened, and not to everyone
    torch.testing.assert_close(gshard_aux_loss(routing.probs, routing.expert_idx),
                               torch.tensor(l_aux, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.manual_seed(100 + seed)
    torch.testing.assert_close(moe_loop(layer, x), out, atol=1e-12, rtol=0)


def test_eval_mode_keeps_both_experts_deterministically():
    layer = gshard_layer(3, capacity_factor=1.0).eval()
    x = torch.randn(30, D, dtype=torch.float64)
    routing = layer.router(x)
    assert routing.mask is None
    top2 = TopKRouter(D, E, 2).double()
    top2.load_state_dict(layer.router.state_dict())
    reference = top2(x)
    assert torch.equal(routing.expert_idx, reference.expert_idx)
    torch.testing.assert_close(routing.weights, reference.weights, atol=1e-15, rtol=0)
    torch.testing.assert_close(layer(x), moe_loop(layer, x), atol=1e-12, rtol=0)
    G, _ = algorithm_1((x @ layer.router.proj.weight.t()).tolist(), [0.0] * 30, expert_capacity(30, E, 2, 1.0))
    expected = torch.einsum("te,ted->td", torch.tensor(G, dtype=torch.float64), swiglu_expert_outputs(layer, x))
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)  # rnd = 0: every second expert kept


@settings(max_examples=40)
@given(st.integers(2, 9), st.integers(1, 30), st.integers(0, 2**16), st.floats(0.1, 5.0))
def test_first_expert_always_kept_second_kept_iff_its_draw_allows(num_experts, T, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    router = GShardRouter(4, num_experts).train()
    with torch.no_grad():
        router.proj.weight.copy_(scale * torch.randn(num_experts, 4, generator=gen))
    x = torch.randn(T, 4, generator=gen)
    torch.manual_seed(seed)
    routing = router(x)
    torch.manual_seed(seed)
    u = torch.rand(T)
    top2 = routing.probs.gather(-1, routing.expert_idx).detach()
    normalised = top2 / top2.sum(-1, keepdim=True)
    assert routing.mask[:, 0].all()
    assert torch.equal(routing.mask[:, 1], 2 * normalised[:, 1] > u)
    torch.testing.assert_close(routing.weights[:, 0].detach(), normalised[:, 0])  # not renormalised after a drop
    torch.testing.assert_close(routing.weights[:, 1].detach(), normalised[:, 1] * routing.mask[:, 1])
    assert torch.equal(routing.expert_idx, routing.logits.topk(2, dim=-1).indices)


def test_per_token_keep_rate_is_two_g2():
    """32 tokens, 4000 training-mode draws: each token's second expert is kept in a share of the
    draws within 4.5 standard errors of 2 g2 / (g1 + g2)."""
    torch.manual_seed(0)
    router = GShardRouter(D, 8).train()
    with torch.no_grad():
        router.proj.weight.mul_(3.0)
    x = torch.randn(32, D)
    draws = 4000
    kept = torch.zeros(32)
    for _ in range(draws):
        kept += router(x).mask[:, 1].float()
    clean = router.eval()(x)
    top2 = clean.probs.gather(-1, clean.expert_idx).detach()
    p = 2 * top2[:, 1] / top2.sum(-1)
    assert p.min() < 0.5 < p.max()  # a spread of probabilities, not all near 1
    stderr = (p * (1 - p) / draws).sqrt()
    assert ((kept / draws - p).abs() <= 4.5 * stderr + 1e-6).all(), (kept / draws, p)


def test_overall_keep_rate_is_the_mean_of_min_one_two_g2():
    torch.manual_seed(1)
    router = GShardRouter(D, 16).train()
    with torch.no_grad():
        router.proj.weight.mul_(3.0)  # decisive gates: g2 often small
    routing = router(torch.randn(50_000, D))
    top2 = routing.probs.gather(-1, routing.expert_idx).detach()
    p = (2 * top2[:, 1] / top2.sum(-1)).clamp(max=1.0)
    rate = routing.mask[:, 1].float().mean()
    stderr = (p * (1 - p)).sum().sqrt() / p.numel()
    assert abs(rate - p.mean()) < 4 * stderr, (rate, p.mean(), stderr)
    assert p.mean() < 0.8  # the drop matters here


def test_aux_loss_hand_computed():
    """S=4, E=2: first choices 0, 0, 1, 0 (c = 3, 1), mean gates (.7+.6+.2+.9)/4 = .6 and .4:
    l_aux = (1/2) (3/4 * .6 + 1/4 * .4) = .275. Uniform gates: 1/E^2; all on one expert: 1/E."""
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], dtype=torch.float64)
    idx = probs.topk(2, dim=-1).indices
    torch.testing.assert_close(gshard_aux_loss(probs, idx), torch.tensor(0.275, dtype=torch.float64))
    torch.testing.assert_close(gshard_aux_loss(probs, idx[:, :1]), torch.tensor(0.275, dtype=torch.float64))
    uniform = torch.full((6, 4), 0.25)
    torch.testing.assert_close(gshard_aux_loss(uniform, torch.randint(0, 4, (6, 2))), torch.tensor(1 / 16))
    one = torch.zeros(6, 4)
    one[:, 2] = 1
    torch.testing.assert_close(gshard_aux_loss(one, torch.full((6, 2), 2)), torch.tensor(0.25))


def test_aux_loss_gradient_flows_through_the_mean_gates_only():
    """d l_aux / d probs[s, e] = c_e / (E S^2): the counts carry no gradient."""
    probs = torch.rand(5, 3, dtype=torch.float64).softmax(-1).requires_grad_(True)
    idx = probs.detach().topk(2, dim=-1).indices
    gshard_aux_loss(probs, idx).backward()
    counts = torch.bincount(idx[:, 0], minlength=3).double()
    torch.testing.assert_close(probs.grad, (counts / (3 * 25)).expand(5, 3))


def test_aux_loss_is_switch_on_first_choices_over_e_squared():
    from minimoe.losses import load_balancing_loss
    probs = torch.rand(50, 8).softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    torch.testing.assert_close(gshard_aux_loss(probs, idx) * 64, load_balancing_loss(probs, idx[:, :1]))


@pytest.mark.parametrize(("args", "error", "message"), [
    ((torch.rand(4, 3), torch.zeros(5, 2, dtype=torch.long)), ValueError,
     r"expert_idx must have shape \(4, k >= 1\) like probs' rows, got \(5, 2\)"),
    ((torch.rand(4, 3), torch.zeros(4, 0, dtype=torch.long)), ValueError, r"got \(4, 0\)"),
    ((torch.rand(4, 3), torch.full((4, 2), 3)), ValueError, r"expert_idx must hold ids in \[0, 3\)"),
    ((torch.rand(4), torch.zeros(4, 2, dtype=torch.long)), ValueError, r"probs must have 2 dimensions"),
])
def test_bad_aux_loss_arguments_raise(args, error, message):
    with pytest.raises(error, match=message):
        gshard_aux_loss(*args)


def test_masked_experts_are_never_chosen():
    torch.manual_seed(0)
    router = GShardRouter(D, 6).train()
    available = torch.tensor([True, False, True, False, True, True])
    routing = router(torch.randn(200, D), available_experts=available)
    assert available[routing.expert_idx].all()
    assert (routing.probs[:, ~available] == 0).all()
    with pytest.raises(ValueError, match=r"at least k=2 of the 6 experts available, got only 1"):
        router(torch.randn(3, D), available_experts=torch.tensor([True] + [False] * 5))


def test_make_router_builds_it_and_the_zoo_default_leaves_it_out():
    assert "gshard" in ROUTERS
    router = make_router("gshard", D, E)
    assert type(router) is GShardRouter and router.k == 2
    with pytest.raises(ValueError, match=r"k must be 2 for the 'gshard' router, got k=1"):
        make_router("gshard", D, E, 1)
    with pytest.raises(ValueError, match=r"routed_scaling_factor must be 1 for the 'gshard' router"):
        make_router("gshard", D, E, routed_scaling_factor=2.0)
    with pytest.raises(ValueError, match=r"k must be <= num_experts=1, got k=2"):
        GShardRouter(D, 1)
    assert inspect.signature(compare_routers).parameters["routers"].default == ZOO and "gshard" not in ZOO
