"""minimoe.checks.ch11: every check passes correct answers (two styles each: Triton kernels for
11.1, torch for 11.2-11.4), fails common wrong ones with a message naming the task (writing
outside `out` included, caught by the guard zones), and says "not implemented" for the
exercise's stub. The kernels run under the Triton interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel below is defined)."""

import numpy as np
import pytest
import torch
from check_contract import contract_tests

from minimoe import kernels
from minimoe.checks import ch11, read_check

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


# ---- 11.3 tile_schedule ----

def tile_schedule(counts, block_m):
    tiles = (counts + block_m - 1) // block_m
    expert = torch.repeat_interleave(torch.arange(counts.numel()), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    offset = torch.cumsum(counts, 0) - counts
    return torch.stack([expert, offset[expert] + block_m * (torch.arange(expert.numel()) - first_tile[expert])], 1)


def tile_schedule_loop(counts, block_m):
    table, offset = [], 0
    for e, n in enumerate(counts.tolist()):
        table += [[e, start] for start in range(offset, offset + n, block_m)]
        offset += n
    return torch.tensor(table, dtype=torch.int64).view(-1, 2)


def tile_schedule_floor(counts, block_m):
    """Drops each expert's partial last tile."""
    return tile_schedule_with(counts, block_m, lambda n: n // block_m)


def tile_schedule_with(counts, block_m, num_tiles, offset_of=None):
    table, offset = [], 0
    for e, n in enumerate(counts.tolist()):
        start = offset if offset_of is None else offset_of(offset)
        table += [[e, start + i * block_m] for i in range(num_tiles(n))]
        offset += n
    return torch.tensor(table, dtype=torch.int64).view(-1, 2)


def tile_schedule_ignoring_experts(counts, block_m):
    """Tiles the sorted rows as one matrix: a tile can hold two experts' rows."""
    starts = torch.arange(0, int(counts.sum()), block_m)
    expert = torch.searchsorted(torch.cumsum(counts, 0), starts, right=True)
    return torch.stack([expert, starts], 1)


# ---- 11.4 expert_weight_grad ----

def expert_weight_grad(x, token_idx, grad, counts):
    splits = counts.tolist()
    return torch.stack([xe.t() @ ge for xe, ge in zip(x[token_idx].split(splits), grad.split(splits), strict=True)])


def expert_weight_grad_outer(x, token_idx, grad, counts):
    """Every row's outer product, added into its expert's matrix."""
    expert = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    outer = x[token_idx][:, :, None] * grad[:, None, :]
    return outer.new_zeros(counts.numel(), x.shape[1], grad.shape[1]).index_add(0, expert, outer)


def expert_weight_grad_transposed(x, token_idx, grad, counts):
    return expert_weight_grad(x, token_idx, grad, counts).transpose(1, 2)


def expert_weight_grad_without_gather(x, token_idx, grad, counts):
    """Reads the tokens in token order instead of through token_idx."""
    rows = x.repeat(grad.shape[0] // x.shape[0] + 1, 1)[: grad.shape[0]]
    return expert_weight_grad(rows, torch.arange(grad.shape[0]), grad, counts)


def expert_weight_grad_busy_experts_only(x, token_idx, grad, counts):
    """Leaves out the experts with no row."""
    return expert_weight_grad(x, token_idx, grad, counts)[counts > 0]


def expert_weight_grad_mean(x, token_idx, grad, counts):
    return expert_weight_grad(x, token_idx, grad, counts) / counts.clamp(min=1)[:, None, None]


def expert_weight_grad_reversed_splits(x, token_idx, grad, counts):
    """Splits the rows by the counts in reverse order."""
    return expert_weight_grad(x, token_idx, grad, counts.flip(0)).flip(0)


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
    (ch11.check_tile_schedule, "11.3", [tile_schedule, tile_schedule_loop], [
        tile_schedule_floor,
        lambda counts, block_m: tile_schedule_with(counts, block_m, lambda n: max(1, -(-n // block_m))),
        lambda counts, block_m: tile_schedule_with(counts, block_m, lambda n: n // block_m + 1),
        lambda counts, block_m: tile_schedule_with(counts, block_m, lambda n: -(-n // block_m), lambda off: 0),
        tile_schedule_ignoring_experts,
    ]),
    (ch11.check_expert_weight_grad, "11.4", [expert_weight_grad, expert_weight_grad_outer], [
        expert_weight_grad_transposed, expert_weight_grad_without_gather, expert_weight_grad_busy_experts_only,
        expert_weight_grad_mean, expert_weight_grad_reversed_splits,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


@pytest.mark.parametrize(("wrong", "message"), [
    (launch_copy(copy_rows_unmasked_store_kernel), "wrote outside `out`"),
    (lambda x, src, out: None, "`out` was not written"),
])
def test_failures_explain_guard_and_unwritten_output(wrong, message):
    with pytest.raises(ch11.CheckFailure, match=message):
        ch11.check_copy_rows(wrong)


@triton.jit
def stub_kernel(x_ptr, src_ptr, out_ptr):
    raise NotImplementedError("task 11.1")


def test_a_stub_kernel_behind_a_finished_launcher_is_not_implemented():
    with pytest.raises(ch11.CheckFailure, match="task 11.1: not implemented"):
        ch11.check_copy_rows(lambda x, src, out: stub_kernel[(1,)](x, src, out))


def test_plans_cover_drops_empty_experts_and_several_k():
    plans = [ch11._plan(np.random.default_rng(1000 * case + 7)) for case in range(3)]
    assert any((~p.kept).all(1).any() for p in plans)            # a token loses every assignment
    assert any((~p.kept).any() and p.kept.shape[1] > 1 for p in plans)
    assert any((p.tokens_per_expert == 0).any() for p in plans)  # an expert with no token
    assert len({p.kept.shape[1] for p in plans}) == 3


def test_tile_schedule_cases_have_an_empty_expert_an_exact_multiple_and_a_partial_tile():
    check = read_check(ch11.check_tile_schedule, tile_schedule)
    cases = [check.make_inputs(np.random.default_rng(1000 * case + 7)) for case in range(check.cases)]
    for counts, block_m in cases:
        assert (counts == 0).any() and ((counts > 0) & (counts % block_m == 0)).any()
    assert any((counts % block_m != 0).any() for counts, block_m in cases)
