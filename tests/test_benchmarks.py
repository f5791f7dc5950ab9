"""The benchmark compares like with like: every MoE implementation it times computes MoELayer's
output from the same weights (the dense FFN, a different function, is excluded)."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("bench_layer", Path(__file__).parents[1] / "benchmarks" / "layer.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_all_timed_moe_implementations_agree_on_the_tiny_config():
    fns = bench.implementations(bench.CONFIGS["tiny"], with_token_loop=True)
    x = torch.randn(64, 64)
    bench.check_equal(fns, x)  # raises on any difference above 1e-4
    assert "per-token loop (reference)" in fns and "loop over experts" in fns


def test_hf_mixtral_blocks_hold_the_same_weights():
    pytest.importorskip("transformers")
    fns = bench.implementations(bench.CONFIGS["tiny"])
    assert {"HF Mixtral block (eager)", "HF Mixtral block (grouped_mm)"} <= set(fns)
    bench.check_equal(fns, torch.randn(64, 64))


def test_check_equal_catches_a_wrong_implementation():
    fns = bench.implementations(bench.CONFIGS["tiny"])
    layer = fns["minimoe MoELayer"]
    fns["off by a little"] = lambda x: layer(x) + 1e-3
    with pytest.raises(AssertionError, match="off by a little"):
        bench.check_equal(fns, torch.randn(64, 64))


def test_timing_reports_a_median_per_implementation():
    fns = {"minimoe MoELayer": lambda x: x * 2, "other": lambda x: x * 3}
    medians = bench.time_side_by_side(fns, torch.randn(4, 4), repeats=3)
    assert set(medians) == set(fns) and all(t > 0 for t in medians.values())
    assert bench.report(bench.CONFIGS["tiny"], medians).splitlines()[2].split()[-1] == "1.00"
