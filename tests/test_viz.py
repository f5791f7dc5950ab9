"""minimoe.viz: every plot returns a Figure whose artists hold exactly the data passed in (read
back from the QuadMesh, lines, stacked areas and bars), every axis is titled and labelled,
every colour bar is labelled, and bad inputs raise.

The figures are built without pyplot, so there is nothing to close: the first test checks that
no pyplot figure is left open."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from minimoe import viz
from minimoe.dispatch import make_plan
from minimoe.metrics import load_entropy, mutual_information, specialization
from minimoe.routing import ExpertChoiceRouter, Routing, TopKRouter

matplotlib.use("Agg")

T, E = 12, 6


def colorbar_axes(fig: Figure) -> dict:
    """{colour bar axes: its Colorbar} for every mappable in the figure that has one."""
    mappables = [m for ax in fig.axes for m in (*ax.images, *ax.collections)]
    return {m.colorbar.ax: m.colorbar for m in mappables if getattr(m, "colorbar", None) is not None}


def assert_labelled(fig: Figure) -> None:
    """Every plot axis has a title, an x label and a y label; every colour bar has a label."""
    colorbars = colorbar_axes(fig)
    assert fig.axes, "the figure has no axes"
    for i, ax in enumerate(fig.axes):
        if ax in colorbars:
            assert ax.get_ylabel() or ax.get_xlabel(), f"colour bar (axes {i}) has no label"
            continue
        for what in ("title", "xlabel", "ylabel"):
            assert getattr(ax, f"get_{what}")().strip(), f"axes {i} has no {what}"


def quadmesh(ax) -> np.ndarray:
    """The data of a seaborn heatmap, [rows, columns], masked (blank) cells read as 0."""
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    return np.ma.filled(mesh.get_array(), 0.0)


def blank_cells(ax) -> np.ndarray:
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    return np.ma.getmaskarray(mesh.get_array())


def routing_of(seed: int = 0) -> Routing:
    torch.manual_seed(seed)
    return TopKRouter(8, E, 2)(torch.randn(T, 8))


def dense_by_loop(routing: Routing) -> np.ndarray:
    dense = np.zeros((routing.expert_idx.shape[0], routing.probs.shape[1]))
    for t, j in np.ndindex(*routing.expert_idx.shape):
        if routing.mask is None or routing.mask[t, j]:
            dense[t, int(routing.expert_idx[t, j])] += float(routing.weights[t, j].detach())
    return dense


def test_plots_leave_no_pyplot_figure_open():
    """A notebook would otherwise show each figure twice (open figure + returned value)."""
    plt.close("all")
    viz.routing_heatmap(routing_of())
    viz.load_over_training(np.ones((3, E)))
    viz.dropped_vs_capacity([1.0], {"a": [0.1]})
    viz.specialization_heatmap(np.ones((2, E)))
    viz.router_probability_histogram(np.full((T, E), 1 / E))
    viz.capacity_slot_grid(SLOT_EXPERTS, 3, 4, SLOT_WEIGHTS)
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------
# the labelling helper itself
# ---------------------------------------------------------------------------------------------

def test_assert_labelled_fails_on_unlabelled_axes():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set(title="a title", xlabel="x (units)")
    with pytest.raises(AssertionError, match="ylabel"):
        assert_labelled(fig)
    ax.set_ylabel("y (units)")
    assert_labelled(fig)
    with pytest.raises(AssertionError, match="no axes"):
        assert_labelled(Figure())


def test_assert_labelled_fails_on_an_unlabelled_colour_bar():
    fig = Figure()
    ax = fig.add_subplot()
    fig.colorbar(ax.imshow(np.eye(3)))
    ax.set(title="t", xlabel="x", ylabel="y")
    with pytest.raises(AssertionError, match="colour bar"):
        assert_labelled(fig)


# ---------------------------------------------------------------------------------------------
# routing_heatmap
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["top2", "expert_choice"])
def test_routing_heatmap_of_a_routing_shows_its_combine_weights(source):
    if source == "expert_choice":
        torch.manual_seed(0)
        routing = ExpertChoiceRouter(8, E, capacity_factor=1.0)(torch.randn(T, 8))
        assert not routing.mask.all()  # some empty slots, which must not show
    else:
        routing = routing_of()
    tokens = [f"tok{t}" for t in range(T)]
    fig = viz.routing_heatmap(routing, tokens=tokens)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    np.testing.assert_allclose(quadmesh(ax), dense_by_loop(routing), rtol=1e-6)
    np.testing.assert_array_equal(blank_cells(ax), dense_by_loop(routing) == 0)  # not routed: blank
    assert [label.get_text() for label in ax.get_yticklabels()] == tokens
    assert_labelled(fig)
    assert colorbar_axes(fig)


@pytest.mark.parametrize("as_type", [np.asarray, torch.as_tensor, lambda a: a.tolist()])
def test_routing_heatmap_of_a_dense_matrix_shows_it(as_type):
    dense = dense_by_loop(routing_of())
    fig = viz.routing_heatmap(as_type(dense), num_experts=E)
    np.testing.assert_allclose(quadmesh(fig.axes[0]), dense)
    assert_labelled(fig)


# ---------------------------------------------------------------------------------------------
# load_over_training
# ---------------------------------------------------------------------------------------------

def stack_bounds(collection, steps) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) edge of a stacked area at each step, from its polygon's vertices."""
    vertices = collection.get_paths()[0].vertices
    at = [vertices[np.isclose(vertices[:, 0], step), 1] for step in steps]
    return np.array([y.min() for y in at]), np.array([y.max() for y in at])


