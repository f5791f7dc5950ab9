"""minimoe.kernels: the Triton permute / unpermute kernels give minimoe.dispatch's results,
forward and backward, for odd widths, k = 1..4, capacity dropping, experts with no token and
tokens with every assignment dropped; MoELayer(backend="triton") equals backend="torch"; the
torch fallback; input validation; the doctor line and the benchmark's CPU behaviour.

Without a GPU the kernels run under the Triton interpreter (minimoe.kernels sets
TRITON_INTERPRET=1), about a millisecond per program: sizes stay small."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimoe import kernels
from minimoe.cli import main as cli
from minimoe.dispatch import make_plan, permute, unpermute
from minimoe.layer import MoELayer

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(kernels.MODE == "torch", reason="Triton cannot run here (it is Linux-only); "
                                  "minimoe.kernels falls back to torch")
DEVICE = "cuda" if kernels.MODE == "compiled" else "cpu"


def plan_for(num_tokens, num_experts, k, capacity=None, empty_expert=False, seed=0):
    """A plan for k distinct random experts per token; empty_expert: the last expert gets none."""
    gen = torch.Generator().manual_seed(seed)
    pool = num_experts - 1 if empty_expert else num_experts
    expert_idx = torch.rand(num_tokens, pool, generator=gen).argsort(1)[:, :k]
    return make_plan(expert_idx.to(DEVICE), num_experts, capacity)


def randn(*shape, dtype=torch.float32, seed=1, requires_grad=True):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


# (tokens, width, experts, k, capacity, empty_expert)
CASES = {
    "k1": (10, 7, 4, 1, None, False),
    "k2-capacity": (12, 33, 4, 2, 4, False),
    "k3-empty-expert": (9, 1, 5, 3, None, True),
    "k4-tokens-fully-dropped": (10, 20, 4, 4, 3, False),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    tokens, width, experts, k, capacity, empty = CASES[request.param]
    return plan_for(tokens, experts, k, capacity, empty), width


def test_cases_cover_empty_experts_and_dropping():
    plans = {name: plan_for(t, e, k, c, empty) for name, (t, _, e, k, c, empty) in CASES.items()}
    assert plans["k3-empty-expert"].tokens_per_expert[-1] == 0
    assert not plans["k2-capacity"].kept.all()
    assert (~plans["k4-tokens-fully-dropped"].kept).all(1).any()  # some token loses all k


def test_destinations_invert_the_plan_order(case):
    plan, _ = case
    dest = kernels.destinations(plan)
    assert dest.shape == plan.kept.shape and dest.dtype == torch.int64
    assert torch.equal(dest.view(-1)[plan.order], torch.arange(plan.order.numel(), device=dest.device))
    assert torch.equal(dest < 0, ~plan.kept)


def grads(out, inputs, seed=3):
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, probe)


@needs_triton
def test_permute_equals_torch(case):
    plan, width = case
    x = randn(plan.kept.shape[0], width)
    got, expected = kernels.triton_permute(x, plan), permute(x, plan)
    assert torch.equal(got, expected)
    torch.testing.assert_close(grads(got, x), grads(expected, x))


@needs_triton
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
def test_unpermute_equals_torch(case, weighted):
    plan, width = case
    y = randn(plan.order.numel(), width)
    w = torch.rand(plan.kept.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
    weights = w if weighted else None
    got, expected = kernels.triton_unpermute(y, plan, weights), unpermute(y, plan, weights)
    torch.testing.assert_close(got, expected)
    inputs = [y, w] if weighted else [y]
    torch.testing.assert_close(grads(got, inputs), grads(expected, inputs))


@needs_triton
@pytest.mark.parametrize("width", [37, 48], ids=["tail-masked", "whole-blocks"])
def test_rows_wider_than_one_block(monkeypatch, width):
    """With 16 columns per program, a row spans several programs; 37 leaves a partial last block."""
    monkeypatch.setattr(kernels, "MAX_BLOCK_D", 16)
    plan = plan_for(6, 4, 2, capacity=2)
    x, w = randn(6, width), torch.rand(6, 2, device=DEVICE, requires_grad=True)
    assert torch.equal(kernels.triton_permute(x, plan), permute(x, plan))
    y = randn(plan.order.numel(), width)
    got, expected = kernels.triton_unpermute(y, plan, w), unpermute(y, plan, w)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grads(got, [y, w]), grads(expected, [y, w]))


@needs_triton
def test_everything_dropped():
    plan = plan_for(5, 3, 2, capacity=0)
    x, w = randn(5, 6), torch.rand(5, 2, device=DEVICE, requires_grad=True)
    x_sorted = kernels.triton_permute(x, plan)
    assert x_sorted.shape == (0, 6)
    out = kernels.triton_unpermute(x_sorted, plan, w)
    assert torch.equal(out, torch.zeros(5, 6, device=DEVICE))
    grad_x, grad_w = grads(out, [x, w])
    assert not grad_x.any() and not grad_w.any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    """A copy is exact; the combine accumulates in float32 and rounds once, so it is within one
    unit in the last place of the exact sum (the interpreter truncates to bf16, a GPU rounds)."""
    plan = plan_for(8, 4, 2)
    x = randn(8, 24, dtype=dtype, requires_grad=False)
    assert torch.equal(kernels.triton_permute(x, plan), permute(x, plan))
    y, w = randn(plan.order.numel(), 24, dtype=dtype, requires_grad=False), torch.rand(8, 2, device=DEVICE)
    exact = unpermute(y.float(), plan, w)
    got = kernels.triton_unpermute(y, plan, w)
    assert got.dtype == dtype
    assert ((got.float() - exact).abs() <= torch.finfo(dtype).eps * exact.abs()).all()


@needs_triton
def test_gradcheck_float64():
    plan = plan_for(4, 3, 2, capacity=2)
    x = randn(4, 3, dtype=torch.float64)
    y = randn(plan.order.numel(), 3, dtype=torch.float64, seed=4)
    w = torch.rand(4, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernels.triton_permute(t, plan), (x,))
    assert torch.autograd.gradcheck(lambda a, b: kernels.triton_unpermute(a, plan, b), (y, w))
    grad = randn(4, 3, dtype=torch.float64, seed=5, requires_grad=False)
    got = torch.autograd.grad(kernels.triton_unpermute(y, plan, w), (y, w), grad)
    expected = torch.autograd.grad(unpermute(y, plan, w), (y, w), grad)
    for a, b in zip(got, expected, strict=True):  # float64 accumulation in every kernel, backward included
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@needs_triton
@pytest.mark.parametrize("config", [dict(k=2), dict(k=3, capacity_factor=0.5, num_shared_experts=1)],
                         ids=["dropless", "capacity-shared"])
def test_layer_triton_backend_equals_torch(config, monkeypatch):
    launches = []

    def spy(name, launch):
        return lambda *args: launches.append(name) or launch(*args)

    for name in ("_launch_permute", "_launch_unpermute"):
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    torch.manual_seed(0)
    layers = {backend: MoELayer(16, 32, 6, backend=backend, **config).to(DEVICE) for backend in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = randn(2, 9, 16)
    results = {}
    for backend, layer in layers.items():
        out = layer(x)
        results[backend] = (out, grads(out, [x, *layer.parameters()]))
    torch.testing.assert_close(results["triton"], results["torch"])
    assert launches == ["_launch_permute", "_launch_unpermute"] * 2  # forward, then each one's backward
    if "capacity_factor" in config:
        assert layers["triton"].stats.dropped_fraction > 0


def test_torch_fallback_when_kernels_cannot_run(monkeypatch):
    def no_kernels(*args):
        raise AssertionError("a kernel was launched")

    plan = plan_for(6, 4, 2, capacity=2)
    x, y, w = randn(6, 5), randn(plan.order.numel(), 5), torch.rand(6, 2, device=DEVICE)
    monkeypatch.setattr(kernels, "_launch_permute", no_kernels)
    monkeypatch.setattr(kernels, "_launch_unpermute", no_kernels)
    for mode in ("torch", "compiled"):  # compiled kernels cannot run CPU tensors
        monkeypatch.setattr(kernels, "MODE", mode)
        if mode == "compiled" and DEVICE == "cuda":
            continue
        assert torch.equal(kernels.triton_permute(x, plan), permute(x, plan))
        assert torch.equal(kernels.triton_unpermute(y, plan, w), unpermute(y, plan, w))
        with pytest.raises(RuntimeError, match="fall back to torch"):
            kernels.permute_rows(x, kernels.destinations(plan), plan.order.numel())


@needs_triton
def test_rows_functions_reuse_one_destination_map():
    plan = plan_for(7, 4, 3, capacity=4)
    dest = kernels.destinations(plan)
    x, w = randn(7, 5), torch.rand(7, 3, device=DEVICE)
    x_sorted = kernels.permute_rows(x, dest, plan.order.numel())
    assert torch.equal(x_sorted, permute(x, plan))
    torch.testing.assert_close(kernels.unpermute_rows(x_sorted, dest, w), unpermute(x_sorted, plan, w))


PLAN = plan_for(4, 3, 2)
BAD_CALLS = {
    "plan-type": (lambda: kernels.triton_permute(torch.zeros(4, 3), "plan"), TypeError, "plan"),
    "x-rows": (lambda: kernels.triton_permute(torch.zeros(5, 3), PLAN), ValueError, "x"),
    "x-1d": (lambda: kernels.triton_permute(torch.zeros(4), PLAN), ValueError, "x"),
    "x-int": (lambda: kernels.triton_permute(torch.zeros(4, 3, dtype=torch.int64), PLAN), TypeError, "x"),
    "y-rows": (lambda: kernels.triton_unpermute(torch.zeros(7, 3), PLAN, None), ValueError, "y"),
    "weights-shape": (lambda: kernels.triton_unpermute(torch.zeros(8, 3), PLAN, torch.ones(4, 3)), ValueError,
                      "weights"),
    "weights-int": (lambda: kernels.triton_unpermute(torch.zeros(8, 3), PLAN, torch.ones(4, 2, dtype=torch.int64)),
                    TypeError, "weights"),
    "dest-dtype": (lambda: kernels.permute_rows(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.int32), 8),
                   ValueError, "dest"),
    "num-rows": (lambda: kernels.permute_rows(torch.zeros(4, 3), kernels.destinations(PLAN), -1), ValueError,
                 "num_rows"),
    "dest-past-rows": (lambda: kernels.permute_rows(torch.zeros(4, 3), torch.full((4, 2), 8), 8), ValueError, "dest"),
    "dest-below-minus-1": (lambda: kernels.unpermute_rows(torch.zeros(8, 3), torch.full((4, 2), -2)), ValueError,
                           "dest"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(name):
    call, error, argument = BAD_CALLS[name]
    with pytest.raises(error, match=rf"\b{argument}\b"):
        call()


def test_doctor_reports_how_kernels_run(capsys):
    assert cli(["doctor"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("kernels"))
    expected = {"compiled": "compiled for the GPU", "interpreted": "interpreted on CPU", "torch": "torch fallback"}
    assert expected[kernels.MODE] in line


def python(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ,
                          cwd=ROOT).stdout


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels compile instead")
@pytest.mark.parametrize(("first_import", "mode"), [
    ("", "interpreted"),
    ("import triton", "torch"),  # triton.language's own @jit helpers are then not interpreted
    ("from torch.utils.flop_counter import FlopCounterMode", "torch"),  # imports triton.language
])
def test_kernels_run_interpreted_only_if_triton_language_was_not_imported_before(first_import, mode):
    """Either way the layer computes the same; the kernels never claim a mode they cannot run in."""
    code = f"""
