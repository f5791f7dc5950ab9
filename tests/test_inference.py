"""minimoe.inference and the routers' `available_experts`: masking against routing written out
here, pruning against masking and the per-token loop, merging and hidden-unit alignment,
int8 quantisation against its derived error bound, the cache simulator against hand-replayed
traces, the context managers, and input validation."""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minimoe import inference as inf
from minimoe.experts import Experts
from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.reference import moe_loop
from minimoe.routing import ExpertChoiceRouter, HashRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

D, H, E = 16, 32, 8


def tokens(n: int = 40, seed: int = 1, d: int = D) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def layer_with(router_name: str = "softmax", k: int = 2, seed: int = 0, **kwargs) -> MoELayer:
    torch.manual_seed(seed)
    routers = {
        "softmax": lambda: TopKRouter(D, E, k),
        "sigmoid_bias": lambda: TopKRouter(D, E, k, score="sigmoid", bias_update_rate=0.1),
        "switch": lambda: SwitchRouter(D, E),
        "noisy": lambda: NoisyTopKRouter(D, E, k),
        "expert_choice": lambda: ExpertChoiceRouter(D, E, 1.0),
    }
    router = routers[router_name]()
    if router_name == "sigmoid_bias":  # a large bias on the masked experts: they must still lose
        router.expert_bias.copy_(torch.linspace(2.0, -2.0, E))
    return MoELayer(D, H, E, router=router, **kwargs).eval()


def mask_of(available: list[int], num_experts: int = E) -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[available] = True
    return mask


AVAILABLE = [0, 2, 3, 6, 7]  # experts 1, 4 and 5 have failed


# ---- masking in the routers ----


def masked_softmax_topk(logits, available, k):
    """Written out: softmax over the available columns only, top-k there, ids mapped back."""
    cols = available.nonzero().squeeze(1)
    probs_avail = logits[:, cols].softmax(-1)
    top = probs_avail.topk(k, dim=-1)
    probs = torch.zeros_like(logits)
    probs[:, cols] = probs_avail
    return probs, cols[top.indices], top.values / top.values.sum(-1, keepdim=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_masked_softmax_routing_matches_the_formula(k):
    layer = layer_with("softmax", k=k)
    x, available = tokens(), mask_of(AVAILABLE)
    routing = layer.router(x, available_experts=available)
    probs, expert_idx, weights = masked_softmax_topk(x @ layer.router.proj.weight.T, available, k)
    assert torch.equal(routing.expert_idx, expert_idx)
    torch.testing.assert_close(routing.weights, weights)
    torch.testing.assert_close(routing.probs, probs)


@pytest.mark.parametrize("router_name", ["softmax", "sigmoid_bias", "switch", "noisy"])
@pytest.mark.parametrize("training", [False, True])
def test_masked_experts_are_never_chosen_and_weights_sum_to_one(router_name, training):
    layer = layer_with(router_name).train(training)
    available = mask_of(AVAILABLE)
    routing = layer.router(tokens(200), available_experts=available)
    assert available[routing.expert_idx].all()
    assert (routing.probs[:, ~available] == 0).all()
    if router_name == "switch":  # not renormalised over k, but over the available experts' softmax
        probs = masked_softmax_topk(routing.logits, available, 1)[0]
        torch.testing.assert_close(routing.weights, probs.gather(1, routing.expert_idx))
    else:
        torch.testing.assert_close(routing.weights.sum(-1), torch.ones(200))


def test_sigmoid_router_selects_without_masked_experts_but_keeps_their_bias_out_of_the_weights():
    layer = layer_with("sigmoid_bias")
    x, available = tokens(), mask_of(AVAILABLE)
    routing = layer.router(x, available_experts=available)
    scores = torch.sigmoid(x @ layer.router.proj.weight.T)
    selection = (scores + layer.router.expert_bias).masked_fill(~available, -math.inf)
    expert_idx = selection.topk(2, dim=-1).indices
    chosen = scores.gather(1, expert_idx)
    assert torch.equal(routing.expert_idx, expert_idx)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True))


def test_expert_choice_masked_experts_take_no_token_and_the_others_keep_their_capacity():
    layer = layer_with("expert_choice")
    available = mask_of(AVAILABLE)
    routing = layer.router(tokens(40), available_experts=available)
    picked = routing.expert_idx[routing.mask]
    counts = torch.bincount(picked, minlength=E)
    assert (counts[~available] == 0).all()
    assert (counts[available] == 5).all()  # C = ceil(40 * 1.0 / 8)
    assert (routing.probs[:, ~available] == 0).all()


def test_hash_router_refuses_a_mask_that_excludes_an_expert():
    router = HashRouter(D, E, vocab_size=20, k=2)
    x, ids = tokens(10), torch.arange(10)
    same = router(x, ids, available_experts=torch.ones(E, dtype=torch.bool))
    assert torch.equal(same.expert_idx, router(x, ids).expert_idx)
    with pytest.raises(ValueError, match="available_experts must be all True for a HashRouter"):
        router(x, ids, available_experts=mask_of(AVAILABLE))


