"""Triton kernels for MoE dispatch: permute token rows into expert order, and combine the expert
rows back, weighted, with autograd.

Both kernels read a *destination map* `dest [T, k]`: the sorted row of each assignment (t, j),
or -1 where the plan dropped it (`destinations(plan)`). One program handles one token and one
block of BLOCK_D columns. Permute loads the token's row once and stores its k copies; unpermute
loads the token's k rows and stores their weighted sum, accumulated in float32. No two programs
write the same memory, so no atomics are needed. The two operations are each other's adjoints:
the backward of one is the other (plus a dot-product kernel for the combine weights' gradient).

`MODE` says how the kernels run:
  "compiled"     on a CUDA GPU;
  "interpreted"  with TRITON_INTERPRET=1, which this module sets when no CUDA device is present,
                 before its kernels are defined: they then run on CPU tensors, slowly (a millisecond
                 or more per program), for tests and for learning;
  "torch"        Triton is not installed (it is Linux-only) or cannot run here, e.g. when
                 triton.language was imported (torch's FLOP counter and compiler import it)
                 before TRITON_INTERPRET=1 was set: set the variable before importing torch.
`triton_permute` and `triton_unpermute` fall back to `minimoe.dispatch.permute` / `unpermute`,
which compute the same, when the kernels cannot run on the tensors given.
"""

import os

import torch

from minimoe import _checks
from minimoe.dispatch import DispatchPlan, permute, unpermute

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when each @triton.jit below runs

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_BLOCK_D = 1024  # columns per program: one 16-byte vector per thread for bf16 with 4 warps
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

