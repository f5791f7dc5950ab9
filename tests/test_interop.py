"""minimoe.interop against Hugging Face transformers' own modules: each family's sparse MoE block
and its MoELayer agree on routing, outputs and gradients (x and every weight) within 1e-5 in
float32; a converted tiny *ForCausalLM keeps its logits; weights round-trip; wrong conversions and
unsupported configurations are caught."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from minimoe import interop  # noqa: E402
from minimoe.inference import restrict_experts  # noqa: E402
from minimoe.layer import MoELayer, moe_layers  # noqa: E402
from minimoe.monitor import RoutingMonitor  # noqa: E402
from minimoe.routing import SwitchRouter, TopKRouter  # noqa: E402

TOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
             max_position_embeddings=64)


def mixtral(**kw):
    # intermediate = hidden: an untransposed down_proj still loads, and must be caught by the comparison
    return transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                      **kw)


def qwen2_moe(shared=32, **kw):
    return transformers.Qwen2MoeConfig(**SMALL | dict(norm_topk_prob=False) | kw, intermediate_size=48,
                                       moe_intermediate_size=16, shared_expert_intermediate_size=shared,
                                       num_experts=8, num_experts_per_tok=2)


def qwen3_moe(**kw):
    return transformers.Qwen3MoeConfig(**SMALL | dict(norm_topk_prob=True) | kw, head_dim=16, intermediate_size=48,
                                       moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3)


def olmoe(**kw):
    return transformers.OlmoeConfig(**SMALL | dict(norm_topk_prob=False, eos_token_id=2) | kw, intermediate_size=16,
                                    num_experts=8, num_experts_per_tok=2)


def deepseek_v3(**kw):
    # layer 0 dense (first_k_dense_replace=1), layer 1 MoE: 8 experts in 4 groups, 2 groups kept, k=3
    routing = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True)
    return transformers.DeepseekV3Config(**SMALL, intermediate_size=48, moe_intermediate_size=16,
                                         routed_scaling_factor=2.5, n_shared_experts=2, first_k_dense_replace=1,
                                         q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                         v_head_dim=16, **routing | kw)


FAMILIES = {  # name -> (config, model class, MoE layers of the 2-layer model)
    "mixtral": (mixtral, transformers.MixtralForCausalLM, 2),
    "qwen2_moe": (qwen2_moe, transformers.Qwen2MoeForCausalLM, 2),
    "qwen3_moe": (qwen3_moe, transformers.Qwen3MoeForCausalLM, 2),
    "olmoe": (olmoe, transformers.OlmoeForCausalLM, 2),
    "deepseek_v3": (deepseek_v3, transformers.DeepseekV3ForCausalLM, 1),
}


@torch.no_grad()
def randomize(block: nn.Module) -> None:
    """Weights large enough that routing is decisive and each part moves the output."""
    for name, p in block.named_parameters():
        p.normal_(0, 0.5 if name.startswith("gate") or "shared_expert_gate" in name else 0.2)
    if isinstance(block, interop.DeepseekV3MoE):
        block.gate.e_score_correction_bias.normal_(0, 0.1)


def build_model(family: str, seed: int = 0, experts: str = "grouped_mm", **config_kw):
    """A tiny random float32 *ForCausalLM in eval mode; experts: HF's experts implementation
    (grouped_mm is its default; eager is the per-expert loop of modeling_*.py)."""
    config, cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config(**config_kw)).float().eval()
    model.set_experts_implementation(experts)
    for block in model.modules():
        if type(block) in interop.BLOCKS:
            randomize(block)
    return model


def moe_block(family: str, experts: str = "grouped_mm", **config_kw) -> nn.Module:
    return build_model(family, experts=experts, **config_kw).model.layers[-1].mlp


def hf_grads(block):
    ex = block.experts
    grads = {"router": block.gate.weight.grad, "gate_up_proj": ex.gate_up_proj.grad, "down_proj": ex.down_proj.grad}
    shared = getattr(block, interop.BLOCKS[type(block)] or "", None)
    if shared is not None:
        grads |= {f"shared.{n}": getattr(shared, n).weight.grad for n in ("gate_proj", "up_proj", "down_proj")}
    if hasattr(block, "shared_expert_gate"):
        grads["shared_gate"] = block.shared_expert_gate.weight.grad
    return grads


def layer_grads_in_hf_layout(layer):
    """The layer's gradients rearranged by hand into HF's layout, for comparison."""
    ex = layer.experts
    grads = {"router": layer.router.proj.weight.grad,
             "gate_up_proj": torch.cat([ex.w_gate.grad, ex.w_up.grad], dim=2).transpose(1, 2),
             "down_proj": ex.w_down.grad.transpose(1, 2)}
    if layer.shared is not None:
        sh = layer.shared
        grads |= {"shared.gate_proj": sh.w_gate.grad.T, "shared.up_proj": sh.w_up.grad.T,
                  "shared.down_proj": sh.w_down.grad.T}
    if layer.shared_gate is not None:
        grads["shared_gate"] = layer.shared_gate.weight.grad
    return grads


def max_diffs(block, layer, seed: int = 1) -> dict:
    """Max |HF - minimoe| of the output, of the combine weights per (token, expert), of the
    gradients of a random projection of the output w.r.t. x and every weight; and whether the
    chosen experts agree."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, block.experts.hidden_dim, generator=gen)
    probe = torch.randn(x.shape, generator=gen)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    block.zero_grad()
    layer.zero_grad()
    out_hf, out = block(x_hf), layer(x_ours)
    (out_hf * probe).sum().backward()
    (out * probe).sum().backward()
    _, hf_weights, hf_idx = block.gate(x.view(-1, x.shape[-1]))
    def dense(idx, w):  # [T, k] ids and weights -> [T, E], order-free
        return torch.zeros(idx.shape[0], layer.num_experts, dtype=torch.float64).scatter_add(1, idx, w.double())

    routing = layer.last_routing
    diffs = {"out": (out_hf - out).abs().max().item(), "x": (x_hf.grad - x_ours.grad).abs().max().item(),
             "same_experts": torch.equal(hf_idx.sort(-1).values, routing.expert_idx.sort(-1).values),
             "weights": (dense(hf_idx, hf_weights.detach()) - dense(routing.expert_idx, routing.weights)).abs().max()
             .item()}
    ours = layer_grads_in_hf_layout(layer)
    for name, grad in hf_grads(block).items():  # a weight the layer lacks counts as a zero gradient
        diffs[name] = (grad - ours.get(name, torch.zeros_like(grad))).abs().max().item()
    return diffs


