"""minimoe.monitor: every recorded value against the metrics computed here by hand from the same
routing, the step convention in training and eval, hooks gone after detach, pandas present or
not, the dashboard's labelled panels, diagnose's thresholds, and errors."""

import math
import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.monitor import FIELDS, GRAD_FIELDS, METRICS, RoutingMonitor, diagnose, expert_grad_norms, routing_record
from minimoe.reference import kept_assignments
from minimoe.routing import ExpertChoiceRouter, NoisyTopKRouter, TopKRouter

matplotlib.use("Agg")

D, H, E = 8, 16, 4
SMALL = dict(vocab_size=20, seq_len=8, d_model=16, n_layers=4, n_heads=2, d_hidden=8, num_experts=4, k=2,
             moe_every=2)  # MoE in blocks 1 and 3


def by_hand(routing, num_experts: int) -> dict:
    """The record's routing metrics, computed one assignment at a time with plain Python."""
    ids = [int(e) for e, used in zip(routing.expert_idx.reshape(-1),
                                     (routing.mask if routing.mask is not None
                                      else torch.ones_like(routing.expert_idx, dtype=torch.bool)).reshape(-1),
                                     strict=True) if used]
    load = [ids.count(e) for e in range(num_experts)]
    total, mean = sum(load), sum(load) / num_experts
    share = [n / total for n in load]
    logits = routing.logits.detach().double().tolist()
    flat = [v for row in logits for v in row]
    lse = [max(row) + math.log(sum(math.exp(v - max(row)) for v in row)) for row in logits]
    return dict(tokens=len(logits), load=load,
                load_entropy=-sum(p * math.log(p) for p in share if p > 0) / math.log(num_experts),
                dead_experts=load.count(0), max_violation=(max(load) - mean) / mean,
                cv=math.sqrt(sum((n - mean) ** 2 for n in load) / num_experts) / mean,
                logit_max=max(flat), logit_rms=math.sqrt(sum(v * v for v in flat) / len(flat)),
                z_loss=sum(v * v for v in lse) / len(lse))


def assert_record_matches(record: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert record[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def skewed_layer(**kwargs) -> MoELayer:
    """An MoELayer whose router loads experts 0-2 unevenly and never picks expert 3 on positive inputs."""
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, k=2, **kwargs)
    with torch.no_grad():
        layer.router.proj.weight.copy_(torch.randn(E, D))
        layer.router.proj.weight[0] += 0.1
        layer.router.proj.weight[3] -= 5.0
    return layer


def positive_input(shape=(3, 10, D), seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_records_equal_the_metrics_computed_by_hand_from_the_same_routing(capacity_factor):
    layer = skewed_layer(capacity_factor=capacity_factor)
    x = positive_input()
    with RoutingMonitor(layer) as monitor:
        layer(x)
    (record,) = monitor.records
    routing = layer.router(x)  # no noise: the same routing again
    expected = by_hand(routing, E)
    assert expected["load"] == [25, 30, 5, 0]
    assert_record_matches(record, expected)
    capacity = None if capacity_factor is None else math.ceil(2 * 30 * capacity_factor / E)
    dropped = 1 - len(kept_assignments(routing, E, capacity, "position")) / 60
    assert record["dropped_fraction"] == pytest.approx(dropped)
    assert (dropped > 0) == (capacity_factor is not None)
    assert (record["step"], record["call"], record["layer"], record["training"]) == (0, 0, 0, True)
    assert set(record) == set(FIELDS)


def test_expert_choice_records_count_only_the_filled_slots():
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, router=ExpertChoiceRouter(D, E, capacity_factor=1.0))
    x = torch.randn(12, D)
    with RoutingMonitor(layer) as monitor:
        layer(x)
    routing = layer.router(x)
    assert not routing.mask.all()
    assert_record_matches(monitor.records[0], by_hand(routing, E))
    assert monitor.records[0]["load"] == [3] * E


def test_a_noisy_router_is_recorded_as_it_routed():
    """In training the record counts the noisy choices the layer acted on, as layer.stats does."""
    torch.manual_seed(0)
    layer = MoELayer(D, H, E, k=2, router=NoisyTopKRouter(D, E, 2))
    with RoutingMonitor(layer) as monitor:
        for _ in range(3):
            layer(torch.randn(40, D))
            assert monitor.records[-1]["load"] == layer.stats.load.tolist()


def test_routing_record_rejects_bad_input():
    with pytest.raises(TypeError, match="routing"):
        routing_record(torch.zeros(3, E), E)
    empty = TopKRouter(D, E, 2)(torch.zeros(0, D))
    with pytest.raises(ValueError, match="routing"):
        routing_record(empty, E)


# ---------------------------------------------------------------------------------------------
# the transformer, steps, training and eval
# ---------------------------------------------------------------------------------------------

def small_transformer() -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**SMALL))


