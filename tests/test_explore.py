"""minimoe.explore: the explorers' pure functions give the values a hand computation or the
underlying minimoe function gives, their figures show them, and the ipywidgets UIs redraw a
different figure when a control moves (driven here by setting the widget's value, as a slider
drag does in JupyterLab; tests/test_browser.py moves one there)."""

import math

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from minimoe import explore
from minimoe.experiments import collapse_experiment, make_task

pytest.importorskip("ipywidgets", reason="the explorers' UI needs ipywidgets (the course extra)")
matplotlib.use("Agg")

TASK = make_task()
BATCH = TASK.sample(16, seed=1)
X, TOKEN_IDS = BATCH["x"], BATCH["token_ids"]
E = 8
GATE = torch.randn(E, TASK.d_model, generator=torch.Generator().manual_seed(0)) * TASK.d_model**-0.5

# chapter 06's example: 6 tokens, 3 experts, top-2; expert 0 is everyone's favourite
SLOT_EXPERTS = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [0, 2], [0, 1]])
SLOT_WEIGHTS = torch.tensor([[0.55, 0.45], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.65, 0.35], [0.8, 0.2]])


def heatmap_data(fig: Figure) -> np.ndarray:
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    return np.ma.filled(mesh.get_array(), 0.0)


def dense(routing) -> np.ndarray:
    out = np.zeros((routing.expert_idx.shape[0], E))
    for t, j in np.ndindex(*routing.expert_idx.shape):
        if routing.mask is None or routing.mask[t, j]:
            out[t, int(routing.expert_idx[t, j])] += float(routing.weights[t, j])
    return out


# ---------------------------------------------------------------------------------------------
# chapter 04: route_batch and its explorer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_route_batch_topk_is_the_renormalised_softmax_top_k_of_the_given_gate(k):
    routing = explore.route_batch("topk", k, X, GATE)
    probs = (X @ GATE.T).softmax(-1)
    top = probs.topk(k, dim=-1)
    assert torch.equal(routing.expert_idx, top.indices)
    torch.testing.assert_close(routing.weights, top.values / top.values.sum(-1, keepdim=True))


def test_route_batch_switch_weight_is_the_largest_probability():
    routing = explore.route_batch("switch", 1, X, GATE)
    torch.testing.assert_close(routing.weights[:, 0], (X @ GATE.T).softmax(-1).max(-1).values)


@pytest.mark.parametrize("c", [1, 2])
def test_route_batch_expert_choice_takes_k_as_the_capacity_factor(c):
    routing = explore.route_batch("expert_choice", c, X, GATE)
    per_expert = np.bincount(routing.expert_idx[routing.mask].numpy(), minlength=E)
    assert per_expert.tolist() == [math.ceil(len(X) * c / E)] * E  # each expert takes ceil(T c / E) tokens


def test_route_batch_hash_follows_the_token_ids_and_ignores_the_gate():
    a = explore.route_batch("hash", 1, X, GATE, TOKEN_IDS, TASK.vocab_size)
    b = explore.route_batch("hash", 1, X, torch.zeros_like(GATE), TOKEN_IDS, TASK.vocab_size)
    assert torch.equal(a.expert_idx, b.expert_idx)
    same_id = [(s, t) for s in range(len(X)) for t in range(s) if TOKEN_IDS[s] == TOKEN_IDS[t]]
    assert same_id and all(a.expert_idx[s, 0] == a.expert_idx[t, 0] for s, t in same_id)


def test_route_batch_training_draw_is_noisy_and_seeded():
    clean = explore.route_batch("noisy_topk", 2, X, GATE)
    draws = [explore.route_batch("noisy_topk", 2, X, GATE, training_draw=True, seed=s) for s in (0, 0, 1)]
    assert torch.equal(clean.expert_idx, explore.route_batch("topk", 2, X, GATE).expert_idx)  # eval: no noise
    assert torch.equal(draws[0].expert_idx, draws[1].expert_idx)
    assert not torch.equal(draws[0].weights, draws[2].weights)
    assert not torch.equal(draws[0].weights, clean.weights)