if triton is not None:

    @triton.jit
    def _permute_kernel(x_ptr, dest_ptr, w_ptr, out_ptr, d, K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[dest[t, j]] = x[t] (times w[t, j] if HAS_WEIGHTS) for every kept slot j of token t."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_row = cols < d
        row = tl.load(x_ptr + t * d + cols, mask=in_row)
        for j in tl.static_range(K):
            r = tl.load(dest_ptr + t * K + j)
            if r >= 0:  # a dropped assignment has no row
                val = row
                if HAS_WEIGHTS:
                    val = (row.to(ACC) * tl.load(w_ptr + t * K + j).to(ACC)).to(row.dtype)
                tl.store(out_ptr + r * d + cols, val, mask=in_row)

    @triton.jit
    def _unpermute_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, d, K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t] = sum over kept slots j of y[dest[t, j]] (times w[t, j] if HAS_WEIGHTS)."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_row = cols < d
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        for j in tl.static_range(K):
            r = tl.load(dest_ptr + t * K + j)
            if r >= 0:
                row = tl.load(y_ptr + r * d + cols, mask=in_row, other=0.0).to(ACC)
                if HAS_WEIGHTS:
                    row = row * tl.load(w_ptr + t * K + j).to(ACC)
                acc += row
        tl.store(out_ptr + t * d + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _weight_grad_kernel(grad_ptr, y_ptr, dest_ptr, out_ptr, d, K: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """out[t, j] = <grad[t], y[dest[t, j]]>, 0 for a dropped slot. One program per token."""
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            r = tl.load(dest_ptr + t * K + j)
            acc = tl.zeros([BLOCK_D], dtype=ACC)
            if r >= 0:
                for start in range(0, d, BLOCK_D):
                    cols = start + tl.arange(0, BLOCK_D)
                    in_row = cols < d
                    g = tl.load(grad_ptr + t * d + cols, mask=in_row, other=0.0).to(ACC)
                    acc += g * tl.load(y_ptr + r * d + cols, mask=in_row, other=0.0).to(ACC)
            tl.store(out_ptr + t * K + j, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))

    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(_permute_kernel, InterpretedFunction):
        # triton.language's own @jit helpers (tl.sum, tl.zeros) are interpreted only if the variable
        # was set before triton.language was first imported; torch's FLOP counter and compiler
        # import it, so a program that used them first gets the torch path
        MODE = "interpreted" if isinstance(tl.sum, InterpretedFunction) else "torch"
    else:
        MODE = "compiled" if torch.cuda.is_available() else "torch"
else:
    MODE = "torch"


def _runs_kernels(t: torch.Tensor) -> bool:
    """The interpreter runs any tensor; compiled kernels need CUDA tensors."""
    return MODE == "interpreted" or (MODE == "compiled" and t.is_cuda)


def _grid_and_block(num_tokens: int, d: int) -> tuple[tuple[int, int], int]:
    block = min(triton.next_power_of_2(d), MAX_BLOCK_D)
    return (num_tokens, triton.cdiv(d, block)), block


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_permute(x: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor | None, num_rows: int):
    """[num_rows, d]: row dest[t, j] = x[t] (* weights[t, j]) for each kept (t, j)."""
    x, dest = x.contiguous(), dest.contiguous()
    out = x.new_empty(num_rows, x.shape[1])
    if out.numel():
        grid, block = _grid_and_block(x.shape[0], x.shape[1])
        w = x if weights is None else weights.contiguous()  # an unused pointer when no weights
        with torch.cuda.device_of(x):
            _permute_kernel[grid](x, dest, w, out, x.shape[1], K=dest.shape[1], HAS_WEIGHTS=weights is not None,
                                  ACC=_acc_dtype(x.dtype), BLOCK_D=block)
    return out


def _launch_unpermute(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor | None):
    """[T, d]: row t = sum over kept j of y[dest[t, j]] (* weights[t, j])."""
    y, dest = y.contiguous(), dest.contiguous()
    out = y.new_empty(dest.shape[0], y.shape[1])
    if out.numel():
        grid, block = _grid_and_block(dest.shape[0], y.shape[1])
        w = y if weights is None else weights.contiguous()
        with torch.cuda.device_of(y):
            _unpermute_kernel[grid](y, dest, w, out, y.shape[1], K=dest.shape[1], HAS_WEIGHTS=weights is not None,
                                    ACC=_acc_dtype(y.dtype), BLOCK_D=block)
    return out


def _launch_weight_grad(grad: torch.Tensor, y: torch.Tensor, dest: torch.Tensor, dtype: torch.dtype):
    """[T, k] of dtype: <grad[t], y[dest[t, j]]>, 0 where dropped."""
    grad, y, dest = grad.contiguous(), y.contiguous(), dest.contiguous()
    out = torch.zeros(dest.shape, dtype=dtype, device=y.device)
    if out.numel() and y.shape[1]:
        _, block = _grid_and_block(1, y.shape[1])
        with torch.cuda.device_of(y):
            _weight_grad_kernel[(dest.shape[0],)](grad, y, dest, out, y.shape[1], K=dest.shape[1],
                                                  ACC=_acc_dtype(y.dtype), BLOCK_D=block)
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dest, num_rows):
        ctx.save_for_backward(dest)
        return _launch_permute(x, dest, None, num_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return _launch_unpermute(grad, dest, None), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dest, weights):
        ctx.save_for_backward(y, dest, weights)
        return _launch_unpermute(y, dest, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, dest, weights = ctx.saved_tensors
        grad_y = _launch_permute(grad, dest, weights, y.shape[0]) if ctx.needs_input_grad[0] else None
        grad_w = _launch_weight_grad(grad, y, dest, weights.dtype) if ctx.needs_input_grad[2] else None
        return grad_y, None, grad_w


def destinations(plan: DispatchPlan) -> torch.Tensor:
    """[T, k] int64: the row of plan's sorted buffer that holds assignment (t, j), -1 if dropped.
    The inverse of plan.order: destinations(plan).view(-1)[plan.order] == arange(S)."""
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan must be a minimoe.dispatch.DispatchPlan, got {type(plan).__name__}")
    dest = torch.full((plan.kept.numel(),), -1, dtype=torch.int64, device=plan.order.device)
    dest[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
    return dest.view(plan.kept.shape)


def _check_rows(name: str, value, rows: int | None = None, what: str = "") -> torch.Tensor:
    _checks.tensor(name, value, ndim=2)
    if value.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows ({what}), got {value.shape[0]}")
    return value


def _check_dest(dest, num_rows: int, num_tokens: int | None = None) -> torch.Tensor:
    """dest [T, k] int64 holding rows in [0, num_rows) or -1 (dropped)."""
    _checks.tensor("dest", dest, ndim=2)
    if dest.dtype != torch.int64 or (num_tokens is not None and dest.shape[0] != num_tokens):
        expected = "T" if num_tokens is None else f"T={num_tokens}"
        raise ValueError(f"dest must be an int64 [{expected}, k] tensor (see destinations), "
                         f"got {dest.dtype} of shape {tuple(dest.shape)}")
    if dest.numel() and (int(dest.min()) < -1 or int(dest.max()) >= num_rows):
        raise ValueError(f"dest must hold rows in [0, {num_rows}) or -1 (dropped), "
                         f"got values in [{int(dest.min())}, {int(dest.max())}]")
    return dest


def _check_weights(weights, shape) -> None:
    if weights is not None:
        _checks.tensor("weights", weights)
        _checks.same_shape("weights", weights, shape, "the plan's [T, k]")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")


def _needs_kernels(t: torch.Tensor) -> None:
    if not _runs_kernels(t):
        raise RuntimeError(f"the Triton kernels cannot run on a {t.device.type} tensor here (MODE={MODE!r}); "
                           "triton_permute / triton_unpermute fall back to torch")


def permute_rows(x: torch.Tensor, dest: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x [T, d] -> [num_rows, d], row dest[t, j] = x[t] for dest[t, j] >= 0: the permute kernel
    alone, for callers that build the destination map once. dest [T, k] int64 must fill every row
    once (as `destinations(plan)` with num_rows = S does). Raises RuntimeError if MODE == "torch"."""
    _check_rows("x", x)
    _checks.positive_int("num_rows", num_rows, minimum=0)
    _check_dest(dest, num_rows, x.shape[0])
    _needs_kernels(x)
    return _Permute.apply(x, dest.to(x.device), num_rows)


def unpermute_rows(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """y [S, d] -> [T, d], row t = sum over j with dest[t, j] >= 0 of weights[t, j] * y[dest[t, j]]
    (weights None: 1): the combine kernel alone. dest [T, k] int64 holds rows of y or -1.
    Raises RuntimeError if MODE == "torch"."""
    _check_rows("y", y)
    _check_dest(dest, y.shape[0])
    _check_weights(weights, dest.shape)
    _needs_kernels(y)
    return _Unpermute.apply(y, dest.to(y.device), weights)


def triton_permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [T, d] -> [S, d]: one row per kept assignment, grouped by expert; equals
    minimoe.dispatch.permute(x, plan), gradient included."""
    dest = destinations(plan)
    _check_rows("x", x, dest.shape[0], "the plan's tokens")
    if not _runs_kernels(x):
        return permute(x, plan)
    return _Permute.apply(x, dest.to(x.device), plan.order.numel())


def triton_unpermute(y: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor | None) -> torch.Tensor:
    """y [S, d] expert outputs -> [T, d], each token's kept rows times their weights [T, k], summed
    (weights=None: rows already weighted); equals minimoe.dispatch.unpermute(y, plan, weights),
    gradients of y and weights included."""
    dest = destinations(plan)
    _check_rows("y", y, plan.order.numel(), "the plan's kept assignments")
    _check_weights(weights, dest.shape)
    if not _runs_kernels(y):
        return unpermute(y, plan, weights)
    return _Unpermute.apply(y, dest.to(y.device), weights)
