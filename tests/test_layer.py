"""minimoe.layer.MoELayer and the routers: outputs and gradients against the one-token-at-a-time
`minimoe.reference.moe_loop`, float64 gradcheck, router losses and statistics against the
papers' formulas written out here, router behaviour, and input validation."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from minimoe import experts as experts_module
from minimoe.layer import MoELayer
from minimoe.reference import kept_assignments, moe_loop
from minimoe.routing import ExpertChoiceRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

D_MODEL, D_HIDDEN, NUM_EXPERTS = 16, 32, 8
X_SHAPE = (2, 12, D_MODEL)  # 24 tokens


def build_layer(seed: int = 0, **kwargs) -> MoELayer:
    """An MoELayer of the test's shapes, top-2 unless kwargs give a router (which holds k)."""
    torch.manual_seed(seed)
    config = dict(d_model=D_MODEL, d_hidden=D_HIDDEN, num_experts=NUM_EXPERTS)
    config |= {} if "router" in kwargs else {"k": 2}
    return MoELayer(**config | kwargs)


def random_input(shape=X_SHAPE, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def output_and_grads(forward, layer: MoELayer, x: torch.Tensor):
    """forward(x) and the gradients of a fixed random projection of it w.r.t. x and every
    parameter of `layer` (zeros for parameters the computation does not touch)."""
    out = forward(x)
    probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    names = ["x", *(name for name, _ in layer.named_parameters())]
    grads = torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()],
                                allow_unused=True, materialize_grads=True)
    return out, dict(zip(names, grads, strict=True))


