"""The MoE layer: route, dispatch, run the experts, combine; plus shared experts and the
router losses and statistics of the last call."""

from dataclasses import dataclass

import torch
from torch import nn

from minimoe import _checks
from minimoe.dispatch import POLICIES, expert_capacity, make_plan, permute, sorted_weights, unpermute
from minimoe.experts import Experts, FeedForward
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.metrics import load_entropy
from minimoe.routing import ExpertChoiceRouter, Router, SwitchRouter, TopKRouter

BACKENDS = ("torch", "triton")


def _dispatch_functions(backend: str):
    """(permute, unpermute) of a backend: minimoe.dispatch's torch ops, or minimoe.kernels'
    Triton kernels (imported only when asked for: importing them sets up Triton)."""
    if backend == "triton":
        from minimoe.kernels import triton_permute, triton_unpermute
        return triton_permute, triton_unpermute
    return permute, unpermute


def route_and_plan(layer, x: torch.Tensor, token_ids: torch.Tensor | None = None):
    """The first half of an MoE forward, shared by MoELayer and the expert-parallel layer:
    x [..., d] -> (tokens [T, d], Routing, DispatchPlan) with the layer's router,
    available_experts, capacity_factor and drop_policy."""
    _checks.tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != layer.d_model:
        raise ValueError(f"x must have last dimension d_model={layer.d_model}, got shape {tuple(x.shape)}")
    tokens = x.reshape(-1, layer.d_model)
    routing = layer.router.route(x, token_ids, layer.available_experts)
    capacity = None
    if layer.capacity_factor is not None:
        capacity = expert_capacity(tokens.shape[0], layer.num_experts, layer.k, layer.capacity_factor)
    plan = make_plan(routing.expert_idx, layer.num_experts, capacity, layer.drop_policy,
                     routing.weights, routing.mask)
    return tokens, routing, plan


@dataclass
class MoEStats:
    """Detached routing statistics of one forward call.

    tokens_per_expert  [E] assignments the router sent to each expert, before capacity
    load               [E] the same as fractions (sums to 1)
    dropped_fraction   share of assignments dropped by capacity (0 when dropless)
    load_entropy       entropy of `load` / log E: 1 = perfectly even, 0 = one expert takes all
    """

    tokens_per_expert: torch.Tensor
    load: torch.Tensor
    dropped_fraction: float
    load_entropy: float


class MoELayer(nn.Module):
    """A sparse FFN. forward(x [..., d_model], token_ids=None) -> same shape as x.

    router: any `minimoe.routing.Router`; default TopKRouter(d_model, num_experts, k), and for
        k=1 SwitchRouter (the raw probability as weight: renormalising one weight makes it 1 and
        leaves the router no gradient from the output). A router that routes on token ids
        (HashRouter) needs token_ids [...] (x's leading shape); the others must get None.
    capacity_factor: None is dropless; otherwise each expert takes at most
        ceil(k * T * capacity_factor / E) assignments, chosen by drop_policy ("position" or
        "score"); a dropped assignment adds nothing (the residual stream carries the token).
    num_shared_experts: always-on experts of width d_hidden (DeepSeekMoE), stored as one dense
        FFN of width num_shared_experts * d_hidden, which computes exactly their sum.
    backend: "torch" permutes with index_select / index_add; "triton" with the kernels of
        `minimoe.kernels` (compiled on a GPU, interpreted and slow on CPU), same results.
    After each call: `aux_loss` (Switch load balancing) and `z_loss` (router z-loss) are
    differentiable scalars; `stats` is a detached `MoEStats`. The layer never updates the
    router's balancing bias itself: call `layer.router.update_bias(layer.stats.tokens_per_expert)`
    once per training step for aux-loss-free balancing.
    available_experts: None (all experts usable) or a bool [E] tensor, set as an attribute
        (e.g. at inference, when experts fail or are offloaded); every call passes it to the
        router, which never selects a False expert and renormalises the weights over the rest
        (`minimoe.routing`; a HashRouter refuses a mask that excludes any expert).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *,
                 router: Router | None = None, capacity_factor: float | None = None,
                 drop_policy: str = "position", num_shared_experts: int = 0,
                 activation: str = "swiglu", backend: str = "torch"):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = _checks.positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        _checks.positive("capacity_factor", capacity_factor, none_means="dropless")
        self.capacity_factor = capacity_factor
        self.drop_policy = _checks.choice("drop_policy", drop_policy, POLICIES)
        self.backend = _checks.choice("backend", backend, BACKENDS)
        _checks.positive_int("num_shared_experts", num_shared_experts, minimum=0)

        if router is None:
            router = SwitchRouter(d_model, num_experts) if k == 1 else TopKRouter(d_model, num_experts, k)
        self.router = router
        self._check_router()
        self.experts = Experts(num_experts, d_model, d_hidden, activation)
        self.shared = (FeedForward(d_model, num_shared_experts * d_hidden, activation)
                       if num_shared_experts else None)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None
        self.available_experts: torch.Tensor | None = None

    def _check_router(self) -> None:
        router = self.router
        if not isinstance(router, Router):
            raise TypeError(f"router must be a minimoe.routing.Router, got {type(router).__name__}")
        if (router.d_model, router.num_experts) != (self.d_model, self.num_experts):
            raise ValueError(f"router must map d_model={self.d_model} to num_experts={self.num_experts}, "
                             f"got d_model={router.d_model}, num_experts={router.num_experts}")
        if hasattr(router, "k") and router.k != self.k:
            raise ValueError(f"k={self.k} differs from router.k={router.k}: pass the same k to both")
        if isinstance(router, ExpertChoiceRouter) and self.capacity_factor is not None:
            raise ValueError("capacity_factor must be None with an ExpertChoiceRouter, which sets "
                             f"its own capacity (router.capacity_factor), got {self.capacity_factor}")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens, routing, plan = route_and_plan(self, x, token_ids)
        # the combine weights scale rows inside the experts, where it is cheapest
        permute_fn, unpermute_fn = _dispatch_functions(self.backend)
        expert_out = self.experts(permute_fn(tokens, plan), plan.tokens_per_expert,
                                  sorted_weights(routing.weights, plan))
        out = unpermute_fn(expert_out, plan, weights=None)
        if self.shared is not None:
            out = out + self.shared(tokens)

        self.aux_loss = load_balancing_loss(routing.probs, routing.expert_idx, routing.mask)
        self.z_loss = router_z_loss(routing.logits)
        self.stats = self._stats(routing.expert_idx, routing.mask, plan.order.numel())
        return out.view_as(x)

    def _stats(self, expert_idx: torch.Tensor, mask: torch.Tensor | None, num_kept: int) -> MoEStats:
        ids = expert_idx if mask is None else expert_idx[mask]
        routed = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        total = int(routed.sum())
        if total == 0:  # no tokens: nothing dropped, and no imbalance
            even = torch.full((self.num_experts,), 1 / self.num_experts, dtype=torch.float64)
            return MoEStats(routed, even, 0.0, 1.0)
        return MoEStats(routed, routed.double() / total, 1.0 - num_kept / total, load_entropy(routed))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoELayers of model in module order (the model itself if it is one)."""
    if isinstance(model, MoELayer):
        return [model]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    if not layers:
        raise ValueError(f"model must contain an MoELayer, got a {type(model).__name__} without one")
    return layers
