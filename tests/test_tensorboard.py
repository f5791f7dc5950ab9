"""TensorBoard output of RoutingMonitor.to_tensorboard and of Trainer(writer=...): the event files
read back hold the exact steps and values of the records and of the History (the routing metrics
recomputed here by hand from the History's load shares); with no writer nothing is written and
tensorboard is not imported; without tensorboard the error names the extra."""

import math
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from minimoe.data import load_corpus  # noqa: E402
from minimoe.model import MoETransformer, MoETransformerConfig  # noqa: E402
from minimoe.monitor import METRICS, RoutingMonitor  # noqa: E402
from minimoe.train import TrainConfig, Trainer  # noqa: E402

E = 4
SMALL = dict(vocab_size=20, seq_len=8, d_model=16, n_layers=4, n_heads=2, d_hidden=8, num_experts=E, k=2,
             moe_every=2)  # MoE in blocks 1 and 3
TINY = dict(seq_len=32, d_model=32, n_layers=2, n_heads=4, d_hidden=32, num_experts=E, k=2, capacity_factor=1.0)
TRAIN_SCALARS = ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s")
TRAIN_ROUTING = ("load_entropy", "dead_experts", "max_violation", "cv", "dropped_fraction")
LIMITS = [0.5, 1.5, 2.5, 3.5]  # the histogram's bucket per expert


def read(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def scalars(events, tag) -> tuple[list, list]:
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def assert_histograms(events, tag, steps, shares) -> None:
    """The load-share histograms at `steps` hold the shares [n, E], one bucket per expert."""
    points = events.Histograms(tag)
    assert [p.step for p in points] == list(steps)
    for point, share in zip(points, shares, strict=True):
        h = point.histogram_value
        assert list(h.bucket_limit) == LIMITS
        np.testing.assert_allclose(list(h.bucket), share, rtol=1e-12)
        used = [e for e in range(E) if share[e] > 0]
        assert (h.min, h.max) == (used[0], used[-1])
        assert h.num == pytest.approx(1.0) and h.sum == pytest.approx(sum(e * s for e, s in enumerate(share)))


# ---------------------------------------------------------------------------------------------
# RoutingMonitor.to_tensorboard
# ---------------------------------------------------------------------------------------------

def monitored_run() -> RoutingMonitor:
    """3 training calls (steps 0-2), then 2 eval calls that share step 3."""
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**SMALL))
    with RoutingMonitor(model) as monitor:
        for seed in range(5):
            model.train(seed < 3)
            model(torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(seed)))
    return monitor


def by_step(monitor, layer, training, value) -> tuple[list, list]:
    """(steps, mean over each step's records of value(record)), from the raw records."""
    groups = defaultdict(list)
    for r in monitor.records:
        if r["layer"] == layer and r["training"] == training:
            groups[r["step"]].append(value(r))
    steps = sorted(groups)
    return steps, [np.mean(groups[s], axis=0) for s in steps]


def test_monitor_writes_every_metric_per_layer_and_step_training_and_eval(tmp_path):
    monitor = monitored_run()
    with SummaryWriter(tmp_path) as writer:
        monitor.to_tensorboard(writer, eval_prefix="routing_eval")
    events = read(tmp_path)
    prefixes = {True: "routing", False: "routing_eval"}
    assert set(events.Tags()["scalars"]) == {f"{p}/layer{i}/{m}" for p in prefixes.values() for i in (0, 1)
                                             for m in METRICS}
    assert set(events.Tags()["histograms"]) == {f"{p}/layer{i}/load_share" for p in prefixes.values()
                                                for i in (0, 1)}
    for training, prefix in prefixes.items():
        for layer in (0, 1):
            for name in METRICS:
                steps, values = by_step(monitor, layer, training, lambda r, name=name: r[name])
                assert steps == ([0, 1, 2] if training else [3])
                written_steps, written = scalars(events, f"{prefix}/layer{layer}/{name}")
                assert written_steps == steps
                assert written == pytest.approx(values, rel=1e-6, abs=1e-7), name
            steps, loads = by_step(monitor, layer, training, lambda r: r["load"])  # mean load = summed / calls
            assert_histograms(events, f"{prefix}/layer{layer}/load_share", steps,
                              [load / load.sum() for load in loads])
    # the two eval calls differ, so their mean is not either one
    evals = [r["logit_max"] for r in monitor.records if r["layer"] == 0 and not r["training"]]
    assert evals[0] != evals[1]