def assert_matches_loop(layer: MoELayer, x: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    out, grads = output_and_grads(layer, layer, x)
    ref_out, ref_grads = output_and_grads(lambda inp: moe_loop(layer, inp), layer, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def tokens_of(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# MoELayer == moe_loop, outputs and gradients
# ---------------------------------------------------------------------------------------------

GRID = [
    (k, activation, capacity_factor, drop_policy, shared)
    for k, activation, capacity_factor, drop_policy, shared in itertools.product(
        [1, 2, 4], ["swiglu", "gelu", "relu"], [None, 0.5, 1.25], ["position", "score"], [0, 2])
    if not (capacity_factor is None and drop_policy == "score")  # the policy only matters with a capacity
]


@pytest.mark.parametrize(("k", "activation", "capacity_factor", "drop_policy", "num_shared_experts"), GRID)
def test_layer_matches_loop(k, activation, capacity_factor, drop_policy, num_shared_experts):
    layer = build_layer(k=k, activation=activation, capacity_factor=capacity_factor,
                        drop_policy=drop_policy, num_shared_experts=num_shared_experts)
    names = dict(layer.named_parameters())
    assert {"router.proj.weight", "experts.w_up", "experts.w_down"} <= names.keys()
    assert ("experts.w_gate" in names) == (activation == "swiglu")
    assert ("shared.w_up" in names) == (num_shared_experts > 0)
    assert_matches_loop(layer, random_input())
    if capacity_factor == 0.5:  # half the seats: something must have been dropped
        assert layer.stats.dropped_fraction > 0


def test_shared_gate_scales_the_shared_experts_by_a_sigmoid_per_token():
    """out = routed(x) + sigmoid(x g) * shared(x), Qwen2-MoE's gated shared expert, written out here;
    the loop agrees on outputs and gradients; without a gate the layer is unchanged bit for bit."""
    gated = build_layer(num_shared_experts=2, shared_gate=True)
    plain = build_layer(num_shared_experts=2)
    assert gated.shared_gate.weight.shape == (1, D_MODEL) and plain.shared_gate is None
    assert "shared_gate.weight" not in plain.state_dict()
    plain.load_state_dict({name: t for name, t in gated.state_dict().items() if not name.startswith("shared_gate")})
    with torch.no_grad():
        gated.shared_gate.weight.normal_()
    x = random_input()
    tokens = x.detach().reshape(-1, D_MODEL)
    shared = plain.shared(tokens)
    routed = plain(x).detach().reshape(-1, D_MODEL) - shared
    gate = 1 / (1 + torch.exp(-(tokens @ gated.shared_gate.weight[0])))  # [T]
    expected = routed + gate[:, None] * shared
    torch.testing.assert_close(gated(x).detach().reshape(-1, D_MODEL), expected, atol=1e-6, rtol=0)
    assert (gate - 1).abs().max() > 0.1  # the gate is far from a no-op here
    assert_matches_loop(gated, x)
    default = build_layer(num_shared_experts=2)
    assert torch.equal(default(x), plain(x))


ROUTERS = {
    "switch": (lambda: SwitchRouter(D_MODEL, NUM_EXPERTS), 1),
    "noisy_top2": (lambda: NoisyTopKRouter(D_MODEL, NUM_EXPERTS, 2), 2),
    "sigmoid_unnormalized": (
        lambda: TopKRouter(D_MODEL, NUM_EXPERTS, 2, score="sigmoid", normalize=False), 2),
}


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("router_name", ROUTERS)
def test_layer_with_router_matches_loop(router_name, capacity_factor):
    make_router, k = ROUTERS[router_name]
    torch.manual_seed(3)
    router = make_router()
    if isinstance(router, NoisyTopKRouter):
        nn.init.normal_(router.noise_proj.weight)  # eval mode must ignore it even when it is not 0
    layer = build_layer(k=k, router=router, capacity_factor=capacity_factor, drop_policy="score").eval()
    assert_matches_loop(layer, random_input())


def test_layer_with_expert_choice_router_matches_loop():
    torch.manual_seed(3)
    layer = build_layer(router=ExpertChoiceRouter(D_MODEL, NUM_EXPERTS, capacity_factor=1.5))
    assert_matches_loop(layer, random_input())


def _count_grouped_mm_calls(monkeypatch) -> list:
    """Wrap torch.nn.functional.grouped_mm; the returned list grows by one entry per call."""
    calls = []
    original = F.grouped_mm

    def spy(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


@pytest.mark.parametrize(("d_model", "d_hidden", "grouped"), [
    (16, 32, True),   # fp32 rows of 64 and 128 bytes: torch.nn.functional.grouped_mm
    (5, 32, False),   # 20-byte rows: one matmul per expert block
    (16, 6, False),
    (32, 16, True),   # experts narrower than d_model
    (24, 6, False),
])
def test_grouped_mm_and_fallback_paths_match_loop(monkeypatch, d_model, d_hidden, grouped):
    calls = _count_grouped_mm_calls(monkeypatch)
    layer = build_layer(d_model=d_model, d_hidden=d_hidden, capacity_factor=1.0)
    assert_matches_loop(layer, random_input((24, d_model)))
    assert bool(calls) == grouped


def _grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for grouped_mm: rows [S, a] @ per-group [a, b] is 2 * S * a * b."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


@pytest.mark.parametrize(("d_model", "k"), [(16, 1), (16, 2), (16, 4), (5, 2)])  # grouped_mm, fallback
def test_experts_compute_k_experts_per_token_not_all_of_them(d_model, k):
    """Sparsity, counted in FLOPs: the router's T x d x E product plus k SwiGLU experts (3 matrices
    of d x h) per token. A layer that runs all E experts on every token and zeroes the unchosen
    ones gives the same outputs as moe_loop, and fails here (E / k times the expert FLOPs)."""
    layer = build_layer(d_model=d_model, k=k)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as counter:
        layer(random_input((24, d_model)))
    assert counter.get_total_flops() == 2 * 24 * d_model * NUM_EXPERTS + 2 * 24 * k * 3 * d_model * D_HIDDEN


# ---------------------------------------------------------------------------------------------
# float64 gradcheck
# ---------------------------------------------------------------------------------------------

def _graph_names(tensor: torch.Tensor) -> set[str]:
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(("activation", "backend", "hand_written"),
                         [("swiglu", "torch", True), ("gelu", "torch", False), ("relu", "torch", False)])
def test_swiglu_experts_take_the_chunked_hand_written_backward(activation, backend, hand_written):
    layer = build_layer(activation=activation, backend=backend)
    out = layer(random_input((24, D_MODEL)))
    assert ("_SwiGLUExpertsBackward" in _graph_names(out)) == hand_written


@pytest.mark.parametrize(("capacity_factor", "d_model", "d_hidden"), [(None, 16, 32), (0.75, 32, 16), (None, 5, 6)])
def test_experts_in_many_row_chunks_match_loop(monkeypatch, capacity_factor, d_model, d_hidden):
    """Chunks of 3 or 4 rows cut through experts' blocks and leave others empty; the outputs
    and gradients are still moe_loop's (grouped_mm and the per-expert fallback)."""
    monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", 100)
    layer = build_layer(d_model=d_model, d_hidden=d_hidden, capacity_factor=capacity_factor)
    assert_matches_loop(layer, random_input((24, d_model)))
    # on a CPU each chunk runs only the experts it has rows of (expert 1 is empty, 3 starts at 10)
    chunked = list(experts_module._chunks(torch.tensor([3, 3, 10, 10]), 10, 32))
    assert [(a, b, e, c.tolist(), o.tolist()) for a, b, e, c, o in chunked] == [
        (0, 3, slice(0, 1), [3], [3]), (3, 6, slice(2, 3), [3], [3]),
        (6, 9, slice(2, 3), [3], [3]), (9, 10, slice(2, 3), [1], [1])]
    chunked = list(experts_module._chunks(torch.tensor([2, 4, 4, 6]), 6, 32))  # blocks of 2, 2, 0, 2 rows
    assert [(e, c.tolist()) for _, _, e, c, _ in chunked] == [(slice(0, 2), [2, 1]), (slice(1, 4), [1, 0, 2])]


@pytest.mark.parametrize(("capacity_factor", "num_shared_experts", "d_model", "d_hidden", "chunk_rows"),
                         [(None, 0, 4, 6, None), (0.75, 1, 4, 6, None), (0.5, 0, 6, 4, None), (None, 0, 4, 6, 2)])
def test_gradcheck_float64(monkeypatch, capacity_factor, num_shared_experts, d_model, d_hidden, chunk_rows):
    """float64 and these widths take the per-expert fallback, through _SwiGLUExperts's
    hand-written backward (in one chunk, or chunk_rows rows at a time); the Jacobian w.r.t. x and
    every parameter (router included) must match finite differences."""
    if chunk_rows is not None:
        monkeypatch.setattr(experts_module, "CHUNK_ELEMENTS", chunk_rows * max(d_model, d_hidden))
    calls = _count_grouped_mm_calls(monkeypatch)
    layer = build_layer(d_model=d_model, d_hidden=d_hidden, num_experts=4, k=2, capacity_factor=capacity_factor,
                        num_shared_experts=num_shared_experts, drop_policy="score").double()
    names, params = zip(*((n, p.detach().clone().requires_grad_()) for n, p in layer.named_parameters()),
                         strict=True)
    x = random_input((6, d_model), dtype=torch.float64)

    def forward(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))
    assert not calls
    if capacity_factor is not None:
        assert layer.stats.dropped_fraction > 0


@pytest.mark.parametrize(("dtype", "router_dtype"), [
    (torch.bfloat16, torch.float32),  # low precision is upcast: softmax in fp32 (Switch, section 2.4)
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),   # and a float64 layer is not silently downcast
])
def test_router_computes_in_at_least_float32(dtype, router_dtype):
    router = TopKRouter(4, 4, 2).to(dtype)
    routing = router(torch.randn(6, 4, dtype=dtype))
    assert routing.logits.dtype == routing.probs.dtype == routing.weights.dtype == router_dtype


# ---------------------------------------------------------------------------------------------
# losses and statistics against the papers' formulas
# ---------------------------------------------------------------------------------------------

def switch_aux_loss(probs: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Switch Transformer eq. 4 for k slots: E * sum_i f_i P_i, f_i = share of the T*k
    assignments routed to i, P_i = mean router probability of i."""
    T, E = probs.shape
    ids = expert_idx.reshape(-1).tolist()
    f = torch.tensor([ids.count(i) / len(ids) for i in range(E)])
    P = probs.sum(0) / T
    return E * (f * P).sum()


def z_loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ST-MoE eq. 5: mean over tokens of (log sum_j exp(x W^T)_j)^2."""
    logits = x @ w.t()
    return (logits.exp().sum(-1).log() ** 2).mean()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_and_z_loss_follow_the_paper_formulas(k):
    layer = build_layer(k=k)
    x = random_input()
    layer(x)
    weight = layer.router.proj.weight
    routing = layer.router(tokens_of(x))
    expected_aux = switch_aux_loss(routing.probs, routing.expert_idx)
    expected_z = z_loss(tokens_of(x), weight)
    torch.testing.assert_close(layer.aux_loss, expected_aux)
    torch.testing.assert_close(layer.z_loss, expected_z)
    for loss, expected in [(layer.aux_loss, expected_aux), (layer.z_loss, expected_z)]:
        torch.testing.assert_close(torch.autograd.grad(loss, weight, retain_graph=True)[0],
                                   torch.autograd.grad(expected, weight, retain_graph=True)[0])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_loss_is_one_for_a_uniform_router(k):
    layer = build_layer(k=k)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
    layer(random_input())
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.25])
@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_stats_count_routed_and_dropped_assignments(capacity_factor, drop_policy):
    layer = build_layer(k=2, capacity_factor=capacity_factor, drop_policy=drop_policy)
    x = random_input()
    layer(x)
    routing = layer.router(tokens_of(x))
    T, k = routing.expert_idx.shape
    capacity = None if capacity_factor is None else math.ceil(k * T * capacity_factor / NUM_EXPERTS)
    kept = kept_assignments(routing, NUM_EXPERTS, capacity, drop_policy)
    stats = layer.stats
    assert int(stats.load.sum()) == T * k
    assert stats.load.tolist() == [routing.expert_idx.reshape(-1).tolist().count(e) for e in range(NUM_EXPERTS)]
    torch.testing.assert_close(stats.load_share, stats.load.double() / (T * k))
    assert stats.dropped == T * k - len(kept)
    assert stats.dropped_fraction == pytest.approx(1 - len(kept) / (T * k))
    assert (stats.dropped_fraction > 0) == (capacity_factor is not None)  # both factors drop here


@pytest.mark.parametrize(("hot_experts", "entropy"), [(NUM_EXPERTS, 1.0), (1, 0.0)])
def test_load_entropy_of_even_and_collapsed_load(hot_experts, entropy):
    """Token i carries a one-hot feature i % E; the router sends it to expert i % hot_experts."""
    layer = build_layer(d_model=NUM_EXPERTS, k=1, router=SwitchRouter(NUM_EXPERTS, NUM_EXPERTS))
    target = torch.arange(NUM_EXPERTS) % hot_experts
    with torch.no_grad():
        layer.router.proj.weight.copy_(10 * F.one_hot(target, NUM_EXPERTS).t())
    layer(torch.eye(NUM_EXPERTS).repeat(3, 1))
    assert layer.stats.load.tolist() == [3 * NUM_EXPERTS // hot_experts] * hot_experts + [0] * (
        NUM_EXPERTS - hot_experts)
    assert layer.stats.load_entropy == pytest.approx(entropy)


# ---------------------------------------------------------------------------------------------
# the layer remembers its routing: last_routing, last_plan, and stats computed from them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("capacity_factor", "drop_policy"), [(None, "position"), (0.5, "position"), (0.75, "score")])
def test_last_routing_and_last_plan_are_the_decision_of_the_call(capacity_factor, drop_policy):
    layer = build_layer(k=2, capacity_factor=capacity_factor, drop_policy=drop_policy).eval()
    x = random_input()
    assert layer.last_routing is None and layer.last_plan is None and layer.stats is None
    layer(x)
    routing, plan = layer.last_routing, layer.last_plan
    fresh = layer.router(tokens_of(x))  # eval mode: the same decision again
    for got, want in zip(_routing_fields(routing), _routing_fields(fresh), strict=True):
        assert torch.equal(got, want.detach())
    assert not (routing.logits.requires_grad or routing.probs.requires_grad or routing.weights.requires_grad)
    T, k = routing.expert_idx.shape
    capacity = None if capacity_factor is None else math.ceil(k * T * capacity_factor / NUM_EXPERTS)
    kept = kept_assignments(routing, NUM_EXPERTS, capacity, drop_policy)  # the per-assignment reference
    assert {tuple(tj) for tj in plan.kept.nonzero().tolist()} == kept
    kept_experts = [int(routing.expert_idx[t, j]) for t, j in kept]
    assert plan.tokens_per_expert.tolist() == [kept_experts.count(e) for e in range(NUM_EXPERTS)]
    assert layer.stats.load.tolist() == [routing.expert_idx.reshape(-1).tolist().count(e) for e in range(NUM_EXPERTS)]
    assert layer.stats.dropped == T * k - len(kept)


def test_the_next_call_replaces_the_routing_and_its_stats():
    layer = build_layer(router=ExpertChoiceRouter(D_MODEL, NUM_EXPERTS, capacity_factor=1.0))
    layer(random_input((16, D_MODEL)))
    first = layer.stats
    assert first.tokens == 16 and layer.last_routing.mask is not None
    layer(random_input((40, D_MODEL), seed=3))
    assert layer.stats is not first and layer.stats.tokens == 40 and layer.last_plan.kept.shape[0] == 40
    assert layer.stats.load.tolist() == [5] * NUM_EXPERTS  # expert choice: ceil(40 / 8) tokens each


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_tokens", "capacity_factor"), [(24, 1.0), (24, 0.5), (10, 2.0), (6, 16.0)])
def test_expert_choice_gives_each_expert_its_top_capacity_tokens(num_tokens, capacity_factor):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(D_MODEL, NUM_EXPERTS, capacity_factor=capacity_factor)
    routing = router(random_input((num_tokens, D_MODEL)))
    capacity = min(num_tokens, math.ceil(num_tokens * capacity_factor / NUM_EXPERTS))
    for e in range(NUM_EXPERTS):
        picked = {t for t, j in routing.mask.nonzero().tolist() if routing.expert_idx[t, j] == e}
        top = routing.probs[:, e].detach().argsort(descending=True)[:capacity].tolist()
        assert picked == set(top), f"expert {e}"
    assert torch.equal(routing.weights != 0, routing.mask)
    assert (routing.weights[:, 1:] <= routing.weights[:, :-1]).all()  # best first, empty slots last
    torch.testing.assert_close(routing.weights[routing.mask],
                               routing.probs.gather(1, routing.expert_idx)[routing.mask])


def test_expert_choice_layer_loads_every_expert_to_capacity():
    layer = build_layer(router=ExpertChoiceRouter(D_MODEL, NUM_EXPERTS, capacity_factor=2.0))
    layer(random_input())
    capacity = math.ceil(24 * 2.0 / NUM_EXPERTS)
    assert layer.stats.load.tolist() == [capacity] * NUM_EXPERTS
    assert layer.stats.dropped_fraction == 0
    assert layer.stats.load_entropy == pytest.approx(1.0)


def _routing_fields(routing):
    return routing.logits, routing.probs, routing.expert_idx, routing.weights


def test_top_k_noise_only_in_training_mode():
    torch.manual_seed(0)
    noisy = TopKRouter(D_MODEL, NUM_EXPERTS, 2, noise_std=1.0)
    clean = TopKRouter(D_MODEL, NUM_EXPERTS, 2)
    clean.load_state_dict(noisy.state_dict())
    x = random_input((24, D_MODEL)).detach()
    noisy.eval()
    for got, want in zip(_routing_fields(noisy(x)), _routing_fields(clean(x)), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    noisy.train()
    trained = noisy(x)
    torch.testing.assert_close(trained.logits, clean(x).logits)  # logits are the raw, pre-noise ones
    assert not torch.allclose(trained.probs, clean(x).probs)
    assert not torch.allclose(trained.probs, noisy(x).probs)  # fresh noise on every call


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_expert_bias_changes_selection_not_weights(score, normalize):
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, NUM_EXPERTS, 2, score=score, normalize=normalize, bias_update_rate=0.1)
    x = random_input((24, D_MODEL)).detach()
    unbiased = router(x)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 2.0, 3.0]))
    biased = router(x)
    assert (unbiased.expert_idx < 6).any()  # the bias is what moves every token
    assert biased.expert_idx.tolist() == [[7, 6]] * 24
    torch.testing.assert_close(biased.probs, unbiased.probs)
    expected = biased.probs.gather(1, biased.expert_idx)
    if normalize:
        expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(biased.weights, expected)