@pytest.mark.parametrize("fractions", [False, True])
def test_load_over_training_stacks_each_experts_share_and_plots_entropy(fractions):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(7, E)).astype(float)
    counts[-1] = [60, 0, 0, 0, 0, 0]  # collapsed
    loads = counts / counts.sum(1, keepdims=True) if fractions else torch.as_tensor(counts)
    steps = np.arange(7) * 100
    fig = viz.load_over_training(loads, steps=steps)
    top, bottom = fig.axes
    share = 100 * counts / counts.sum(1, keepdims=True)
    cumulative = np.cumsum(share, 1)
    assert len(top.collections) == E
    for e, collection in enumerate(top.collections):
        lower, upper = stack_bounds(collection, steps)
        np.testing.assert_allclose(upper, cumulative[:, e], atol=1e-9)
        np.testing.assert_allclose(lower, cumulative[:, e - 1] if e else 0, atol=1e-9)
    (line,) = bottom.lines
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_allclose(line.get_ydata(), [load_entropy(row) for row in counts])
    assert line.get_ydata()[-1] == 0
    assert_labelled(fig)


def test_load_over_training_plots_given_entropy():
    entropy = [0.9, 0.5, 0.1]
    fig = viz.load_over_training(np.ones((3, E)), entropy=entropy)
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_ydata(), entropy)


# ---------------------------------------------------------------------------------------------
# dropped_vs_capacity
# ---------------------------------------------------------------------------------------------

def test_dropped_vs_capacity_draws_one_line_per_label_in_percent():
    factors = [0.5, 1.0, 1.25, 2.0]
    dropped = {"position": [0.5, 0.1, 0.02, 0.0], "score": np.array([0.45, 0.08, 0.0, 0.0])}
    fig = viz.dropped_vs_capacity(factors, dropped)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == list(dropped)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(dropped)
    for line, fractions in zip(ax.lines, dropped.values(), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), factors)
        np.testing.assert_allclose(line.get_ydata(), 100 * np.asarray(fractions))
    assert_labelled(fig)


# ---------------------------------------------------------------------------------------------
# specialization_heatmap
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_classes", "annotated"), [(3, True), (20, False)])
def test_specialization_heatmap_shows_row_shares_and_mutual_information(num_classes, annotated):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % num_classes
    expert_idx = (labels[:, None] + torch.randint(2, (400, 2), generator=gen)) % E
    counts = specialization(labels, expert_idx, num_classes, E)
    names = [f"class {c}" for c in range(num_classes)]
    fig = viz.specialization_heatmap(counts, class_names=names)
    ax = fig.axes[0]
    share = 100 * counts.double().numpy() / counts.sum(1, keepdims=True).double().numpy()
    np.testing.assert_allclose(quadmesh(ax), share)
    np.testing.assert_allclose(quadmesh(ax).sum(1), 100)
    assert f"{mutual_information(counts):.3f} bits" in ax.get_title()
    assert [label.get_text() for label in ax.get_yticklabels()] == names
    assert len(ax.texts) == (num_classes * E if annotated else 0)
    (colorbar,) = colorbar_axes(fig).values()
    assert "%" in colorbar.ax.get_ylabel()
    assert_labelled(fig)


# ---------------------------------------------------------------------------------------------
# router_probability_histogram
# ---------------------------------------------------------------------------------------------

def test_router_probability_histogram_counts_every_probability_and_every_top1():
    probs = routing_of().probs.detach()
    bins = 20
    fig = viz.router_probability_histogram(probs, bins=bins)
    every, top1 = fig.axes
    edges = np.linspace(0, 1, bins + 1)
    for ax, values in [(every, probs.reshape(-1)), (top1, probs.max(1).values)]:
        heights = [patch.get_height() for patch in ax.patches]
        assert sum(heights) == values.numel()
        np.testing.assert_array_equal(heights, np.histogram(values.double().numpy(), edges)[0])
    assert_labelled(fig)


