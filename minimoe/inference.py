"""MoE at inference (chapter 09): route around missing experts, flag uncertain tokens, change
the capacity, prune, merge and int8-quantise experts, and simulate an expert cache.

    with restrict_experts(model, available):        # bool [E] per MoE layer, or one for all
        loss = evaluate(model, corpus)
    small = prune_experts(layer, keep=[0, 2, 5])     # a new layer with 3 experts
    with swap_moe_layers(model, [quantize_experts(layer) for layer in moe_layers(model)]):
        loss_int8 = evaluate(model, corpus)
    simulate_cache(trace, cache_size=4, policy="lru").hit_rate
    freeze(model, "router")                          # then fine-tune the rest

The context managers change a model's MoE layers for the duration of a `with` block and put
them back afterwards, even on an error; the builders return new layers and leave theirs alone.
"""

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.data import Corpus
from minimoe.experts import WEIGHTS, Experts, FeedForward, GroupedExperts, activate
from minimoe.layer import MoELayer, moe_layers
from minimoe.routing import (
    ExpertChoiceRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SwitchRouter,
    TopKRouter,
    check_available_experts,
)
from minimoe.train import Trainer, evaluate

# ---- changing a model's MoE layers for a while ----


@contextmanager
def _override(slots: list, values: list):
    """Set each (object, attribute) slot to its value; restore the old values on exit."""
    old = [getattr(obj, name) for obj, name in slots]
    try:
        for (obj, name), value in zip(slots, values, strict=True):
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name), value in zip(slots, old, strict=True):
            setattr(obj, name, value)


def _layers(model: nn.Module) -> list[MoELayer]:
    """moe_layers(model), which must not be empty."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model must contain an MoELayer, got a {type(model).__name__} without one")
    return layers


def _per_layer(name: str, value, layers: list) -> list:
    """One value for every layer, or a list / tuple with one entry per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != len(layers):
            raise ValueError(f"{name} must have one entry per MoE layer ({len(layers)}), got {len(value)}")
        return list(value)
    return [value] * len(layers)


def restrict_experts(model: nn.Module, available, renormalize: bool = True):
    """Within the block, each MoE layer loses the experts that `available` marks False: a bool
    [E] tensor for every layer, or a list with one per layer (None: all experts available).

    renormalize=True: the layer's `available_experts`; the router picks among the others and
    the weights renormalise over them (the router checks the mask when the layer runs).
    renormalize=False: the router still routes to the lost experts, whose slots are emptied
    (`LostExpertsRouter`): a token keeps its other experts at their old weights.
    """
    layers = _layers(model)
    masks = _per_layer("available", available, layers)
    if renormalize:
        return _override([(layer, "available_experts") for layer in layers], masks)
    return _override([(layer, "router") for layer in layers],
                     [layer.router if mask is None else LostExpertsRouter(layer.router, mask)
                      for layer, mask in zip(layers, masks, strict=True)])


def inference_capacity(model: nn.Module, capacity_factor: float | None = None):
    """Within the block, every MoE layer uses capacity_factor (None: dropless, nothing dropped)."""
    _checks.positive("capacity_factor", capacity_factor, none_means="dropless")
    layers = _layers(model)
    if any(isinstance(layer.router, ExpertChoiceRouter) for layer in layers) and capacity_factor is not None:
        raise ValueError("capacity_factor must be None for a model with ExpertChoiceRouter layers, which set "
                         f"their own capacity, got {capacity_factor}")
    return _override([(layer, "capacity_factor") for layer in layers], [capacity_factor] * len(layers))


def swap_moe_layers(model: nn.Module, new_layers: list):
    """Within the block, model's MoE layers (in `moe_layers` order) are replaced by new_layers."""
    if isinstance(model, MoELayer):
        raise TypeError("model must contain MoE layers to swap, got an MoELayer itself")
    where = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    slots = [where[id(layer)] for layer in _layers(model)]
    new_layers = _per_layer("new_layers", list(new_layers), slots)
    for (parent, name), new in zip(slots, new_layers, strict=True):
        old = getattr(parent, name)
        if not isinstance(new, MoELayer) or new.d_model != old.d_model:
            raise ValueError(f"new_layers must be MoELayers of d_model={old.d_model}, got {new!r:.60}")
    return _override(slots, new_layers)