@pytest.mark.parametrize("router_name, k, available, message", [
    ("switch", 1, [], "every expert is masked"),
    ("softmax", 2, [], "every expert is masked"),
    ("softmax", 2, [3], "only 1 available"),
    ("expert_choice", 1, [], "every expert is masked"),
])
def test_masking_every_expert_or_too_many_is_a_clear_error(router_name, k, available, message):
    layer = layer_with(router_name, k=k)
    with pytest.raises(ValueError, match=rf"available_experts must leave at least k={k} of the 8 experts available, "
                                         rf"got {message}"):
        layer.available_experts = mask_of(available)  # checked once, when set


@pytest.mark.parametrize("bad, error, message", [
    (torch.ones(E - 1, dtype=torch.bool), ValueError, r"shape \(8,\)"),
    (torch.ones(2, E, dtype=torch.bool), ValueError, "1 dimensions"),
    (torch.ones(E), TypeError, "bool tensor"),
    ([True] * E, TypeError, "torch.Tensor"),
])
def test_mask_validation(bad, error, message):
    with pytest.raises(error, match=f"available_experts must .*{message}"):
        layer_with().router(tokens(), available_experts=bad)


def test_layer_passes_its_mask_to_the_router_and_counts_no_token_for_masked_experts():
    layer = layer_with()
    layer.available_experts = mask_of(AVAILABLE)
    layer(tokens())
    assert (layer.stats.load[~mask_of(AVAILABLE)] == 0).all()
    assert int(layer.stats.load.sum()) == 80


# ---- pruning: equal to masking, equal to the per-token loop ----


@pytest.mark.parametrize("router_name", ["softmax", "sigmoid_bias", "switch", "noisy"])
def test_pruned_layer_equals_the_masked_layer_and_the_loop(router_name):
    layer = layer_with(router_name, num_shared_experts=1)
    x = tokens()
    small = inf.prune_experts(layer, AVAILABLE)
    with torch.no_grad():
        layer.available_experts = mask_of(AVAILABLE)
        masked = layer(x)
        torch.testing.assert_close(small(x), masked, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(moe_loop(small, x), masked, atol=1e-5, rtol=1e-4)


def test_pruning_keeps_only_the_listed_experts_and_their_outputs():
    biased = layer_with("sigmoid_bias")
    assert torch.equal(inf.prune_experts(biased, [5, 2]).router.expert_bias, biased.router.expert_bias[[5, 2]])
    layer = layer_with("softmax")
    keep = [6, 0, 3, 1, 5]  # any order: new expert i is old expert keep[i]
    small = inf.prune_experts(layer, keep)
    assert small.num_experts == 5 and small.router.num_experts == 5 and small.experts.num_experts == 5
    assert torch.equal(small.router.proj.weight, layer.router.proj.weight[keep])
    x = tokens()
    with torch.no_grad():
        for i, e in enumerate(keep):  # each kept expert computes what it did, on every token
            only = lambda expert, n: torch.zeros(n, dtype=torch.int64).index_fill(0, torch.tensor([expert]), 40)  # noqa: E731
            torch.testing.assert_close(small.experts(x, only(i, 5)), layer.experts(x, only(e, E)))
    with torch.no_grad():  # tokens whose chosen experts were all kept get the same output
        routing = layer.router(x)
        whole = torch.isin(routing.expert_idx, torch.tensor(keep)).all(-1)
        assert whole.any() and not whole.all()
        torch.testing.assert_close(small(x)[whole], layer(x)[whole], atol=1e-6, rtol=1e-5)


def test_pruning_copies_settings_and_leaves_the_original_alone():
    layer = layer_with("softmax", capacity_factor=1.5, drop_policy="score", num_shared_experts=2)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    small = inf.prune_experts(layer, [1, 2, 3])
    with torch.no_grad():
        small.experts.w_up.zero_()
    assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items())
    assert (small.capacity_factor, small.drop_policy, small.k) == (1.5, "score", 2)
    assert torch.equal(small.shared.w_up, layer.shared.w_up)
    assert inf.prune_experts(layer_with("expert_choice"), [0, 5]).router.capacity_factor == 1.0


