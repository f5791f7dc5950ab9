"""Forward + backward time of MoE layer implementations, measured side by side in one process.

    python benchmarks/layer.py                 # all configs, 2 threads
    python benchmarks/layer.py --repeats 9 --threads 2 --config fine-grained
    python benchmarks/layer.py --default-malloc   # the default-allocator column only
    python benchmarks/layer.py --device cuda      # on a GPU, with MoELayer's Triton backends too

Every implementation computes the same function with the same weights (checked before timing).
Runs are interleaved (A B C A B C ...) so that drift in machine speed hits all of them alike;
the table reports medians and each one's ratio to minimoe's MoELayer, and the peak memory of
one forward + backward (profiler allocation events, which the allocator settings do not change).

Allocator: glibc serves every buffer over 32 MB with a fresh mmap and returns it on free, so
each new buffer is page-faulted in again (here ~35 ms for 64 MB). MoE dispatch makes several
[T*k, d] buffers per step and pays this far more than a dense FFN does. The first timing column
is glibc as it comes (what a notebook gets); for the second, the script runs itself again in a
child process with MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_, which keep freed
memory for reuse, as PyTorch's CPU performance guide advises (or jemalloc / tcmalloc). The two
columns come from two processes run one after the other, so compare ratios, not milliseconds.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minimoe import FeedForward, MoELayer
from minimoe.reference import moe_loop

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or loaded from a path by the tests
from memory import peak_memory  # noqa: E402


@dataclass
class Config:
    name: str
    tokens: int
    d_model: int
    d_hidden: int
    num_experts: int
    k: int


CONFIGS = {
    "mixtral-like": Config("mixtral-like", 4096, 512, 1024, 8, 2),
    "fine-grained": Config("fine-grained", 4096, 512, 128, 64, 8),
    "tiny": Config("tiny", 64, 64, 128, 8, 2),  # small enough for the per-token loop
}
REUSE_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def expert_loop(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The common 'loop over experts' MoE: for each expert, find its tokens with a mask, run the
    FFN on them, scale and scatter-add back (the pattern of many tutorials and HF's eager path)."""
    routing = layer.router(x)
    ex = layer.experts
    out = torch.zeros_like(x)
    for e in range(layer.num_experts):
        token, slot = torch.where(routing.expert_idx == e)
        if token.numel() == 0:
            continue
        rows = x[token]
        hidden = torch.nn.functional.silu(rows @ ex.w_gate[e]) * (rows @ ex.w_up[e])
        out.index_add_(0, token, (hidden @ ex.w_down[e]) * routing.weights[token, slot, None])
    return out


def hf_mixtral_block(layer: MoELayer, implementation: str):
    """transformers' MixtralSparseMoeBlock holding `layer`'s weights, or None if not installed."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=layer.d_model, intermediate_size=layer.experts.d_hidden,
                           num_local_experts=layer.num_experts, num_experts_per_tok=layer.k,
                           experts_implementation=implementation)
    block = MixtralSparseMoeBlock(config)
    ex = layer.experts
    with torch.no_grad():  # HF stores weights for F.linear (x @ W.T), gate and up concatenated
        block.gate.weight.copy_(layer.router.proj.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.w_gate, ex.w_up], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(ex.w_down.transpose(1, 2))
    return block


def implementations(cfg: Config, with_token_loop: bool = False, device: str = "cpu") -> dict[str, Callable]:
    """name -> function(x) of the same MoE (and the dense FFN with hidden k*h: same active FLOPs),
    on `device`; on a GPU also MoELayer with its Triton backends (on a CPU they would only be interpreted)."""
    torch.manual_seed(0)
    layer = MoELayer(cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.k).to(device)
    dense = FeedForward(cfg.d_model, cfg.k * cfg.d_hidden).to(device)
    fns = {
        "minimoe MoELayer": layer,
        f"dense SwiGLU, hidden k*h={cfg.k * cfg.d_hidden}": dense,
        "loop over experts": lambda x: expert_loop(layer, x),
    }
    if device == "cuda":
        for backend in ("triton", "triton_gemm"):
            fns[f"minimoe MoELayer, backend={backend}"] = copy.deepcopy(layer)
            fns[f"minimoe MoELayer, backend={backend}"].backend = backend
    for impl in ("eager", "grouped_mm"):
        block = hf_mixtral_block(layer, impl)
        if block is not None:
            block.to(device)
            fns[f"HF Mixtral block ({impl})"] = lambda x, b=block: b(x[None])[0]
    if with_token_loop:
        fns["per-token loop (reference)"] = lambda x: moe_loop(layer, x)
    return fns


def check_equal(fns: dict[str, Callable], x: torch.Tensor, atol: float = 1e-4) -> None:
    """Every MoE implementation must give minimoe's output (the dense FFN is a different function)."""
    expected = fns["minimoe MoELayer"](x)
    for name, fn in fns.items():
        if not name.startswith("dense"):
            diff = (fn(x) - expected).abs().max().item()
            if diff > atol:
                raise AssertionError(f"{name} differs from MoELayer by {diff:.2e}")


