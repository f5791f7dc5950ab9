"""minimoe.routing.HashRouter (Roller et al. 2021): the fixed table is seeded, balanced and gives
each id distinct experts; routing depends on the token id only; a MoELayer with it equals the
per-token loop; its losses are the constants the docstring promises; token_ids are validated."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layer import output_and_grads, random_input

from minimoe.layer import MoELayer
from minimoe.reference import moe_loop
from minimoe.routing import HashRouter, TopKRouter

D_MODEL, D_HIDDEN, NUM_EXPERTS, VOCAB = 16, 32, 8, 50
X_SHAPE = (2, 12, D_MODEL)


def random_ids(shape=X_SHAPE[:-1], vocab_size: int = VOCAB, seed: int = 3) -> torch.Tensor:
    return torch.randint(vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hash_layer(k: int = 1, **kwargs) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, k, router=HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=k),
                    **kwargs)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

@settings(max_examples=100)
@given(vocab_size=st.integers(1, 300), num_experts=st.integers(1, 16), data=st.data(),
       seed=st.integers(0, 2**32))
def test_table_gives_distinct_experts_and_balanced_loads(vocab_size, num_experts, data, seed):
    """Every id gets k distinct experts; every expert gets floor or ceil of vocab_size * k / E ids."""
    k = data.draw(st.integers(1, num_experts), label="k")
    table = HashRouter(4, num_experts, vocab_size, k=k, seed=seed).table
    assert table.shape == (vocab_size, k) and table.dtype == torch.int64
    assert all(len(set(row)) == k for row in table.tolist())
    counts = torch.bincount(table.reshape(-1), minlength=num_experts).tolist()
    share = vocab_size * k / num_experts
    assert set(counts) <= {math.floor(share), math.ceil(share)}
    assert sum(counts) == vocab_size * k


def test_table_is_deterministic_per_seed_and_saved_in_the_state_dict():
    tables = [HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=2, seed=seed).table for seed in (0, 0, 1)]
    assert torch.equal(tables[0], tables[1])
    assert not torch.equal(tables[0], tables[2])
    other = HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=2, seed=1)
    other.load_state_dict(HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=2, seed=0).state_dict())
    assert torch.equal(other.table, tables[0])


def test_nothing_is_learned():
    router = HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=2)
    assert router.proj is None
    assert list(router.parameters()) == []
    assert list(hash_layer().router.parameters()) == []


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(("dtype", "router_dtype"), [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_routing_is_the_table_row_with_equal_weights_and_uniform_probs(k, dtype, router_dtype):
    router = HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=k)
    ids = random_ids()
    routing = router(torch.randn(X_SHAPE, dtype=dtype), ids)
    T = ids.numel()
    assert torch.equal(routing.expert_idx, router.table[ids.reshape(-1)])
    assert routing.logits.dtype == routing.probs.dtype == routing.weights.dtype == router_dtype
    assert torch.equal(routing.logits, torch.zeros(T, NUM_EXPERTS, dtype=router_dtype))
    assert torch.equal(routing.probs, torch.full((T, NUM_EXPERTS), 1 / NUM_EXPERTS, dtype=router_dtype))
    assert torch.equal(routing.weights, torch.full((T, k), 1 / k, dtype=router_dtype))
    assert routing.mask is None


def test_an_id_goes_to_the_same_experts_whatever_its_context():
    """Id 7 at different positions, in different sequences, next to different tokens and with
    different hidden states always gets the same experts."""
    router = HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=2)
    ids = torch.tensor([[7, 1, 2, 3], [4, 5, 7, 6], [7, 7, 0, 9]])
    routing = router(torch.randn(3, 4, D_MODEL), ids)
    where = (ids.reshape(-1) == 7).nonzero().squeeze(1)
    assert routing.expert_idx[where].tolist() == [router.table[7].tolist()] * 4
    alone = router(torch.randn(1, D_MODEL), torch.tensor([7]))
    assert alone.expert_idx.tolist() == [router.table[7].tolist()]


# ---------------------------------------------------------------------------------------------
# in a MoELayer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "capacity_factor", "drop_policy", "num_shared_experts"), [
    (1, None, "position", 0), (2, None, "position", 1), (1, 0.5, "position", 0), (2, 0.5, "score", 0),
])
def test_layer_matches_loop(k, capacity_factor, drop_policy, num_shared_experts):
    layer = hash_layer(k, capacity_factor=capacity_factor, drop_policy=drop_policy,
                       num_shared_experts=num_shared_experts)
    x, ids = random_input(X_SHAPE), random_ids()
    out, grads = output_and_grads(lambda inp: layer(inp, ids), layer, x)
    ref_out, ref_grads = output_and_grads(lambda inp: moe_loop(layer, inp, ids), layer, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert (layer.stats.dropped_fraction > 0) == (capacity_factor is not None)


@pytest.mark.parametrize("num_experts", [3, 8, 12])
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_one_and_z_loss_is_log_e_squared(num_experts, k):
    """Exact in real numbers; float32 rounding of 1/E leaves a few ulp."""
    router = HashRouter(D_MODEL, num_experts, VOCAB, k=k)
    layer = MoELayer(D_MODEL, D_HIDDEN, num_experts, k, router=router)
    layer(random_input(X_SHAPE), random_ids())
    assert layer.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert layer.z_loss.item() == pytest.approx(math.log(num_experts) ** 2, rel=1e-6)
    assert not layer.aux_loss.requires_grad and not layer.z_loss.requires_grad


def test_layer_load_is_the_table_count_of_the_ids():
    layer = hash_layer(k=2)
    ids = random_ids()
    layer(random_input(X_SHAPE), ids)
    expected = torch.bincount(layer.router.table[ids.reshape(-1)].reshape(-1), minlength=NUM_EXPERTS)
    assert torch.equal(layer.stats.load, expected)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(vocab_size=10.0), TypeError, "vocab_size"),
    (dict(k=0), ValueError, "k"),
    (dict(k=NUM_EXPERTS + 1), ValueError, "k"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(d_model=0), ValueError, "d_model"),
], ids=["vocab_zero", "vocab_float", "k_zero", "k_gt_E", "seed_negative", "seed_str", "experts_zero",
        "d_model_zero"])
def test_router_rejects_bad_config(kwargs, error, argument):
    config = dict(d_model=D_MODEL, num_experts=NUM_EXPERTS, vocab_size=VOCAB) | kwargs
    with pytest.raises(error, match=rf"\b{argument}\b"):
        HashRouter(**config)


def test_layer_rejects_a_hash_router_with_another_k():
    with pytest.raises(ValueError, match=r"\brouter\.k\b"):
        MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, 2, router=HashRouter(D_MODEL, NUM_EXPERTS, VOCAB, k=1))


BAD_IDS = {
    "missing": (None, ValueError),
    "wrong_leading_shape": (random_ids((2, 11)), ValueError),
    "flattened": (random_ids((24,)), ValueError),
    "too_large": (torch.full(X_SHAPE[:-1], VOCAB), ValueError),
    "negative": (torch.full(X_SHAPE[:-1], -1), ValueError),
    "float": (random_ids().float(), TypeError),
    "list": (random_ids().tolist(), TypeError),
}


@pytest.mark.parametrize("forward", ["layer", "moe_loop"])
@pytest.mark.parametrize("case", BAD_IDS)
def test_hash_layer_rejects_bad_token_ids(case, forward):
    token_ids, error = BAD_IDS[case]
    layer = hash_layer()
    run = layer if forward == "layer" else lambda x, ids: moe_loop(layer, x, ids)
    with pytest.raises(error, match=r"\btoken_ids\b"):
        run(random_input(X_SHAPE), token_ids)


@pytest.mark.parametrize("forward", ["layer", "moe_loop"])
def test_token_ids_given_to_a_router_that_ignores_them_are_an_error(forward):
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, 2, router=TopKRouter(D_MODEL, NUM_EXPERTS, 2))
    run = layer if forward == "layer" else lambda x, ids: moe_loop(layer, x, ids)
    with pytest.raises(ValueError, match=r"\btoken_ids\b.*TopKRouter"):
        run(random_input(X_SHAPE), random_ids())