def test_pruning_keeps_a_gated_shared_expert():
    layer = layer_with("softmax", num_shared_experts=1, shared_gate=True)
    with torch.no_grad():
        layer.shared_gate.weight.normal_()
    small = inf.prune_experts(layer, AVAILABLE)
    assert torch.equal(small.shared_gate.weight, layer.shared_gate.weight)
    x = tokens()
    with torch.no_grad():
        layer.available_experts = mask_of(AVAILABLE)
        torch.testing.assert_close(small(x), layer(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(moe_loop(small, x), layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep, error, message", [
    ([0, 0, 1], ValueError, "distinct"),
    ([0, 8], ValueError, r"in \[0, 8\)"),
    ([1], ValueError, "at least k=2"),
    ([0.0, 1.0], TypeError, "expert ids"),
])
def test_prune_validation(keep, error, message):
    with pytest.raises(error, match=f"keep must .*{message}"):
        inf.prune_experts(layer_with(), keep)


def test_prune_refuses_a_hash_router():
    layer = MoELayer(D, H, E, 1, router=HashRouter(D, E, vocab_size=20))
    with pytest.raises(TypeError, match="HashRouter"):
        inf.prune_experts(layer, [0, 1])


# ---- merging ----


def test_merge_averages_experts_and_router_rows():
    layer = layer_with("sigmoid_bias")
    merged = inf.merge_experts(layer, 2, 5)
    for name in ("w_gate", "w_up", "w_down"):
        old, new = getattr(layer.experts, name), getattr(merged.experts, name)
        assert new.shape[0] == E - 1
        torch.testing.assert_close(new[2], (old[2] + old[5]) / 2)
        torch.testing.assert_close(new[[0, 1, 3, 4, 5, 6]], old[[0, 1, 3, 4, 6, 7]])
    torch.testing.assert_close(merged.router.proj.weight[2], layer.router.proj.weight[[2, 5]].mean(0))
    bias = layer.router.expert_bias  # linspace(2, -2): all distinct
    torch.testing.assert_close(merged.router.expert_bias,
                               torch.cat([bias[[0, 1]], bias[[2, 5]].mean(0, keepdim=True), bias[[3, 4, 6, 7]]]))


def permuted_twin(layer: MoELayer, i: int, j: int, seed: int = 3) -> torch.Tensor:
    """Make expert j expert i with its hidden units shuffled (the same function); -> the shuffle."""
    shuffle = torch.randperm(H, generator=torch.Generator().manual_seed(seed))
    ex = layer.experts
    with torch.no_grad():
        ex.w_gate[j], ex.w_up[j], ex.w_down[j] = ex.w_gate[i][:, shuffle], ex.w_up[i][:, shuffle], ex.w_down[i][shuffle]
    return shuffle


def test_alignment_undoes_a_hidden_unit_shuffle_so_merging_twins_is_exact():
    layer = layer_with()
    shuffle = permuted_twin(layer, 1, 6)
    x = tokens(200)
    perm = inf.align_hidden_units(layer.experts, 1, 6, x)
    assert torch.equal(shuffle[perm], torch.arange(H))
    aligned = inf.merge_experts(layer, 1, 6, x=x)
    naive = inf.merge_experts(layer, 1, 6)
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(aligned.experts, name)[1], getattr(layer.experts, name)[1])
        assert not torch.allclose(getattr(naive.experts, name)[1], getattr(layer.experts, name)[1])


def test_expert_similarity_of_weights_and_of_outputs():
    layer = layer_with()
    permuted_twin(layer, 1, 6)
    x = tokens(100)
    by_weights, by_outputs = inf.expert_similarity(layer), inf.expert_similarity(layer, x)
    for sim in (by_weights, by_outputs):
        assert sim.shape == (E, E)
        torch.testing.assert_close(sim, sim.T)
        torch.testing.assert_close(sim.diagonal(), torch.ones(E))
    assert by_outputs[1, 6] > 0.9999 and abs(by_weights[1, 6]) < 0.5  # the same function, other weights
    with torch.no_grad():
        layer.experts.w_up[3] = 2 * layer.experts.w_up[0]
        layer.experts.w_gate[3], layer.experts.w_down[3] = 2 * layer.experts.w_gate[0], 2 * layer.experts.w_down[0]
    assert inf.expert_similarity(layer)[0, 3] > 0.9999


def test_merge_validation():
    with pytest.raises(ValueError, match="distinct"):
        inf.merge_experts(layer_with(), 3, 3)
    with pytest.raises(ValueError, match="at least k=2"):
        inf.merge_experts(MoELayer(D, H, 2, 2), 0, 1)
    with pytest.raises(ValueError, match="x must have d_model=16"):
        inf.merge_experts(layer_with(), 0, 1, x=tokens(d=4))


def test_relative_error():
    assert inf.relative_error(torch.tensor([0.0, 4.0]), torch.tensor([3.0, 4.0])) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="approx must have shape"):
        inf.relative_error(torch.zeros(3), torch.ones(2))


# ---- int8 ----