def assert_close_to_hf(diffs: dict) -> None:
    assert diffs.pop("same_experts"), "the layer routes tokens to other experts than the HF block"
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_routes_and_computes_what_the_hf_block_does(family, experts):
    block = moe_block(family, experts)
    assert block.experts.config._experts_implementation == experts
    layer = interop.from_transformers(block)
    assert isinstance(layer, MoELayer) and layer.training == block.training
    diffs = max_diffs(block, layer)
    assert len(diffs) == {"qwen2_moe": 11, "deepseek_v3": 10}.get(family, 7)  # every weight compared
    assert_close_to_hf(diffs)
    # the layer holds copies: changing it leaves the block alone
    before = block.experts.gate_up_proj.detach().clone()
    with torch.no_grad():
        layer.experts.w_gate.add_(1.0)
    assert torch.equal(block.experts.gate_up_proj, before)


def test_the_hf_routing_settings_are_carried_over():
    mix = interop.from_transformers(moe_block("mixtral")).router
    assert (type(mix), mix.k, mix.score, mix.normalize, mix.expert_bias) == (TopKRouter, 2, "softmax", True, None)
    assert not interop.from_transformers(moe_block("qwen2_moe")).router.normalize
    assert interop.from_transformers(moe_block("qwen3_moe")).router.normalize
    block = moe_block("deepseek_v3")
    ds = interop.from_transformers(block)
    assert (ds.router.score, ds.router.n_group, ds.router.topk_group, ds.router.routed_scaling_factor,
            ds.num_shared_experts) == ("sigmoid", 4, 2, 2.5, 2)
    assert torch.equal(ds.router.expert_bias, block.gate.e_score_correction_bias)
    qwen = interop.from_transformers(moe_block("qwen2_moe"))
    assert (qwen.num_shared_experts, qwen.shared.d_hidden, qwen.shared_gate is not None) == (2, 32, True)


