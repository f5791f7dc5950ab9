"""minimoe.model: parameter counts from the formulas, the loss's parts, causality, generation,
routing statistics and configuration errors."""

import pytest
import torch
import torch.nn.functional as F

from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.routing import NoisyTopKRouter, SwitchRouter, TopKRouter

SMALL = dict(vocab_size=50, seq_len=16, d_model=32, n_layers=3, n_heads=4, d_hidden=24)


def expected_params(c: MoETransformerConfig, active: bool) -> int:
    """The parameter count written out: embeddings, per block two LayerNorms, attention and an
    FFN (SwiGLU: 3 * d * width per FFN), the final LayerNorm; the head is tied."""
    d = c.d_model
    total = c.vocab_size * d + c.seq_len * d + 2 * d
    for i in range(c.n_layers):
        total += 2 * 2 * d + 4 * d * d
        if c.is_moe_block(i):
            experts = c.k if active else c.num_experts
            total += d * c.num_experts + 3 * d * c.d_hidden * (experts + c.num_shared_experts)
        else:
            total += 3 * d * c.active_hidden
    return total


@pytest.mark.parametrize("moe", [
    dict(num_experts=8, k=2), dict(num_experts=16, k=4, num_shared_experts=1, d_hidden=6),
    dict(num_experts=4, k=1, moe_every=2)])
def test_parameter_counts_match_the_formula_and_the_dense_twin_has_the_same_active_count(moe):
    config = MoETransformerConfig(**{**SMALL, **moe})
    model, dense = MoETransformer(config), MoETransformer(config.dense_equivalent())
    assert model.num_params() == expected_params(config, active=False)
    assert model.num_params(active=True) == expected_params(config, active=True)
    n_moe = sum(config.is_moe_block(i) for i in range(config.n_layers))
    # equal active FLOPs: the MoE model differs from its dense twin by the routers only
    assert dense.num_params() == dense.num_params(active=True) == expected_params(config.dense_equivalent(), False)
    assert model.num_params(active=True) - dense.num_params() == n_moe * config.d_model * config.num_experts


def test_moe_every_places_moe_blocks_and_the_router_follows_the_config():
    model = MoETransformer(MoETransformerConfig(**{**SMALL, "n_layers": 4}, num_experts=4, k=1, moe_every=2))
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks] == [False, True, False, True]
    assert all(type(layer.router) is SwitchRouter for layer in model.moe_layers)
    noisy = MoETransformer(MoETransformerConfig(**SMALL, router="noisy_topk"))
    assert all(isinstance(layer.router, NoisyTopKRouter) for layer in noisy.moe_layers)
    sig = MoETransformer(MoETransformerConfig(**SMALL, router="sigmoid_bias", bias_update_rate=0.05))
    assert all(isinstance(r := layer.router, TopKRouter) and r.score == "sigmoid" and r.expert_bias is not None
               for layer in sig.moe_layers)


def test_loss_is_cross_entropy_plus_weighted_router_losses():
    torch.manual_seed(0)
    config = MoETransformerConfig(**SMALL, aux_loss_coef=0.3, z_loss_coef=0.02)
    model = MoETransformer(config)
    idx, targets = torch.randint(50, (2, 16)), torch.randint(50, (2, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 50)
    ce = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))
    aux = sum(layer.aux_loss for layer in model.moe_layers)
    z = sum(layer.z_loss for layer in model.moe_layers)
    assert torch.allclose(loss, ce + 0.3 * aux + 0.02 * z)
    assert torch.allclose(model.last_losses["task"], ce) and torch.allclose(model.last_losses["aux"], aux)
    assert model(idx)[1] is None
    # small init and a tied head: near-uniform predictions, a loss near log(vocab)
    assert abs(float(ce.detach()) - torch.log(torch.tensor(50.0))) < 0.2


def test_a_position_sees_only_itself_and_earlier_positions():
    torch.manual_seed(1)
    model = MoETransformer(MoETransformerConfig(**SMALL)).eval()
    idx = torch.randint(50, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 50
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_routing_stats_and_expert_choices_describe_the_last_call():
    """Against the top-2 of each block's logits, computed here from the block's input."""
    torch.manual_seed(2)
    model = MoETransformer(MoETransformerConfig(**SMALL, num_experts=6, k=2))
    idx = torch.randint(50, (3, 10))
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _layer, args: inputs.append(args[0])) for layer in model.moe_layers]
    choices = model.expert_choices(idx)
    for hook in hooks:
        hook.remove()
    stats = model.routing_stats()
    assert len(choices) == len(stats) == len(inputs) == 3
    for chosen, stat, x, layer in zip(choices, stats, inputs, model.moe_layers, strict=True):
        expected = (x @ layer.router.proj.weight.T).topk(2, dim=-1).indices
        assert chosen.shape == (3, 10, 2) and torch.equal(chosen, expected)
        assert stat.load.tolist() == [expected.reshape(-1).tolist().count(e) for e in range(6)]
        assert stat.tokens == 30 and stat.dropped == 0 and stat.dropped_fraction == 0