@pytest.mark.parametrize(("call", "error", "argument"), [
    (lambda: explore.route_batch("switch", 2, X, GATE), ValueError, "k"),
    (lambda: explore.route_batch("topk", 0, X, GATE), ValueError, "k"),
    (lambda: explore.route_batch("lottery", 2, X, GATE), ValueError, "name"),
    (lambda: explore.route_batch("topk", 2, X, GATE[:, :4]), ValueError, "gate_weight"),
    (lambda: explore.route_batch("topk", 2, X[0], GATE), ValueError, "x"),
])
def test_route_batch_bad_inputs_raise_naming_the_argument(call, error, argument):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        call()


def test_routing_figure_shows_the_routing_and_its_load():
    routing = explore.route_batch("topk", 2, X, GATE)
    fig = explore.routing_figure(routing, "topk", 2)
    np.testing.assert_allclose(heatmap_data(fig), dense(routing), rtol=1e-6)
    load = np.bincount(routing.expert_idx.reshape(-1).numpy(), minlength=E).tolist()
    assert fig.axes[0].get_title().startswith(f"topk, k = 2: tokens per expert\n{load}\n")


def test_routing_explorer_redraws_and_locks_k_for_switch():
    ui = explore.routing_explorer(X, GATE, TOKEN_IDS, TASK.vocab_size)
    first = ui.figure
    np.testing.assert_allclose(heatmap_data(first), dense(explore.route_batch("topk", 2, X, GATE)), rtol=1e-6)
    ui.controls["k"].value = 3
    np.testing.assert_allclose(heatmap_data(ui.figure), dense(explore.route_batch("topk", 3, X, GATE)), rtol=1e-6)
    ui.controls["name"].value = "switch"
    assert ui.values() == {"name": "switch", "k": 1, "training_draw": False} and ui.controls["k"].disabled
    assert (heatmap_data(ui.figure) > 0).sum(1).tolist() == [1] * len(X)  # one expert per token
    ui.controls["name"].value = "expert_choice"
    assert not ui.controls["k"].disabled


# ---------------------------------------------------------------------------------------------
# chapter 05: balancing_run and its explorer
# ---------------------------------------------------------------------------------------------

def test_balancing_run_is_collapse_experiment_with_the_aux_loss_and_noise():
    steps = 12
    none = explore.balancing_run(0.0, steps=steps)
    np.testing.assert_array_equal(none.trace.load, collapse_experiment("none", steps).trace.load)
    aux = explore.balancing_run(10.0, steps=steps)
    np.testing.assert_array_equal(aux.trace.loss, collapse_experiment("aux_loss", steps, aux_loss_coef=10.0).trace.loss)
    assert not np.array_equal(aux.trace.loss, none.trace.loss)
    noisy = explore.balancing_run(0.0, noise_std=2.0, steps=steps)
    assert not np.array_equal(noisy.trace.load, none.trace.load)


def test_balancing_explorer_redraws_with_the_new_coefficient():
    ui = explore.balancing_explorer(aux_loss_coef=0.0, steps=8)
    before = ui.figure
    assert before.get_suptitle().startswith("alpha = 0, noise std 0:")
    ui.controls["aux_loss_coef"].value = 10.0
    assert ui.figure is not before and ui.figure.get_suptitle().startswith("alpha = 10, noise std 0:")
    entropy = ui.figure.axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(entropy, explore.balancing_run(10.0, steps=8).trace.load_entropy)
    with pytest.raises(Exception, match="alpha|options|value"):
        ui.controls["aux_loss_coef"].value = 0.5  # not a slider position