@torch.no_grad()
def record_routing(model: nn.Module, idx: torch.Tensor) -> list[tuple[torch.Tensor, Routing]]:
    """Run model(idx) and return, per MoE layer, (its input tokens x [T, d], its last_routing)."""
    layers, inputs = _layers(model), {}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: inputs.update({layer: args[0]})) for layer in layers]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return [(inputs[layer].reshape(-1, layer.d_model), layer.last_routing) for layer in layers]


FREEZABLE = ("router", "ffn")


def freeze(model: nn.Module, part: str) -> int:
    """Stop training one part of model (requires_grad = False; an optimiser then skips it, since
    its gradient stays None) and return how many parameters it has:
      "router": every MoE layer's router;
      "ffn": every feed-forward weight: the MoE layers' experts (routed and shared, with any
          shared gate) and the dense FFNs, i.e. everything in an FFN except the routers."""
    _checks.choice("part", part, FREEZABLE)
    chosen = {}
    for module in model.modules():
        if isinstance(module, MoELayer):
            router = {id(w) for w in module.router.parameters()}
            chosen.update({id(w): w for w in module.parameters() if (id(w) in router) == (part == "router")})
        elif isinstance(module, FeedForward) and part == "ffn":
            chosen.update({id(w): w for w in module.parameters()})
    if not chosen:
        raise ValueError(f"model must have parameters in part={part!r}, got a {type(model).__name__} without any")
    for w in chosen.values():
        w.requires_grad_(False)
    return sum(w.numel() for w in chosen.values())


def fine_tune(model: nn.Module, corpus: Corpus, config, part: str | None = None, eval_every: int | None = None,
              eval_batches: int = 2) -> dict:
    """Fine-tune model in place on corpus's train split with `minimoe.train.Trainer(config)`,
    with `freeze(model, part)` first unless part is None, and measure the loss
    (`minimoe.train.evaluate`, eval_batches fixed batches of 32 windows) on the train and the
    val split before training and every eval_every steps (default: only at the end).
    Returns {"step": [...], "train": [...], "val": [...]}, one entry per measurement. The
    Trainer's own validation runs as config says (config.eval_every = config.steps: once)."""
    if part is not None:
        freeze(model, part)
    eval_every = _checks.positive_int("eval_every", eval_every or config.steps)
    trainer = Trainer(model, corpus, config)
    curve = {"step": [], "train": [], "val": []}
    while True:
        curve["step"].append(trainer.step)
        for split in ("train", "val"):
            curve[split].append(evaluate(model, corpus, eval_batches, split=split))
        if trainer.step >= config.steps:
            return curve
        trainer.run(steps=min(eval_every, config.steps - trainer.step), progress=False)


