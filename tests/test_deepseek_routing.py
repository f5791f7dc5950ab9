"""DeepSeek-V2/V3 routing on TopKRouter (DeepSeek-AI 2024): routed_scaling_factor and group-limited
selection (n_group, topk_group), against a dense FFN, a hand-computed case, a per-token loop written
here, a hypothesis property, and Hugging Face's DeepseekV3TopkRouter."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.experts import FeedForward
from minimoe.inference import merge_experts, prune_experts
from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.routing import NoisyTopKRouter, SwitchRouter, TopKRouter, make_router

# ---- routed_scaling_factor ----


def split_dense(dense: FeedForward, layer: MoELayer, k: int) -> None:
    """Expert i of layer gets the i-th of k column blocks of the dense SwiGLU FFN's hidden width."""
    h = dense.w_up.shape[1] // k
    with torch.no_grad():
        for i in range(k):
            block = slice(i * h, (i + 1) * h)
            layer.experts.w_gate[i].copy_(dense.w_gate[:, block])
            layer.experts.w_up[i].copy_(dense.w_up[:, block])
            layer.experts.w_down[i].copy_(dense.w_down[block, :])


def dense_and_split(k, dtype, **layer_kwargs):
    torch.manual_seed(0)
    d, h = 6, 4 * k
    dense = FeedForward(d, h).to(dtype)
    layer = MoELayer(d, h // k, k, k=k, **layer_kwargs).to(dtype)
    split_dense(dense, layer, k)
    return dense, layer


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_k_of_k_experts_scaled_by_k_equal_the_dense_ffn_under_a_uniform_router(k, dtype, tol):
    """E = k: every token visits all k experts. The renormalised weights are the softmax probs
    themselves (they already sum to 1 over all E = k experts), so they are 1/k each only when the
    router is uniform (zero weights); then routed_scaling_factor = k makes every weight 1 and the
    layer is the dense FFN whose hidden width the experts split."""
    dense, layer = dense_and_split(k, dtype, routed_scaling_factor=k)
    assert isinstance(layer.router, TopKRouter) and layer.router.normalize and layer.router.score == "softmax"
    with torch.no_grad():
        layer.router.proj.weight.zero_()
    x = torch.randn(3, 5, 6, dtype=dtype, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    out, out_dense = layer(x), dense(x_dense)
    torch.testing.assert_close(out, out_dense, atol=tol, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_dense.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=tol, rtol=0)
    torch.testing.assert_close(layer.last_routing.weights, torch.ones(15, k, dtype=dtype), atol=tol, rtol=0)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("k", [2, 3])
def test_k_of_k_experts_with_any_router_weigh_each_dense_block_by_k_times_its_prob(k, dtype, tol):
    """With any router weights the identity is out = sum_i k p_i(x) block_i(x), not the dense
    FFN (which it equals only when every p_i = 1/k): checked against the dense FFN's blocks."""
    dense, layer = dense_and_split(k, dtype, routed_scaling_factor=k)
    with torch.no_grad():
        layer.router.proj.weight.normal_()
    x = torch.randn(10, 6, dtype=dtype)
    probs = (x @ layer.router.proj.weight.t()).softmax(-1)  # [T, k]
    h = dense.w_up.shape[1] // k
    expected = torch.zeros_like(x)
    for i in range(k):
        block = slice(i * h, (i + 1) * h)
        hidden = torch.nn.functional.silu(x @ dense.w_gate[:, block]) * (x @ dense.w_up[:, block])
        expected += k * probs[:, i:i + 1] * (hidden @ dense.w_down[block, :])
    out = layer(x)
    torch.testing.assert_close(out, expected, atol=tol, rtol=0)
    assert (out - dense(x)).abs().max() > 1e-3  # the dense identity needs a uniform router


def test_scaling_multiplies_the_renormalised_routed_weights_not_the_shared_experts():
    torch.manual_seed(0)
    plain = MoELayer(8, 6, 4, k=2, num_shared_experts=1)
    scaled = MoELayer(8, 6, 4, k=2, num_shared_experts=1, routed_scaling_factor=2.5)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(12, 8)
    shared = plain.shared(x)
    torch.testing.assert_close(scaled(x) - shared, 2.5 * (plain(x) - shared), atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled.last_routing.weights.sum(-1), torch.full((12,), 2.5))  # renormalised, then scaled
    assert torch.equal(scaled.last_routing.expert_idx, plain.last_routing.expert_idx)


def test_switch_router_scales_its_single_probability():
    router = SwitchRouter(8, 4, routed_scaling_factor=3.0)
    x = torch.randn(5, 8)
    routing = router(x)
    expected = 3.0 * (x @ router.proj.weight.t()).softmax(-1).max(-1).values
    torch.testing.assert_close(routing.weights[:, 0], expected)


def test_config_plumbs_routed_scaling_factor_into_every_moe_router():
    small = dict(vocab_size=16, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_hidden=8, num_experts=4, k=2)
    for router in ("topk", "noisy_topk", "sigmoid_bias"):
        model = MoETransformer(MoETransformerConfig(**small, router=router, routed_scaling_factor=2.5))
        routers = [layer.router for layer in model.moe_layers]
        assert len(routers) == 2 and all(r.routed_scaling_factor == 2.5 for r in routers)
        # the default, None, is k: the k renormalised weights of every token sum to k
        default = MoETransformer(MoETransformerConfig(**{**small, "k": 3}, router=router))
        assert default.config.routed_scale == 3.0
        x = torch.randint(0, 16, (2, 8))
        default(x)
        for layer in default.moe_layers:
            torch.testing.assert_close(layer.last_routing.weights.sum(-1), torch.full((16,), 3.0))
    with pytest.raises(ValueError, match=r"routed_scaling_factor must be > 0 or None \(k\), got 0"):
        MoETransformerConfig(**small, routed_scaling_factor=0)


def test_noisy_topk_scales_its_softmax_over_the_kept_logits():
    torch.manual_seed(0)
    plain, scaled = NoisyTopKRouter(8, 6, 2).eval(), NoisyTopKRouter(8, 6, 2, routed_scaling_factor=2.0).eval()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(5, 8)
    a, b = plain(x), scaled(x)
    assert torch.equal(a.expert_idx, b.expert_idx)
    torch.testing.assert_close(b.weights, 2.0 * a.weights)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: TopKRouter(8, 4, 2, routed_scaling_factor=0.0), r"routed_scaling_factor must be > 0, got 0.0"),
    (lambda: TopKRouter(8, 4, 2, routed_scaling_factor=-1), r"routed_scaling_factor must be > 0, got -1"),
    (lambda: TopKRouter(8, 4, 2, routed_scaling_factor=float("nan")), r"routed_scaling_factor must be > 0, got nan"),
    (lambda: MoELayer(8, 4, 4, k=2, routed_scaling_factor=0), r"routed_scaling_factor must be > 0, got 0"),
    (lambda: MoELayer(8, 4, 4, router=TopKRouter(8, 4, 2), routed_scaling_factor=2.0),
     r"routed_scaling_factor=2.0 differs from the router's 1.0"),
    (lambda: make_router("expert_choice", 8, 4, None, routed_scaling_factor=2.0),
     r"routed_scaling_factor must be 1 for the 'expert_choice' router .*got 2.0"),
])
def test_bad_routed_scaling_factor_raises(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_layer_accepts_the_routers_own_scaling_factor():
    router = TopKRouter(8, 4, 2, routed_scaling_factor=2.0)
    assert MoELayer(8, 4, 4, router=router, routed_scaling_factor=2.0).router is router


def test_pruning_keeps_the_scaling_factor_and_refuses_group_limited_routers():
    """prune_experts computes what the layer computes with the pruned experts masked, scale included."""
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 6, router=TopKRouter(8, 6, 2, routed_scaling_factor=2.5))
    keep = [0, 2, 3, 5]
    pruned = prune_experts(layer, keep)
    assert pruned.router.routed_scaling_factor == 2.5
    mask = torch.zeros(6, dtype=torch.bool)
    mask[keep] = True
    layer.available_experts = mask
    x = torch.randn(10, 8)
    torch.testing.assert_close(pruned(x), layer(x), atol=1e-6, rtol=0)
    grouped = MoELayer(8, 4, 6, router=TopKRouter(8, 6, 2, n_group=3, topk_group=2))
    with pytest.raises(ValueError, match=r"must not be group-limited .* got n_group=3, topk_group=2"):
        prune_experts(grouped, keep)
    with pytest.raises(ValueError, match=r"must not be group-limited"):
        merge_experts(grouped, 0, 1)


