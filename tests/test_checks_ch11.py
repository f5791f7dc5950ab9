"""minimoe.checks.ch11: every check passes correct Triton kernels (two styles each), fails common
wrong ones with a message naming the task (writing outside `out` included, caught by the guard
zones), and says "not implemented" for the exercise's stub. The kernels run under the Triton
interpreter on CPU (minimoe.kernels sets TRITON_INTERPRET=1 before any kernel below is defined)."""

import numpy as np
import pytest
import torch
from check_contract import contract_tests

from minimoe import kernels
from minimoe.checks import ch11

if kernels.MODE == "torch":
    pytest.skip("Triton cannot run here (it is Linux-only): the chapter 11 checks need it", allow_module_level=True)

import triton  # noqa: E402  (after the skip: Triton may be missing)
import triton.language as tl  # noqa: E402

# ---- 11.1 copy_rows: correct kernels ----


@triton.jit
def copy_rows_kernel(x_ptr, src_ptr, out_ptr, d, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(src_ptr + i)
    tl.store(out_ptr + i * d + cols, tl.load(x_ptr + s * d + cols, mask=cols < d), mask=cols < d)


def copy_rows(x, src, out, block=16):
    grid = (src.numel(), triton.cdiv(x.shape[1], block))
    copy_rows_kernel[grid](x, src, out, x.shape[1], BLOCK=block)


@triton.jit
def copy_rows_looping_kernel(x_ptr, src_ptr, out_ptr, d, BLOCK: tl.constexpr):
    """One program per row, walking along it block by block."""
    i = tl.program_id(0)
    s = tl.load(src_ptr + i)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + i * d + cols, tl.load(x_ptr + s * d + cols, mask=cols < d), mask=cols < d)


def copy_rows_looping(x, src, out):
    copy_rows_looping_kernel[(src.numel(),)](x, src, out, x.shape[1], BLOCK=8)


# ---- 11.1 wrong ----

@triton.jit
def copy_rows_ignoring_src_kernel(x_ptr, src_ptr, out_ptr, d, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i * d + cols, tl.load(x_ptr + (i % 3) * d + cols, mask=cols < d), mask=cols < d)