# ---- uncertain tokens ----


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs [T, E] -> [T] entropy of each token's router distribution / log E, in [0, 1]:
    0 = certain (one expert has all the mass), 1 = uniform. Rows are renormalised first
    (sigmoid scores do not sum to 1); 0 * log 0 counts as 0."""
    _checks.tensor("probs", probs, ndim=2)
    if probs.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 experts (columns), got shape {tuple(probs.shape)}")
    p = probs.double() / probs.double().sum(-1, keepdim=True)
    return (-torch.xlogy(p, p).sum(-1) / math.log(probs.shape[1])).to(probs.dtype)


class _WrappedRouter(Router):
    """A router around another: it checks and routes as the inner router does, then `edit`s
    the Routing."""

    def __init__(self, router: Router):
        if not isinstance(router, Router):
            raise TypeError(f"router must be a minimoe.routing.Router, got {type(router).__name__}")
        super().__init__(router.d_model, router.num_experts, router.k, learned=False)
        self.inner = router

    def check_token_ids(self, token_ids, x):
        return self.inner.check_token_ids(token_ids, x)

    def check_available(self, available_experts):
        return self.inner.check_available(available_experts)

    def _route(self, tokens, token_ids, available) -> Routing:
        routing = self.inner._route(tokens, token_ids, available)
        mask = torch.ones_like(routing.expert_idx, dtype=torch.bool) if routing.mask is None else routing.mask.clone()
        return self.edit(routing, mask)


class LostExpertsRouter(_WrappedRouter):
    """Routes as `router` does, then empties every slot that goes to an expert marked False in
    available [E]: the other slots keep their weights, so the lost experts' share of each
    token's output is missing (no renormalisation)."""

    def __init__(self, router: Router, available: torch.Tensor):
        super().__init__(router)
        self.available = check_available_experts(available, router.num_experts, 1)

    def edit(self, routing: Routing, mask: torch.Tensor) -> Routing:
        mask &= self.available.to(mask.device)[routing.expert_idx]
        return Routing(routing.logits, routing.probs, routing.expert_idx, routing.weights * mask, mask)


FALLBACKS = ("top1", "skip")


class FallbackRouter(_WrappedRouter):
    """Routes as `router` does; tokens whose `routing_entropy` exceeds max_entropy (an unsure
    router, as one hopes on out-of-distribution inputs) then get a fallback instead:
      "top1": only their best expert, with weight 1;
      "skip": no routed expert; the layer's shared experts (if any) and the residual carry them.
    `flagged` [T] bool holds the last call's flagged tokens."""

    def __init__(self, router: Router, max_entropy: float, fallback: str = "top1"):
        super().__init__(router)
        if not 0 <= _checks.non_negative("max_entropy", max_entropy) <= 1:
            raise ValueError(f"max_entropy must be in [0, 1] (entropy / log E), got {max_entropy}")
        self.max_entropy = float(max_entropy)
        self.fallback = _checks.choice("fallback", fallback, FALLBACKS)
        self.flagged: torch.Tensor | None = None

    def edit(self, routing: Routing, mask: torch.Tensor) -> Routing:
        self.flagged = flagged = routing_entropy(routing.probs.detach()) > self.max_entropy
        weights = routing.weights
        if self.fallback == "top1":
            mask[flagged, 1:] = False
            first_of_flagged = torch.zeros_like(mask)
            first_of_flagged[flagged, 0] = True
            weights = torch.where(first_of_flagged, torch.ones_like(weights), weights)
        else:
            mask[flagged] = False
        return Routing(routing.logits, routing.probs, routing.expert_idx, weights * mask, mask)


def fallback_routing(model: nn.Module, max_entropy, fallback: str = "top1"):
    """Within the block, every MoE layer's router is wrapped in a FallbackRouter; max_entropy is
    one threshold for all layers or a list with one per layer."""
    layers = _layers(model)
    thresholds = _per_layer("max_entropy", max_entropy, layers)
    return _override([(layer, "router") for layer in layers],
                     [FallbackRouter(layer.router, t, fallback) for layer, t in zip(layers, thresholds, strict=True)])


# ---- smaller layers: pruning and merging ----

PER_EXPERT = ("proj.weight", "noise_proj.weight", "expert_bias")  # router tensors with one row per expert