# ---- group-limited selection ----


def router_with_scores(probs, bias, **kwargs):
    """A TopKRouter(score="sigmoid") whose d = E identity projection turns x = logit(probs) into these
    sigmoid scores, and whose expert_bias is bias."""
    E = len(bias)
    router = TopKRouter(E, E, score="sigmoid", bias_update_rate=1.0, **kwargs)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(E))
        router.expert_bias.copy_(torch.tensor(bias))
    p = torch.tensor(probs, dtype=torch.float64)
    return router, torch.log(p / (1 - p))


def test_group_limited_hand_computed_case():
    """E=8 in 4 groups {0,1} {2,3} {4,5} {6,7}, keep 2 groups, k=2, scale 2.5.
    token 0: biased scores .9 .1 | .6 .5 | .3 .05 | .5 .7 -> group sums 1.0 1.1 .35 1.2 -> groups 3, 1
        -> experts 7 (.7), 2 (.6); expert 0, the best overall, is in a dropped group.
    token 1: biased .95 .05 | .6 .58 | .4 .85 | .3 .2 -> sums 1.0 1.18 1.25 .5 -> groups 2, 1
        -> experts 5 (.85), 2 (.6): a top-2 sum, not the max (the max would keep group 0).
    Weights from the unbiased scores: expert 4's raw .9 (biased .4) is not chosen."""
    bias = [0, 0, 0, 0, -0.5, 0, 0.2, 0]
    probs = [[0.9, 0.1, 0.6, 0.5, 0.8, 0.05, 0.3, 0.7],
             [0.95, 0.05, 0.6, 0.58, 0.9, 0.85, 0.1, 0.2]]
    router, x = router_with_scores(probs, bias, k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    routing = router(x)
    assert routing.expert_idx.tolist() == [[7, 2], [5, 2]]
    expected = torch.tensor([[0.7, 0.6], [0.85, 0.6]], dtype=torch.float64)
    expected = 2.5 * expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.weights, expected, atol=1e-12, rtol=0)
    plain, _ = router_with_scores(probs, bias, k=2, routed_scaling_factor=2.5)
    plain.load_state_dict(router.state_dict())
    assert plain(x).expert_idx.tolist() == [[0, 7], [0, 5]]  # no groups: the global top-2 of the biased scores


