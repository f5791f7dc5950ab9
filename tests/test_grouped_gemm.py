"""minimoe.grouped_gemm: the tile schedule covers every sorted row once without crossing experts;
the gathered GEMM and the full expert FFN equal the per-token loop `minimoe.reference.moe_loop`
(outputs and gradients of x, the expert weights and the router), for experts with no token,
uneven counts, capacity drops, k = 1..3 and odd widths; MoELayer(backend="triton_gemm") equals
the torch backend; the torch fallback computes the same; bad input is refused by name.

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): sizes stay tiny and hypothesis draws few examples."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import grouped_gemm as gg
from minimoe.dispatch import expert_capacity, make_plan
from minimoe.inference import Int8Experts
from minimoe.layer import MoELayer
from minimoe.reference import moe_loop

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if gg.MODE == "compiled" else "cpu"
needs_kernel = pytest.mark.skipif(gg.MODE == "torch", reason="the grouped GEMM kernel cannot run here")


def rows_of(tiles, counts, block_m):
    """The sorted rows each tile computes: [start, min(start + block_m, end of its expert))."""
    ends = torch.cumsum(counts, 0)
    return [list(range(start, min(start + block_m, int(ends[e])))) for e, start in tiles.tolist()]


def test_tile_schedule_of_a_hand_worked_case():
    counts = torch.tensor([3, 0, 5, 16])
    tiles = gg.tile_schedule(counts, 4)
    # expert 0: rows 0-2 (one padded tile); expert 1: none; expert 2: rows 3-7; expert 3: rows 8-23
    assert tiles.tolist() == [[0, 0], [2, 3], [2, 7], [3, 8], [3, 12], [3, 16], [3, 20]]
    assert rows_of(tiles, counts, 4)[:3] == [[0, 1, 2], [3, 4, 5, 6], [7]]


@settings(max_examples=60)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=9), st.sampled_from([1, 2, 3, 16, 64]))
def test_tile_schedule_covers_every_row_once_within_its_expert(counts, block_m):
    counts = torch.tensor(counts)
    tiles = gg.tile_schedule(counts, block_m)
    assert tiles.dtype == torch.int64 and tiles.shape == (int(((counts + block_m - 1) // block_m).sum()), 2)
    covered = [r for rows in rows_of(tiles, counts, block_m) for r in rows]
    assert sorted(covered) == list(range(int(counts.sum())))  # every row once
    starts = torch.cumsum(counts, 0) - counts
    for (e, start), rows in zip(tiles.tolist(), rows_of(tiles, counts, block_m), strict=True):
        assert counts[e] > 0 and rows  # no tile for an empty expert, none empty
        assert starts[e] <= start and rows[-1] < starts[e] + counts[e]  # never crosses into another expert
    assert tiles[:, 0].tolist() == sorted(tiles[:, 0].tolist())


def loop_gather_matmul(a, w, plan, weights):
    """out[t*k + j] = a[t or t*k + j] @ w[e] * weights[t, j] for kept (t, j), one row at a time."""
    num_tokens, k = plan.kept.shape
    expert_of = torch.repeat_interleave(torch.arange(w.shape[0]), plan.tokens_per_expert.cpu())
    rows = [torch.zeros(w.shape[2], dtype=a.dtype, device=a.device)] * (num_tokens * k)
    for i, assignment in enumerate(plan.order.tolist()):
        source = assignment // k if a.shape[0] == num_tokens else assignment
        row = a[source] @ w[int(expert_of[i])]
        rows[assignment] = row if weights is None else row * weights.view(-1)[assignment]
    return torch.stack(rows)


@needs_kernel
@pytest.mark.parametrize("per_assignment_rows", [False, True], ids=["token-rows", "assignment-rows"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["no-weights", "weights"])
def test_gather_matmul_equals_a_loop_forward_and_backward(per_assignment_rows, with_weights):
    torch.manual_seed(0)
    num_tokens, E, k, K, N = 11, 5, 2, 19, 37  # 37 columns: three column blocks, the last masked
    expert_idx = torch.rand(num_tokens, E - 1).argsort(1)[:, :k]  # expert 4 gets no token
    plan = make_plan(expert_idx.to(DEVICE), E, capacity=4)
    a = torch.randn(num_tokens * k if per_assignment_rows else num_tokens, K, device=DEVICE, requires_grad=True)
    w = torch.randn(E, K, N, device=DEVICE, requires_grad=True)
    weights = torch.rand(num_tokens, k, device=DEVICE, requires_grad=True) if with_weights else None
    inputs = [a, w] + ([weights] if with_weights else [])
    out, expected = gg.gather_matmul(a, w, plan, weights), loop_gather_matmul(a, w, plan, weights)
    assert plan.tokens_per_expert[-1] == 0 and not plan.kept.all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, probe), torch.autograd.grad(expected, inputs, probe),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def layer_and_input(num_tokens, E, k, d, h, capacity_factor, unavailable, activation, seed):
    torch.manual_seed(seed)
    layer = MoELayer(d, h, E, k=k, capacity_factor=capacity_factor, activation=activation).to(DEVICE)
    if unavailable:  # these experts get no token
        layer.available_experts = torch.tensor([e not in unavailable for e in range(E)], device=DEVICE)
    return layer, torch.randn(num_tokens, d, device=DEVICE, requires_grad=True)


def grouped_forward(layer, x, block_m=None):
    """grouped_experts on the layer's own routing and plan (the router stays in the graph)."""
    routing = layer.router(x, available_experts=layer.available_experts)
    capacity = None if layer.capacity_factor is None else expert_capacity(x.shape[0], layer.num_experts, layer.k,
                                                                           layer.capacity_factor)
    plan = make_plan(routing.expert_idx, layer.num_experts, capacity)
    return gg.grouped_experts(x, plan, routing.weights, layer.experts, block_m), plan