def test_quantize_int8_by_hand():
    w = torch.tensor([[0.5, -0.5, 0.0], [-2.0, 0.2, 0.0]])  # x @ w: 3 output channels (columns)
    q, scale = inf.quantize_int8(w)
    torch.testing.assert_close(scale, torch.tensor([[2 / 127, 0.5 / 127, 1.0]]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[32, -127, 0], [-127, 51, 0]]  # 0.5 * 127 / 2 = 31.75, 0.2 * 127 / 0.5 = 50.8
    torch.testing.assert_close(inf.dequantize_int8(q, scale), w, atol=float(scale.max()) / 2, rtol=0)


def test_quantize_int8_error_is_at_most_half_a_step_per_weight():
    w = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(0))
    w[1, :, 7] = 0.0  # an all-zero channel
    q, scale = inf.quantize_int8(w)
    assert q.shape == w.shape and scale.shape == (4, 1, 40)
    assert q.abs().max() == 127 and (q.abs().amax(dim=1)[scale[:, 0] != 1] == 127).all()
    assert (q[1, :, 7] == 0).all() and scale[1, 0, 7] == 1
    err = (inf.dequantize_int8(q, scale) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_int8_experts_stay_within_the_derived_bound(activation):
    torch.manual_seed(0)
    experts = Experts(D, H, E, activation)
    q8 = inf.Int8Experts(experts)
    x = tokens(64)
    for e in range(E):
        counts = torch.zeros(E, dtype=torch.int64)
        counts[e] = x.shape[0]
        with torch.no_grad():
            exact, approx = experts(x, counts), q8(x, counts)
        error, bound = (approx - exact).abs(), inf.int8_error_bound(x, experts, e)
        assert (error <= bound + 1e-6).all()
        assert error.max() > 0 and bound.max() < 0.2 * exact.abs().max()  # a real, non-vacuous bound


@pytest.mark.parametrize("activation, act", [("swiglu", F.silu), ("gelu", F.gelu), ("relu", F.relu)])
def test_lipschitz_constants_cover_the_activations(activation, act):
    z = torch.linspace(-10, 10, 200001, dtype=torch.float64, requires_grad=True)
    slope = torch.autograd.grad(act(z).sum(), z)[0].abs().max().item()
    assert slope <= inf.LIPSCHITZ[activation] < slope + 1e-3


def test_quantized_layer_forward_and_bytes():
    layer = layer_with(num_shared_experts=1)
    q_layer = inf.quantize_experts(layer)
    assert isinstance(q_layer.experts, inf.Int8Experts) and isinstance(layer.experts, Experts)
    x = tokens()
    with torch.no_grad():
        assert inf.relative_error(q_layer(x), layer(x)) < 0.01
        torch.testing.assert_close(q_layer(x), moe_loop(q_layer, x), atol=1e-5, rtol=1e-4)
    n_weights = E * 3 * D * H
    assert inf.weight_bytes(layer.experts) == 4 * n_weights
    assert inf.weight_bytes(q_layer.experts) == n_weights + 4 * E * (H + H + D)


def test_int8_validation():
    with pytest.raises(ValueError, match="w must be a floating tensor with at least 2 dimensions"):
        inf.quantize_int8(torch.ones(5))
    with pytest.raises(ValueError, match="w must be a floating"):
        inf.quantize_int8(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="q must be an int8"):
        inf.dequantize_int8(torch.ones(2, 2), torch.ones(1, 2))
    with pytest.raises(TypeError, match="experts must be a minimoe.experts.Experts"):
        inf.Int8Experts(nn.Linear(2, 2))
    q8 = inf.Int8Experts(Experts(D, H, E))
    with pytest.raises(ValueError, match="tokens_per_expert must sum to the 5 rows of x_sorted, got 8"):
        q8(tokens(5), torch.full((E,), 1))
    with pytest.raises(ValueError, match=r"tokens_per_expert must have shape \(8,\)"):
        q8(tokens(5), torch.full((E - 1,), 1))
    with pytest.raises(ValueError, match="e must hold distinct expert ids"):
        inf.int8_error_bound(tokens(), Experts(D, H, E), E)


# ---- uncertain tokens and fallbacks ----


def test_routing_entropy_values():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0],
                          [0.4, 0.4, 0.4, 0.4]])  # the last: sigmoid-like scores, renormalised
    torch.testing.assert_close(inf.routing_entropy(probs), torch.tensor([1.0, 0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="probs must have 2 dimensions"):
        inf.routing_entropy(torch.ones(4))
    with pytest.raises(ValueError, match="at least 2 experts"):
        inf.routing_entropy(torch.ones(3, 1))


def test_fallback_top1_gives_flagged_tokens_their_best_expert_alone():
    layer = layer_with()
    x = tokens(200)
    with torch.no_grad():
        routing = layer.router(x)
    threshold = float(inf.routing_entropy(routing.probs).median())
    with inf.fallback_routing(layer, threshold, "top1"):
        out = layer(x).detach()
        flagged = layer.router.flagged
        fallback = layer.router(x)
    assert isinstance(layer.router, TopKRouter)  # restored
    assert 60 < int(flagged.sum()) < 140
    assert torch.equal(fallback.mask, torch.stack([torch.ones(200, dtype=torch.bool), ~flagged], 1))
    torch.testing.assert_close(fallback.weights[flagged], torch.tensor([[1.0, 0.0]]).expand(int(flagged.sum()), 2))
    torch.testing.assert_close(fallback.weights[~flagged], routing.weights[~flagged])
    with torch.no_grad():
        ex, best = layer.experts, routing.expert_idx[flagged, 0]
        expected = torch.stack([(F.silu(t @ ex.w_gate[e]) * (t @ ex.w_up[e])) @ ex.w_down[e]
                                for t, e in zip(x[flagged], best, strict=True)])
        torch.testing.assert_close(out[flagged], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[~flagged], layer(x)[~flagged], atol=1e-6, rtol=1e-5)


def test_fallback_skip_leaves_flagged_tokens_to_the_shared_experts():
    layer = layer_with(num_shared_experts=1)
    x = tokens(50)
    with torch.no_grad(), inf.fallback_routing(layer, 0.0, "skip"):  # every token flagged
        out = layer(x)
        assert layer.router.flagged.all()
        torch.testing.assert_close(out, layer.shared(x))
    with torch.no_grad(), inf.fallback_routing(layer, 1.0, "skip"):  # none flagged
        torch.testing.assert_close(layer(x), layer_with(num_shared_experts=1)(x))


def test_fallback_validation():
    with pytest.raises(ValueError, match=r"max_entropy must be in \[0, 1\]"):
        inf.FallbackRouter(TopKRouter(D, E), 1.5)
    with pytest.raises(ValueError, match="fallback must be one of"):
        inf.FallbackRouter(TopKRouter(D, E), 0.5, "dense")
    with pytest.raises(TypeError, match="router must be a minimoe.routing.Router"):
        inf.FallbackRouter(nn.Linear(D, E), 0.5)


# ---- context managers on a model ----


def tiny_model() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8, d_hidden=16,
                                               num_experts=4, k=2)).eval()