def reference_route(router: TopKRouter, x: torch.Tensor, available=None):
    """One token at a time, in Python floats: the experts (as a set) and their weights."""
    E, G, k = router.num_experts, router.n_group, router.k
    size = E // G
    logits = (x.double() @ router.proj.weight.double().t()).tolist()
    bias = [0.0] * E if router.expert_bias is None else router.expert_bias.double().tolist()
    ok = [True] * E if available is None else available.tolist()
    out = []
    for row in logits:
        if router.score == "softmax":
            z = sum(math.exp(v) for v, a in zip(row, ok, strict=True) if a)
            probs = [math.exp(v) / z if a else 0.0 for v, a in zip(row, ok, strict=True)]
        else:
            probs = [1 / (1 + math.exp(-v)) if a else 0.0 for v, a in zip(row, ok, strict=True)]
        select = [p + b if a else -math.inf for p, b, a in zip(probs, bias, ok, strict=True)]
        group_score = []
        for g in range(G):
            top = sorted(select[g * size:(g + 1) * size], reverse=True)[:2]
            group_score.append(sum(top))
        groups = sorted(range(G), key=lambda g: -group_score[g])[:router.topk_group]
        candidates = [e for e in range(E) if e // size in groups and ok[e]]
        chosen = sorted(candidates, key=lambda e: -select[e])[:k]
        weights = [probs[e] for e in chosen]
        if router.normalize:
            weights = [w / sum(weights) for w in weights]
        out.append({e: router.routed_scaling_factor * w for e, w in zip(chosen, weights, strict=True)})
    return out


def assert_matches(routing, reference, tol):
    for t, expected in enumerate(reference):
        idx = routing.expert_idx[t].tolist()
        assert sorted(idx) == sorted(expected), (t, idx, expected)
        for e, w in zip(idx, routing.weights[t].tolist(), strict=True):
            assert abs(w - expected[e]) <= tol, (t, e, w, expected[e])


@pytest.mark.parametrize(("E", "n_group", "topk_group", "k"), [
    (8, 4, 2, 2), (16, 4, 2, 4), (12, 3, 1, 3), (12, 6, 3, 2), (16, 8, 3, 5), (8, 2, 2, 3), (8, 1, 1, 2)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("biased", [False, True])
def test_group_limited_matches_a_per_token_loop(E, n_group, topk_group, k, score, biased):
    torch.manual_seed(E * n_group + k)
    router = TopKRouter(5, E, k, score=score, n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.5,
                        bias_update_rate=1.0 if biased else 0.0)
    if biased:
        with torch.no_grad():
            router.expert_bias.normal_(0, 0.3)
    x = torch.randn(40, 5, dtype=torch.float64)
    assert_matches(router(x), reference_route(router, x), 1e-12)


def test_n_group_one_is_exactly_plain_top_k():
    torch.manual_seed(0)
    for kwargs in (dict(), dict(score="sigmoid", bias_update_rate=1.0), dict(normalize=False)):
        plain = TopKRouter(6, 8, 3, **kwargs)
        if plain.expert_bias is not None:
            plain.expert_bias.normal_()
        for groups in (dict(n_group=1, topk_group=1), dict(n_group=4, topk_group=4)):
            grouped = TopKRouter(6, 8, 3, **kwargs, **groups)
            grouped.load_state_dict(plain.state_dict())
            x = torch.randn(30, 6)
            a, b = plain(x), grouped(x)
            assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.weights, b.weights)


@st.composite
def group_setups(draw):
    n_group = draw(st.integers(1, 5))
    size = draw(st.integers(1 if n_group == 1 else 2, 4))
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * size))
    return size * n_group, n_group, topk_group, k, draw(st.integers(0, 2**16))