@triton.jit
def copy_rows_unmasked_store_kernel(x_ptr, src_ptr, out_ptr, d, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(src_ptr + i)
    tl.store(out_ptr + i * d + cols, tl.load(x_ptr + s * d + cols, mask=cols < d, other=0.0))


def launch_copy(kernel, blocks=None, block=16):
    def run(x, src, out):
        grid = (src.numel(), blocks or triton.cdiv(x.shape[1], block))
        kernel[grid](x, src, out, x.shape[1], BLOCK=block)
    return run


# ---- 11.2 destinations ----

def destinations(plan):
    dest = torch.full((plan.kept.numel(),), -1, dtype=torch.int64)
    dest[plan.order] = torch.arange(plan.order.numel())
    return dest.view(plan.kept.shape)


def destinations_loop(plan):
    num_tokens, k = plan.kept.shape
    dest = -torch.ones(num_tokens, k, dtype=torch.int64)
    for row, a in enumerate(plan.order.tolist()):
        dest[a // k, a % k] = row
    return dest


def destinations_zero_for_dropped(plan):
    dest = torch.zeros(plan.kept.numel(), dtype=torch.int64)
    dest[plan.order] = torch.arange(plan.order.numel())
    return dest.view(plan.kept.shape)


def destinations_not_inverted(plan):
    """Reads the order instead of inverting it: assignment ids where rows are wanted."""
    dest = torch.full((plan.kept.numel(),), -1, dtype=torch.int64)
    dest[: plan.order.numel()] = plan.order
    return dest.view(plan.kept.shape)


def destinations_slot_major(plan):
    num_tokens, k = plan.kept.shape
    return destinations(plan).reshape(k, num_tokens).t()


# ---- 11.3 permute: correct kernels ----

@triton.jit
def permute_kernel(x_ptr, dest_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(x_ptr + t * d + cols, mask=cols < d)
    for j in tl.static_range(K):
        r = tl.load(dest_ptr + t * K + j)
        if r >= 0:
            tl.store(out_ptr + r * d + cols, row, mask=cols < d)


def permute(x, dest, out, block=16):
    num_tokens, k = dest.shape
    permute_kernel[(num_tokens, triton.cdiv(x.shape[1], block))](x, dest, out, x.shape[1], K=k, BLOCK=block)


@triton.jit
def permute_per_assignment_kernel(x_ptr, dest_ptr, out_ptr, d, k, BLOCK: tl.constexpr):
    """One program per assignment a = t * k + j (reads each token k times: correct, slower)."""
    a = tl.program_id(0)
    r = tl.load(dest_ptr + a)
    if r >= 0:
        cols = tl.arange(0, BLOCK)
        tl.store(out_ptr + r * d + cols, tl.load(x_ptr + (a // k) * d + cols, mask=cols < d), mask=cols < d)


def permute_per_assignment(x, dest, out):
    permute_per_assignment_kernel[(dest.numel(),)](x, dest, out, x.shape[1], dest.shape[1],
                                                   BLOCK=triton.next_power_of_2(x.shape[1]))


# ---- 11.3 wrong ----

@triton.jit
def permute_clamping_kernel(x_ptr, dest_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr):
    """Sends dropped assignments to row 0 instead of skipping them."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(x_ptr + t * d + cols, mask=cols < d)
    for j in tl.static_range(K):
        r = tl.maximum(tl.load(dest_ptr + t * K + j), 0)
        tl.store(out_ptr + r * d + cols, row, mask=cols < d)


@triton.jit
def permute_not_skipping_kernel(x_ptr, dest_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr):
    """Writes dropped assignments to row -1, just before out (the guard zone catches it)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(x_ptr + t * d + cols, mask=cols < d)
    for j in tl.static_range(K):
        tl.store(out_ptr + tl.load(dest_ptr + t * K + j) * d + cols, row, mask=cols < d)


@triton.jit
def permute_slot_major_kernel(x_ptr, dest_ptr, out_ptr, d, T, K: tl.constexpr, BLOCK: tl.constexpr):
    """Reads dest[j, t] as if dest were [k, T]."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(x_ptr + t * d + cols, mask=cols < d)
    for j in tl.static_range(K):
        r = tl.load(dest_ptr + j * T + t)
        if r >= 0:
            tl.store(out_ptr + r * d + cols, row, mask=cols < d)


def launch_permute(kernel, with_tokens=False):
    def run(x, dest, out):
        num_tokens, k = dest.shape
        extra = (num_tokens,) if with_tokens else ()
        kernel[(num_tokens, triton.cdiv(x.shape[1], 16))](x, dest, out, x.shape[1], *extra, K=k, BLOCK=16)
    return run


# ---- 11.4 unpermute: correct kernels ----

@triton.jit
def unpermute_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(dest_ptr + t * K + j)
        if r >= 0:
            acc += tl.load(w_ptr + t * K + j) * tl.load(y_ptr + r * d + cols, mask=cols < d)
    tl.store(out_ptr + t * d + cols, acc, mask=cols < d)


def unpermute(y, dest, weights, out, block=16):
    num_tokens, k = dest.shape
    unpermute_kernel[(num_tokens, triton.cdiv(y.shape[1], block))](y, dest, weights, out, y.shape[1], K=k,
                                                                   BLOCK=block)


@triton.jit
def unpermute_tile_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, d, k, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """All k rows of a token as one [BLOCK_K, BLOCK] tile, masked, then a weighted sum over axis 0."""
    t = tl.program_id(0)
    slots = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK)
    rows = tl.load(dest_ptr + t * k + slots, mask=slots < k, other=-1)
    w = tl.load(w_ptr + t * k + slots, mask=slots < k, other=0.0)
    tile = tl.load(y_ptr + rows[:, None] * d + cols[None, :], mask=(rows[:, None] >= 0) & (cols[None, :] < d),
                   other=0.0)
    tl.store(out_ptr + t * d + cols, tl.sum(tile * w[:, None], axis=0), mask=cols < d)


def unpermute_tile(y, dest, weights, out):
    num_tokens, k = dest.shape
    unpermute_tile_kernel[(num_tokens,)](y, dest, weights, out, y.shape[1], k, BLOCK_K=triton.next_power_of_2(k),
                                         BLOCK=triton.next_power_of_2(y.shape[1]))


# ---- 11.4 wrong ----

@triton.jit
def unpermute_variant_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, d, K: tl.constexpr, BLOCK: tl.constexpr,
                             MISTAKE: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(dest_ptr + t * K + j)
        if MISTAKE == "no weights":
            if r >= 0:
                acc += tl.load(y_ptr + r * d + cols, mask=cols < d)
        elif MISTAKE == "weight of the sorted row":  # w[r] instead of w[t, j]
            if r >= 0:
                acc += tl.load(w_ptr + r) * tl.load(y_ptr + r * d + cols, mask=cols < d)
        elif MISTAKE == "dropped read as row 0":
            r = tl.maximum(r, 0)
            acc += tl.load(w_ptr + t * K + j) * tl.load(y_ptr + r * d + cols, mask=cols < d)
        elif MISTAKE == "dropped not skipped":  # reads row -1: the NaN guard before y
            acc += tl.load(w_ptr + t * K + j) * tl.load(y_ptr + r * d + cols, mask=cols < d)
        elif MISTAKE == "first slot only":
            if j == 0 and r >= 0:
                acc += tl.load(w_ptr + t * K + j) * tl.load(y_ptr + r * d + cols, mask=cols < d)
    tl.store(out_ptr + t * d + cols, acc, mask=cols < d)


def unpermute_with(mistake):
    def run(y, dest, weights, out):
        num_tokens, k = dest.shape
        unpermute_variant_kernel[(num_tokens, triton.cdiv(y.shape[1], 16))](y, dest, weights, out, y.shape[1], K=k,
                                                                            BLOCK=16, MISTAKE=mistake)
    return run


def allocating_own_output(y, dest, weights, out):
    """Computes the right values into a new tensor and returns it, leaving `out` untouched."""
    mine = torch.empty_like(out)
    unpermute(y, dest, weights, mine)
    return mine


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch11.check_copy_rows, "11.1", [copy_rows, copy_rows_looping, lambda x, src, out: copy_rows(x, src, out, 64)], [
        launch_copy(copy_rows_ignoring_src_kernel),
        launch_copy(copy_rows_unmasked_store_kernel),   # the last row's tail lands after out
        launch_copy(copy_rows_kernel, blocks=1),         # the grid covers only the first 16 columns
    ]),
    (ch11.check_destinations, "11.2", [destinations, destinations_loop], [
        destinations_zero_for_dropped, destinations_not_inverted, destinations_slot_major,
    ]),
    (ch11.check_permute, "11.3", [permute, permute_per_assignment, lambda x, dest, out: permute(x, dest, out, 128)], [
        launch_permute(permute_clamping_kernel),
        launch_permute(permute_not_skipping_kernel),
        launch_permute(permute_slot_major_kernel, with_tokens=True),
    ]),
    (ch11.check_unpermute, "11.4", [unpermute, unpermute_tile], [
        unpermute_with("no weights"), unpermute_with("weight of the sorted row"),
        unpermute_with("dropped read as row 0"), unpermute_with("dropped not skipped"),
        unpermute_with("first slot only"), allocating_own_output,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


@pytest.mark.parametrize(("wrong", "message"), [
    (launch_permute(permute_not_skipping_kernel), "wrote outside `out`"),
    (lambda x, dest, out: None, "`out` was not written"),
])
def test_failures_explain_guard_and_unwritten_output(wrong, message):
    with pytest.raises(ch11.CheckFailure, match=message):
        ch11.check_permute(wrong)


@triton.jit
def stub_kernel(x_ptr, dest_ptr, out_ptr):
    raise NotImplementedError("task 11.3")


def test_a_stub_kernel_behind_a_finished_launcher_is_not_implemented():
    with pytest.raises(ch11.CheckFailure, match="task 11.3: not implemented"):
        ch11.check_permute(lambda x, dest, out: stub_kernel[(1,)](x, dest, out))


def test_plans_cover_drops_empty_experts_and_several_k():
    plans = [ch11._plan(np.random.default_rng(1000 * case + 7)) for case in range(3)]
    assert any((~p.kept).all(1).any() for p in plans)            # a token loses every assignment
    assert any((~p.kept).any() and p.kept.shape[1] > 1 for p in plans)
    assert any((p.tokens_per_expert == 0).any() for p in plans)  # an expert with no token
    assert len({p.kept.shape[1] for p in plans}) == 3


def test_plan_from_dest_gives_back_the_plan():
    plan = ch11._plan(np.random.default_rng(7))
    again = ch11._plan_from_dest(kernels.destinations(plan))
    assert torch.equal(again.order, plan.order) and torch.equal(again.kept, plan.kept)