def test_transformer_layers_are_recorded_in_order_and_match_their_stats():
    model = small_transformer()
    idx = torch.randint(20, (2, 8))
    with RoutingMonitor(model) as monitor:
        model(idx)
    assert monitor.layers == model.moe_layers
    assert [r["layer"] for r in monitor.records] == [0, 1]
    for record, stats in zip(monitor.records, model.routing_stats(), strict=True):
        assert record["load"] == stats.load.tolist()
        share = [n / 32 for n in record["load"]]  # 16 tokens x k=2
        assert record["load_entropy"] == pytest.approx(-sum(p * math.log(p) for p in share if p) / math.log(4))
        assert record["dropped_fraction"] == 0.0  # dropless
        assert record["tokens"] == 16


def test_training_calls_count_steps_and_eval_calls_carry_the_steps_so_far():
    model = small_transformer()
    idx = torch.randint(20, (2, 8))
    with RoutingMonitor(model) as monitor:
        model.eval()
        model(idx)                      # before any training: step 0
        model.train()
        for _ in range(3):
            model(idx)                  # steps 0, 1, 2
        model.eval()
        with torch.no_grad():
            model(idx)                  # after 3 training steps: step 3
            model(idx)
    first_layer = [r for r in monitor.records if r["layer"] == 0]
    assert [(r["step"], r["call"], r["training"]) for r in first_layer] == [
        (0, 0, False), (0, 1, True), (1, 2, True), (2, 3, True), (3, 4, False), (3, 5, False)]
    assert (monitor.steps, monitor.calls) == (3, 6)


def test_series_averages_the_calls_that_share_a_step():
    model = small_transformer().eval()
    with RoutingMonitor(model) as monitor:
        model(torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(0)))
        model(torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(1)))
    steps, values = monitor.series("logit_max", layer=1, training=False)
    expected = np.mean([r["logit_max"] for r in monitor.records if r["layer"] == 1])
    assert steps.tolist() == [0]
    assert values.tolist() == pytest.approx([expected])
    with pytest.raises(ValueError, match="no training-mode records"):
        monitor.series("logit_max", layer=1)
    with pytest.raises(ValueError, match="name"):
        monitor.series("entropy")
    with pytest.raises(ValueError, match="layer"):
        monitor.series("cv", layer=2, training=False)


def test_a_layer_called_outside_the_model_is_not_recorded():
    model = small_transformer()
    with RoutingMonitor(model) as monitor:
        model.moe_layers[0](torch.randn(5, 16))
    assert monitor.records == []


def test_an_empty_batch_counts_as_a_step_but_leaves_no_record():
    layer = skewed_layer()
    with RoutingMonitor(layer) as monitor:
        layer(torch.zeros(0, D))
        layer(positive_input())
    assert [(r["step"], r["call"]) for r in monitor.records] == [(1, 1)]


# ---------------------------------------------------------------------------------------------
# attaching and detaching
# ---------------------------------------------------------------------------------------------

def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("make_model", [small_transformer, skewed_layer])
def test_detach_removes_every_hook_and_recording_stops(make_model):
    model = make_model()
    x = torch.randint(20, (2, 8)) if isinstance(model, MoETransformer) else positive_input()
    before = hook_count(model)
    monitor = RoutingMonitor(model)
    assert monitor.attached and hook_count(model) > before
    model(x)
    recorded = len(monitor.records)
    monitor.detach()
    monitor.detach()  # twice is fine
    assert not monitor.attached and hook_count(model) == before
    model(x)
    assert len(monitor.records) == recorded > 0
    with RoutingMonitor(model):
        assert hook_count(model) > before
    assert hook_count(model) == before


def test_a_model_without_moe_layers_is_an_error():
    with pytest.raises(ValueError, match="model must contain an MoELayer, got a Sequential without one"):
        RoutingMonitor(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    dense = MoETransformer(MoETransformerConfig(**{**SMALL, "num_experts": 1, "k": 1}))
    with pytest.raises(ValueError, match="MoETransformer without one"):
        RoutingMonitor(dense)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        RoutingMonitor("model")


# ---------------------------------------------------------------------------------------------
# to_dataframe, dashboard
# ---------------------------------------------------------------------------------------------

def monitored_run(steps: int = 4) -> RoutingMonitor:
    model = small_transformer()
    with RoutingMonitor(model) as monitor:
        for step in range(steps):
            model(torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(step)))
        model.eval()
        model(torch.randint(20, (2, 8)))
    return monitor


