"""GB/s of minimoe's Triton permute and unpermute kernels on a CUDA GPU, side by side with torch's
index_select / index_add_ and with a device-to-device copy of the same bytes (the limit).

    python benchmarks/dispatch_kernels.py                          # bf16, k=2, E=8, several T and d
    python benchmarks/dispatch_kernels.py --dtype float32 --k 8 --tokens 8192 --widths 2048

Bytes are the least any implementation must move, counted alike for all of them: permute reads
each token once and writes its k copies, unpermute reads the k rows and writes their sum, so each
moves (1 + k) T d b bytes (b per element; the [T, k] index and weight arrays, under 1% at these
widths, are left out). The copy reads and writes half that many bytes each: its GB/s is what the
memory system gives a kernel that does nothing but move data. Both kernels get the destination
map and torch the sorted token ids precomputed, as a layer computes them once per plan. Every
implementation is checked against torch before timing. Times are medians of
triton.testing.do_bench, which clears the L2 cache before each run.
Without a CUDA GPU (or with TRITON_INTERPRET=1) the script says so and exits 0.
"""

import argparse
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimoe import kernels
from minimoe.dispatch import make_plan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GOAL = (32768, 4096, 0.80)  # tokens, width, fraction of copy bandwidth both kernels should reach (bf16)


@dataclass
class Case:
    tokens: int
    width: int
    k: int
    num_experts: int
    dtype: torch.dtype
    device: str

    @property
    def bytes_moved(self) -> int:
        """(1 + k) T d b: permute and unpermute alike."""
        return (1 + self.k) * self.tokens * self.width * torch.empty((), dtype=self.dtype).element_size()


def implementations(case: Case) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """operation -> implementation name -> a function of no arguments, on seeded random data with
    k distinct uniformly random experts per token (dropless)."""
    gen = torch.Generator().manual_seed(0)
    expert_idx = torch.rand(case.tokens, case.num_experts, generator=gen).argsort(1)[:, :case.k]
    plan = make_plan(expert_idx.to(case.device), case.num_experts)
    rows = plan.order.numel()
    x = torch.randn(case.tokens, case.width, generator=gen).to(case.device, case.dtype)
    y = torch.randn(rows, case.width, generator=gen).to(case.device, case.dtype)
    weights = torch.rand(case.tokens, case.k, generator=gen).softmax(-1).to(case.device)
    dest, token_idx = kernels.destinations(plan), plan.token_idx
    w_sorted = weights.reshape(-1)[plan.order].to(case.dtype)[:, None]
    combined = torch.empty_like(x)
    copy_src = torch.empty(case.bytes_moved // 2 // x.element_size(), dtype=case.dtype, device=case.device)
    copy_dst = torch.empty_like(copy_src)
    return {
        "permute": {
            "triton kernel": lambda: kernels.permute_rows(x, dest, rows),
            "torch index_select": lambda: x.index_select(0, token_idx),
        },
        "unpermute": {
            "triton kernel": lambda: kernels.unpermute_rows(y, dest, weights),
            "torch index_add_": lambda: combined.zero_().index_add_(0, token_idx, y * w_sorted),
        },
        "copy": {"device copy": lambda: copy_dst.copy_(copy_src)},
    }


def check_equal(impls: dict[str, dict[str, Callable]]) -> None:
    """Within each operation, every implementation gives the first one's result (to the
    rounding of the dtype: the kernel sums in float32, index_add_ in the tensors' dtype)."""
    for op in ("permute", "unpermute"):
        (first, ref_fn), *others = impls[op].items()
        expected = ref_fn()
        tol = 1e-5 if expected.dtype in (torch.float32, torch.float64) else 2e-2
        for name, fn in others:
            got = fn()
            if not torch.allclose(got.float(), expected.float(), atol=tol, rtol=tol):
                diff = (got.float() - expected.float()).abs().max().item()
                raise AssertionError(f"{op}: {name} differs from {first} by up to {diff:.3g}")


def measure(case: Case) -> list[dict]:
    """One row per (operation, implementation): microseconds, GB/s, fraction of the copy's GB/s."""
    from triton.testing import do_bench

    impls = implementations(case)
    check_equal(impls)
    copy_gbps = None
    rows = []
    for op in ("copy", "permute", "unpermute"):
        for name, fn in impls[op].items():
            seconds = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
            gbps = case.bytes_moved / seconds / 1e9
            copy_gbps = copy_gbps or gbps
            rows.append(dict(tokens=case.tokens, width=case.width, op=op, impl=name, us=seconds * 1e6,
                             gbps=gbps, of_copy=gbps / copy_gbps))
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table, ready to paste into the chapter."""
    lines = ["| tokens | width | operation | implementation | µs | GB/s | of copy |",
             "|---:|---:|---|---|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['width']} | {r['op']} | {r['impl']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{r['of_copy']:.0%} |" for r in rows]
    return "\n".join(lines)


def goal_line(rows: list[dict]) -> str | None:
    tokens, width, fraction = GOAL
    got = {r["op"]: r["of_copy"] for r in rows
           if (r["tokens"], r["width"], r["impl"]) == (tokens, width, "triton kernel")}
    if not got:
        return None
    verdict = "met" if min(got.values()) >= fraction else "NOT met"
    return (f"goal ({tokens} tokens x {width}, both kernels >= {fraction:.0%} of copy): {verdict} "
            f"(permute {got['permute']:.0%}, unpermute {got['unpermute']:.0%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2880, 4096])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= args.experts:
        parser.error(f"--k must be in [1, --experts={args.experts}], got {args.k}")
    if min(args.tokens + args.widths) < 1:
        parser.error(f"--tokens and --widths must be >= 1, got {args.tokens} and {args.widths}")
    if not torch.cuda.is_available() or kernels.MODE != "compiled":
        print(f"benchmarks/dispatch_kernels.py needs a CUDA GPU with Triton compiling kernels (here: kernels "
              f"MODE={kernels.MODE!r}, CUDA available: {torch.cuda.is_available()}). Nothing to measure; "
              "tests/test_kernels.py checks the kernels' results on CPU under the Triton interpreter.")
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {args.dtype}, k={args.k}, E={args.experts}\n")
    rows = []
    for tokens in args.tokens:
        for width in args.widths:
            rows += measure(Case(tokens, width, args.k, args.experts, DTYPES[args.dtype], "cuda"))
    print(table(rows))
    if (line := goal_line(rows)) and args.dtype == "bfloat16":
        print("\n" + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