def test_restrict_experts_per_layer_and_restored_even_after_an_error():
    model = tiny_model()
    idx = torch.randint(96, (3, 8), generator=torch.Generator().manual_seed(0))
    with inf.restrict_experts(model, [None, mask_of([0, 3], 4)]):
        choices = model.expert_choices(idx)
        assert model.moe_layers[0].available_experts is None
    assert set(choices[1].unique().tolist()) <= {0, 3} and len(choices[0].unique()) == 4
    with pytest.raises(RuntimeError, match="boom"), inf.restrict_experts(model, mask_of([1, 2], 4)):
        raise RuntimeError("boom")
    assert all(layer.available_experts is None for layer in model.moe_layers)
    with pytest.raises(ValueError, match=r"available must have one entry per MoE layer \(2\)"):
        inf.restrict_experts(model, [None])


def test_restrict_experts_without_renormalisation_loses_the_masked_share():
    layer = layer_with()
    x, available = tokens(), mask_of(AVAILABLE)
    broken = inf.prune_experts(layer, list(range(E)))  # a copy whose lost experts output zero
    with torch.no_grad():
        broken.experts.w_down[~available] = 0
        expected = broken(x)
        with inf.restrict_experts(layer, available, renormalize=False):
            lost = layer(x)
            assert isinstance(layer.router, inf.LostExpertsRouter)
        renormalised = inf.prune_experts(layer, AVAILABLE)(x)
    torch.testing.assert_close(lost, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(lost, renormalised, atol=1e-3)
    assert isinstance(layer.router, TopKRouter)


def test_inference_capacity_dropless_makes_outputs_batch_independent():
    model = tiny_model()
    idx = torch.randint(96, (16, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with inf.inference_capacity(model, 0.5):
            assert all(layer.capacity_factor == 0.5 for layer in model.moe_layers)
            assert not torch.allclose(model(idx[:1])[0], model(idx)[0][:1], atol=1e-4)
        with inf.inference_capacity(model, None):
            torch.testing.assert_close(model(idx[:1])[0], model(idx)[0][:1], atol=1e-5, rtol=1e-4)
    assert all(layer.capacity_factor is None for layer in model.moe_layers)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        inf.inference_capacity(model, 0)
    with pytest.raises(ValueError, match="ExpertChoiceRouter"):
        inf.inference_capacity(layer_with("expert_choice"), 2.0)


def test_swap_moe_layers_and_record_routing():
    model = tiny_model()
    idx = torch.randint(96, (2, 8), generator=torch.Generator().manual_seed(0))
    old = inf.moe_layers(model)
    small = [inf.prune_experts(layer, [0, 1, 2]) for layer in old]
    with inf.swap_moe_layers(model, small):
        assert inf.moe_layers(model) == small
        records = inf.record_routing(model, idx)
    assert inf.moe_layers(model) == old
    with inf.restrict_experts(model, mask_of([0, 1, 2], 4)):
        masked = model.expert_choices(idx)
    for (x, routing), choice in zip(records, masked, strict=True):  # pruned == masked
        assert x.shape == (16, 16)
        assert torch.equal(routing.expert_idx.view(2, 8, 2), choice)
    with pytest.raises(ValueError, match="new_layers must have one entry per MoE layer"):
        inf.swap_moe_layers(model, small[:1])
    with pytest.raises(ValueError, match="new_layers must be MoELayers of d_model=16"):
        inf.swap_moe_layers(model, [MoELayer(8, 8, 4), small[1]])
    assert inf.moe_layers(nn.Linear(2, 2)) == []
    with pytest.raises(ValueError, match="model must contain an MoELayer"):
        inf.restrict_experts(nn.Linear(2, 2), None)



def test_swap_follows_moe_layers_order_in_nested_models():
    """moe_layers walks modules depth first; the swap must put each new layer where the old one was."""
    inner, outer = MoELayer(D, H, E, 2), MoELayer(D, H, E, 2)
    model = nn.Sequential(nn.Sequential(inner), outer)  # moe_layers: [inner, outer]
    new_inner, new_outer = MoELayer(D, H, E, 2), MoELayer(D, H, E, 2)
    with inf.swap_moe_layers(model, [new_inner, new_outer]):
        assert model[0][0] is new_inner and model[1] is new_outer
    assert model[0][0] is inner and model[1] is outer
    with pytest.raises(ValueError, match="model must contain an MoELayer"):
        inf.swap_moe_layers(nn.Sequential(nn.Linear(2, 2)), [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pruned_merged_and_quantised_layers_keep_the_dtype(dtype):
    layer = layer_with().to(dtype)
    x = tokens().to(dtype)
    for new in (inf.prune_experts(layer, [0, 1, 2]), inf.merge_experts(layer, 2, 5), inf.quantize_experts(layer)):
        assert new(x).dtype == dtype and new.router.proj.weight.dtype == dtype

# ---- expert cache ----

TRACE = [[0, 1], [2, 0], [1, 3], [0, 2]]  # requests 0 1 2 0 1 3 0 2


@pytest.mark.parametrize("trace, size, policy, hits", [
    (TRACE, 2, "lru", 0),        # 0m 1m 2m(-0) 0m(-1) 1m(-2) 3m(-0) 0m(-1) 2m(-3): LRU thrashes
    (TRACE, 2, "belady", 2),     # 0m 1m 2m(-1, next use furthest) 0h 1m(-2) 3m(-1, never again) 0h 2m
    (TRACE, 2, "static", 5),     # counts 0:3 1:2 2:2 3:1 -> keeps {0, 1} (tie by lower id): 3 + 2
    (TRACE, 3, "lru", 3),        # 0m 1m 2m 0h 1h 3m(-2) 0h 2m(-1)
    ([[0], [1], [0], [2], [0], [1]], 2, "lru", 2),  # 0m 1m 0h 2m(-1) 0h 1m(-2); FIFO would hit once
    (TRACE, 4, "lru", 4),        # only the 4 cold misses
    (TRACE, 4, "belady", 4),
])
def test_cache_hits_match_hand_replayed_traces(trace, size, policy, hits):
    stats = inf.simulate_cache(torch.tensor(trace), size, policy)
    n = sum(len(row) for row in trace)
    assert (stats.hits, stats.misses) == (hits, n - hits)
    assert stats.hit_rate == pytest.approx(hits / n)


def test_belady_never_loses_to_lru_and_hits_grow_with_the_cache():
    gen = torch.Generator().manual_seed(0)
    popular = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 0.5, 0.5]), 600, replacement=True, generator=gen)
    trace = popular.view(-1, 2)
    for policy in ("lru", "belady", "static"):
        rates = [inf.simulate_cache(trace, size, policy).hit_rate for size in range(1, 9)]
        assert all(a <= b for a, b in zip(rates, rates[1:], strict=False)), policy
    for size in range(1, 9):
        assert inf.simulate_cache(trace, size, "belady").hits >= inf.simulate_cache(trace, size, "lru").hits


@pytest.mark.parametrize("trace, size, policy, error, message", [
    (torch.zeros(4, 2), 2, "lru", ValueError, "trace must hold non-negative integer"),
    (torch.tensor([[0, -1]]), 2, "lru", ValueError, "trace must hold non-negative integer"),
    (torch.tensor([0, 1]), 2, "lru", ValueError, "trace must have 2 dimensions"),
    (torch.tensor([[0, 1]]), 0, "lru", ValueError, "cache_size must be >= 1"),
    (torch.tensor([[0, 1]]), 2, "fifo", ValueError, "policy must be one of"),
])
def test_cache_validation(trace, size, policy, error, message):
    with pytest.raises(error, match=message):
        inf.simulate_cache(trace, size, policy)


def fewest_misses(requests: list[int], size: int, bypass: bool) -> int:
    """The optimum over every cache policy, by exhaustive search over the cache's contents:
    a miss must admit the expert (evicting any cached one when full), or, with bypass, may
    read it without caching it."""
    @functools.cache
    def best(n: int, cache: frozenset) -> int:
        if n == len(requests):
            return 0
        e = requests[n]
        if e in cache:
            return best(n + 1, cache)
        options = [cache | {e}] if len(cache) < size else [cache - {v} | {e} for v in cache]
        if bypass:
            options.append(cache)
        return 1 + min(best(n + 1, option) for option in options)
    return best(0, frozenset())


@pytest.mark.parametrize("trace, size, hits", [
    ([[0], [1], [0], [1]], 1, 1),  # 0m 1m(its next use 3 is later than 0's, 2: bypass) 0h 1m
    (TRACE, 2, 3),                 # 0m 1m 2m(bypass: next use 7 > 1's 4) 0h 1h 3m(bypass) 0h 2m; belady: 2
    ([[0], [1], [2], [0], [1], [2], [0]], 2, 3),  # 0m 1m 2m(bypass: never sooner) 0h 1h 2m 0h
])
def test_belady_with_bypass_by_hand(trace, size, hits):
    assert inf.simulate_cache(torch.tensor(trace), size, "belady_bypass").hits == hits


@settings(max_examples=150)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.integers(1, 3))
def test_belady_is_optimal_among_admitting_caches_and_with_bypass_among_all(requests, size):
    trace = torch.tensor(requests)[:, None]
    belady = inf.simulate_cache(trace, size, "belady").misses
    bypass = inf.simulate_cache(trace, size, "belady_bypass").misses
    assert belady == fewest_misses(requests, size, bypass=False)
    assert bypass == fewest_misses(requests, size, bypass=True)
    for policy in ("lru", "belady"):
        assert bypass <= inf.simulate_cache(trace, size, policy).misses, policy
    # static starts full, its fill loads uncounted: as a cache that starts empty it misses them too
    fills = min(size, len(set(requests)))
    assert bypass <= inf.simulate_cache(trace, size, "static").misses + fills


# ---- prefetching ----


@pytest.mark.parametrize("trace, prefetch, size, stats", [
    # no guesses: LRU by step (a step's cached experts are touched before its misses evict)
    ([[0, 1], [2, 0], [1, 3], [0, 2]], None, 2, (1, 7, 0)),  # 0m1m | 0h 2m(-1) | 1m(-0)3m(-2) | 0m(-1)2m(-3)
    ([[0, 1], [2, 0], [1, 3], [0, 2]], None, 3, (3, 5, 0)),  # 0m1m | 0h 2m | 1h 3m(-0) | 0h 2m(-1)
    # perfect guesses: every request hits, each guess that was absent is a prefetch
    ([[0, 1], [2, 0], [1, 3], [0, 2]], [[0, 1], [2, 0], [1, 3], [0, 2]], 2, (8, 0, 7)),
    # a wrong guess costs a load and evicts a useful expert: cache 2, guess 5 before step 1
    ([[0], [1], [0]], [[-1], [5], [-1]], 2, (0, 3, 1)),  # 0m | 5p(cache 0,5) 1m(-0) | 0m(-5)
    ([[0], [1], [0]], [[-1], [1], [-1]], 2, (2, 1, 1)),  # 0m | 1p 1h | 0h
])
def test_prefetch_by_hand(trace, prefetch, size, stats):
    result = inf.simulate_prefetch(torch.tensor(trace), size, None if prefetch is None else torch.tensor(prefetch))
    assert (result.hits, result.misses, result.prefetches) == stats
    assert result.loads == stats[1] + stats[2]
    assert result.hit_rate == pytest.approx(stats[0] / sum(len(row) for row in trace))


@settings(max_examples=60)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 4))
def test_prefetch_without_guesses_is_lru_for_one_request_per_step(requests, size):
    trace = torch.tensor(requests)[:, None]
    lru = inf.simulate_cache(trace, size, "lru")
    plain = inf.simulate_prefetch(trace, size)
    none = inf.simulate_prefetch(trace, size, torch.full((len(requests), size), -1))
    assert (plain.hits, plain.misses, plain.prefetches) == (lru.hits, lru.misses, 0)
    assert (none.hits, none.misses, none.prefetches) == (lru.hits, lru.misses, 0)