def time_side_by_side(fns: dict[str, Callable], x: torch.Tensor, repeats: int = 7) -> dict[str, float]:
    """Median seconds of forward+backward per implementation, runs interleaved, one warm-up each."""
    grad = torch.randn_like(x)
    times = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            xr = x.detach().requires_grad_()
            _synchronize(x)
            start = time.perf_counter()
            fn(xr).backward(grad)
            _synchronize(x)
            if rep > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _synchronize(x: torch.Tensor) -> None:
    """Wait for the GPU, so that the clock measures the work and not its launch."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def report(cfg: Config, medians: dict[str, float], reuse: dict[str, float] | None = None,
           memory: dict[str, int] | None = None) -> str:
    """The table: ms and ratio to MoELayer with the default allocator, then (when given) with freed
    memory reused, then peak MB of forward + backward and its ratio; and MoELayer / dense."""
    columns = [("ms", medians), ("ms reuse", reuse), ("peak MB", memory)]
    columns = [(title, values) for title, values in columns if values is not None]
    lines = [f"{cfg.name}: T={cfg.tokens} d={cfg.d_model} h={cfg.d_hidden} E={cfg.num_experts} k={cfg.k}",
             f"{'implementation':<36}" + "".join(f"{title:>10} {'/ minimoe':>9}" for title, _ in columns)]
    scale = {"ms": 1e3, "ms reuse": 1e3, "peak MB": 2.0 ** -20}
    for name in medians:
        lines.append(f"{name:<36}" + "".join(
            f"{scale[title] * values[name]:>10.1f} {values[name] / values['minimoe MoELayer']:>9.2f}"
            for title, values in columns))
    for dense in (name for name in medians if name.startswith("dense")):
        lines.append("MoELayer / dense: " + ", ".join(
            f"{title} {values['minimoe MoELayer'] / values[dense]:.2f}" for title, values in columns))
    return "\n".join(lines)


def measure(name: str, args) -> tuple[dict[str, float], dict[str, int] | None]:
    """(medians, peak memory or None on a GPU) of every implementation of config `name`."""
    cfg = CONFIGS[name]
    fns = implementations(cfg, with_token_loop=name == "tiny", device=args.device)
    x = torch.randn(cfg.tokens, cfg.d_model, device=args.device)
    check_equal(fns, x)
    medians = time_side_by_side(fns, x, args.repeats)
    memory = None if args.device == "cuda" else {n: peak_memory(fn, x) for n, fn in fns.items()}
    return medians, memory


def reuse_column(args) -> dict[str, dict[str, float]]:
    """{config: medians} measured by this script in a child process with freed memory kept for
    reuse (glibc reads the MALLOC_* settings only at process start)."""
    command = [sys.executable, __file__, "--json", "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--device", args.device, *[f"--config={name}" for name in args.config]]
    child = subprocess.run(command, env={**os.environ, **REUSE_FREED_MEMORY}, capture_output=True, text=True,
                           check=True)
    return json.loads(child.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), action="append")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="only the default-allocator column (no child process with freed memory reused)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch sees none")
    args.config = args.config or ["tiny", "mixtral-like", "fine-grained"]
    torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps({name: time_side_by_side(implementations(CONFIGS[name], name == "tiny", args.device),
                                                  torch.randn(CONFIGS[name].tokens, CONFIGS[name].d_model,
                                                              device=args.device), args.repeats)
                          for name in args.config}))
        return
    tuned = all(os.environ.get(name) == value for name, value in REUSE_FREED_MEMORY.items())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    allocator = "glibc malloc as set in this environment" if tuned else "glibc malloc, default settings"
    print(f"torch {torch.__version__}, {where}, float32, forward+backward, median of {args.repeats} interleaved "
          f"runs; ms: {allocator}" + ("" if args.default_malloc else "; ms reuse: freed memory kept for reuse") + "\n")
    results = {name: measure(name, args) for name in args.config}
    reuse = {} if args.default_malloc else reuse_column(args)
    for name, (medians, memory) in results.items():
        print(report(CONFIGS[name], medians, reuse.get(name), memory), "\n")


if __name__ == "__main__":
    main()