def test_the_layer_takes_the_blocks_dtype():
    block = moe_block("deepseek_v3", "eager").double()  # HF's grouped_mm takes no float64
    layer = interop.from_transformers(block)
    assert layer.experts.w_up.dtype == layer.router.expert_bias.dtype == layer.shared.w_up.dtype == torch.float64
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    # HF's DeepSeek-V3 router runs in float32 whatever the input, minimoe's in float64 here
    torch.testing.assert_close(layer(x), block(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("family", "norm"), [("qwen2_moe", True), ("olmoe", True), ("deepseek_v3", False)])
def test_norm_topk_prob_either_way(family, norm):
    block = moe_block(family, norm_topk_prob=norm)
    layer = interop.from_transformers(block)
    assert layer.router.normalize is norm
    assert_close_to_hf(max_diffs(block, layer))


def swap_gate_and_up(layer, block):
    with torch.no_grad():
        gate = layer.experts.w_gate.clone()
        layer.experts.w_gate.copy_(layer.experts.w_up)
        layer.experts.w_up.copy_(gate)


def untransposed_down_proj(layer, block):
    with torch.no_grad():
        layer.experts.w_down.copy_(block.experts.down_proj)  # [E, d, h] loaded as [E, h, d]: d = h here


def no_renormalisation(layer, block):
    layer.router.normalize = False


def ungated_shared_expert(layer, block):
    layer.shared_gate = None


def no_correction_bias(layer, block):
    layer.router.expert_bias.zero_()


def no_groups(layer, block):
    layer.router.n_group = layer.router.topk_group = 1


def no_scaling(layer, block):
    layer.router.routed_scaling_factor = 1.0


@pytest.mark.parametrize(("family", "mistake"), [
    ("mixtral", swap_gate_and_up), ("mixtral", untransposed_down_proj), ("mixtral", no_renormalisation),
    ("qwen3_moe", no_renormalisation), ("qwen2_moe", ungated_shared_expert), ("deepseek_v3", no_correction_bias),
    ("deepseek_v3", no_groups), ("deepseek_v3", no_scaling)])
def test_a_wrong_conversion_fails_the_comparison(family, mistake):
    block = moe_block(family)
    layer = interop.from_transformers(block)
    assert_close_to_hf(max_diffs(block, layer))
    mistake(layer, block)
    diffs = max_diffs(block, layer)
    assert not diffs["same_experts"] or diffs["out"] > 1e-3, diffs
    with pytest.raises(AssertionError):
        assert_close_to_hf(diffs)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_keeps_its_logits_and_works_with_minimoe_tools(family):
    model = build_model(family)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    before = logits(model, ids)
    assert interop.convert_model(model) is model
    diff = (logits(model, ids) - before).abs().max().item()
    assert diff <= TOL
    layers = moe_layers(model)
    assert len(layers) == FAMILIES[family][2]
    assert not any(type(m) in interop.BLOCKS for m in model.modules())

    monitor = RoutingMonitor(model)
    logits(model, ids)
    assert sorted(record["layer"] for record in monitor.records) == list(range(len(layers)))
    assert all(int(layer.stats.load.sum()) == 24 * layer.k for layer in layers)
    monitor.detach()

    mask = torch.ones(layers[0].num_experts, dtype=torch.bool)
    mask[0] = False
    assert all(layer.stats.load[0] > 0 for layer in layers)  # expert 0 was used ...
    with restrict_experts(model, mask):
        masked = logits(model, ids)
        assert all(layer.stats.load[0] == 0 for layer in layers)  # ... and gets nothing while masked
    assert (masked - before).abs().max() > 1e-4
    torch.testing.assert_close(logits(model, ids), before, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_round_trip_through_the_hf_block(family):
    block = moe_block(family)
    layer = interop.from_transformers(block)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.add_(0.05)
    assert interop.to_transformers(layer, block) is block
    again = interop.from_transformers(block)
    for name, t in layer.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    assert_close_to_hf(max_diffs(block, layer))


def test_to_transformers_refuses_a_layer_of_another_shape():
    layer = interop.from_transformers(moe_block("mixtral"))
    with pytest.raises(ValueError, match=r"OlmoeSparseMoeBlock .*d_hidden: layer 32, block 16"):
        interop.to_transformers(layer, moe_block("olmoe"))
    with pytest.raises(ValueError, match=r"shared_gate: layer False, block True"):
        interop.to_transformers(interop.from_transformers(moe_block("olmoe")), moe_block("qwen2_moe"))
    with pytest.raises(ValueError, match=r"Qwen3MoeSparseMoeBlock .*normalize: layer False, block True"):
        interop.to_transformers(interop.from_transformers(moe_block("qwen3_moe", norm_topk_prob=False)),
                                moe_block("qwen3_moe"))
    switch = MoELayer(32, 32, 8, router=SwitchRouter(32, 8))
    with pytest.raises(TypeError, match=r"TopKRouter .*got SwitchRouter"):
        interop.to_transformers(switch, moe_block("mixtral"))


@pytest.mark.parametrize(("build", "error", "message"), [
    (lambda: interop.from_transformers(nn.Linear(4, 4)), TypeError,
     r"block must be one of MixtralSparseMoeBlock, .*DeepseekV3MoE, got Linear"),
    (lambda: interop.from_transformers(moe_block("mixtral", router_jitter_noise=0.1)), ValueError,
     r"MixtralSparseMoeBlock with router_jitter_noise=0.1 is not supported"),
    (lambda: interop.from_transformers(moe_block("olmoe", hidden_act="gelu")), ValueError,
     r"OlmoeSparseMoeBlock.experts must use hidden_act='silu' .*got GELUActivation"),
    (lambda: interop.from_transformers(moe_block("qwen2_moe", shared=24)), ValueError,
     r"Qwen2MoeSparseMoeBlock: the shared experts' width 24 must be a multiple of the routed experts' 16"),
    (lambda: interop.convert_model(nn.Sequential(nn.Linear(4, 4))), TypeError,
     r"Sequential has no supported sparse MoE block"),
    (lambda: interop.convert_model(moe_block("mixtral")), TypeError, r"is a MixtralSparseMoeBlock itself"),
    (lambda: interop.convert_model(build_model("olmoe", output_router_logits=True)), ValueError,
     r"OlmoeForCausalLM with config.output_router_logits=True is not supported"),
])
def test_unsupported_modules_and_configurations_raise(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(("experts", "n_group", "topk_group", "k"), [(16, 8, 4, 4), (12, 3, 1, 3), (8, 2, 2, 3)])
def test_deepseek_v3_groupings_convert(experts, n_group, topk_group, k):
    """DeepSeek-V3's own grouping (8 groups, 4 kept), a single kept group, and all groups kept
    (plain top-k): the layer routes and computes what the block does."""
    block = moe_block("deepseek_v3", n_routed_experts=experts, n_group=n_group, topk_group=topk_group,
                      num_experts_per_tok=k)
    layer = interop.from_transformers(block)
    assert (layer.router.n_group, layer.router.topk_group, layer.k) == (n_group, topk_group, k)
    assert_close_to_hf(max_diffs(block, layer))