def test_monitor_given_a_directory_writes_the_training_records_only(tmp_path):
    monitor = monitored_run()
    monitor.to_tensorboard(tmp_path / "tb", prefix="moe")
    events = read(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {f"moe/layer{i}/{m}" for i in (0, 1) for m in METRICS}
    assert scalars(events, "moe/layer1/cv") == (
        [0, 1, 2], pytest.approx([r["cv"] for r in monitor.records if r["layer"] == 1 and r["training"]]))


def test_monitor_without_records_of_a_mode_is_an_error(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**SMALL)).eval()
    with RoutingMonitor(model) as monitor:
        model(torch.randint(20, (2, 8)))
    with SummaryWriter(tmp_path) as writer, pytest.raises(ValueError, match="no training-mode records"):
        monitor.to_tensorboard(writer)


# ---------------------------------------------------------------------------------------------
# Trainer(writer=...)
# ---------------------------------------------------------------------------------------------

def entropy(share) -> float:
    return -sum(p * math.log(p) for p in share if p > 0) / math.log(len(share))


def spread(share) -> tuple[float, float]:
    """(MaxVio, CV) of a load share."""
    mean = sum(share) / len(share)
    return (max(share) - mean) / mean, math.sqrt(sum((p - mean) ** 2 for p in share) / len(share)) / mean


def test_trainer_logs_the_history_as_it_trains(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    trainer = Trainer(model, load_corpus(), TrainConfig(steps=5, batch_size=4, eval_every=2),
                      writer=tmp_path / "tb")
    history = trainer.run(progress=False)
    events = read(tmp_path / "tb")
    routing = [f"train/routing/layer{i}/{m}" for i in (0, 1) for m in TRAIN_ROUTING]
    assert set(events.Tags()["scalars"]) == {f"train/{m}" for m in TRAIN_SCALARS} | {"val/loss"} | set(routing)
    assert set(events.Tags()["histograms"]) == {"train/routing/layer0/load_share", "train/routing/layer1/load_share"}

    for name in TRAIN_SCALARS:
        assert scalars(events, f"train/{name}") == ([0, 1, 2, 3, 4], pytest.approx(getattr(history, name), rel=1e-6))
    assert history.val_step == [2, 4, 5]
    assert scalars(events, "val/loss") == (history.val_step, pytest.approx(history.val_loss, rel=1e-6))
    for layer in (0, 1):
        shares = [step[layer] for step in history.load_share]
        expected = dict(load_entropy=[entropy(s) for s in shares],
                        dead_experts=[float(sum(p == 0 for p in s)) for s in shares],
                        max_violation=[spread(s)[0] for s in shares], cv=[spread(s)[1] for s in shares],
                        dropped_fraction=[step[layer] for step in history.dropped_fraction])
        for name, values in expected.items():
            assert scalars(events, f"train/routing/layer{layer}/{name}") == (
                [0, 1, 2, 3, 4], pytest.approx(values, rel=1e-6, abs=1e-7)), name
        assert_histograms(events, f"train/routing/layer{layer}/load_share", range(5), shares)
    assert max(max(d) for d in history.dropped_fraction) > 0  # capacity factor 1: a value that is not 0


def test_no_writer_writes_nothing_and_never_imports_tensorboard(tmp_path):
    script = """
import sys, torch
from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.monitor import RoutingMonitor
from minimoe.train import TrainConfig, Trainer
model = MoETransformer(MoETransformerConfig(seq_len=16, d_model=16, n_layers=1, n_heads=2, d_hidden=16,
                                            num_experts=4, k=2))
with RoutingMonitor(model) as monitor:
    Trainer(model, load_corpus(), TrainConfig(steps=2, batch_size=2, eval_batches=1)).run(progress=False)
assert {r["training"] for r in monitor.records} == {True, False}  # it trained and validated
print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorb")))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no event file


def test_without_tensorboard_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    monitor = monitored_run()
    with pytest.raises(ImportError, match=r"pip install minimoe\[tensorboard\]"):
        monitor.to_tensorboard(tmp_path)
    model = MoETransformer(MoETransformerConfig(**TINY))
    with pytest.raises(ImportError, match=r"pip install minimoe\[tensorboard\]"):
        Trainer(model, load_corpus(), writer=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
