"""Hugging Face transformers' sparse MoE blocks as MoELayers, and back (`pip install minimoe[hf]`).

Supported blocks (transformers 5.x): MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock (with its
sigmoid-gated shared expert), Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock and DeepseekV3MoE
(sigmoid scores, e_score_correction_bias, n_group / topk_group, routed_scaling_factor, shared
experts), all with SiLU (SwiGLU) experts.

  from_transformers(block) -> MoELayer   the same routing and output, the weights copied
  convert_model(model) -> model          every supported block swapped for its MoELayer, in place
  to_transformers(layer, block)          the layer's weights written back into a block of its shape

Weight layouts: HF experts hold gate_up_proj [E, 2h, d] (gate rows first, then up) and
down_proj [E, d, h], used as x @ W.T; minimoe's Experts hold w_gate, w_up [E, d, h] and
w_down [E, h, d], used as x @ W. The router weight [E, d] is the same in both.
Every supported block returns one tensor [B, L, d], as MoELayer does: the layer takes the
block's place in the decoder layer as it is. HF records router logits with hooks on its router
classes, which a converted model no longer has: convert_model refuses output_router_logits.
"""

import torch
from torch import nn

from minimoe.layer import MoELayer
from minimoe.routing import TopKRouter

try:
    from transformers.activations import SiLUActivation
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("minimoe.interop needs transformers >= 4.57: pip install 'minimoe[hf]'") from error

# block class -> the attribute holding its shared experts (None: no shared experts)
BLOCKS = {
    MixtralSparseMoeBlock: None,
    Qwen2MoeSparseMoeBlock: "shared_expert",
    Qwen3MoeSparseMoeBlock: None,
    OlmoeSparseMoeBlock: None,
    DeepseekV3MoE: "shared_experts",
}
BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's; HF never updates the bias, nor does MoELayer unless asked


def _supported(block: nn.Module) -> type:
    if type(block) not in BLOCKS:
        names = ", ".join(cls.__name__ for cls in BLOCKS)
        raise TypeError(f"block must be one of {names}, got {type(block).__name__}")
    return type(block)


def _check_silu(owner: str, act_fn: nn.Module) -> None:
    if not isinstance(act_fn, (SiLUActivation, nn.SiLU)):
        raise ValueError(f"{owner} must use hidden_act='silu' (minimoe's swiglu experts), "
                         f"got {type(act_fn).__name__}")


def _spec(block: nn.Module) -> dict:
    """What the MoELayer of a supported block must be: the layer's shape and routing settings."""
    cls = _supported(block)
    gate, experts = block.gate, block.experts
    name = cls.__name__
    _check_silu(f"{name}.experts", experts.act_fn)
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError(f"{name} with router_jitter_noise={block.jitter_noise} is not supported "
                         "(minimoe's routers have no input jitter): use router_jitter_noise=0")
    spec = dict(d_model=experts.hidden_dim, d_hidden=experts.intermediate_dim, num_experts=experts.num_experts,
                k=gate.top_k, score="softmax", normalize=bool(getattr(gate, "norm_topk_prob", True)),
                routed_scaling_factor=1.0, n_group=1, topk_group=1, biased=False,
                num_shared_experts=0, shared_gate=cls is Qwen2MoeSparseMoeBlock)
    if cls is DeepseekV3MoE:
        spec.update(score="sigmoid", routed_scaling_factor=float(gate.routed_scaling_factor),
                    n_group=gate.num_group, topk_group=gate.topk_group, biased=True)
    if BLOCKS[cls] is not None:
        shared = getattr(block, BLOCKS[cls])
        _check_silu(f"{name}.{BLOCKS[cls]}", shared.act_fn)
        width, h = shared.intermediate_size, spec["d_hidden"]
        if width % h:
            raise ValueError(f"{name}: the shared experts' width {width} must be a multiple of the routed experts' "
                             f"{h} (minimoe's shared experts are num_shared_experts * d_hidden wide)")
        spec["num_shared_experts"] = width // h
    return spec


def _layer_spec(layer: MoELayer) -> dict:
    """The same description read from an MoELayer (TypeError where it cannot be an HF block's)."""
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be an MoELayer, got {type(layer).__name__}")
    router = layer.router
    if type(router) is not TopKRouter or layer.experts.activation != "swiglu":
        raise TypeError(f"layer must have a TopKRouter and swiglu experts to be an HF block, got "
                        f"{type(router).__name__} and {layer.experts.activation}")
    return dict(d_model=layer.d_model, d_hidden=layer.experts.d_hidden, num_experts=layer.num_experts, k=layer.k,
                score=router.score, normalize=router.normalize, routed_scaling_factor=router.routed_scaling_factor,
                n_group=router.n_group, topk_group=router.topk_group, biased=router.expert_bias is not None,
                num_shared_experts=layer.num_shared_experts, shared_gate=layer.shared_gate is not None)