# ---------------------------------------------------------------------------------------------
# chapter 06: capacity_summary and its explorer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cf", "policy", "kept", "no_expert", "firsts_lost"), [
    # C = 4: expert 0 (6 assignments) drops 2; position loses token 5's first choice and token 2's second
    (1.0, "position", [[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [0, 1]], 0, 1),
    # score loses the two lightest of expert 0: token 0's first (0.55) and token 2's second (0.4)
    (1.0, "score", [[0, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], 0, 1),
    # C = 2, slot-major: expert 0 seats t0, t1; expert 1 t2 then t0's second; expert 2 t1's and t4's seconds
    (0.5, "position", [[1, 1], [1, 1], [1, 0], [0, 0], [0, 1], [0, 0]], 2, 3),
])
def test_capacity_summary_by_hand(cf, policy, kept, no_expert, firsts_lost):
    summary = explore.capacity_summary(SLOT_EXPERTS, SLOT_WEIGHTS, 3, cf, policy)
    assert summary.capacity == math.ceil(2 * 6 * cf / 3)
    np.testing.assert_array_equal(summary.kept, np.array(kept, dtype=bool))
    assert summary.dropped_fraction == pytest.approx(1 - np.mean(kept))
    assert (summary.tokens_without_expert, summary.first_choices_dropped) == (no_expert, firsts_lost)


def test_capacity_figure_draws_one_policy_with_its_summary():
    fig = explore.capacity_figure(SLOT_EXPERTS, SLOT_WEIGHTS, 3, 0.5, "position")
    (ax,) = fig.axes
    assert ax.get_title() == "position priority: 6 dropped"
    assert fig.get_suptitle() == ("capacity factor 0.5: C = 2 slots per expert, \n"
                                  "50% of the assignments dropped, 2 tokens with no expert")


def test_capacity_explorer_redraws_when_the_slider_or_the_policy_moves():
    ui = explore.capacity_explorer(SLOT_EXPERTS, SLOT_WEIGHTS, 3)
    assert ui.figure.axes[0].get_title() == "position priority: 2 dropped"
    ui.controls["capacity_factor"].value = 0.5
    assert ui.figure.axes[0].get_title() == "position priority: 6 dropped"
    ui.controls["policy"].value = "score"
    assert ui.figure.axes[0].get_title() == "score priority: 6 dropped"
    ui.controls["capacity_factor"].value = 2.0
    assert ui.figure.axes[0].get_title() == "score priority: 0 dropped"
    assert "C = 8" in ui.figure.get_suptitle()


@pytest.mark.parametrize(("call", "error", "argument"), [
    (lambda: explore.capacity_summary(SLOT_EXPERTS, SLOT_WEIGHTS, 3, 0.0), ValueError, "capacity_factor"),
    (lambda: explore.capacity_summary(SLOT_EXPERTS, SLOT_WEIGHTS, 3, 1.0, "random"), ValueError, "policy"),
    (lambda: explore.capacity_summary(SLOT_EXPERTS, SLOT_WEIGHTS, 2, 1.0), ValueError, "expert_idx"),
    (lambda: explore.capacity_summary(SLOT_EXPERTS[:, 0], SLOT_WEIGHTS, 3, 1.0), ValueError, "expert_idx"),
    (lambda: explore.balancing_run(-0.1, steps=1), ValueError, "aux_loss_coef"),
    (lambda: explore.balancing_run(0.1, noise_std=-1.0, steps=1), ValueError, "noise_std"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, argument):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        call()


# ---------------------------------------------------------------------------------------------
# the Explorer itself
# ---------------------------------------------------------------------------------------------

def test_explorer_rejects_bad_arguments():
    import ipywidgets

    slider = ipywidgets.IntSlider(value=1)
    with pytest.raises(TypeError, match="draw"):
        explore.Explorer("not a function", {"n": slider})
    with pytest.raises(ValueError, match="controls"):
        explore.Explorer(lambda: Figure(), {})
    with pytest.raises(TypeError, match="draw must return a matplotlib Figure"):
        explore.Explorer(lambda n: n, {"n": slider})