@needs_kernel
@settings(max_examples=12)
@given(num_tokens=st.integers(1, 12), E=st.integers(2, 6), k=st.integers(1, 3), d=st.integers(1, 20),
       h=st.integers(1, 24), capacity_factor=st.sampled_from([None, 0.5, 1.0]),
       unavailable=st.sets(st.integers(0, 5), max_size=2), activation=st.sampled_from(["swiglu", "gelu"]),
       seed=st.integers(0, 2**16))
def test_grouped_experts_equal_the_per_token_loop(num_tokens, E, k, d, h, capacity_factor, unavailable,
                                                  activation, seed):
    unavailable = {e for e in unavailable if e < E}
    k = min(k, E - len(unavailable))
    if k < 1:
        unavailable, k = set(), 1
    layer, x = layer_and_input(num_tokens, E, k, d, h, capacity_factor, unavailable, activation, seed)
    out, plan = grouped_forward(layer, x)
    expected = moe_loop(layer, x)
    assert all(plan.tokens_per_expert[e] == 0 for e in unavailable)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    params = [x, *layer.parameters()]  # x, the router, w_gate (swiglu), w_up, w_down
    for got, want in zip(torch.autograd.grad(out.square().sum(), params),
                         torch.autograd.grad(expected.square().sum(), params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_tiles_larger_than_an_expert_and_many_tiles_per_expert_agree():
    """block_m = 32 pads every expert into one tile; with 40 tokens on 2 experts, block_m = 16 cuts
    each expert into several tiles."""
    layer, x = layer_and_input(40, 2, 1, 8, 16, None, set(), "swiglu", seed=3)
    expected = moe_loop(layer, x)
    for block_m in (16, 32):
        out, plan = grouped_forward(layer, x, block_m)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert len(gg.tile_schedule(plan.tokens_per_expert, 16)) > 2


@needs_kernel
def test_bfloat16_is_close_to_the_float32_loop():
    layer, x = layer_and_input(10, 4, 2, 16, 32, None, set(), "swiglu", seed=1)
    expected = moe_loop(layer, x)
    layer = layer.to(torch.bfloat16)
    out, _ = grouped_forward(layer, x.detach().bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_kernel
def test_layer_backend_triton_gemm_equals_the_torch_backend():
    torch.manual_seed(2)
    layer = MoELayer(12, 20, 4, k=2, capacity_factor=1.0, num_shared_experts=1).to(DEVICE)
    x = torch.randn(2, 7, 12, device=DEVICE, requires_grad=True)
    results = []
    for backend in ("torch", "triton_gemm"):
        layer.backend = backend
        out = layer(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])))
    assert layer.stats.dropped_fraction > 0
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_torch_fallback_computes_the_same(monkeypatch):
    layer, x = layer_and_input(9, 4, 2, 10, 14, 1.0, {3}, "swiglu", seed=5)
    kernel_out, _ = grouped_forward(layer, x)
    monkeypatch.setattr(gg, "MODE", "torch")
    torch_out, _ = grouped_forward(layer, x)
    torch.testing.assert_close(torch_out, kernel_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch_out, moe_loop(layer, x), atol=1e-5, rtol=1e-4)


def test_expert_weight_grad_equals_autograd_of_a_loop():
    torch.manual_seed(0)
    a, counts = torch.randn(6, 5), torch.tensor([3, 0, 4])
    rows = torch.tensor([0, 2, 2, 5, 1, 0, 3])
    grad = torch.randn(7, 9)
    w = torch.randn(3, 5, 9, requires_grad=True)
    expert_of = torch.repeat_interleave(torch.arange(3), counts)
    out = torch.stack([a[r] @ w[e] for r, e in zip(rows.tolist(), expert_of.tolist(), strict=True)])
    (expected,) = torch.autograd.grad(out, w, grad)
    torch.testing.assert_close(gg.expert_weight_grad(a, rows, grad, counts), expected)


def small_case():
    plan = make_plan(torch.tensor([[0, 1], [1, 2], [2, 0]], device=DEVICE), 3)
    return plan, torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, 5, device=DEVICE)


