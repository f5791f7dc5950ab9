"""minimoe.model.upcycle (sparse upcycling, Komatsuzaki et al. 2022): right after upcycling, the
MoE transformer computes its dense parent's logits; every copied weight is the parent's."""

import pytest
import torch

from minimoe.model import MoETransformer, MoETransformerConfig, upcycle

DENSE = MoETransformerConfig(vocab_size=50, seq_len=16, d_model=32, n_layers=2, n_heads=4, d_hidden=48,
                             num_experts=1, k=1)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = MoETransformer(DENSE)
    with torch.no_grad():  # a "trained" model: weights unlike any fresh init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("num_experts, k, router", [(4, 2, "topk"), (8, 3, "topk"), (8, 2, "sigmoid_bias")])
def test_upcycled_model_computes_the_dense_logits_and_loss(dense, num_experts, k, router):
    moe = upcycle(dense, num_experts, k, router=router).eval()
    assert (moe.config.num_experts, moe.config.k, moe.config.d_hidden) == (num_experts, k, DENSE.d_hidden)
    assert len(moe.moe_layers) == DENSE.n_layers
    idx = torch.randint(0, DENSE.vocab_size, (4, DENSE.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (dense_logits, _), (moe_logits, _) = dense(idx, idx), moe(idx, idx)
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert moe.last_losses["task"] == pytest.approx(float(dense.last_losses["task"]), abs=1e-5)
    # the routers are new and route tokens unevenly, so the equality is not an accident of uniformity
    assert any(layer.last_routing.weights.std() > 0.01 for layer in moe.moe_layers)


def test_every_weight_but_the_routers_comes_from_the_dense_model(dense):
    moe = upcycle(dense, 4, 2)
    parent = dense.state_dict()
    for name, value in moe.state_dict().items():
        if ".ffn.router." in name:
            continue
        if ".ffn.experts." in name:  # blocks.i.ffn.experts.w_up [E, d, h] <- blocks.i.ffn.w_up [d, h]
            source = parent[name.replace(".experts.", ".")]
            assert all(torch.equal(expert, source) for expert in value), name
        else:
            assert torch.equal(value, parent[name]), name


def test_a_switch_router_does_not_start_at_the_dense_model(dense):
    """k=1 Switch weights are the chosen probability (< 1): the start is scaled, as documented."""
    idx = torch.randint(0, DENSE.vocab_size, (2, DENSE.seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = (upcycle(dense, 4, 1).eval()(idx)[0] - dense(idx)[0]).abs().max()
    assert gap > 1e-3


def test_bad_arguments_are_clear_errors(dense):
    moe = upcycle(dense, 4, 2)
    with pytest.raises(TypeError, match="dense must be a dense MoETransformer .* num_experts=4"):
        upcycle(moe, 8, 2)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(dense, 1, 1)
    with pytest.raises(ValueError, match="changes must not set 'd_hidden'"):
        upcycle(dense, 4, 2, d_hidden=8)
    with pytest.raises(ValueError, match="changes must not set 'moe_every'"):
        upcycle(dense, 4, 2, moe_every=2)
    with pytest.raises(ValueError, match="k must be <= num_experts"):
        upcycle(dense, 4, 5)
