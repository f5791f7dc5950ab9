"""The MoE layer: route, plan, permute, run the experts, unpermute; plus shared experts, and the
router losses, the routing and its statistics of the last call."""

import torch
from torch import nn

from minimoe import _checks
from minimoe.dispatch import (
    DROP_POLICIES,
    DispatchPlan,
    _make_plan,
    expert_capacity,
    permute,
    sorted_weights,
    unpermute,
)
from minimoe.experts import Experts, FeedForward, GroupedExperts
from minimoe.losses import _load_balancing_loss, router_z_loss
from minimoe.metrics import MoEStats, routing_stats
from minimoe.routing import ExpertChoiceRouter, Router, Routing, make_router

BACKENDS = ("torch", "triton", "triton_gemm")


def _dispatch_functions(backend: str):
    """(permute, unpermute) of a backend: minimoe.dispatch's torch ops, or minimoe.kernels'
    Triton kernels (imported only when asked for: importing them sets up Triton)."""
    if backend == "triton":
        from minimoe.kernels import triton_permute, triton_unpermute
        return triton_permute, triton_unpermute
    return permute, unpermute


class MoELayer(nn.Module):
    """A sparse FFN. forward(x [..., d_model], token_ids=None) -> same shape as x.

    k: experts per token of the default router, TopKRouter(d_model, num_experts, k) (k=2 when
        None), or SwitchRouter for k=1 (the raw probability as weight: renormalising one weight
        makes it 1 and leaves the router no gradient from the output). k lives on the router
        (`layer.k` reads `router.k`): with a router, leave k out or give the router's.
    routed_scaling_factor: of the default router (DeepSeek-V2/V3, HF's name; 1 when None):
        multiplies the routed experts' combine weights, never the shared experts. Like k, it
        lives on the router: with a router, leave it out or give the router's.
    router: any `minimoe.routing.Router`. A router that routes on token ids (HashRouter) needs
        token_ids [...] (x's leading shape); the others must get None.
    capacity_factor: None is dropless; otherwise each expert takes at most
        ceil(k * T * capacity_factor / E) assignments, chosen by drop_policy ("position" or
        "score"); a dropped assignment adds nothing (the residual stream carries the token).
    num_shared_experts: always-on experts of width d_hidden (DeepSeekMoE), stored as one dense
        FFN of width num_shared_experts * d_hidden, which computes exactly their sum.
    shared_gate: False (default) or True (needs shared experts): `shared_gate`, a bias-free
        Linear d_model -> 1, scales the shared experts' output per token by sigmoid(x @ g)
        (Qwen2-MoE's shared_expert_gate).
    backend: "torch" permutes with index_select / index_add; "triton" with the kernels of
        `minimoe.kernels` (compiled on a GPU, interpreted and slow on CPU), same results;
        "triton_gemm" runs the experts as `minimoe.grouped_gemm.grouped_experts`, gathered
        GEMMs with the combine weight in the epilogue and no permuted copy (needs `Experts`).
    available_experts: None (all experts usable) or a bool [E] tensor, checked when set (e.g. at
        inference, when experts fail or are offloaded); the router never selects a False expert
        and renormalises the weights over the rest (a HashRouter refuses a mask with any False).

    After each call: `aux_loss` (Switch load balancing) and `z_loss` (router z-loss) are
    differentiable scalars; `last_routing` (the `Routing`, detached) and `last_plan` (the
    `DispatchPlan`) are the decision; `stats` is its `MoEStats`, computed when first read. The
    layer never updates the router's balancing bias itself: call
    `layer.router.update_bias(layer.stats.load)` once per training step for aux-loss-free balancing.
    Expert parallelism replaces `experts` from outside (`minimoe.parallel.parallelize`).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int | None = None, *,
                 router: Router | None = None, capacity_factor: float | None = None,
                 drop_policy: str = "position", num_shared_experts: int = 0,
                 activation: str = "swiglu", backend: str = "torch", routed_scaling_factor: float | None = None,
                 shared_gate: bool = False):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        _checks.positive("capacity_factor", capacity_factor, none_means="dropless")
        self.capacity_factor = capacity_factor
        self.drop_policy = _checks.choice("drop_policy", drop_policy, DROP_POLICIES)
        self.backend = _checks.choice("backend", backend, BACKENDS)
        self.num_shared_experts = _checks.positive_int("num_shared_experts", num_shared_experts, minimum=0)

        if router is None:
            router = make_router("topk", d_model, num_experts, 2 if k is None else k,
                                 routed_scaling_factor=1.0 if routed_scaling_factor is None else routed_scaling_factor)
        self.router = router
        self._check_router(k, routed_scaling_factor)
        self.experts: GroupedExperts = Experts(d_model, d_hidden, num_experts, activation)
        self.shared = (FeedForward(d_model, num_shared_experts * d_hidden, activation)
                       if num_shared_experts else None)
        if shared_gate and not num_shared_experts:
            raise ValueError("shared_gate=True needs shared experts to gate, got num_shared_experts=0")
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.last_plan: DispatchPlan | None = None
        self._stats: MoEStats | None = None
        self._available_experts: torch.Tensor | None = None

    def _check_router(self, k: int | None, routed_scaling_factor: float | None) -> None:
        router = self.router
        if not isinstance(router, Router):
            raise TypeError(f"router must be a minimoe.routing.Router, got {type(router).__name__}")
        if (router.d_model, router.num_experts) != (self.d_model, self.num_experts):
            raise ValueError(f"router must map d_model={self.d_model} to num_experts={self.num_experts}, "
                             f"got d_model={router.d_model}, num_experts={router.num_experts}")
        if k is not None and router.k != k:
            raise ValueError(f"k={k} differs from router.k={router.k}: give k to the router only")
        if routed_scaling_factor is not None and getattr(router, "routed_scaling_factor", 1.0) != routed_scaling_factor:
            raise ValueError(f"routed_scaling_factor={routed_scaling_factor} differs from the router's "
                             f"{getattr(router, 'routed_scaling_factor', 1.0)} ({type(router).__name__}): "
                             "give routed_scaling_factor to the router only")
        if isinstance(router, ExpertChoiceRouter) and self.capacity_factor is not None:
            raise ValueError("capacity_factor must be None with an ExpertChoiceRouter, which sets "
                             f"its own capacity (router.capacity_factor), got {self.capacity_factor}")

    @property
    def k(self) -> int | None:
        """Experts per token: the router's k (None for expert choice)."""
        return self.router.k

    @property
    def available_experts(self) -> torch.Tensor | None:
        return self._available_experts

    @available_experts.setter
    def available_experts(self, mask: torch.Tensor | None) -> None:
        self._available_experts = self.router.check_available(mask)

    @property
    def stats(self) -> MoEStats | None:
        """The MoEStats of the last call (None before the first), computed when first read."""
        if self._stats is None and self.last_routing is not None:
            self._stats = routing_stats(self.last_routing, self.last_plan)
        return self._stats

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., d_model] (token_ids [...] for a HashRouter) -> same shape as x.

        The inputs are checked here, once; the steps below trust them. The torch backend's
        experts gather their rows and add each token's outputs up themselves, chunk by chunk
        (SwiGLU: `minimoe.experts.feed_forward`): no permuted [T*k, d] buffer, kept or not.
        What still waits for the device (a host sync, a stall on a GPU), each because a shape or
        a split size depends on the data:
          - with a HashRouter, the range check of token_ids;
          - expert choice: the number of slots per token;
          - the plan, with a capacity or a slot mask only: `nonzero` of the kept assignments
            (S rows) and the boolean selections (dropless top-k routing has S = T * k: no sync);
          - the experts, where torch.nn.functional.grouped_mm cannot run (dtype, widths): the
            split sizes as Python ints (on a CPU, grouped_mm itself reads its offsets, and the
            SwiGLU experts read them once to give each row chunk only its own experts);
          - expert-parallel experts (minimoe.parallel): the split sizes of the two all-to-alls.
        The counts (plan, aux loss) are index_adds, not bincount (which syncs on CUDA). `stats`
        is computed on first read, not here.
        """
        tokens = self.router.flat_tokens(x)  # [T, d]
        token_ids = self.router.check_token_ids(token_ids, x)
        # the router reads a view of x of its own, as router(x) does: gradients then sum in the same order
        routing = self.router._route(x.reshape(tokens.shape), token_ids, self._available_experts)
        capacity = None
        if self.capacity_factor is not None:
            capacity = expert_capacity(tokens.shape[0], self.num_experts, self.k, self.capacity_factor)
        plan = _make_plan(routing.expert_idx, self.num_experts, capacity, self.drop_policy,
                          routing.weights, routing.mask)

        if self.backend == "triton_gemm":
            from minimoe.grouped_gemm import grouped_experts  # imported when asked for: it sets up Triton
            out = grouped_experts(tokens, plan, routing.weights, self.experts)
        else:
            # the combine weights scale rows inside the experts, where it is cheapest
            permute_fn, unpermute_fn = _dispatch_functions(self.backend)
            row_weights = sorted_weights(routing.weights, plan)
            if self.backend == "torch":  # the experts gather their rows and add up each token's outputs
                out = self.experts._forward(tokens, plan.tokens_per_expert, row_weights, rows=plan.token_idx)
            else:
                expert_out = self.experts._forward(permute_fn(tokens, plan), plan.tokens_per_expert, row_weights)
                out = unpermute_fn(expert_out, plan, weights=None)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared

        self.aux_loss = _load_balancing_loss(routing.probs, routing.expert_idx, routing.mask)
        self.z_loss = router_z_loss(routing.logits)
        self.last_routing, self.last_plan, self._stats = _detached(routing), plan, None
        return out.view_as(x)


def _detached(routing: Routing) -> Routing:
    """The same decision, cut from the autograd graph."""
    return Routing(routing.logits.detach(), routing.probs.detach(), routing.expert_idx, routing.weights.detach(),
                   routing.mask)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoELayers of model in module order (the model itself if it is one); [] if none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [module for module in model.modules() if isinstance(module, MoELayer)]