@pytest.mark.parametrize(("change", "error", "message"), [
    (dict(a=torch.randn(4, 4)), ValueError, r"a must have T=3 rows \(tokens\) or T\*k=6 rows"),
    (dict(a=torch.randn(3, 4, dtype=torch.float64)), TypeError, r"a must be float32, float16 or bfloat16"),
    (dict(w=torch.randn(2, 4, 5)), ValueError, r"w must be \[E=3, K=4, N\]"),
    (dict(w=torch.randn(3, 4, 5).half()), ValueError, r"of a's dtype torch.float32"),
    (dict(w=torch.randn(4, 5)), ValueError, r"w must have 3 dimensions"),
    (dict(weights=torch.rand(3, 3)), ValueError, r"weights must have shape \(3, 2\)"),
    (dict(weights=torch.ones(3, 2, dtype=torch.int64)), TypeError, r"weights must be a floating-point"),
    (dict(block_m=24), ValueError, r"block_m must be a power of two >= 16, got 24"),
    (dict(block_m=8), ValueError, r"block_m must be >= 16"),
    (dict(plan="plan"), TypeError, r"plan must be a minimoe.dispatch.DispatchPlan"),
], ids=["a-rows", "a-dtype", "w-experts", "w-dtype", "w-ndim", "weights-shape", "weights-dtype", "block-m-pow2",
        "block-m-small", "plan"])
def test_gather_matmul_rejects_bad_input(change, error, message):
    plan, a, w = small_case()
    args = dict(a=a, w=w, plan=plan, weights=None, block_m=None)
    args.update({key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in change.items()})
    with pytest.raises(error, match=message):
        gg.gather_matmul(**args)


@pytest.mark.parametrize(("args", "error", "message"), [
    ((torch.tensor([2.0, 1.0]), 16), TypeError, r"tokens_per_expert must hold integer counts"),
    ((torch.tensor([2, -1]), 16), ValueError, r"tokens_per_expert must be >= 0, got \[2, -1\]"),
    ((torch.tensor([[2, 1]]), 16), ValueError, r"tokens_per_expert must have 1 dimensions"),
    ((torch.tensor([2, 1]), 0), ValueError, r"block_m must be >= 1, got 0"),
])
def test_tile_schedule_rejects_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        gg.tile_schedule(*args)


def test_grouped_experts_and_weight_grad_reject_bad_input():
    plan, x, _ = small_case()
    layer = MoELayer(4, 6, 3, k=2).to(DEVICE)
    with pytest.raises(TypeError, match="experts must be a minimoe.experts.Experts, got Int8Experts"):
        gg.grouped_experts(x, plan, None, Int8Experts(layer.experts))
    with pytest.raises(ValueError, match="x must have 4 columns"):
        gg.grouped_experts(x[:, :3], plan, None, layer.experts)
    with pytest.raises(ValueError, match=r"grad's rows \(2\) and tokens_per_expert's sum \(3\) must equal rows' len"):
        gg.expert_weight_grad(x, torch.tensor([0, 1, 2]), torch.randn(2, 5), torch.tensor([1, 2]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel compiles instead")
def test_mode_is_torch_without_the_interpreter_and_the_result_is_the_same():
    code = """
import torch
from minimoe import MoELayer, grouped_gemm
torch.manual_seed(0)
layer = MoELayer(8, 16, 4, k=2, backend="triton_gemm")
x = torch.randn(10, 8)
y = layer(x)
layer.backend = "torch"
print(grouped_gemm.MODE, torch.allclose(y, layer(x), atol=1e-6))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.split() == ["torch", "True"]


@needs_kernel
def test_the_kernel_compiles_for_an_h100():
    """The GPU path is more than the interpreter checks: compile the kernel for sm_90 (no GPU
    needed) with the largest autotuning blocks, in float32 and bfloat16."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minimoe import grouped_gemm as gg
fn = gg._gather_matmul_kernel
for dt, fp32_dot in [("fp32", True), ("bf16", False)]:
    types = dict(a_ptr=dt, w_ptr=dt, out_ptr=dt, weights_ptr="fp32", order_ptr="i64", tiles_ptr="i64", ends_ptr="i64")
    sig = {a: "*" + types[a] if a in types else "i32" if a in ("K", "N", "ROWS_PER_SOURCE") else "constexpr"
           for a in fn.arg_names}
    meta = dict(HAS_WEIGHTS=True, FP32_DOT=fp32_dot, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64)
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_INTERPRET": "0"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                             cwd=ROOT).stdout
    except subprocess.CalledProcessError as error:
        if "ptxas" in error.stderr or "No module named 'triton.backends.nvidia'" in error.stderr:
            pytest.skip(f"Triton's CUDA compiler is not usable here: {error.stderr.splitlines()[-1]}")
        raise AssertionError(error.stderr) from None
    assert out.strip() == "compiled"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its checks")
def test_gpu_check_without_a_gpu_says_so_and_fails():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), os.devnull], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert result.returncode == 1 and "needs a CUDA GPU, and torch sees none" in result.stderr
