"""Expert feed-forward networks, all E of them held as 3-D weight tensors.

Weights are used as `x @ W`: w_gate, w_up [E, d, h], w_down [E, h, d]. With rows sorted by
expert (see `minimoe.dispatch`), the E matrix products become one grouped matmul over
contiguous row blocks: `torch.nn.functional.grouped_mm` where it supports the dtype and
widths, else one matmul per expert block. Never a Python loop over tokens.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks

ACTIVATIONS = ("swiglu", "gelu", "relu")
WEIGHTS = ("w_gate", "w_up", "w_down")  # the experts' matrices (w_gate: swiglu only, else None)


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm takes fp32/bf16/fp16 (bf16 only on CUDA) with row strides of 16-byte multiples."""
    dtypes = (torch.bfloat16,) if x.is_cuda else (torch.float32, torch.bfloat16, torch.float16)
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    return (hasattr(F, "grouped_mm") and x.device.type in ("cpu", "cuda") and x.dtype in dtypes
            and w.dtype == x.dtype and aligned)


def _matmul(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor | None,
            offsets: torch.Tensor | None = None) -> torch.Tensor:
    """x [S, a] @ w: w [a, b] for a dense FFN, or w [E, a, b] applied to consecutive row blocks
    of sizes tokens_per_expert [E] (offsets: their int32 cumulative sum, if already at hand)."""
    if tokens_per_expert is None:
        return x @ w
    if _grouped_mm_supported(x, w):
        if offsets is None:
            offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        return F.grouped_mm(x.contiguous(), w, offs=offsets)
    # the split sizes must be Python ints (a host sync); unbind, not w[e]: each w[e]'s backward
    # would build a whole [E, a, b] gradient
    splits = tokens_per_expert.tolist()
    return torch.cat([rows @ w_e for rows, w_e in zip(x.split(splits), w.unbind(0), strict=True)])


