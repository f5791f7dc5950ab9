"""Expert feed-forward networks, all E of them held as 3-D weight tensors.

Weights are used as `x @ W`: w_gate, w_up [E, d, h], w_down [E, h, d]. With rows sorted by
expert (see `minimoe.dispatch`), the E matrix products become one grouped matmul over
contiguous row blocks: `torch.nn.functional.grouped_mm` where it supports the dtype and
widths, else one matmul per expert block. Never a Python loop over tokens.
"""

import bisect
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


CHUNK_ELEMENTS = 1 << 20  # _SwiGLUExperts' chunk: rows * max(d, h) numbers, a buffer of 4 MB in fp32


def _chunks(offsets: torch.Tensor, num_rows: int, width: int):
    """(start, end, experts, tokens_per_expert, offsets) of consecutive row chunks of about
    CHUNK_ELEMENTS / width rows, cut anywhere (an expert's block may span chunks). `experts` is
    the slice of experts with rows in the chunk, and the counts and offsets are theirs, on a CPU:
    there grouped_mm runs one product per expert and reads each count on the host anyway, and a
    weight gradient of all E experts per chunk would be mostly zeros (one host read of the
    offsets per call). Elsewhere `experts` is every expert (no host sync)."""
    size = max(1, CHUNK_ELEMENTS // width)
    bounds = offsets.tolist() if offsets.device.type == "cpu" and num_rows > size else None
    for start in range(0, num_rows, size):
        end = min(start + size, num_rows)
        experts = slice(None)
        if bounds is not None:  # first expert whose block ends after start, last one starting before end
            experts = slice(bisect.bisect_right(bounds, start), bisect.bisect_left(bounds, end) + 1)
        chunk_offsets = (offsets[experts] - start).clamp_(0, end - start).to(torch.int32)
        yield start, end, experts, torch.diff(chunk_offsets, prepend=chunk_offsets.new_zeros(1)), chunk_offsets


class _SwiGLUExperts(torch.autograd.Function):
    """E SwiGLU experts, row_weight * (silu(x W_gate) * x W_up) W_down on rows sorted by expert,
    computed in chunks of rows so that no [S, d] buffer exists (S = sorted rows):
      rows None: x [S, d] is the sorted rows; out [S, d].
      rows [S]: sorted row i is x[rows[i]] (x [T, d], the tokens), gathered chunk by chunk, and
        its output is added at out[rows[i]] (out [T, d]): the combine of `unpermute` done here.
    The backward keeps x W_gate and x W_up ([S, h] each, one tensor per chunk; autograd would
    keep silu(gate), the hidden layer and its scaled copy too) and recomputes the hidden layer."""

    @staticmethod
    def forward(ctx, x, rows, row_weights, w_gate, w_up, w_down, offsets):
        num_rows = x.shape[0] if rows is None else rows.shape[0]
        out_rows = num_rows if rows is None else x.shape[0]
        out = x.new_zeros(out_rows, w_down.shape[2])
        gates, ups = [], []
        ctx.chunks = list(_chunks(offsets, num_rows, max(w_down.shape[1:])))
        for start, end, experts, counts, chunk_offsets in ctx.chunks:
            x_chunk = _take(x, rows, start, end)
            gate, up = (_matmul(x_chunk, w[experts], counts, chunk_offsets) for w in (w_gate, w_up))
            del x_chunk  # each [rows, d] buffer is freed before the next one is made
            hidden = F.silu(gate).mul_(up)
            if row_weights is not None:
                hidden.mul_(row_weights[start:end, None])
            _put(out, rows, start, end, _matmul(hidden, w_down[experts], counts, chunk_offsets))
            gates.append(gate)
            ups.append(up)
        ctx.save_for_backward(x, rows, row_weights, w_gate, w_up, w_down, *gates, *ups)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rows, row_weights, w_gate, w_up, w_down, *saved = ctx.saved_tensors
        gates, ups = saved[:len(saved) // 2], saved[len(saved) // 2:]
        grad = grad.contiguous()
        need_x, _, need_weights, need_gate, need_up, need_down, _ = ctx.needs_input_grad
        grad_x = torch.zeros_like(x) if need_x else None
        grad_weights = torch.empty_like(row_weights) if need_weights else None
        weights = {"gate": w_gate, "up": w_up, "down": w_down}
        grad_w = dict.fromkeys(weights)

        def accumulate(name, experts, value):  # value: the gradient of weights[name][experts]
            if grad_w[name] is None and experts == slice(None):
                grad_w[name] = value
            else:
                if grad_w[name] is None:
                    grad_w[name] = torch.zeros_like(weights[name])
                grad_w[name][experts].add_(value)

        for (start, end, experts, counts, chunk_offsets), gate, up in zip(ctx.chunks, gates, ups, strict=True):
            w_gate_e, w_up_e, w_down_e = w_gate[experts], w_up[experts], w_down[experts]
            grad_out = _take(grad, rows, start, end)
            grad_hidden = _matmul(grad_out, w_down_e.transpose(1, 2), counts, chunk_offsets)  # of the unscaled hidden
            if need_weights or need_down:
                hidden = F.silu(gate).mul_(up)  # recomputed
                if need_weights:
                    grad_weights[start:end] = torch.linalg.vecdot(grad_hidden, hidden)
                if need_down:
                    if row_weights is not None:
                        hidden.mul_(row_weights[start:end, None])
                    accumulate("down", experts, _weight_grad(hidden, grad_out, w_down_e, counts, chunk_offsets))
                del hidden
            del grad_out
            if row_weights is not None:
                grad_hidden.mul_(row_weights[start:end, None])
            grad_up = F.silu(gate).mul_(grad_hidden)  # d hidden / d up = silu(gate)
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_hidden.mul_(up), gate, grad_input=grad_hidden)
            if need_x:
                for grad_a, w in ((grad_gate, w_gate_e), (grad_up, w_up_e)):
                    _put(grad_x, rows, start, end, _matmul(grad_a, w.transpose(1, 2), counts, chunk_offsets))
            if need_gate or need_up:
                x_chunk = _take(x, rows, start, end)
                if need_gate:
                    accumulate("gate", experts, _weight_grad(x_chunk, grad_gate, w_gate_e, counts, chunk_offsets))
                if need_up:
                    accumulate("up", experts, _weight_grad(x_chunk, grad_up, w_up_e, counts, chunk_offsets))
        for name, needed in (("gate", need_gate), ("up", need_up), ("down", need_down)):
            if needed and grad_w[name] is None:  # no rows at all: a gradient of zeros, as autograd gives
                grad_w[name] = torch.zeros_like(weights[name])
        return grad_x, None, grad_weights, grad_w["gate"], grad_w["up"], grad_w["down"], None


def _take(x: torch.Tensor, rows: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
    """Sorted rows start:end: of x itself, or x[rows[start:end]]."""
    return x[start:end] if rows is None else x.index_select(0, rows[start:end])


def _put(out: torch.Tensor, rows: torch.Tensor | None, start: int, end: int, value: torch.Tensor) -> None:
    """The transpose of _take: out[start:end] += value, or out[rows[start:end]] += value."""
    if rows is None:
        out[start:end] += value
    else:
        out.index_add_(0, rows[start:end], value)


def feed_forward(x, w_up, w_down, w_gate=None, activation="swiglu", tokens_per_expert=None, row_weights=None,
                 rows=None):
    """The FFN of one expert ([a, b] weights) or of E experts on sorted rows ([E, a, b] weights,
    tokens_per_expert [E] rows per expert). row_weights [S] scales each row's output.
    rows [S] (E experts only): x is then the tokens [T, d] and sorted row i is x[rows[i]],
    gathered inside the first matmul; the output is the tokens' [T, d], row i's output added
    at rows[i] (the combine of `unpermute`), and no [S, d] copy is kept for the backward.

    swiglu: (silu(x W_gate) * x W_up) W_down    (Shazeer 2020, used by Mixtral and DeepSeek)
    gelu / relu: act(x W_up) W_down

    E SwiGLU experts run in `_SwiGLUExperts`: in chunks of rows (each buffer at most about
    4 MB: glibc then reuses freed memory instead of mapping fresh pages for every buffer), and a
    backward that recomputes the activation instead of keeping it.
    """
    grouped = tokens_per_expert is not None
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32) if grouped else None
    if activation == "swiglu" and grouped:
        return _SwiGLUExperts.apply(x, rows, row_weights, w_gate, w_up, w_down, offsets)
    up = (_matmul(x, w_up, tokens_per_expert, offsets) if rows is None
          else _GatheredMatmul.apply(x, rows, w_up, tokens_per_expert, offsets))
    gate = _matmul(x, w_gate, tokens_per_expert, offsets) if activation == "swiglu" else None
    hidden = activate(up, gate, activation)
    if row_weights is not None and hidden.shape[1] <= w_down.shape[-1]:  # scale the narrower side
        hidden, row_weights = hidden * row_weights[:, None], None
    out = _matmul(hidden, w_down, tokens_per_expert, offsets)
    out = out if row_weights is None else out * row_weights[:, None]
    return out if rows is None else out.new_zeros(x.shape[0], out.shape[1]).index_add_(0, rows, out)


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
        """forward without checks. rows [S]: x_sorted is then the tokens [T, d], row i is
        x_sorted[rows[i]] (gathered inside the first matmul), and the output is the tokens'
        [T, d]: row i's output added at rows[i] (the layer's combine, `unpermute`'s sum)."""
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