def test_prefetching_the_requests_themselves_removes_every_miss():
    trace = inf.random_topk_trace(200, 8, 2, seed=3)
    stats = inf.simulate_prefetch(trace, 3, trace)
    assert stats.misses == 0 and stats.hits == trace.numel()
    # guessing exactly the step's requests loads what plain LRU-by-step would load, only earlier
    assert stats.prefetches == inf.simulate_prefetch(trace, 3).misses


@pytest.mark.parametrize("prefetch, message", [
    (torch.zeros(4, 3, dtype=torch.int64), "p <= cache_size=2"),
    (torch.zeros(3, 1, dtype=torch.int64), r"shape \[4, p\]"),
    (torch.full((4, 1), -2), "integer expert ids or -1"),
    (torch.zeros(4, 1), "integer expert ids or -1"),
])
def test_prefetch_validation(prefetch, message):
    with pytest.raises(ValueError, match=message):
        inf.simulate_prefetch(torch.tensor(TRACE), 2, prefetch)


# ---- batched decoding ----


@pytest.mark.parametrize("E, k, B", [(4, 2, 2), (5, 2, 3), (6, 3, 2), (4, 1, 4)])
def test_expected_distinct_experts_equals_enumeration(E, k, B):
    subsets = list(itertools.combinations(range(E), k))  # every top-k set, equally likely
    union_sizes = [len(set().union(*batch)) for batch in itertools.product(subsets, repeat=B)]
    assert inf.expected_distinct_experts(E, k, B) == pytest.approx(sum(union_sizes) / len(union_sizes))