@settings(max_examples=60)
@given(group_setups(), st.sampled_from(["softmax", "sigmoid"]))
def test_chosen_experts_are_the_top_k_of_the_chosen_groups(setup, score):
    E, n_group, topk_group, k, seed = setup
    gen = torch.Generator().manual_seed(seed)
    router = TopKRouter(4, E, k, score=score, n_group=n_group, topk_group=topk_group, bias_update_rate=1.0)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(E, 4, generator=gen))
        router.expert_bias.copy_(0.2 * torch.randn(E, generator=gen))
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        routing = router(x)
    size = E // n_group
    select = routing.probs + router.expert_bias.double()
    group_scores = select.view(16, n_group, size).topk(min(2, size), dim=-1).values.sum(-1)  # size 1: n_group 1
    for t in range(16):
        chosen = set(routing.expert_idx[t].tolist())
        assert len(chosen) == k
        groups = set(group_scores[t].topk(topk_group).indices.tolist())
        assert len({e // size for e in chosen}) <= topk_group
        restricted = torch.tensor([select[t, e] if e // size in groups else -math.inf for e in range(E)])
        assert chosen == set(restricted.topk(k).indices.tolist())


def test_masked_experts_are_never_selected_and_score_minus_inf_in_their_group():
    """Scores .99 .98 | .6 .3 | .3 .05 | .45 .4: group 0 wins (1.97), experts 0 and 1. With expert 0
    masked its group's top-2 sum is -inf (not .98, the top-1 of what is left): the token keeps
    groups 1 (.9) and 3 (.85) and picks 2 and 6, not expert 1 either."""
    probs = [[0.99, 0.98, 0.6, 0.3, 0.3, 0.05, 0.45, 0.4]]
    router, x = router_with_scores(probs, [0.0] * 8, k=2, n_group=4, topk_group=2)
    available = torch.tensor([False] + [True] * 7)
    assert router(x).expert_idx.tolist() == [[0, 1]]
    routing = router(x, available_experts=available)
    assert routing.expert_idx.tolist() == [[2, 6]]
    expected = torch.tensor([[0.6, 0.45]], dtype=torch.float64) / 1.05
    torch.testing.assert_close(routing.weights, expected, atol=1e-12, rtol=0)
    assert_matches(routing, reference_route(router, x, available), 1e-12)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_masked_group_limited_routing_matches_the_loop(score):
    torch.manual_seed(1)
    router = TopKRouter(5, 16, 3, score=score, n_group=4, topk_group=2, bias_update_rate=1.0)
    with torch.no_grad():
        router.expert_bias.normal_(0, 0.3)
    available = torch.ones(16, dtype=torch.bool)
    available[[0, 5, 6, 12, 13, 14, 15]] = False  # group 3 gone, group 1 down to 2, group 0 to 3
    x = torch.randn(60, 5, dtype=torch.float64)
    routing = router(x, available_experts=available)
    assert not available[routing.expert_idx].logical_not().any()
    assert_matches(routing, reference_route(router, x, available), 1e-12)
    layer = MoELayer(5, 4, 16, router=router).double()
    layer.available_experts = available
    layer(x)
    assert not available[layer.last_routing.expert_idx].logical_not().any()


def test_a_mask_leaving_too_few_experts_in_some_kept_groups_raises():
    router = TopKRouter(4, 8, 4, n_group=4, topk_group=2)  # groups of 2, keep 2, k = 4: no expert to spare
    router.check_available(torch.tensor([True] * 6 + [False] * 2))  # a whole group masked: it scores -inf
    # groups 0, 1 with one expert each score -inf: a token keeps groups 2 and 3, four experts
    half = torch.tensor([False, True] * 2 + [True] * 4)
    router.check_available(half)
    routing = router(torch.randn(50, 4), available_experts=half)
    assert sorted(set(routing.expert_idx.flatten().tolist())) == [4, 5, 6, 7]
    bad = torch.tensor([False, True] * 3 + [True] * 2)  # one full group: a token keeps it and a one-expert group
    with pytest.raises(ValueError, match=r"at least k=4 experts in any topk_group=2 groups .* got available "
                                         r"experts per group \[1, 1, 1, 2\]"):
        router.check_available(bad)
    with pytest.raises(ValueError, match=r"available experts per group \[1, 1, 1, 2\]"):
        MoELayer(4, 4, 8, router=router).available_experts = bad


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(n_group=3), ValueError, r"n_group must divide num_experts=8, got n_group=3"),
    (dict(n_group=0), ValueError, r"n_group must be >= 1, got 0"),
    (dict(n_group=2.0), TypeError, r"n_group must be an int, got 2.0"),
    (dict(n_group=4, topk_group=0), ValueError, r"topk_group must be >= 1, got 0"),
    (dict(n_group=4, topk_group=5), ValueError, r"topk_group must be in \[1, n_group=4\], got topk_group=5"),
    (dict(topk_group=2), ValueError, r"topk_group must be in \[1, n_group=1\], got topk_group=2"),
    (dict(n_group=4, topk_group=1), ValueError,
     r"k must be <= topk_group \* num_experts / n_group = 1 \* 2 = 2 .*, got k=3"),
    (dict(n_group=8, topk_group=4), ValueError,
     r"n_group must leave at least 2 experts per group .* got n_group=8 for num_experts=8: groups of 1"),
    (dict(n_group=8, topk_group=8), ValueError, r"n_group must leave at least 2 experts per group"),
])
def test_bad_group_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        TopKRouter(6, 8, 3, **kwargs)


SMALL = dict(vocab_size=16, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_hidden=8, num_experts=8, k=2)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: make_router("noisy_topk", 8, 8, 2, n_group=4, topk_group=2),
     r"n_group and topk_group must be 1 for the 'noisy_topk' router with k=2 .*got n_group=4, topk_group=2"),
    (lambda: make_router("topk", 8, 8, 1, n_group=4, topk_group=2), r"must be 1 for the 'topk' router with k=1"),
    (lambda: make_router("gshard", 8, 8, 2, n_group=2, topk_group=1), r"must be 1 for the 'gshard' router"),
    (lambda: make_router("topk", 8, 8, 4, n_group=4, topk_group=1), r"k must be <= topk_group \* num_experts"),
    (lambda: MoETransformerConfig(**SMALL, n_group=3), r"n_group must divide num_experts=8, got n_group=3"),
    (lambda: MoETransformerConfig(**SMALL, n_group=4, topk_group=5), r"topk_group must be in \[1, n_group=4\]"),
    (lambda: MoETransformerConfig(**SMALL, n_group=8, topk_group=2), r"at least 2 experts per group"),
    (lambda: MoETransformerConfig(**{**SMALL, "k": 5}, n_group=4, topk_group=2), r"= 4 .*got k=5"),
    (lambda: MoETransformerConfig(**SMALL, router="noisy_topk", n_group=2, topk_group=1),
     r"must be 1 for the 'noisy_topk' router"),
])
def test_bad_groups_in_make_router_and_the_config_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_make_router_and_the_config_plumb_the_groups():
    for name in ("topk", "sigmoid_bias"):
        router = make_router(name, 8, 16, 4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
        assert (type(router), router.n_group, router.topk_group, router.group_limited) == (TopKRouter, 4, 2, True)
        assert router.routed_scaling_factor == 2.5 and router.score == ("softmax" if name == "topk" else "sigmoid")
    for name in ("topk", "sigmoid_bias"):
        model = MoETransformer(MoETransformerConfig(**SMALL, router=name, n_group=4, topk_group=2))
        assert [(layer.router.n_group, layer.router.topk_group) for layer in model.moe_layers] == [(4, 2)] * 2
        model(torch.randint(0, 16, (2, 8)))
        for layer in model.moe_layers:  # every token's two experts come from at most 2 of the 4 groups
            groups = layer.last_routing.expert_idx // 2
            assert all(len(set(row)) <= 2 for row in groups.tolist())
    dense = MoETransformerConfig(**SMALL, n_group=4, topk_group=2).dense_equivalent()
    assert (dense.num_experts, dense.n_group, dense.topk_group) == (1, 1, 1)


# ---- Hugging Face's DeepseekV3TopkRouter ----


@pytest.mark.parametrize(("E", "n_group", "topk_group", "k", "seed"), [
    (16, 4, 2, 4, 0), (32, 8, 4, 8, 1), (12, 3, 1, 3, 2), (16, 8, 3, 5, 3), (16, 4, 4, 4, 4)])
def test_matches_hugging_face_deepseek_v3_router(E, n_group, topk_group, k, seed):
    """The gate of HF's DeepseekV3MoE built from a tiny random DeepseekV3Config, with a non-zero
    e_score_correction_bias: the same experts per token (as sets) and the same weights.
    (32, 8, 4, 8) is DeepSeek-V3's grouping (256 experts in 8 groups, 4 kept, k = 8) with 4 experts a group."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = transformers.DeepseekV3Config(
        hidden_size=32, n_routed_experts=E, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1, moe_intermediate_size=8,
        intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=32)
    torch.manual_seed(seed)
    gate = hf.DeepseekV3MoE(config).gate
    with torch.no_grad():
        gate.weight.normal_(0, 0.5)
        gate.e_score_correction_bias.copy_(0.1 * torch.randn(E))
    router = TopKRouter(32, E, k, score="sigmoid", normalize=True, bias_update_rate=1e-3, n_group=n_group,
                        topk_group=topk_group, routed_scaling_factor=2.5)
    with torch.no_grad():
        router.proj.weight.copy_(gate.weight)
        router.expert_bias.copy_(gate.e_score_correction_bias)
    x = torch.randn(2, 64, 32)
    hf_logits, hf_weights, hf_idx = gate(x)
    routing = router(x)
    torch.testing.assert_close(routing.logits, hf_logits, atol=1e-6, rtol=0)
    hf_sorted, hf_order = hf_idx.sort(-1)
    ours_sorted, our_order = routing.expert_idx.sort(-1)
    assert torch.equal(ours_sorted, hf_sorted)
    torch.testing.assert_close(routing.weights.gather(-1, our_order), hf_weights.gather(-1, hf_order),
                               atol=1e-5, rtol=0)
    if topk_group < n_group:  # the groups matter here: plain top-k of the biased scores differs for some tokens
        plain = (routing.probs + router.expert_bias).topk(k).indices.sort(-1).values
        assert not torch.equal(plain, ours_sorted)
