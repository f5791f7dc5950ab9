"""The experts as a Triton grouped GEMM that gathers its input rows itself and applies the combine
weight in its epilogue, so no permuted copy of the tokens is ever written (the structure of
vLLM's fused MoE kernel).

Rows. A `DispatchPlan` sorts the S kept assignments by expert: sorted row i is assignment
a = plan.order[i] = t * k + j, of expert e(i). Outside the kernel every tensor stays in token
order: the input a [T, K] (one row per token) or [T*k, K] (one row per assignment), the output
[T*k, N] (one row per assignment, zero where the plan dropped it).

Tiles. `tile_schedule` cuts each expert's block of sorted rows into tiles of BLOCK_M rows; the
last tile of an expert is padded, its rows past the expert's end masked off, so a tile never
holds two experts' rows. Program (tile, n) computes one [BLOCK_M, BLOCK_N] block of output:
    out[a_r] = (A[src_r] @ W[e]) * w_r  for the tile's rows r,
loading A's rows through the plan's indices (src = a // k for token rows, a for assignment
rows) and looping tl.dot over K in steps of BLOCK_K; the epilogue scales each row by its combine
weight w_r = weights[t, j] (when given) and stores it at row a of the output.

Combine. The down GEMM writes one weighted row per assignment ([T, k, d]) and torch sums over
k. Atomic adds into [T, d] would save that buffer, but on a GPU atomics add in a different order
on every run (results not reproducible bit for bit) and Triton's float atomics are limited to
fp32/fp16; the sum over k is deterministic and reads the rows in slot order, like the combine
kernel of `minimoe.kernels`.

Backward (torch ops, not kernels): with G = dL/dout gathered to sorted order,
    dA[src_r] += w_r * G_r W[e]^T,  dW[e] = sum over e's rows of A[src_r]^T (w_r G_r)
    (`expert_weight_grad`),  dw_r = <G_r W[e]^T, A[src_r]>.
It gathers A's rows into a sorted copy, which a fused backward kernel would avoid.

Block sizes. BLOCK_M is chosen on the host (the schedule depends on it): 16 under the
interpreter, 64 on a GPU. On a GPU `triton.autotune` picks BLOCK_N, BLOCK_K, warps and stages
per (N, K, BLOCK_M) on the first call of each shape; the interpreter uses one fixed config.

`MODE` says how the kernel runs: "compiled" (CUDA), "interpreted" (TRITON_INTERPRET=1 was set
before triton was first imported: CPU tensors, slowly, for tests and learning) or "torch" (no
Triton, or neither of those: the same function computed with torch ops). This module never
sets TRITON_INTERPRET itself (importing `minimoe.kernels` does, when no GPU is present).
"""

import torch

from minimoe import _checks
from minimoe.dispatch import DispatchPlan
from minimoe.experts import Experts, _matmul, activate

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what tl.dot multiplies