def test_expected_distinct_experts_edges_and_validation():
    assert inf.expected_distinct_experts(16, 4, 1) == pytest.approx(4)
    assert inf.expected_distinct_experts(16, 16, 3) == pytest.approx(16)
    assert inf.expected_distinct_experts(16, 4, 0) == 0
    for args, error, message in [((4, 5, 1), ValueError, "k must be <= num_experts=4"),
                                 ((4, 2, -1), ValueError, "batch_size must be >= 0"),
                                 ((4, 2.0, 1), TypeError, "k must be an int")]:
        with pytest.raises(error, match=message):
            inf.expected_distinct_experts(*args)


def test_random_topk_trace_rows_are_distinct_experts_used_uniformly():
    trace = inf.random_topk_trace(4000, 8, 3, seed=1)
    assert trace.shape == (4000, 3) and trace.dtype == torch.int64
    assert all(len(set(row)) == 3 for row in trace.tolist())
    share = torch.bincount(trace.reshape(-1), minlength=8) / trace.numel()
    assert torch.allclose(share, torch.full((8,), 1 / 8), atol=0.01)


def test_distinct_experts_by_hand_and_against_the_formula():
    trace = torch.tensor([[0, 1], [1, 2], [0, 1]])
    assert inf.distinct_experts(trace, 3, num_batches=5).tolist() == [3] * 5  # the whole trace: {0, 1, 2}
    assert set(inf.distinct_experts(trace, 2, num_batches=50).tolist()) == {2, 3}  # rows 0 and 2 share both
    for B in (1, 4, 16):
        counts = inf.distinct_experts(inf.random_topk_trace(5000, 16, 4, seed=B), B, num_batches=2000, seed=B)
        # mean of 2000 batches: its standard error is below 0.05 (a count's spread is below 2)
        assert float(counts.double().mean()) == pytest.approx(inf.expected_distinct_experts(16, 4, B), abs=0.15)
    with pytest.raises(ValueError, match="batch_size must be <= the trace's 3 rows"):
        inf.distinct_experts(trace, 4)