# ---------------------------------------------------------------------------------------------
# capacity_seats and capacity_slot_grid
# ---------------------------------------------------------------------------------------------

# chapter 06's example: 6 tokens, 3 experts, top-2, C = 4; expert 0 is everyone's favourite
SLOT_EXPERTS = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [0, 2], [0, 1]])
SLOT_WEIGHTS = torch.tensor([[0.55, 0.45], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.65, 0.35], [0.8, 0.2]])


def seats_by_loop(expert_idx, num_experts, capacity, policy, weights):
    """Reference: list every (t, j) in priority order, seat each in its expert while it has room."""
    T, k = expert_idx.shape
    order = [(t, j) for j in range(k) for t in range(T)]  # slot-major: all first choices first
    if policy == "score":
        order = sorted(order, key=lambda tj: -float(weights[tj]))  # stable: ties keep slot-major order
    seats, dropped = [[] for _ in range(num_experts)], [[] for _ in range(num_experts)]
    for t, j in order:
        e = int(expert_idx[t, j])
        (seats[e] if len(seats[e]) < capacity else dropped[e]).append(t * k + j)
    return [row + [-1] * (capacity - len(row)) for row in seats], dropped


@pytest.mark.parametrize(("policy", "dropped"), [("position", [10, 5]), ("score", [0, 5])])
def test_capacity_seats_on_chapter_06s_example(policy, dropped):
    """position drops token 5's first choice (a = 10) and token 2's second (a = 5); score drops
    the two lightest of expert 0's six: token 0's first (0.55, a = 0) and token 2's second (0.4)."""
    seats, lost = viz.capacity_seats(SLOT_EXPERTS, 3, 4, policy, SLOT_WEIGHTS)
    assert lost == [dropped, [], []]
    # expert 2: position seats token 1's second choice (a = 3) first, score token 4's (0.35 > 0.1)
    assert seats[2].tolist() == ([3, 9, -1, -1] if policy == "position" else [9, 3, -1, -1])
    expected_seats, _ = seats_by_loop(SLOT_EXPERTS, 3, 4, policy, SLOT_WEIGHTS)
    np.testing.assert_array_equal(seats, expected_seats)


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("seed", range(5))
def test_capacity_seats_matches_a_loop_and_make_plan(policy, seed):
    g = torch.Generator().manual_seed(seed)
    T, k, num_experts = 20, 2, 5
    expert_idx = torch.rand(T, num_experts, generator=g).argsort(1)[:, :k]
    weights = torch.rand(T, k, generator=g).sort(1, descending=True).values
    capacity = 1 + seed
    seats, dropped = viz.capacity_seats(expert_idx, num_experts, capacity, policy, weights)
    expected_seats, expected_dropped = seats_by_loop(expert_idx, num_experts, capacity, policy, weights)
    np.testing.assert_array_equal(seats, expected_seats)
    assert dropped == expected_dropped
    kept = make_plan(expert_idx, num_experts, capacity, policy=policy, weights=weights).kept.reshape(-1)
    assert sorted(seats[seats >= 0].tolist()) == kept.nonzero().squeeze(1).tolist()


def slot_rectangles(ax) -> dict:
    """{gid: (x, y)} of the grid's rectangles."""
    return {p.get_gid(): p.get_xy() for p in ax.patches if p.get_gid()}


def test_capacity_slot_grid_draws_every_seat_and_every_drop():
    fig = viz.capacity_slot_grid(SLOT_EXPERTS, 3, 4, SLOT_WEIGHTS)
    assert len(fig.axes) == 2
    for ax, policy in zip(fig.axes, ("position", "score"), strict=True):
        seats, dropped = viz.capacity_seats(SLOT_EXPERTS, 3, 4, policy, SLOT_WEIGHTS)
        rects = slot_rectangles(ax)
        expected = {}
        for e, c in np.ndindex(*seats.shape):
            t, j = divmod(int(seats[e, c]), 2)
            expected[f"kept t={t} j={j} e={e} seat={c}" if seats[e, c] >= 0 else f"empty e={e} seat={c}"] = (c, e)
        for e, row in enumerate(dropped):
            for i, a in enumerate(row):
                t, j = divmod(a, 2)
                expected[f"dropped t={t} j={j} e={e}"] = (4.3 + i, e)
        assert rects.keys() == expected.keys()
        for gid, xy in expected.items():
            np.testing.assert_allclose(rects[gid], xy)
        assert ax.get_title() == f"{policy} priority: 2 dropped"
        assert "t5\n0.80" in [text.get_text() for text in ax.texts]
        (line,) = ax.lines
        np.testing.assert_array_equal(line.get_xdata(), [4, 4])  # the capacity line
    assert_labelled(fig)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "choice 1 of the token", "choice 2 of the token", "dropped (no slot)"]