def test_update_bias_moves_by_rate_times_sign_of_mean_minus_load():
    router = TopKRouter(D_MODEL, 4, 2, bias_update_rate=0.25)
    router.update_bias(torch.tensor([6, 0, 1, 1]))  # mean load 2
    assert router.expert_bias.tolist() == [-0.25, 0.25, 0.25, 0.25]
    router.update_bias(torch.tensor([2, 2, 2, 2]))  # balanced: no move
    assert router.expert_bias.tolist() == [-0.25, 0.25, 0.25, 0.25]
    router.update_bias(torch.tensor([0, 5, 2, 1]))
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.25, 0.5]


def test_update_bias_needs_a_bias_update_rate():
    with pytest.raises(ValueError, match=r"\bbias_update_rate\b"):
        TopKRouter(D_MODEL, 4, 2).update_bias(torch.tensor([1, 1, 1, 1]))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_softmax_normalized_weights_are_a_softmax_over_the_top_k_logits(k):
    torch.manual_seed(0)
    router = TopKRouter(D_MODEL, NUM_EXPERTS, k)
    routing = router(random_input((24, D_MODEL)))
    top_logits, top_idx = routing.logits.topk(k, dim=-1)
    assert torch.equal(routing.expert_idx, top_idx)
    torch.testing.assert_close(routing.weights, top_logits.softmax(-1))
    torch.testing.assert_close(routing.probs, routing.logits.softmax(-1))