# ---- fine-tuning with a part frozen ----


@pytest.mark.parametrize("num_experts, part, frozen_names", [
    (4, "router", ["ffn.router.proj.weight"]),
    (4, "ffn", ["ffn.experts.w_gate", "ffn.experts.w_up", "ffn.experts.w_down"]),
    (1, "ffn", ["ffn.w_gate", "ffn.w_up", "ffn.w_down"]),  # the dense twin's FFN
])
def test_freeze_stops_exactly_that_part_from_training(num_experts, part, frozen_names):
    torch.manual_seed(0)
    config = MoETransformerConfig(vocab_size=12, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_hidden=8,
                                  num_experts=num_experts, k=min(2, num_experts))
    model = MoETransformer(config)
    before = {name: w.detach().clone() for name, w in model.named_parameters()}
    expected = {f"blocks.{b}.{name}" for b in range(2) for name in frozen_names}
    assert inf.freeze(model, part) == sum(before[name].numel() for name in expected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, 12, (4, 8))
    model(idx, idx)[1].backward()
    optimizer.step()
    for name, w in model.named_parameters():
        assert torch.equal(w, before[name]) == (name in expected), name


def test_freeze_validation():
    dense = MoETransformer(MoETransformerConfig(vocab_size=12, seq_len=8, d_model=16, n_layers=1, n_heads=2,
                                                d_hidden=8, num_experts=1, k=1))
    with pytest.raises(ValueError, match="part='router'"):
        inf.freeze(dense, "router")
    with pytest.raises(ValueError, match="part must be one of"):
        inf.freeze(dense, "attention")
