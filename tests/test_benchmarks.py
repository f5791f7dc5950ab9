"""The benchmark compares like with like: every MoE implementation it times computes MoELayer's
output from the same weights (the dense FFN, a different function, is excluded)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("bench_layer", Path(__file__).parents[1] / "benchmarks" / "layer.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_no_benchmark_script_shadows_an_installed_module():
    """The scripts put benchmarks/ first on sys.path (for their shared helper), so a script named
    like an installed package hides it from everything imported later: a benchmarks/kernels.py
    hid Hugging Face's `kernels`, which transformers 5.25 imports."""
    names = sorted(path.stem for path in (Path(__file__).parents[1] / "benchmarks").glob("*.py"))
    probe = "import importlib.util, sys; print([n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    found = subprocess.run([sys.executable, "-I", "-c", probe, *names], capture_output=True, text=True,
                           check=True, cwd="/").stdout.strip()
    assert found == "[]", f"benchmarks/ scripts named like installed modules: {found}"


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


def test_layer_report_gives_each_column_its_ratios_and_moe_over_dense():
    medians = {"minimoe MoELayer": 0.2, "dense SwiGLU": 0.1}
    table = bench.report(bench.CONFIGS["tiny"], medians, reuse={"minimoe MoELayer": 0.1, "dense SwiGLU": 0.08},
                         memory={"minimoe MoELayer": 3 * 2**20, "dense SwiGLU": 2 * 2**20}).splitlines()
    assert table[3].split()[-6:] == ["100.0", "0.50", "80.0", "0.80", "2.0", "0.67"]
    assert table[4] == "MoELayer / dense: ms 2.00, ms reuse 1.25, peak MB 1.50"


step_spec = importlib.util.spec_from_file_location("bench_train_step",
                                                   Path(__file__).parents[1] / "benchmarks" / "train_step.py")
step_bench = importlib.util.module_from_spec(step_spec)
step_spec.loader.exec_module(step_bench)


def test_train_step_benchmark_pairs_each_moe_with_its_dense_twin():
    configs = step_bench.configs("full")
    assert list(configs) == ["dense", "E=8, k=2, h=96", "E=16, k=4, h=48", "E=32, k=8, h=24"]
    assert configs["dense"].num_experts == 1 and configs["dense"].d_hidden == 192
    assert all(c.k * c.d_hidden == 192 and c.d_model == 96 and c.n_layers == 3 for c in configs.values())


def test_train_step_benchmark_times_profiles_and_reports_every_model():
    runs = step_bench.trainers("default", variants=((4, 2),), batch_size=2)
    medians = step_bench.time_steps(runs, repeats=1, warmup=0)
    assert set(medians) == {"dense", "E=4, k=2, h=64"} and all(t > 0 for t in medians.values())
    assert all(trainer.step == 1 for trainer in runs.values())  # one real optimiser step each
    stages = {name: step_bench.stage_times(trainer, steps=1) for name, trainer in runs.items()}
    moe, dense = stages["E=4, k=2, h=64"], stages["dense"]
    assert list(moe) == list(step_bench.STAGES)
    # every wrapped function was found and ran
    assert all(moe[s] > 0 for s in step_bench.STAGES)
    assert dense["experts"] > 0 and dense["optimiser"] > 0
    assert dense["router"] == dense["plan"] == 0
    memory = {"dense": 1 << 20, "E=4, k=2, h=64": 3 << 19}
    table = step_bench.report("default", medians, memory).splitlines()
    assert table[0].startswith("default shape: d_model=64") and table[2].split()[-3:] == ["1.00", "1.00", "1.00"]
    assert table[3].split()[-1] == "1.50"
    profile_table = step_bench.stage_report(stages).splitlines()
    assert [line.split()[0] for line in profile_table[2:]] == [s.split()[0] for s in step_bench.STAGES] + ["total"]


def test_peak_memory_sees_a_transient_buffer():
    one_mb = 1 << 20
    peak = step_bench.peak_memory(lambda x: (x + torch.ones(one_mb // 4)).sum(-1, keepdim=True), torch.ones(1))
    assert one_mb <= peak < 3 * one_mb
    layer_peaks = step_bench.layer_memory("default", variants=((4, 2),))
    assert set(layer_peaks) == {"dense", "E=4, k=2, h=64"} and all(p > 0 for p in layer_peaks.values())