def activate(up: torch.Tensor, gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The hidden layer from up = x W_up and, for swiglu, gate = x W_gate (None otherwise)."""
    if activation == "swiglu":
        return F.silu(gate) * up
    return F.gelu(up) if activation == "gelu" else F.relu(up)


def _weight_grad(a: torch.Tensor, grad: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
    """The gradient of w [E, a, b] in a @ w per expert block: a_e^T @ grad_e (a [S, a], grad [S, b])."""
    if _grouped_mm_supported(a, w):
        return F.grouped_mm(a.t(), grad, offs=offsets)
    splits = tokens_per_expert.tolist()
    return torch.stack([r.t() @ g for r, g in zip(a.split(splits), grad.split(splits), strict=True)])


class _GatheredMatmul(torch.autograd.Function):
    """x[rows] @ w per expert block (x [T, a], rows [S], w [E, a, b]) without keeping the
    gathered [S, a] copy for the backward, which gathers again for the weight gradient."""

    @staticmethod
    def forward(ctx, x, rows, w, tokens_per_expert, offsets):
        ctx.save_for_backward(x, rows, w, tokens_per_expert, offsets)
        return _matmul(x.index_select(0, rows), w, tokens_per_expert, offsets)

    @staticmethod
    def backward(ctx, grad):
        x, rows, w, tokens_per_expert, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [S, a] buffers one at a time: this one is freed first
            grad_x = torch.zeros_like(x).index_add_(0, rows, _matmul(grad, w.transpose(1, 2), tokens_per_expert,
                                                                     offsets))
        if ctx.needs_input_grad[2]:
            grad_w = _weight_grad(x.index_select(0, rows), grad, w, tokens_per_expert, offsets)
        return grad_x, None, grad_w, None, None


class _SwiGLUDown(torch.autograd.Function):
    """The second half of E SwiGLU experts: gate_up [S, 2h] (x W_gate, x W_up side by side),
    w_down [E, h, d], row_weights [S] or None -> row_weight * (silu(gate) * up) @ W_down [S, d].
    The backward keeps only gate_up (autograd would keep silu(gate), the hidden layer and its
    scaled copy, three more [S, h]) and recomputes the hidden layer from it."""

    @staticmethod
    def forward(ctx, gate_up, w_down, row_weights, tokens_per_expert, offsets):
        gate, up = gate_up.chunk(2, -1)
        hidden = F.silu(gate).mul_(up)
        if row_weights is not None and hidden.shape[1] <= w_down.shape[2]:  # scale the narrower side
            hidden.mul_(row_weights[:, None])
        out = _matmul(hidden, w_down, tokens_per_expert, offsets)
        if row_weights is not None and hidden.shape[1] > w_down.shape[2]:
            out.mul_(row_weights[:, None])
        ctx.save_for_backward(gate_up, w_down, row_weights, tokens_per_expert, offsets)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate_up, w_down, row_weights, tokens_per_expert, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        gate, up = gate_up.chunk(2, -1)
        # one [S, h] buffer besides gate_up and its gradient, whose two halves hold the hidden
        # layer (recomputed) and silu(gate) in turn before their own gradients
        grad_hidden = _matmul(grad, w_down.transpose(1, 2), tokens_per_expert, offsets)  # of the unscaled hidden
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, -1)
        grad_weights = grad_w_down = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            hidden = F.silu(grad_up.copy_(gate), inplace=True).mul_(up)  # unscaled: out = w * hidden @ W_down
            if row_weights is not None:
                if ctx.needs_input_grad[2]:
                    grad_weights = torch.linalg.vecdot(grad_hidden, hidden)
                hidden.mul_(row_weights[:, None])
            if ctx.needs_input_grad[1]:
                grad_w_down = _weight_grad(hidden, grad, w_down, tokens_per_expert, offsets)
        if row_weights is not None:
            grad_hidden.mul_(row_weights[:, None])
        F.silu(grad_up.copy_(gate), inplace=True).mul_(grad_hidden)  # d hidden / d up = silu(gate)
        torch.ops.aten.silu_backward.grad_input(grad_hidden.mul_(up), gate, grad_input=grad_gate)
        return grad_gate_up, grad_w_down, grad_weights, None, None


def feed_forward(x, w_up, w_down, w_gate=None, activation="swiglu", tokens_per_expert=None, row_weights=None,
                 rows=None):
    """The FFN of one expert ([a, b] weights) or of E experts on sorted rows ([E, a, b] weights,
    tokens_per_expert [E] rows per expert). row_weights [S] scales each row's output; being
    linear in the hidden activation, the scaling is applied to the narrower of hidden and output.
    rows [S] (E experts only): the sorted rows are x[rows], gathered inside the first matmul,
    and the backward keeps x instead of an [S, d] copy (except wide swiglu experts, below).

    swiglu: (silu(x W_gate) * x W_up) W_down    (Shazeer 2020, used by Mixtral and DeepSeek)
    gelu / relu: act(x W_up) W_down

    Narrow experts' swiglu (h <= d, fine-grained ones) runs W_gate and W_up as one grouped
    matmul of [E, d, 2h] (the weights concatenated per call; on a CPU half as many small
    per-expert products) where grouped_mm takes W_up, then `_SwiGLUDown`, whose backward
    recomputes the activation instead of keeping it. Wide experts (h > d) gather x[rows] once and
    run W_gate and W_up as two products: no [E, d, 2h] weight copy and no strided halves of a
    [S, 2h] buffer (mixtral-like shape: 15% faster and 11% less peak memory than the fused way).
    """
    grouped = tokens_per_expert is not None
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32) if grouped else None

    def first(w):  # x (gathered by rows) @ w
        if rows is None:
            return _matmul(x, w, tokens_per_expert, offsets)
        return _GatheredMatmul.apply(x, rows, w, tokens_per_expert, offsets)

    if activation == "swiglu" and grouped and w_down.shape[1] <= w_down.shape[2]:  # narrow experts, h <= d
        gate_up = (first(torch.cat([w_gate, w_up], -1)) if _grouped_mm_supported(x, w_up)
                   else torch.cat([first(w_gate), first(w_up)], -1))
        return _SwiGLUDown.apply(gate_up, w_down, row_weights, tokens_per_expert, offsets)
    if activation == "swiglu" and rows is not None:  # wide experts: two products read one gathered copy
        x, rows = x.index_select(0, rows), None
    gate = first(w_gate) if activation == "swiglu" else None
    up = first(w_up)
    hidden = activate(up, gate, activation)
    if row_weights is not None and hidden.shape[1] <= x.shape[1]:
        hidden, row_weights = hidden * row_weights[:, None], None
    out = _matmul(hidden, w_down, tokens_per_expert, offsets)
    return out if row_weights is None else out * row_weights[:, None]


def _init_uniform(shape: tuple, fan_in: int) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear initialises its weight."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class GroupedExperts(nn.Module):
    """What MoELayer calls: E expert FFNs on rows sorted by expert. Subclasses hold d_model,
    d_hidden, num_experts, activation and the weights w_gate (swiglu only), w_up [E, d, h],
    w_down [E, h, d]: `Experts` (float), `minimoe.inference.Int8Experts`, and
    `minimoe.parallel.ExpertParallelExperts` (this rank's E / W of them, and the all-to-alls).

    forward(x_sorted [S, d], tokens_per_expert [E], row_weights [S] or None) -> [S, d], row i
    scaled by row_weights[i] when given: it checks its inputs (the sum of tokens_per_expert
    costs a host sync) and calls `_forward`, which MoELayer calls directly with its plan's counts.
    """

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                row_weights: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("x_sorted", x_sorted, ndim=2)
        if x_sorted.shape[1] != self.d_model:
            raise ValueError(f"x_sorted must have {self.d_model} columns (d_model), got {x_sorted.shape[1]}")
        _checks.tensor("tokens_per_expert", tokens_per_expert, ndim=1)
        _checks.same_shape("tokens_per_expert", tokens_per_expert, (self.num_experts,), "num_experts")
        if int(tokens_per_expert.sum()) != x_sorted.shape[0]:
            raise ValueError(f"tokens_per_expert must sum to the {x_sorted.shape[0]} rows of x_sorted, "
                             f"got {int(tokens_per_expert.sum())}")
        if row_weights is not None:
            _checks.tensor("row_weights", row_weights)
            _checks.same_shape("row_weights", row_weights, x_sorted.shape[:1], "x_sorted's rows")
        return self._forward(x_sorted, tokens_per_expert, row_weights)

    def _forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                 row_weights: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """forward without checks. rows [S]: x_sorted is then the tokens [T, d] and row i is
        x_sorted[rows[i]] (gathered inside the first matmul)."""
        if row_weights is not None:
            row_weights = row_weights.to(x_sorted.dtype)
        return feed_forward(x_sorted, self.w_up, self.w_down, self.w_gate, self.activation,
                            tokens_per_expert, row_weights, rows)


class Experts(GroupedExperts):
    """E independent FFNs of width d_hidden, as float parameters w_gate (swiglu only), w_up
    [E, d, h] and w_down [E, h, d]. forward: see `GroupedExperts`."""

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, activation: str = "swiglu"):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.activation = _checks.choice("activation", activation, ACTIVATIONS)
        E, d, h = num_experts, d_model, d_hidden
        self.w_gate = _init_uniform((E, d, h), d) if activation == "swiglu" else None
        self.w_up = _init_uniform((E, d, h), d)
        self.w_down = _init_uniform((E, h, d), h)


class FeedForward(nn.Module):
    """A dense FFN with the same weight layout as one expert: w_gate, w_up [d, h], w_down [h, d].
    Used for shared experts and dense baselines. forward(x [..., d]) -> [..., d]."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.d_hidden = _checks.positive_int("d_hidden", d_hidden)
        self.activation = _checks.choice("activation", activation, ACTIVATIONS)
        self.w_gate = _init_uniform((d_model, d_hidden), d_model) if activation == "swiglu" else None
        self.w_up = _init_uniform((d_model, d_hidden), d_model)
        self.w_down = _init_uniform((d_hidden, d_model), d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        return feed_forward(x, self.w_up, self.w_down, self.w_gate, self.activation)
