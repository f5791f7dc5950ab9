"""Checks for chapter 11 (a Triton dispatch kernel): one function per task.

11.1 copy_rows(x, src, out)            fills out [n, d]: out[i] = x[src[i]]           (kernel + launch)
11.2 destinations(plan)                dest [T, k] int64: the sorted row of assignment (t, j), -1 if dropped
11.3 permute(x, dest, out)             fills out [S, d]: out[dest[t, j]] = x[t] where dest[t, j] >= 0
11.4 unpermute(y, dest, weights, out)  fills out [T, d]: out[t] = sum over dest[t, j] >= 0 of
                                       weights[t, j] * y[dest[t, j]]

The kernels run under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set before
they are defined), or compiled on a GPU (tensors on cuda). Each `out` the check hands to the
learner sits in a larger buffer whose guard zones on both sides must come back untouched, so a
missing mask fails with a clear message instead of corrupting memory; the float inputs sit
between NaN guards, so reading outside them shows up as NaN; `out` starts as NaN, so a row never
written shows up too. References: x[src], `minimoe.kernels.destinations`, and
`minimoe.dispatch.permute` / `unpermute` on the plan the destination map describes. Plans have
random T, d, E, k, capacity drops (some tokens lose every assignment) and experts with no token.
"""

import numpy as np
import torch

from minimoe import kernels
from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.checks._inputs import random_floats
from minimoe.dispatch import DispatchPlan, make_plan, permute, unpermute

__all__ = ["check_copy_rows", "check_destinations", "check_permute", "check_unpermute"]

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


def _plan_from_dest(dest: torch.Tensor) -> DispatchPlan:
    """The DispatchPlan a destination map describes (permute / unpermute read order and kept)."""
    kept = dest >= 0
    order = torch.empty(int(kept.sum()), dtype=torch.int64)
    order[dest[kept]] = kept.reshape(-1).nonzero().squeeze(1)
    return DispatchPlan(order, torch.zeros(0, dtype=torch.int64), kept, None)


def _guarded(values: torch.Tensor, margin: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): values copied to the kernels' device, in the middle of a flat buffer with
    `margin` elements of `fill` on each side."""
    buffer = torch.full((values.numel() + 2 * margin,), fill, dtype=values.dtype, device=_device())
    view = buffer[margin:margin + values.numel()].view(values.shape)
    view.copy_(values)
    return view, buffer


COLUMNS_HINT = "mask the columns past d (cols < d)"
DROPPED_HINT = COLUMNS_HINT + ", and skip dropped assignments (dest = -1)"


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


def check_permute(learner_permute):
    """Task 11.3: permute(x [T, d], dest [T, k], out [S, d]) fills out[dest[t, j]] = x[t] for every
    kept assignment, with a Triton kernel."""
    require_function("11.3", learner_permute)
    def make_inputs(rng):
        plan = _plan(rng)
        return random_floats(rng, plan.kept.shape[0], int(rng.integers(1, 70))), kernels.destinations(plan)

    def learner(x, dest):
        return _run_guarded("11.3", learner_permute, (x, dest), (int((dest >= 0).sum()), x.shape[1]),
                            DROPPED_HINT)

    run_check("11.3", learner, lambda x, dest: permute(x, _plan_from_dest(dest)), make_inputs, atol=0, rtol=0)


def check_unpermute(learner_unpermute):
    """Task 11.4: unpermute(y [S, d], dest [T, k], weights [T, k], out [T, d]) fills
    out[t] = sum over kept j of weights[t, j] * y[dest[t, j]] (zeros if all dropped), with a Triton kernel."""
    require_function("11.4", learner_unpermute)
    def make_inputs(rng):
        plan = _plan(rng)
        weights = torch.from_numpy(rng.random(plan.kept.shape).astype(np.float32))
        return random_floats(rng, plan.order.numel(), int(rng.integers(1, 70))), kernels.destinations(plan), weights

    def learner(y, dest, weights):
        return _run_guarded("11.4", learner_unpermute, (y, dest, weights), (dest.shape[0], y.shape[1]),
                            COLUMNS_HINT)

    def reference(y, dest, weights):
        return unpermute(y, _plan_from_dest(dest), weights)

    run_check("11.4", learner, reference, make_inputs)