def test_switch_router_weight_is_the_chosen_softmax_probability():
    torch.manual_seed(0)
    router = SwitchRouter(D_MODEL, NUM_EXPERTS)
    routing = router(random_input((24, D_MODEL)))
    probs = routing.logits.softmax(-1)
    assert torch.equal(routing.expert_idx, probs.argmax(-1, keepdim=True))
    torch.testing.assert_close(routing.weights, probs.max(-1, keepdim=True).values)
    assert (routing.weights < 1).all()  # not renormalised to 1


def test_default_top_1_layer_trains_its_router_through_the_output():
    """k=1 defaults to Switch routing: with the renormalised TopKRouter the weight is 1 and the
    router would get no gradient from the output (chapter 01)."""
    torch.manual_seed(0)
    x = random_input((32, D_MODEL))
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, k=1)
    assert isinstance(layer.router, SwitchRouter)
    layer(x).square().sum().backward()  # no aux or z loss: the output alone
    renormalised = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, k=1, router=TopKRouter(D_MODEL, NUM_EXPERTS, 1))
    renormalised(x).square().sum().backward()
    switch_grad = layer.router.proj.weight.grad.abs().max()
    assert switch_grad > 1e-3
    assert renormalised.router.proj.weight.grad.abs().max() < 1e-5 * switch_grad  # p / p: rounding only