def _minimoe_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's weights under the MoELayer's state_dict names, in minimoe's layout."""
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2h, d], [E, d, h]
    h = down.shape[2]
    tensors = {"router.proj.weight": block.gate.weight,
               "experts.w_gate": gate_up[:, :h].transpose(1, 2), "experts.w_up": gate_up[:, h:].transpose(1, 2),
               "experts.w_down": down.transpose(1, 2)}
    if isinstance(block, DeepseekV3MoE):
        tensors["router.expert_bias"] = block.gate.e_score_correction_bias
    shared_name = BLOCKS[type(block)]
    if shared_name is not None:
        shared = getattr(block, shared_name)
        tensors.update({"shared.w_gate": shared.gate_proj.weight.T, "shared.w_up": shared.up_proj.weight.T,
                        "shared.w_down": shared.down_proj.weight.T})
    if isinstance(block, Qwen2MoeSparseMoeBlock):
        tensors["shared_gate.weight"] = block.shared_expert_gate.weight
    return tensors


def _hf_tensors(layer: MoELayer, block: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's weights under the block's state_dict names, in HF's layout."""
    ex = layer.experts
    tensors = {"gate.weight": layer.router.proj.weight,
               "experts.gate_up_proj": torch.cat([ex.w_gate, ex.w_up], dim=2).transpose(1, 2),
               "experts.down_proj": ex.w_down.transpose(1, 2)}
    if isinstance(block, DeepseekV3MoE):
        tensors["gate.e_score_correction_bias"] = layer.router.expert_bias
    shared_name = BLOCKS[type(block)]
    if shared_name is not None:
        sh = layer.shared
        tensors.update({f"{shared_name}.gate_proj.weight": sh.w_gate.T, f"{shared_name}.up_proj.weight": sh.w_up.T,
                        f"{shared_name}.down_proj.weight": sh.w_down.T})
    if isinstance(block, Qwen2MoeSparseMoeBlock):
        tensors["shared_expert_gate.weight"] = layer.shared_gate.weight
    return tensors


def from_transformers(block: nn.Module) -> MoELayer:
    """An MoELayer computing what the HF sparse MoE block computes, on x [..., d] (HF: [B, L, d]):
    the same experts per token, weights and output, with copies of the block's weights, on its
    device and dtype, in its training mode. DeepSeek-V3's e_score_correction_bias becomes the
    router's expert_bias (bias_update_rate 1e-3, applied only by router.update_bias)."""
    spec = _spec(block)
    weight = block.experts.gate_up_proj
    with torch.device(weight.device):
        router = TopKRouter(spec["d_model"], spec["num_experts"], spec["k"], score=spec["score"],
                            normalize=spec["normalize"], bias_update_rate=BIAS_UPDATE_RATE if spec["biased"] else 0.0,
                            routed_scaling_factor=spec["routed_scaling_factor"], n_group=spec["n_group"],
                            topk_group=spec["topk_group"])
        layer = MoELayer(spec["d_model"], spec["d_hidden"], spec["num_experts"], router=router,
                         num_shared_experts=spec["num_shared_experts"], shared_gate=spec["shared_gate"])
    layer.to(weight.dtype).train(block.training)
    with torch.no_grad():
        layer.load_state_dict(_minimoe_tensors(block))
    return layer


@torch.no_grad()
def to_transformers(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy layer's weights into the HF block, which must have the layer's shape and routing
    (ValueError naming what differs); returns block."""
    expected, got = _spec(block), _layer_spec(layer)
    differ = {key: (got[key], expected[key]) for key in expected if got[key] != expected[key]}
    if differ:
        listed = ", ".join(f"{key}: layer {ours!r}, block {theirs!r}" for key, (ours, theirs) in differ.items())
        raise ValueError(f"layer does not match the {type(block).__name__} it is written into: {listed}")
    block.load_state_dict(_hf_tensors(layer, block))
    return block


def convert_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every supported sparse MoE block of an HF model by its
    `from_transformers` MoELayer (dense MLPs stay); returns model. `minimoe.layer.moe_layers`,
    `RoutingMonitor` and `minimoe.inference` then see the layers. TypeError if the model has no
    supported block; ValueError for config.output_router_logits (HF's router hooks are gone)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) in BLOCKS:
        raise TypeError(f"model is a {type(model).__name__} itself, not a model holding one: use from_transformers")
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError(f"{type(model).__name__} with config.output_router_logits=True is not supported: HF "
                         "collects router logits from its router modules, which the conversion replaces")
    blocks = [(name, module) for name, module in model.named_modules() if type(module) in BLOCKS]
    if not blocks:
        names = ", ".join(cls.__name__ for cls in BLOCKS)
        raise TypeError(f"{type(model).__name__} has no supported sparse MoE block ({names})")
    for name, block in blocks:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, from_transformers(block))
    return model