def test_router_biases_move_only_for_the_bias_router():
    torch.manual_seed(3)
    idx = torch.randint(50, (4, 16))
    sig = MoETransformer(MoETransformerConfig(**SMALL, router="sigmoid_bias", bias_update_rate=0.05))
    sig(idx)
    loads = [stat.load.float() for stat in sig.routing_stats()]
    sig.update_router_biases()
    for layer, load in zip(sig.moe_layers, loads, strict=True):
        assert torch.allclose(layer.router.expert_bias, 0.05 * torch.sign(load.mean() - load))
    plain = MoETransformer(MoETransformerConfig(**SMALL))
    plain(idx)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.update_router_biases()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


def test_generate_is_deterministic_per_seed_and_crops_its_context():
    torch.manual_seed(4)
    model = MoETransformer(MoETransformerConfig(**SMALL))
    prompt = torch.randint(50, (2, 5))
    a = model.generate(prompt, 30, seed=7)
    assert a.shape == (2, 35) and torch.equal(a[:, :5], prompt)  # 35 > seq_len=16: cropped
    assert torch.equal(a, model.generate(prompt, 30, seed=7))
    assert not torch.equal(a, model.generate(prompt, 30, seed=8))
    greedy = model.generate(prompt, 3, top_k=1)
    with torch.no_grad():
        assert torch.equal(greedy[:, 5], model(prompt)[0][:, -1].argmax(-1))
    assert model.training  # generate restores the mode


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30, n_heads=4), "n_heads must divide d_model=30"),
    (dict(num_experts=4, k=5), "k must be <= num_experts=4"),
    (dict(num_experts=1, k=1, num_shared_experts=1), "num_shared_experts must be 0 in a dense model"),
    (dict(router="hash"), "router"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(n_layers=0), "n_layers"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
])
def test_bad_configs_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoETransformerConfig(**{**SMALL, **kwargs})


def test_bad_inputs_name_the_argument():
    model = MoETransformer(MoETransformerConfig(**SMALL))
    with pytest.raises(ValueError, match="idx must have 1..seq_len=16 positions"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"idx must hold ids in \[0, vocab_size=50\)"):
        model(torch.full((1, 4), 50))
    with pytest.raises(TypeError, match="idx must be int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.int64), 2, temperature=0)
    with pytest.raises(TypeError, match="config"):
        MoETransformer(dict(SMALL))


@pytest.mark.parametrize("moe", [dict(num_experts=8, k=2, num_shared_experts=1), dict(num_experts=1, k=1)])
def test_every_matrix_has_gpt2_init_and_residual_outputs_are_scaled_by_depth(moe):
    """N(0, 0.02) for every matrix, experts and dense / shared FFNs included; attention's `out`
    and every w_down at 0.02 / sqrt(2 n_layers); norms at weight 1, bias 0. Checked on the
    sample std of each matrix (thousands of entries: within 10%)."""
    config = MoETransformerConfig(**{**SMALL, **moe, "d_hidden": 64})
    torch.manual_seed(0)
    model = MoETransformer(config)
    residual = 0.02 / (2 * config.n_layers) ** 0.5
    expected = {}
    for i, block in enumerate(model.blocks):
        ffn = block.ffn.experts if isinstance(block.ffn, MoELayer) else block.ffn
        expected.update({f"blocks.{i}.attn.qkv.weight": 0.02, f"blocks.{i}.attn.out.weight": residual,
                         f"blocks.{i}.ffn.{'experts.' if ffn is not block.ffn else ''}w_gate": 0.02,
                         f"blocks.{i}.ffn.{'experts.' if ffn is not block.ffn else ''}w_up": 0.02,
                         f"blocks.{i}.ffn.{'experts.' if ffn is not block.ffn else ''}w_down": residual})
        if config.num_shared_experts:
            expected.update({f"blocks.{i}.ffn.shared.w_gate": 0.02, f"blocks.{i}.ffn.shared.w_up": 0.02,
                             f"blocks.{i}.ffn.shared.w_down": residual, f"blocks.{i}.ffn.router.proj.weight": 0.02})
    expected.update({"token_embedding.weight": 0.02, "position_embedding.weight": 0.02})
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.dim() >= 2} == set(expected)
    for name, std in expected.items():
        assert params[name].std().item() == pytest.approx(std, rel=0.1), name
        assert abs(params[name].mean().item()) < 0.2 * std, name
    for name, p in params.items():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