def test_noisy_top_k_router_eval_weights_are_softmax_over_the_top_k_logits():
    torch.manual_seed(0)
    router = NoisyTopKRouter(D_MODEL, NUM_EXPERTS, 2).eval()
    nn.init.normal_(router.noise_proj.weight)
    routing = router(random_input((24, D_MODEL)))
    top_logits, top_idx = routing.logits.topk(2, dim=-1)
    assert torch.equal(routing.expert_idx, top_idx)
    torch.testing.assert_close(routing.weights, top_logits.softmax(-1))


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    (dict(k=NUM_EXPERTS + 1), ValueError, r"k"),
    (dict(k=0), ValueError, r"k"),
    (dict(capacity_factor=0.0), ValueError, r"capacity_factor"),
    (dict(capacity_factor=-1.0), ValueError, r"capacity_factor"),
    (dict(router=TopKRouter(D_MODEL, NUM_EXPERTS // 2, 2)), ValueError, r"router"),
    (dict(router=TopKRouter(D_MODEL + 1, NUM_EXPERTS, 2)), ValueError, r"router"),
    (dict(router=nn.Linear(D_MODEL, NUM_EXPERTS)), TypeError, r"router"),
    (dict(k=2, router=TopKRouter(D_MODEL, NUM_EXPERTS, 1)), ValueError, r"router\.k"),
    (dict(k=1, router=ExpertChoiceRouter(D_MODEL, NUM_EXPERTS)), ValueError, r"router\.k"),
    (dict(router=ExpertChoiceRouter(D_MODEL, NUM_EXPERTS), capacity_factor=1.0), ValueError,
     r"capacity_factor"),
    (dict(activation="tanh"), ValueError, r"activation"),
    (dict(backend="triton-nope"), ValueError, r"backend"),
    (dict(drop_policy="random"), ValueError, r"drop_policy"),
    (dict(num_shared_experts=-1), ValueError, r"num_shared_experts"),
    (dict(shared_gate=True), ValueError, r"shared_gate"),
    (dict(d_hidden=0), ValueError, r"d_hidden"),
], ids=["k_gt_E", "k_zero", "cf_zero", "cf_negative", "router_num_experts", "router_d_model", "router_type",
        "router_k", "expert_choice_k", "expert_choice_with_cf", "activation", "backend", "drop_policy",
        "shared_negative", "shared_gate_alone", "d_hidden"])
def test_layer_rejects_bad_config(kwargs, error, argument):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        build_layer(**kwargs)


@pytest.mark.parametrize(("x", "error"), [
    (torch.randn(2, 12, D_MODEL + 1), ValueError),
    (torch.randn(()), ValueError),
    (torch.randn(2, D_MODEL).tolist(), TypeError),
], ids=["wrong_d_model", "scalar", "list"])
def test_layer_forward_rejects_bad_input(x, error):
    with pytest.raises(error, match=r"\bx\b"):
        build_layer()(x)


@pytest.mark.parametrize(("make_router", "error", "argument"), [
    (lambda: TopKRouter(D_MODEL, 4, 5), ValueError, "k"),
    (lambda: TopKRouter(D_MODEL, 4, 0), ValueError, "k"),
    (lambda: TopKRouter(D_MODEL, 4, 2, score="relu"), ValueError, "score"),
    (lambda: TopKRouter(D_MODEL, 4, 2, noise_std=-1.0), ValueError, "noise_std"),
    (lambda: TopKRouter(D_MODEL, 4, 2, bias_update_rate=-0.1), ValueError, "bias_update_rate"),
    (lambda: NoisyTopKRouter(D_MODEL, 4, 5), ValueError, "k"),
    (lambda: ExpertChoiceRouter(D_MODEL, 4, capacity_factor=0), ValueError, "capacity_factor"),
    (lambda: TopKRouter(D_MODEL, 4, 2, bias_update_rate=0.1).update_bias(torch.ones(3)), ValueError,
     "load"),
    (lambda: TopKRouter(D_MODEL, 4, 2)(torch.randn(3, D_MODEL - 1)), ValueError, "x"),
], ids=["k_gt_E", "k_zero", "score", "noise_std", "bias_rate", "noisy_k_gt_E", "expert_choice_cf",
        "update_bias_shape", "forward_d_model"])
def test_routers_reject_bad_input(make_router, error, argument):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        make_router()


def test_a_call_with_no_tokens_drops_nothing_and_adds_no_loss():
    """An empty batch (an expert-parallel rank can see one): zeros out, zero losses, nothing dropped."""
    layer = build_layer(capacity_factor=1.0)
    x = torch.zeros(0, D_MODEL, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, D_MODEL)
    assert layer.aux_loss.item() == 0.0 and layer.z_loss.item() == 0.0
    assert layer.stats.dropped_fraction == 0.0 and layer.stats.load.sum() == 0
    (out.sum() + layer.aux_loss + layer.z_loss).backward()  # still differentiable


def test_reference_loop_respects_unavailable_experts():
    layer = build_layer()
    layer.available_experts = torch.tensor([True, False] * (NUM_EXPERTS // 2))
    x = random_input()
    torch.testing.assert_close(layer(x), moe_loop(layer, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_top_k_ranks_by_logits_even_where_probabilities_saturate(score):
    """With logits ~100 apart, float32 softmax (or sigmoid) rounds the runner-up scores to exactly
    0 (or 1); the choice must still follow the logits, not an arbitrary tie-break."""
    router = TopKRouter(4, 6, k=2, score=score)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([200.0, -50, 100, -150, 0, 300])[:, None].expand(6, 4))
    x = torch.ones(3, 4) * torch.tensor([[1.0], [-1.0], [0.5]])
    logits = router(x).logits
    assert torch.equal(router(x).expert_idx, logits.topk(2, dim=-1).indices)