def test_capacity_slot_grid_one_policy_without_drops():
    fig = viz.capacity_slot_grid(SLOT_EXPERTS, 3, 6, policies=("position",), tokens=list("abcdef"))
    (ax,) = fig.axes
    assert not any(gid.startswith("dropped") for gid in slot_rectangles(ax))
    assert "f" in [text.get_text() for text in ax.texts]  # the labels, no weights
    assert ax.get_xlim() == (0, 6)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

GOOD_LOADS = np.ones((4, E))
BAD_INPUTS = {
    "heatmap_1d": (lambda: viz.routing_heatmap(np.ones(E)), ValueError, "weights_or_routing"),
    "heatmap_nan": (lambda: viz.routing_heatmap(np.full((T, E), np.nan)), ValueError, "weights_or_routing"),
    "heatmap_str": (lambda: viz.routing_heatmap("weights"), TypeError, "weights_or_routing"),
    "heatmap_num_experts": (lambda: viz.routing_heatmap(np.ones((T, E)), num_experts=E + 1), ValueError,
                            "num_experts"),
    "heatmap_routing_num_experts": (lambda: viz.routing_heatmap(routing_of(), num_experts=2), ValueError,
                                    "expert_idx"),
    "heatmap_tokens": (lambda: viz.routing_heatmap(np.ones((T, E)), tokens=["a"] * (T - 1)), ValueError,
                       "tokens"),
    "heatmap_tokens_type": (lambda: viz.routing_heatmap(np.ones((T, E)), tokens=3), TypeError, "tokens"),
    "load_negative": (lambda: viz.load_over_training(-GOOD_LOADS), ValueError, "loads"),
    "load_zero_row": (lambda: viz.load_over_training(np.zeros((2, E))), ValueError, "loads"),
    "load_1d": (lambda: viz.load_over_training(np.ones(E)), ValueError, "loads"),
    "load_steps": (lambda: viz.load_over_training(GOOD_LOADS, steps=[0, 1]), ValueError, "steps"),
    "load_entropy": (lambda: viz.load_over_training(GOOD_LOADS, entropy=[1.0]), ValueError, "entropy"),
    "dropped_not_dict": (lambda: viz.dropped_vs_capacity([1.0], [0.1]), TypeError, "dropped"),
    "dropped_empty": (lambda: viz.dropped_vs_capacity([1.0], {}), ValueError, "dropped"),
    "dropped_length": (lambda: viz.dropped_vs_capacity([1.0, 2.0], {"a": [0.1]}), ValueError, "dropped"),
    "dropped_percent": (lambda: viz.dropped_vs_capacity([1.0], {"a": [10.0]}), ValueError, "dropped"),
    "capacity_zero": (lambda: viz.dropped_vs_capacity([0.0], {"a": [0.1]}), ValueError, "capacity_factors"),
    "counts_1d": (lambda: viz.specialization_heatmap(np.ones(E)), ValueError, "counts"),
    "counts_empty_class": (lambda: viz.specialization_heatmap(np.zeros((2, E))), ValueError, "counts"),
    "class_names": (lambda: viz.specialization_heatmap(np.ones((2, E)), class_names=["a"]), ValueError,
                    "class_names"),
    "probs_above_one": (lambda: viz.router_probability_histogram(np.full((T, E), 1.5)), ValueError, "probs"),
    "probs_1d": (lambda: viz.router_probability_histogram(np.ones(E) / E), ValueError, "probs"),
    "bins": (lambda: viz.router_probability_histogram(np.ones((T, E)) / E, bins=0), ValueError, "bins"),
    "slots_policies_str": (lambda: viz.capacity_slot_grid(SLOT_EXPERTS, 3, 4, policies="position"), ValueError,
                           "policies"),
    "slots_policy_name": (lambda: viz.capacity_slot_grid(SLOT_EXPERTS, 3, 4, policies=("random",)), ValueError,
                          "policies"),
    "slots_capacity": (lambda: viz.capacity_seats(SLOT_EXPERTS, 3, 0), ValueError, "capacity"),
    "slots_score_weights": (lambda: viz.capacity_seats(SLOT_EXPERTS, 3, 4, "score"), ValueError, "weights"),
    "slots_1d": (lambda: viz.capacity_seats(SLOT_EXPERTS[:, 0], 3, 4), ValueError, "expert_idx"),
    "slots_tokens": (lambda: viz.capacity_slot_grid(SLOT_EXPERTS, 3, 4, policies=("position",), tokens=["a"]),
                     ValueError, "tokens"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(case):
    call, error, argument = BAD_INPUTS[case]
    with pytest.raises(error, match=rf"\b{argument}\b"):
        call()