if triton is not None:

    @triton.jit
    def _gather_matmul_kernel(a_ptr, w_ptr, out_ptr, weights_ptr, order_ptr, tiles_ptr, ends_ptr,
                              K, N, ROWS_PER_SOURCE, HAS_WEIGHTS: tl.constexpr, FP32_DOT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[a_r, cols] = (A[a_r // ROWS_PER_SOURCE] @ W[e])[cols] (* weights[a_r]) for the
        rows r of tile program_id(0) = (expert e, first sorted row), columns of block program_id(1)."""
        tile = tl.program_id(0)
        expert = tl.load(tiles_ptr + 2 * tile)
        rows = tl.load(tiles_ptr + 2 * tile + 1) + tl.arange(0, BLOCK_M)
        in_tile = rows < tl.load(ends_ptr + expert)  # the padding of the expert's last tile
        assignment = tl.load(order_ptr + rows, mask=in_tile, other=0)
        source = assignment // ROWS_PER_SOURCE  # the gather: the row of A this output row reads
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_tile = w_ptr + expert * K * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + source[:, None] * K + ks[None, :], mask=in_tile[:, None] & (ks[None, :] < K),
                        other=0.0)
            w = tl.load(w_tile + ks[:, None] * N, mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            if FP32_DOT:  # full float32 precision, not TF32
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if HAS_WEIGHTS:  # the epilogue: the combine weight of each row
            acc = acc * tl.load(weights_ptr + assignment, mask=in_tile, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + assignment[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=in_tile[:, None] & (cols[None, :] < N))

    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_gather_matmul_kernel, InterpretedFunction):
        # triton.language's own @jit helpers run interpreted only if TRITON_INTERPRET was set
        # before triton.language was first imported (see minimoe.kernels)
        MODE = "interpreted" if isinstance(tl.sum, InterpretedFunction) else "torch"
    elif torch.cuda.is_available():
        MODE = "compiled"
        _TUNED_KERNEL = triton.autotune(
            configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)
                     for n, k, warps, stages in [(64, 32, 4, 4), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3),
                                                 (256, 64, 8, 3), (32, 32, 2, 4)]],
            key=["K", "N", "BLOCK_M"])(_gather_matmul_kernel)
    else:
        MODE = "torch"
else:
    MODE = "torch"

DEFAULT_BLOCK_M = 64 if MODE == "compiled" else 16  # tl.dot needs every block dimension >= 16


def tile_schedule(tokens_per_expert: torch.Tensor, block_m: int) -> torch.Tensor:
    """[n_tiles, 2] int64 (expert, first sorted row) of every tile, expert by expert, rows
    ascending: expert e has ceil(n_e / block_m) tiles starting at offset_e, offset_e + block_m,
    ..., where offset_e = n_0 + ... + n_(e-1). An expert with no row has no tile."""
    _checks.tensor("tokens_per_expert", tokens_per_expert, ndim=1)
    if tokens_per_expert.dtype.is_floating_point or tokens_per_expert.dtype == torch.bool:
        raise TypeError(f"tokens_per_expert must hold integer counts, got dtype {tokens_per_expert.dtype}")
    if tokens_per_expert.numel() and int(tokens_per_expert.min()) < 0:
        raise ValueError(f"tokens_per_expert must be >= 0, got {tokens_per_expert.tolist()}")
    block_m = _checks.positive_int("block_m", block_m)
    counts = tokens_per_expert.long()
    tiles = (counts + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    offset = torch.cumsum(counts, 0) - counts
    index_in_expert = torch.arange(expert.numel(), device=counts.device) - first_tile[expert]
    return torch.stack([expert, offset[expert] + block_m * index_in_expert], 1)


def expert_weight_grad(a: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor,
                       tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """[E, K, N]: dW[e] = sum over the sorted rows i of expert e of a[rows[i]]^T grad[i], the
    gradient of the gathered GEMM out_i = a[rows[i]] @ W[e(i)] for its weights. a [R, K], rows
    [S] int64, grad [S, N], tokens_per_expert [E] summing to S (rows grouped by expert)."""
    _checks.tensor("a", a, ndim=2)
    _checks.tensor("rows", rows, ndim=1)
    _checks.tensor("grad", grad, ndim=2)
    _checks.tensor("tokens_per_expert", tokens_per_expert, ndim=1)
    if grad.shape[0] != rows.numel() or int(tokens_per_expert.sum()) != rows.numel():
        raise ValueError(f"grad's rows ({grad.shape[0]}) and tokens_per_expert's sum "
                         f"({int(tokens_per_expert.sum())}) must equal rows' length {rows.numel()}")
    return _expert_weight_grad(a, rows, grad, tokens_per_expert)


def _expert_weight_grad(a, rows, grad, tokens_per_expert):
    gathered = a.index_select(0, rows)
    splits = tokens_per_expert.tolist()  # a host sync: the split sizes
    return torch.stack([x_e.t() @ g_e for x_e, g_e in zip(gathered.split(splits), grad.split(splits), strict=True)])


def _sources(a: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, int]:
    """(rows of a that the sorted rows read [S], assignments per row of a: k or 1)."""
    per_source = plan.kept.shape[1] if a.shape[0] == plan.kept.shape[0] else 1
    return plan.order // per_source, per_source


def _launch(a, w, weights, plan, block_m):
    """The kernel's [T*k, N] output (zero rows where dropped) on checked, contiguous inputs."""
    num_assignments, (K, N) = plan.kept.numel(), w.shape[1:]
    dropless = plan.order.numel() == num_assignments  # then the kernel writes every row
    out = a.new_empty(num_assignments, N) if dropless and K else a.new_zeros(num_assignments, N)
    tiles = tile_schedule(plan.tokens_per_expert, block_m)
    if tiles.numel() == 0 or N == 0 or K == 0:
        return out
    ends = torch.cumsum(plan.tokens_per_expert, 0)
    _, per_source = _sources(a, plan)
    flat_weights = a if weights is None else weights.reshape(-1)  # an unused pointer when no weights
    args = (a, w, out, flat_weights, plan.order, tiles, ends, K, N, per_source)
    # Triton 3.9's interpreter gets tl.dot of bfloat16 blocks wrong: it multiplies them in float32
    # instead, which gives the same (products of bfloat16 numbers are exact in float32)
    fp32_dot = a.dtype == torch.float32 or (MODE == "interpreted" and a.dtype == torch.bfloat16)
    meta = dict(HAS_WEIGHTS=weights is not None, FP32_DOT=fp32_dot, BLOCK_M=block_m)
    with torch.cuda.device_of(a):
        if MODE == "compiled":
            _TUNED_KERNEL[lambda cfg: (tiles.shape[0], triton.cdiv(N, cfg["BLOCK_N"]))](*args, **meta)
        else:  # the interpreter: one fixed config, as few programs as the widths allow
            block_n, block_k = (max(16, min(triton.next_power_of_2(n), 64)) for n in (N, K))
            _gather_matmul_kernel[(tiles.shape[0], triton.cdiv(N, block_n))](*args, **meta, BLOCK_N=block_n,
                                                                             BLOCK_K=block_k)
    return out


def _torch_forward(a, w, weights, plan):
    """What the kernel computes, with torch ops."""
    sources, _ = _sources(a, plan)
    rows = _matmul(a.index_select(0, sources), w, plan.tokens_per_expert)
    if weights is not None:
        rows = rows * weights.reshape(-1)[plan.order].to(rows.dtype)[:, None]
    return a.new_zeros(plan.kept.numel(), w.shape[2]).index_copy(0, plan.order, rows)


def _runs_kernel(t: torch.Tensor) -> bool:
    return MODE == "interpreted" or (MODE == "compiled" and t.is_cuda)


class _GatherMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w, weights, plan, block_m):
        ctx.save_for_backward(a, w, weights)
        ctx.plan = plan
        if _runs_kernel(a):
            return _launch(a.contiguous(), w.contiguous(), None if weights is None else weights.contiguous(),
                           plan, block_m)
        return _torch_forward(a, w, weights, plan)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, w, weights = ctx.saved_tensors
        plan = ctx.plan
        sources, _ = _sources(a, plan)
        g = grad.index_select(0, plan.order)  # [S, N], sorted
        ga = _matmul(g, w.transpose(1, 2), plan.tokens_per_expert)  # G_r W[e]^T, [S, K]
        grad_weights = None
        if weights is not None:
            if ctx.needs_input_grad[2]:
                dots = (ga * a.index_select(0, sources)).sum(1).to(weights.dtype)
                grad_weights = weights.new_zeros(weights.numel()).index_copy(0, plan.order, dots).view_as(weights)
            row_weights = weights.reshape(-1)[plan.order].to(g.dtype)[:, None]
            g, ga = g * row_weights, ga * row_weights
        grad_a = a.new_zeros(a.shape).index_add(0, sources, ga) if ctx.needs_input_grad[0] else None
        grad_w = _expert_weight_grad(a, sources, g, plan.tokens_per_expert) if ctx.needs_input_grad[1] else None
        return grad_a, grad_w, grad_weights, None, None


def _check_plan(plan) -> None:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a minimoe.dispatch.DispatchPlan, got {type(plan).__name__}")


def gather_matmul(a: torch.Tensor, w: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None = None,
                  block_m: int | None = None) -> torch.Tensor:
    """[T*k, N]: row a = t * k + j is A[src] @ w[e] (times weights[t, j] when given) for each
    assignment the plan kept, with e its expert; zero where the plan dropped it.

    a: [T, K] token rows (src = t) or [T*k, K] assignment rows (src = t * k + j), float32,
       float16 or bfloat16; w [E, K, N] of the same dtype; weights [T, k] or None.
    block_m: rows per tile, a power of two >= 16 (None: DEFAULT_BLOCK_M). Differentiable in a, w and
    weights (the backward uses torch ops)."""
    _check_plan(plan)
    num_tokens, k = plan.kept.shape
    _checks.tensor("a", a, ndim=2)
    if a.shape[0] not in (num_tokens, num_tokens * k):
        raise ValueError(f"a must have T={num_tokens} rows (tokens) or T*k={num_tokens * k} rows (assignments), "
                         f"got {a.shape[0]}")
    if a.dtype not in DTYPES:
        raise TypeError(f"a must be float32, float16 or bfloat16, got {a.dtype}")
    _checks.tensor("w", w, ndim=3)
    expected = (plan.tokens_per_expert.numel(), a.shape[1])
    if tuple(w.shape[:2]) != expected or w.dtype != a.dtype:
        raise ValueError(f"w must be [E={expected[0]}, K={expected[1]}, N] of a's dtype {a.dtype}, "
                         f"got {tuple(w.shape)} of {w.dtype}")
    if weights is not None:
        _checks.tensor("weights", weights)
        _checks.same_shape("weights", weights, plan.kept.shape, "the plan's [T, k]")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    block_m = DEFAULT_BLOCK_M if block_m is None else _checks.positive_int("block_m", block_m, minimum=16)
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    return _GatherMatmul.apply(a, w, weights, plan, block_m)


def grouped_experts(x: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None, experts: Experts,
                    block_m: int | None = None) -> torch.Tensor:
    """[T, d]: sum over each token's kept assignments of weights[t, j] * f_e(x[t]) (f_e: the FFN of
    expert e = expert_idx[t, j]), the routed part of an MoE layer, as gathered GEMMs: (gate and) up
    GEMM reading x's rows through the plan -> activation in torch -> down GEMM with the weight in
    its epilogue -> sum over k.
    x [T, d]; weights [T, k] (None: 1); experts an `Experts` (any activation)."""
    if type(experts) is not Experts:  # Int8Experts / ExpertParallelExperts hold other weights
        raise TypeError(f"experts must be a minimoe.experts.Experts, got {type(experts).__name__}")
    _checks.tensor("x", x, ndim=2)
    if x.shape[1] != experts.d_model:
        raise ValueError(f"x must have {experts.d_model} columns (d_model), got {x.shape[1]}")
    _check_plan(plan)
    num_tokens, k = plan.kept.shape
    gate = gather_matmul(x, experts.w_gate, plan, block_m=block_m) if experts.activation == "swiglu" else None
    hidden = activate(gather_matmul(x, experts.w_up, plan, block_m=block_m), gate, experts.activation)
    rows = gather_matmul(hidden, experts.w_down, plan, weights, block_m=block_m)  # [T*k, d], weighted
    return rows.view(num_tokens, k, -1).sum(1)
