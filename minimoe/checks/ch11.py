"""Checks for chapter 11 (a Triton dispatch kernel): one function per task.

11.1 copy_rows(x, src, out)            fills out [n, d]: out[i] = x[src[i]]           (kernel + launch)
11.2 destinations(plan)                dest [T, k] int64: the sorted row of assignment (t, j), -1 if dropped
11.3 tile_schedule(counts, block_m)    [n_tiles, 2] int64: (expert, first sorted row) of each tile of the
                                       grouped GEMM
11.4 expert_weight_grad(x, token_idx, grad, counts)
                                       [E, d, n]: dW[e] = sum over e's sorted rows i of x[token_idx[i]]^T grad[i]

The kernel of 11.1 runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
before it is defined), or compiled on a GPU (tensors on cuda). Each `out` the check hands to the
learner sits in a larger buffer whose guard zones on both sides must come back untouched, so a
missing mask fails with a clear message instead of corrupting memory; the float inputs sit
between NaN guards, so reading outside them shows up as NaN; `out` starts as NaN, so a row never
written shows up too. References: x[src], `minimoe.kernels.destinations`, and
`minimoe.grouped_gemm.tile_schedule` / `expert_weight_grad`. Plans have random T, d, E, k,
capacity drops (some tokens lose every assignment) and experts with no token.
"""

import numpy as np
import torch

from minimoe import kernels
from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.checks._inputs import random_floats
from minimoe.dispatch import DispatchPlan, make_plan
from minimoe.grouped_gemm import expert_weight_grad, tile_schedule

__all__ = ["check_copy_rows", "check_destinations", "check_expert_weight_grad", "check_tile_schedule"]

GUARD_FILL = 7.0  # the value out's guard zones hold before and must hold after the call


def _device() -> str:
    return "cuda" if kernels.MODE == "compiled" else "cpu"


def _plan(rng: np.random.Generator) -> DispatchPlan:
    """k distinct experts per token; half the time one expert gets no token; usually a capacity
    small enough to drop assignments (position policy: late tokens lose theirs first)."""
    num_tokens, num_experts = int(rng.integers(6, 21)), int(rng.integers(3, 7))
    k = int(rng.integers(1, min(4, num_experts - 1) + 1))
    pool = num_experts - 1 if rng.random() < 0.5 else num_experts
    expert_idx = torch.from_numpy(np.argsort(rng.random((num_tokens, pool)), axis=1)[:, :k].copy())
    capacity = int(rng.integers(1, num_tokens * k // num_experts + 1)) if rng.random() < 0.8 else None
    return make_plan(expert_idx, num_experts, capacity)


def _guarded(values: torch.Tensor, margin: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): values copied to the kernels' device, in the middle of a flat buffer with
    `margin` elements of `fill` on each side."""
    buffer = torch.full((values.numel() + 2 * margin,), fill, dtype=values.dtype, device=_device())
    view = buffer[margin:margin + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


COLUMNS_HINT = "mask the columns past d (cols < d)"


def _run_guarded(task: str, learner_fn, inputs: tuple, out_shape: tuple[int, int], hint: str) -> torch.Tensor:
    """Call learner_fn(*inputs, out) with float inputs between NaN guards and a NaN-filled out
    between GUARD_FILL guards; check the guards; return out on the CPU."""
    margin = 4096 + 2 * (sum(t.numel() for t in inputs) + out_shape[0] * out_shape[1])  # beyond any stray row
    args = [_guarded(t, margin, float("nan"))[0] if t.dtype.is_floating_point else t.to(_device()) for t in inputs]
    out, buffer = _guarded(torch.full(out_shape, float("nan")), margin, GUARD_FILL)
    try:
        learner_fn(*args, out)
    except Exception as error:  # the interpreter wraps a stub kernel's NotImplementedError
        if isinstance(error.__cause__, NotImplementedError):
            raise error.__cause__ from None
        raise
    before, after = int((buffer[:margin] != GUARD_FILL).sum()), int((buffer[-margin:] != GUARD_FILL).sum())
    if before or after:
        raise CheckFailure(
            f"task {task}: the kernel wrote outside `out` ({before} values before its first row, {after} after "
            f"its last row): {hint}")
    if out.numel() and out.isnan().all():
        raise CheckFailure(f"task {task}: `out` was not written: fill the `out` tensor the function is given "
                           "(pass it to the kernel as the output pointer)")
    return out.cpu()


def check_copy_rows(learner_copy_rows):
    """Task 11.1: copy_rows(x [n_in, d] float32, src [n] int64, out [n, d]) fills out[i] = x[src[i]]
    with a Triton kernel."""
    require_function("11.1", learner_copy_rows)
    def make_inputs(rng):
        num_in, num_out, d = int(rng.integers(3, 16)), int(rng.integers(5, 25)), int(rng.integers(1, 70))
        return random_floats(rng, num_in, d), torch.from_numpy(rng.integers(0, num_in, num_out))

    def learner(x, src):
        return _run_guarded("11.1", learner_copy_rows, (x, src), (src.numel(), x.shape[1]), COLUMNS_HINT)

    run_check("11.1", learner, lambda x, src: x[src], make_inputs, atol=0, rtol=0)


def check_destinations(learner_destinations):
    """Task 11.2: destinations(plan) -> dest [T, k] int64, dest[t, j] = the row i with
    plan.order[i] = t * k + j, or -1 if the plan dropped (t, j)."""
    run_check("11.2", learner_destinations, kernels.destinations, lambda rng: (_plan(rng),), atol=0, rtol=0)


def check_tile_schedule(learner_tile_schedule):
    """Task 11.3: tile_schedule(tokens_per_expert [E] int64, block_m) -> [n_tiles, 2] int64, the
    (expert, first sorted row) of every tile, expert by expert and rows ascending; an expert with
    n_e rows has ceil(n_e / block_m) tiles, an expert with none has none."""
    def make_inputs(rng):
        block_m = int(rng.choice([2, 4, 16]))
        counts = rng.integers(0, 3 * block_m + 1, int(rng.integers(3, 9)))
        slots = rng.permutation(counts.size)
        counts[slots[0]], counts[slots[1]] = 0, block_m * int(rng.integers(1, 3))  # empty; an exact multiple
        return torch.from_numpy(counts.astype(np.int64)), block_m

    run_check("11.3", learner_tile_schedule, tile_schedule, make_inputs, atol=0, rtol=0)


def check_expert_weight_grad(learner_expert_weight_grad):
    """Task 11.4: expert_weight_grad(x [T, d], token_idx [S] int64, grad [S, n], tokens_per_expert [E])
    -> [E, d, n], dW[e] = sum over the sorted rows i of expert e of x[token_idx[i]]^T grad[i]."""
    def make_inputs(rng):
        plan = _plan(rng)
        num_tokens, d, n = plan.kept.shape[0], int(rng.integers(1, 13)), int(rng.integers(1, 13))
        return (random_floats(rng, num_tokens, d), plan.token_idx, random_floats(rng, plan.order.numel(), n),
                plan.tokens_per_expert)

    run_check("11.4", learner_expert_weight_grad, expert_weight_grad, make_inputs, atol=1e-5, rtol=1e-5)