def _resized_router(router: Router, num_experts: int) -> Router:
    """An untrained router of router's kind and settings with num_experts outputs."""
    d = router.d_model
    if isinstance(router, TopKRouter) and router.group_limited:
        raise ValueError(f"layer.router must not be group-limited to change the experts (its n_group={router.n_group} "
                         "contiguous groups would not survive removing experts), got n_group="
                         f"{router.n_group}, topk_group={router.topk_group}")
    if isinstance(router, SwitchRouter):
        return SwitchRouter(d, num_experts, noise_std=router.noise_std,
                            routed_scaling_factor=router.routed_scaling_factor)
    if isinstance(router, TopKRouter):
        return TopKRouter(d, num_experts, router.k, score=router.score, normalize=router.normalize,
                          noise_std=router.noise_std, bias_update_rate=router.bias_update_rate,
                          routed_scaling_factor=router.routed_scaling_factor)
    if isinstance(router, NoisyTopKRouter):
        return NoisyTopKRouter(d, num_experts, router.k)
    if isinstance(router, ExpertChoiceRouter):
        return ExpertChoiceRouter(d, num_experts, router.capacity_factor)
    raise TypeError(f"layer.router must be a TopKRouter, SwitchRouter, NoisyTopKRouter or ExpertChoiceRouter to "
                    f"change the experts (a HashRouter's table names them), got {type(router).__name__}")


@torch.no_grad()
def _map_experts(layer: MoELayer, num_experts: int, fn) -> MoELayer:
    """A new layer of num_experts experts: each per-expert tensor t [E, ...] (expert weights,
    router rows, biases) becomes fn(t) [num_experts, ...]; the rest is copied."""
    if not isinstance(layer, MoELayer) or not isinstance(layer.experts, Experts):
        raise TypeError(f"layer must be an MoELayer with float Experts, got {type(layer).__name__}")
    router = _resized_router(layer.router, num_experts)
    router.load_state_dict({name: fn(t) if name in PER_EXPERT else t for name, t in layer.router.state_dict().items()})
    new = MoELayer(layer.d_model, layer.experts.d_hidden, num_experts, router=router,
                   capacity_factor=layer.capacity_factor, drop_policy=layer.drop_policy,
                   num_shared_experts=layer.num_shared_experts, activation=layer.experts.activation,
                   backend=layer.backend, shared_gate=layer.shared_gate is not None)
    new.experts.load_state_dict({name: fn(t) for name, t in layer.experts.state_dict().items()})
    if layer.shared is not None:
        new.shared.load_state_dict(layer.shared.state_dict())
    if layer.shared_gate is not None:
        new.shared_gate.load_state_dict(layer.shared_gate.state_dict())
    return new.to(layer.experts.w_up).train(layer.training)  # its device and dtype


def _check_tokens(x, d_model: int) -> torch.Tensor:
    _checks.tensor("x", x, ndim=2)
    if x.shape[1] != d_model:
        raise ValueError(f"x must have d_model={d_model} columns, got shape {tuple(x.shape)}")
    return x