def test_to_dataframe_with_pandas():
    pd = pytest.importorskip("pandas")
    monitor = monitored_run()
    frame = monitor.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(FIELDS) and len(frame) == len(monitor.records) == 10
    assert frame["load"].tolist() == [r["load"] for r in monitor.records]
    assert frame["z_loss"].tolist() == [r["z_loss"] for r in monitor.records]


def test_to_dataframe_without_pandas_gives_plain_columns(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` raise ImportError
    monitor = monitored_run()
    columns = monitor.to_dataframe()
    assert type(columns) is dict and list(columns) == list(FIELDS)
    for name in FIELDS:
        assert columns[name] == [r[name] for r in monitor.records]


def test_dashboard_is_one_labelled_figure_of_every_metric():
    plt.close("all")
    monitor = monitored_run()
    fig = monitor.dashboard()
    assert isinstance(fig, Figure) and plt.get_fignums() == []
    panels, colorbar = fig.axes[:9], fig.axes[9:]
    assert len(colorbar) == 1 and colorbar[0].get_ylabel()
    for ax in panels:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    for ax, name in zip(panels, METRICS, strict=False):
        assert len(ax.lines) == 2  # one line per MoE layer
        values = [r[name] for r in monitor.records if r["layer"] == 1 and r["training"]]  # one call per step
        scale = 100 if name == "dropped_fraction" else 1
        np.testing.assert_allclose(ax.lines[1].get_ydata(), scale * np.array(values, dtype=float))
        assert ax.lines[1].get_xdata().tolist() == [0, 1, 2, 3]
    heatmap = panels[8].collections[0].get_array().reshape(E, 4)  # experts x steps
    loads = np.array([r["load"] for r in monitor.records if r["layer"] == 0 and r["training"]])
    np.testing.assert_allclose(heatmap, 100 * (loads / loads.sum(1, keepdims=True)).T)
    eval_fig = monitor.dashboard(training=False, load_layer=1)
    assert [len(line.get_xdata()) for line in eval_fig.axes[0].lines] == [1, 1]


def test_dashboard_without_records_is_an_error():
    with RoutingMonitor(small_transformer()) as monitor, pytest.raises(ValueError, match="no training-mode"):
        monitor.dashboard()


# ---------------------------------------------------------------------------------------------
# gradient norms
# ---------------------------------------------------------------------------------------------

def norms_by_hand(model: nn.Module, layer: MoELayer) -> tuple[float, list[float]]:
    """Global and per-expert gradient norms, one .grad entry at a time in plain Python."""
    squares = [v * v for p in model.parameters() if p.grad is not None for v in p.grad.reshape(-1).tolist()]
    per_expert = []
    for e in range(layer.num_experts):
        entries = [v for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down)
                   for v in w.grad[e].reshape(-1).tolist()]
        per_expert.append(math.sqrt(sum(v * v for v in entries)))
    return math.sqrt(sum(squares)), per_expert


def test_gradient_records_equal_the_norms_computed_from_grad_and_a_dead_expert_has_none():
    layer = skewed_layer()
    with RoutingMonitor(layer) as monitor:
        layer(positive_input()).square().sum().backward()
    (record,) = monitor.grad_records
    assert set(record) == set(GRAD_FIELDS) and (record["step"], record["layer"]) == (0, 0)
    grad_norm, per_expert = norms_by_hand(layer, layer)
    assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
    assert record["expert_grad_norm"] == pytest.approx(per_expert, rel=1e-6)
    assert record["expert_grad_norm"][3] == 0.0 and min(record["expert_grad_norm"][:3]) > 0  # expert 3: no tokens
    # the router's gradient counts in the global norm, not in any expert's
    assert record["grad_norm"] ** 2 > sum(v * v for v in per_expert) + 1e-9


def test_gradient_records_follow_each_backward_and_accumulate_as_grad_does():
    model = small_transformer()
    with RoutingMonitor(model) as monitor:
        for step in range(2):
            model.zero_grad()
            idx = torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(step))
            model(idx, idx)[1].backward()
            for i, layer in enumerate(model.moe_layers):
                grad_norm, per_expert = norms_by_hand(model, layer)
                record = monitor.grad_records[-2 + i]
                assert (record["step"], record["layer"]) == (step, i)
                assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-6)
                assert record["expert_grad_norm"] == pytest.approx(per_expert, rel=1e-6)
        model(idx, idx)[1].backward()  # no zero_grad: the record reads the accumulated .grad
        assert monitor.grad_records[-1]["grad_norm"] == pytest.approx(norms_by_hand(model, model.moe_layers[1])[0])
        assert monitor.grad_records[-1]["step"] == 2
        steps, grad_norm, per_expert = monitor.grad_series(1)
        assert steps.tolist() == [0, 1, 2] and per_expert.shape == (3, 4)
        np.testing.assert_allclose(grad_norm, [r["grad_norm"] for r in monitor.grad_records[1::2]])
        with torch.no_grad():
            model(idx)  # no backward: no record
    assert len(monitor.grad_records) == 6
    model(idx, idx)[1].backward()  # detached: no record
    assert len(monitor.grad_records) == 6


def test_the_trainer_runs_gradient_norm_is_the_one_recorded():
    from minimoe.data import load_corpus
    from minimoe.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**{**SMALL, "vocab_size": load_corpus().vocab_size}))
    with RoutingMonitor(model) as monitor:
        history = Trainer(model, load_corpus(), TrainConfig(steps=3, batch_size=2, eval_every=10)).run(progress=False)
    steps, grad_norm, _ = monitor.grad_series(0)
    assert steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(grad_norm, history.grad_norm, rtol=1e-5)


def test_expert_grad_norms_without_gradients_are_zero_and_grad_series_checks_its_input():
    layer = skewed_layer()
    assert expert_grad_norms(layer) == [0.0] * E
    with RoutingMonitor(layer) as monitor:
        with pytest.raises(ValueError, match="no gradient records"):
            monitor.grad_series(0)
        layer(positive_input()).sum().backward()
        with pytest.raises(ValueError, match="layer must be < 1"):
            monitor.grad_series(1)


def test_dashboard_gains_a_row_of_gradient_panels():
    model = small_transformer()
    with RoutingMonitor(model) as monitor:
        for step in range(3):
            idx = torch.randint(20, (2, 8), generator=torch.Generator().manual_seed(step))
            model.zero_grad()
            model(idx, idx)[1].backward()
        model.eval()
        model(idx)
    fig = monitor.dashboard(load_layer=1)
    panels, colorbars = fig.axes[:11], fig.axes[11:]
    assert len(colorbars) == 2 and all(ax.get_ylabel() for ax in colorbars)
    for ax in panels:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    norms, heatmap = panels[9], panels[10]
    assert len(norms.lines) == 3  # all parameters, then each MoE layer's experts
    np.testing.assert_allclose(norms.lines[0].get_ydata(), [r["grad_norm"] for r in monitor.grad_records[::2]])
    layer1 = np.array([r["expert_grad_norm"] for r in monitor.grad_records[1::2]])  # [steps, E]
    np.testing.assert_allclose(norms.lines[2].get_ydata(), np.sqrt((layer1 ** 2).sum(1)))
    np.testing.assert_allclose(heatmap.collections[0].get_array().reshape(E, 3), layer1.T)
    assert len(monitor.dashboard(training=False).axes) == 10  # eval mode: no gradient row


# ---------------------------------------------------------------------------------------------
# diagnose
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("logit_max", "load_entropy", "dead_experts", "label"), [
    (3.0, 0.95, 0, "healthy"),
    (10.0, 0.5, 0, "healthy"),          # both thresholds are strict
    (10.01, 0.95, 0, "logit blow-up"),
    (25.0, 0.1, 5, "logit blow-up"),     # blow-up is checked first
    (3.0, 0.49, 3, "collapsed"),         # then collapse
    (3.0, 0.8, 1, "dead experts"),
])
def test_diagnose_applies_the_thresholds_in_order(logit_max, load_entropy, dead_experts, label):
    record = dict(logit_max=logit_max, load_entropy=load_entropy, dead_experts=dead_experts)
    assert diagnose(record) == label


def test_diagnose_reads_monitor_records_and_rejects_bad_input():
    monitor = monitored_run(steps=1)
    assert diagnose(monitor.records[0]) == "healthy"
    with pytest.raises(TypeError, match="record"):
        diagnose([1, 2])
    with pytest.raises(ValueError, match="dead_experts"):
        diagnose(dict(logit_max=1.0, load_entropy=1.0))