import torch
{first_import}
from minimoe import MoELayer, kernels
torch.manual_seed(0)
layer = MoELayer(8, 16, 4, k=2, backend="triton")
x = torch.randn(10, 8)
y_triton = layer(x)
layer.backend = "torch"
print(kernels.MODE, torch.allclose(y_triton, layer(x), atol=1e-6))
"""
    assert python(code).split() == [mode, "True"]


@needs_triton
def test_kernels_compile_for_an_h100():
    """The GPU path is more than the interpreter accepts: compile every kernel for sm_90 (no GPU
    needed), in each dtype."""
    code = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from minimoe import kernels
for dt, acc in [("bf16", tl.float32), ("fp16", tl.float32), ("fp32", tl.float32), ("fp64", tl.float64)]:
    for fn, ptrs, constexprs in [
        (kernels._permute_kernel, dict(x_ptr=dt, w_ptr="fp32", out_ptr=dt), dict(K=3, HAS_WEIGHTS=True, ACC=acc)),
        (kernels._unpermute_kernel, dict(y_ptr=dt, w_ptr="fp32", out_ptr=dt), dict(K=2, HAS_WEIGHTS=True, ACC=acc)),
        (kernels._weight_grad_kernel, dict(grad_ptr=dt, y_ptr=dt, out_ptr="fp32"), dict(K=4, ACC=acc))]:
        types = ptrs | dict(dest_ptr="i64")
        sig = {a: "*" + types[a] if a in types else "i32" if a == "d" else "constexpr" for a in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs | dict(BLOCK_D=1024)),
                       target=GPUTarget("cuda", 90, 32))
print("compiled")
"""
    try:
        out = python(code, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    except subprocess.CalledProcessError as error:
        if "ptxas" in error.stderr or "No module named 'triton.backends.nvidia'" in error.stderr:
            pytest.skip(f"Triton's CUDA compiler is not usable here: {error.stderr.splitlines()[-1]}")
        raise AssertionError(error.stderr) from None
    assert out.strip() == "compiled"


spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "dispatch_kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark runs")
def test_benchmark_without_a_gpu_says_so_and_exits_0(capsys):
    assert bench.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@needs_triton
@pytest.mark.parametrize(("argv", "message"), [(["--k", "9"], "--k must be in [1, --experts=8], got 9"),
                                               (["--widths", "0"], "--tokens and --widths must be >= 1")])
def test_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_compares_like_with_like():
    case = bench.Case(tokens=6, width=5, k=3, num_experts=4, dtype=torch.float32, device=DEVICE)
    assert case.bytes_moved == (1 + 3) * 6 * 5 * 4
    impls = bench.implementations(case)
    bench.check_equal(impls)  # raises if the kernel and torch differ
    impls["permute"]["off by a little"] = lambda: impls["permute"]["torch index_select"]() + 1e-3
    with pytest.raises(AssertionError, match="off by a little"):
        bench.check_equal(impls)