def _expert_list(name: str, value, num_experts: int) -> list[int]:
    ids = torch.as_tensor(value)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D sequence of expert ids, got {value!r}")
    ids = ids.tolist()
    if any(not 0 <= e < num_experts for e in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{name} must hold distinct expert ids in [0, {num_experts}), got {ids}")
    return ids


def prune_experts(layer: MoELayer, keep) -> MoELayer:
    """A new layer with only the experts in keep (new expert i = old expert keep[i]): their
    weights, and the router's rows (and biases) for them, so the router has len(keep) outputs.
    For a softmax or sigmoid top-k router and a dropless layer it computes exactly what `layer`
    computes with available_experts = the kept experts (with a capacity factor it differs: the
    capacity ceil(k T cf / E) depends on E)."""
    keep = _expert_list("keep", keep, layer.num_experts)
    if len(keep) < (layer.k or 1):
        raise ValueError(f"keep must list at least k={layer.k or 1} experts, got {len(keep)}")
    index = torch.tensor(keep)
    return _map_experts(layer, len(keep), lambda t: t[index.to(t.device)])


@torch.no_grad()
def expert_similarity(layer: MoELayer, x: torch.Tensor | None = None) -> torch.Tensor:
    """[E, E] cosine similarity between experts: of their weights (each expert's matrices
    flattened into one vector), or, given tokens x [T, d], of their outputs on all of x
    (each expert's [T, d] outputs flattened)."""
    ex = layer.experts
    if x is None:
        flat = torch.cat([w.flatten(1) for w in (ex.w_gate, ex.w_up, ex.w_down) if w is not None], dim=1)
    else:
        _check_tokens(x, layer.d_model)
        counts = torch.full((ex.num_experts,), x.shape[0], device=x.device)
        flat = ex(x.repeat(ex.num_experts, 1), counts).view(ex.num_experts, -1)
    return F.cosine_similarity(flat[:, None], flat[None], dim=-1)


def _hidden(experts: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's hidden activations on x [T, d] -> [T, h]."""
    gate = None if experts.w_gate is None else x @ experts.w_gate[e]
    return activate(x @ experts.w_up[e], gate, experts.activation)


@torch.no_grad()
def align_hidden_units(experts: Experts, i: int, j: int, x: torch.Tensor) -> torch.Tensor:
    """Permutation perm [h] of expert j's hidden units that pairs each unit u of expert i with
    the unit perm[u] of j most like it (cosine similarity of their activations on x [T, d]),
    greedily, best pair first. Permuting hidden units leaves an expert's function unchanged."""
    i, j = _expert_list("(i, j)", [i, j], experts.num_experts)
    _check_tokens(x, experts.d_model)
    sim = F.cosine_similarity(_hidden(experts, i, x).T[:, None], _hidden(experts, j, x).T[None], dim=-1)
    perm = torch.empty(sim.shape[0], dtype=torch.int64, device=sim.device)
    for _ in range(sim.shape[0]):
        u, v = divmod(int(sim.argmax()), sim.shape[1])
        perm[u] = v
        sim[u, :], sim[:, v] = -math.inf, -math.inf
    return perm


def merge_experts(layer: MoELayer, i: int, j: int, x: torch.Tensor | None = None) -> MoELayer:
    """A new layer with E - 1 experts: expert i becomes the average of experts i and j (weights,
    router rows and biases alike) and expert j is removed; the experts after j move down one.
    Given calibration tokens x [T, d], j's hidden units are first permuted to line up with i's
    (`align_hidden_units`, as in MC-SMoE, Li et al. 2024); without x they are averaged as stored."""
    i, j = _expert_list("(i, j)", [i, j], layer.num_experts)
    if layer.num_experts - 1 < (layer.k or 1):
        raise ValueError(f"layer must keep at least k={layer.k or 1} experts after a merge, has {layer.num_experts}")
    if x is not None:
        perm = align_hidden_units(layer.experts, i, j, x)
        layer = _map_experts(layer, layer.num_experts, lambda t: t)  # a copy to permute
        with torch.no_grad():
            for name in WEIGHTS:
                w = getattr(layer.experts, name)
                if w is not None:
                    w[j] = w[j][perm] if name == "w_down" else w[j][:, perm]
    others = torch.tensor([e for e in range(layer.num_experts) if e != j])

    def merge(t):
        t = t.clone()
        t[i] = (t[i] + t[j]) / 2
        return t[others.to(t.device)]
    return _map_experts(layer, layer.num_experts - 1, merge)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (Frobenius norms)."""
    _checks.tensor("approx", approx)
    _checks.tensor("exact", exact)
    _checks.same_shape("approx", approx, exact.shape, "exact")
    return float((approx - exact).norm() / exact.norm())


# ---- int8 weight-only experts ----


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [..., n_in, n_out] (used as x @ w) ->
    (q [..., n_in, n_out] int8, scale [..., 1, n_out]), scale = max_i |w[i, j]| / 127
    (1 for an all-zero column), q = round(w / scale). Each weight is off by at most scale / 2."""
    _checks.tensor("w", w)
    if w.dim() < 2 or not w.dtype.is_floating_point:
        raise ValueError(f"w must be a floating tensor with at least 2 dimensions, got {w.dtype} {tuple(w.shape)}")
    amax = w.detach().abs().amax(dim=-2, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w.detach() / scale).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., n_in, n_out] int8, scale [..., 1, n_out] -> q * scale in scale's dtype."""
    _checks.tensor("q", q)
    _checks.tensor("scale", scale)
    if q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {q.dtype}")
    return q.to(scale.dtype) * scale


class Int8Experts(GroupedExperts):
    """Weight-only int8 experts built from float `Experts`: each weight [E, a, b] is kept as an
    int8 buffer `<name>_q` and a float scale `<name>_scale` [E, 1, b] (`quantize_int8`). The
    properties w_gate, w_up, w_down dequantise; forward runs the float FFN on them, so it is
    a drop-in replacement for `layer.experts`."""

    def __init__(self, experts: Experts):
        super().__init__()
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be a minimoe.experts.Experts, got {type(experts).__name__}")
        self.num_experts, self.d_model = experts.num_experts, experts.d_model
        self.d_hidden, self.activation = experts.d_hidden, experts.activation
        for name in WEIGHTS:
            w = getattr(experts, name)
            q, scale = (None, None) if w is None else quantize_int8(w)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def _weight(self, name: str) -> torch.Tensor | None:
        q = getattr(self, f"{name}_q")
        return None if q is None else dequantize_int8(q, getattr(self, f"{name}_scale"))

    w_gate = property(lambda self: self._weight("w_gate"))
    w_up = property(lambda self: self._weight("w_up"))
    w_down = property(lambda self: self._weight("w_down"))


def quantize_experts(layer: MoELayer) -> MoELayer:
    """A copy of layer whose experts are `Int8Experts` (router and shared experts stay float)."""
    new = _map_experts(layer, layer.num_experts, lambda t: t)
    new.experts = Int8Experts(new.experts)
    return new


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of module."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


LIPSCHITZ = {"swiglu": 1.0999, "gelu": 1.1290, "relu": 1.0}  # max |act'(z)|: silu at z ~ 2.40, gelu at sqrt(2)


@torch.no_grad()
def int8_error_bound(x: torch.Tensor, experts: Experts, e: int) -> torch.Tensor:
    """Bound [T, d] on |expert e with int8 weights (x) - expert e (x)| per entry, in exact
    arithmetic, from |w_q - w| <= scale / 2 for every weight (`quantize_int8`).

    A product x @ W is then off by at most ||x||_1 * scale_j / 2 in column j. SwiGLU:
    |silu(g') u' - silu(g) u| <= L eps_g (|u| + eps_u) + |silu(g)| eps_u with L = max |silu'|;
    gelu / relu: L eps_u. The down projection: eps_h @ (|W_down| + s/2) + ||h||_1 * s/2.
    """
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be a minimoe.experts.Experts, got {type(experts).__name__}")
    _check_tokens(x, experts.d_model)
    e = _expert_list("e", [e], experts.num_experts)[0]
    w = {name: getattr(experts, name)[e] for name in WEIGHTS if getattr(experts, name) is not None}
    half = {name: quantize_int8(weight)[1] / 2 for name, weight in w.items()}  # [1, b] per matrix
    x_l1 = x.abs().sum(-1, keepdim=True)
    lipschitz = LIPSCHITZ[experts.activation]
    up, eps_up = x @ w["w_up"], x_l1 * half["w_up"]
    gate = x @ w["w_gate"] if "w_gate" in w else None
    hidden = activate(up, gate, experts.activation)
    if gate is None:
        eps_hidden = lipschitz * eps_up
    else:
        eps_hidden = lipschitz * x_l1 * half["w_gate"] * (up.abs() + eps_up) + F.silu(gate).abs() * eps_up
    return eps_hidden @ (w["w_down"].abs() + half["w_down"]) + hidden.abs().sum(-1, keepdim=True) * half["w_down"]


# ---- expert cache ----

CACHE_POLICIES = ("lru", "belady", "belady_bypass", "static")


@dataclass
class CacheStats:
    """Outcome of replaying a trace: hits + misses = number of requests."""

    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


def _requests(trace) -> tuple[torch.Tensor, list[int]]:
    """trace [N, k] of non-negative integer expert ids -> (trace, its requests in row order)."""
    trace = torch.as_tensor(trace)
    _checks.tensor("trace", trace, ndim=2)
    if trace.dtype.is_floating_point or trace.dtype == torch.bool or (trace.numel() and trace.min() < 0):
        raise ValueError(f"trace must hold non-negative integer expert ids, got dtype {trace.dtype}")
    return trace, trace.reshape(-1).tolist()


def simulate_cache(trace, cache_size: int, policy: str = "lru") -> CacheStats:
    """Replay trace [N, k] (the experts that step n needs, e.g. one token at one layer, in
    execution order) against a cache of cache_size experts; requests are served one by one,
    in row order. A miss reads the expert from slow memory (one load, whether or not it is
    then kept).

    policy="lru": cache every missed expert, evicting the least recently used one.
    policy="belady": cache every missed expert, evicting the one whose next request is furthest
        away (never requested again counts as furthest): the fewest misses of any cache that
        admits every missed expert (Belady, 1966), an oracle that needs the future.
    policy="belady_bypass": the same oracle, but it may also bypass the cache: a missed expert
        whose next request is further away than that of every cached expert is read for this
        one use and not cached. The fewest misses of any cache that starts empty: at most
        those of every other policy here ("static" plus its fill loads).
    policy="static": the cache starts filled with the cache_size most requested experts of the
        whole trace (ties: lower id; these fill loads are not counted as misses) and never
        changes; other experts are read for one use, not cached.
    """
    trace, requests = _requests(trace)
    cache_size = _checks.positive_int("cache_size", cache_size)
    _checks.choice("policy", policy, CACHE_POLICIES)
    if policy == "static":
        counts = torch.bincount(trace.reshape(-1).long())
        cached = set(counts.argsort(descending=True, stable=True)[:cache_size].tolist())
        hits = sum(e in cached for e in requests)
        return CacheStats(hits, len(requests) - hits)
    next_use, seen = [0] * len(requests), {}
    for n in range(len(requests) - 1, -1, -1):
        next_use[n] = seen.get(requests[n], math.inf)
        seen[requests[n]] = n
    cache, hits = OrderedDict(), 0  # expert -> its next request (belady); order = recency (lru)
    for n, e in enumerate(requests):
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        elif len(cache) == cache_size:
            victim = next(iter(cache)) if policy == "lru" else max(cache, key=cache.get)
            if policy == "belady_bypass" and next_use[n] >= cache[victim]:
                continue  # read for this use only: every cached expert is needed sooner
            del cache[victim]
        cache[e] = next_use[n]
    return CacheStats(hits, len(requests) - hits)


@dataclass
class PrefetchStats:
    """Outcome of `simulate_prefetch`: hits + misses = requests; a miss makes the token wait for
    its expert, a prefetch loads an expert before it is asked for (hidden behind computation
    when it arrives in time). loads = misses + prefetches experts moved in all."""

    hits: int
    misses: int
    prefetches: int

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def loads(self) -> int:
        return self.misses + self.prefetches


def simulate_prefetch(trace, cache_size: int, prefetch=None) -> PrefetchStats:
    """An LRU cache of cache_size experts for one MoE layer, step by step, that can prefetch.

    trace [N, k]: the experts step n needs (one token at this layer), all at once; prefetch
    [N, p] (p <= cache_size; -1 = no guess) or None: experts to load before step n.
    Step n first loads its guesses that are absent (prefetches, counted apart from misses),
    then serves its requests: the cached ones are hits, the others are loaded on demand
    (misses: the token waits). Each load evicts the least recently used expert outside the
    set being loaded or served (with k <= cache_size); guesses and requests count as used.

    A right guess turns a miss into a prefetch, a load that can overlap earlier computation
    when the guess is made early enough, e.g. from the previous layer: the next layer's router
    applied to this layer's input (Eliseev and Mazur, 2023). A wrong one moves an expert for
    nothing and may evict a useful one. Without prefetch this is LRU with a step's requests
    served together (for k = 1 the same as `simulate_cache(trace, cache_size, "lru")`).
    """
    trace, _ = _requests(trace)
    cache_size = _checks.positive_int("cache_size", cache_size)
    guesses = torch.full((trace.shape[0], 0), -1) if prefetch is None else torch.as_tensor(prefetch)
    _checks.tensor("prefetch", guesses, ndim=2)
    if guesses.dtype.is_floating_point or guesses.dtype == torch.bool or (guesses.numel() and guesses.min() < -1):
        raise ValueError(f"prefetch must hold integer expert ids or -1 (no guess), got dtype {guesses.dtype}")
    if guesses.shape[0] != trace.shape[0] or guesses.shape[1] > cache_size:
        raise ValueError(f"prefetch must have shape [{trace.shape[0]}, p] with p <= cache_size={cache_size}, got "
                         f"{tuple(guesses.shape)}")
    cache = OrderedDict()  # cached experts, least recently used first

    def serve(experts: list[int]) -> int:
        """Load the absent experts, then make all of them the most recently used, in list
        order; the number loaded."""
        experts = list(dict.fromkeys(e for e in experts if e >= 0))
        absent = [e for e in experts if e not in cache]
        for e in experts:
            if e in cache:
                cache.move_to_end(e)  # out of the eviction's way
        for e in absent:
            if len(cache) == cache_size:
                cache.popitem(last=False)
            cache[e] = None
        for e in experts:
            cache.move_to_end(e)
        return len(absent)

    requests, prefetches, misses = trace.numel(), 0, 0
    for guess, need in zip(guesses.tolist(), trace.tolist(), strict=True):
        prefetches += serve(guess)
        misses += serve(need)
    return PrefetchStats(requests - misses, misses, prefetches)


# ---- batched decoding ----


def expected_distinct_experts(num_experts: int, k: int, batch_size: int) -> float:
    """Expected number of distinct experts that batch_size tokens touch when each picks k of
    num_experts experts uniformly at random, independently: E (1 - (1 - k/E)^B), since one
    token leaves a given expert out with probability 1 - k/E."""
    E = _checks.positive_int("num_experts", num_experts)
    k = _checks.positive_int("k", k)
    if k > E:
        raise ValueError(f"k must be <= num_experts={E}, got {k}")
    B = _checks.positive_int("batch_size", batch_size, minimum=0)
    return E * (1 - (1 - k / E) ** B)


def random_topk_trace(num_tokens: int, num_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """[num_tokens, k] int64: each row k distinct experts drawn uniformly (a router that knows
    nothing about its tokens)."""
    T = _checks.positive_int("num_tokens", num_tokens)
    expected_distinct_experts(num_experts, k, 1)  # checks num_experts and k
    scores = torch.rand(T, num_experts, generator=torch.Generator().manual_seed(seed))
    return scores.topk(k, dim=-1).indices


def distinct_experts(trace, batch_size: int, num_batches: int = 1000, seed: int = 0) -> torch.Tensor:
    """[num_batches] int64: the number of distinct experts in each of num_batches batches of
    batch_size rows of trace [N, k], each drawn at random without replacement (a decode step
    serving batch_size requests, one token each)."""
    trace, _ = _requests(trace)
    B = _checks.positive_int("batch_size", batch_size)
    if B > trace.shape[0]:
        raise ValueError(f"batch_size must be <= the trace's {trace.shape[0]} rows, got {B}")
    num_batches = _checks.positive_int("num_batches", num_batches)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(trace.shape[0], generator=gen)[:B] for _ in range(num_batches)])
    experts = trace[rows].reshape(num_batches, -1)  # [batches, B k]
    width = int(trace.max()) + 1 if trace.numel() else 1
    touched = torch.zeros(num_batches, width, dtype=torch.bool)
    touched.scatter_(1, experts, True)
    return touched.sum(-1)
