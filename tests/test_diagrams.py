"""minimoe.diagrams: each picture, read back through the gids of its boxes, texts and bars, shows
the data it was given, checked against references written out here (a naive stable sort, the
softmax and its renormalisation by hand); sizes fit a notebook; bad inputs raise."""

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from minimoe import diagrams

matplotlib.use("Agg")

# chapter 03's six tokens: the routing of MoELayer(8, 16, 4, k=2) after torch.manual_seed(5)
CH03_EXPERT_IDX = [[1, 2], [2, 1], [1, 2], [1, 2], [0, 2], [1, 2]]
CH03_WEIGHTS = [[0.526, 0.474], [0.524, 0.476], [0.602, 0.398], [0.847, 0.153], [0.557, 0.443], [0.541, 0.459]]


def artists(fig: Figure, prefix: str) -> dict:
    """{gid: [artists]} for every text and patch of the figure whose gid starts with prefix."""
    found: dict = {}
    for ax in fig.axes:
        for artist in (*ax.texts, *ax.patches):
            gid = artist.get_gid()
            if gid is not None and gid.startswith(prefix):
                found.setdefault(gid, []).append(artist)
    return found


def text_of(fig: Figure, gid: str) -> str:
    (text,) = [a for a in artists(fig, gid)[gid] if isinstance(a, matplotlib.text.Text)]
    return text.get_text()


def assert_fits_a_notebook(fig: Figure) -> None:
    width, height = fig.get_size_inches()
    assert width <= 10 and height <= 12, (width, height)
    assert fig.get_suptitle().strip()
    fig.canvas.draw()  # lays out without error


def test_diagrams_leave_no_pyplot_figure_open():
    plt.close("all")
    diagrams.moe_block_in_transformer()
    diagrams.dispatch_pipeline(CH03_EXPERT_IDX, CH03_WEIGHTS, 4)
    diagrams.topk_renormalisation([0.1, 2.0, -1.0], 1)
    assert plt.get_fignums() == []


# ---------------------------------------------------------------------------------------------
# moe_block_in_transformer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_experts", "chosen", "weights"), [(6, (1, 4), (0.7, 0.3)), (8, (7, 0, 3), None),
                                                                (2, (0,), (0.9,))])
def test_moe_block_draws_every_expert_and_highlights_the_chosen(num_experts, chosen, weights):
    fig = diagrams.moe_block_in_transformer(num_experts, chosen, weights)
    experts = artists(fig, "expert-")
    assert len(experts) == num_experts
    highlighted = {int(gid.split("-")[1].split(":")[0]) for gid in experts if gid.endswith(":chosen")}
    assert highlighted == set(chosen)
    for gid, drawn in experts.items():
        e = int(gid.split("-")[1].split(":")[0])
        (patch,) = [a for a in drawn if isinstance(a, matplotlib.patches.Patch)]
        assert (patch.get_facecolor() == to_rgba(diagrams.IDLE)) == (e not in chosen)
        assert text_of(fig, gid) == f"$f_{e}$"
    expected = [1 / len(chosen)] * len(chosen) if weights is None else weights
    assert {gid: text_of(fig, gid) for gid in artists(fig, "weight-")} == {
        f"weight-{e}": f"× {w:.2f}" for e, w in zip(chosen, expected, strict=True)}
    assert f"top-{len(chosen)}" in text_of(fig, "router")
    assert_fits_a_notebook(fig)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"num_experts": 1}, ValueError, "num_experts must be >= 2"),
    ({"num_experts": 11, "chosen": (0,), "weights": None}, ValueError, "num_experts must be <= 10"),
    ({"num_experts": 2.0}, TypeError, "num_experts must be an int"),
    ({"chosen": (1, 6)}, ValueError, r"ids in \[0, 6\), got 6"),
    ({"chosen": (1, 1)}, ValueError, "must not repeat"),
    ({"chosen": ()}, ValueError, "between 1 and num_experts=6"),
    ({"chosen": (1.0, 2)}, TypeError, "int expert ids"),
    ({"chosen": "12"}, TypeError, "sequence of expert ids"),
    ({"weights": (0.5,)}, ValueError, "one weight per chosen expert"),
    ({"weights": (0.5, -0.1)}, ValueError, "weights must be >= 0"),
])
def test_moe_block_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        diagrams.moe_block_in_transformer(**kwargs)


# ---------------------------------------------------------------------------------------------
# dispatch_pipeline
# ---------------------------------------------------------------------------------------------

def naive_dispatch(expert_idx, weights, num_experts):
    """Reference: assignments a = t*k + j sorted by (expert, a); token, weight and block sizes."""
    k = len(expert_idx[0])
    flat = [e for row in expert_idx for e in row]
    order = sorted(range(len(flat)), key=lambda a: (flat[a], a))
    return {"order": order, "token": [a // k for a in order],
            "weight": [weights[a // k][a % k] for a in order],
            "counts": [flat.count(e) for e in range(num_experts)]}


def numbered(fig: Figure, prefix: str) -> list[str]:
    gids = sorted(artists(fig, prefix), key=lambda gid: int(gid[len(prefix):]))
    assert [int(gid[len(prefix):]) for gid in gids] == list(range(len(gids)))
    return [text_of(fig, gid) for gid in gids]


def gemm_blocks(fig: Figure) -> dict[int, float]:
    """{expert: height of its GEMM block, in rows}."""
    blocks = {}
    for gid, drawn in artists(fig, "gemm-").items():
        if gid.startswith("gemm-empty"):
            continue
        (patch,) = [a for a in drawn if isinstance(a, matplotlib.patches.Rectangle)]
        blocks[int(gid.split("-")[1])] = patch.get_height()
    return blocks


@pytest.mark.parametrize("case", ["chapter 03", "random", "top-1", "one token"])
def test_dispatch_pipeline_draws_the_plan(case):
    if case == "chapter 03":
        expert_idx, weights, E = CH03_EXPERT_IDX, CH03_WEIGHTS, 4
    elif case == "one token":
        expert_idx, weights, E = [[2, 0, 1]], [[0.5, 0.3, 0.2]], 3
    else:
        rng = np.random.default_rng(3)
        T, k, E = (7, 1, 5) if case == "top-1" else (5, 3, 6)
        expert_idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).tolist()
        weights = rng.dirichlet(np.ones(k), T).round(3).tolist()
    ref = naive_dispatch(expert_idx, weights, E)
    fig = diagrams.dispatch_pipeline(torch.tensor(expert_idx), torch.tensor(weights), E)

    assert numbered(fig, "sorted-") == [f"a={a}" for a in ref["order"]]
    assert numbered(fig, "buffer-") == [f"row {i}: $x_{t}$" for i, t in enumerate(ref["token"])]
    assert numbered(fig, "combine-") == [f"×{w:.2f}" for w in ref["weight"]]
    k = len(expert_idx[0])
    assert numbered(fig, "route-") == [f"a={a}: $f_{e}$, g={weights[a // k][a % k]:.2f}"
                                       for a, e in enumerate(e for row in expert_idx for e in row)]
    blocks = gemm_blocks(fig)
    assert set(blocks) == {e for e, n in enumerate(ref["counts"]) if n > 0}
    for e, height in blocks.items():
        assert math.isclose(height, ref["counts"][e] - 0.16)
        assert text_of(fig, f"gemm-{e}").endswith(f"{ref['counts'][e]} row{'s' if ref['counts'][e] > 1 else ''}")
    empty = [e for e, n in enumerate(ref["counts"]) if n == 0]
    drawn_empty = sorted(int(e) for gid in artists(fig, "gemm-empty") for e in gid.split(":")[1].split(","))
    assert drawn_empty == empty
    assert len(numbered(fig, "token-")) == len(numbered(fig, "output-")) == len(expert_idx)
    assert_fits_a_notebook(fig)


def test_dispatch_pipeline_of_chapter_03_shows_its_printed_order():
    """The order chapter 03 prints: [8, 0, 3, 4, 6, 10, 1, 2, 5, 7, 9, 11]; expert 3 gets no rows."""
    fig = diagrams.dispatch_pipeline(CH03_EXPERT_IDX, CH03_WEIGHTS, 4)
    assert numbered(fig, "sorted-") == [f"a={a}" for a in [8, 0, 3, 4, 6, 10, 1, 2, 5, 7, 9, 11]]
    assert list(artists(fig, "gemm-empty")) == ["gemm-empty:3"]


@pytest.mark.parametrize(("args", "error", "match"), [
    ((CH03_EXPERT_IDX, CH03_WEIGHTS, 2), ValueError, r"ids in \[0, 2\)"),
    ((CH03_EXPERT_IDX, CH03_WEIGHTS, 11), ValueError, "num_experts must be <= 10"),
    ((CH03_EXPERT_IDX, CH03_WEIGHTS, 0), ValueError, "num_experts must be >= 1"),
    (([[0.0, 1.0]], [[0.5, 0.5]], 2), TypeError, "integer ids"),
    (([0, 1], [0.5, 0.5], 2), ValueError, "2 dimensions"),
    ((CH03_EXPERT_IDX, CH03_WEIGHTS[:5], 4), ValueError, r"weights must have shape \(6, 2\)"),
    (([[0, 1]] * 13, [[0.5, 0.5]] * 13, 2), ValueError, "at most 24 assignments"),
    (([[0, 1]], [[0.5, float("nan")]], 2), ValueError, "weights must be finite"),
    (([[0, 1]], [["a", "b"]], 2), TypeError, "weights must be a"),
    ((np.zeros((0, 2), dtype=int), np.zeros((0, 2)), 2), ValueError, "at least one assignment"),
])
def test_dispatch_pipeline_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        diagrams.dispatch_pipeline(*args)


# ---------------------------------------------------------------------------------------------
# topk_renormalisation
# ---------------------------------------------------------------------------------------------

def bars(fig: Figure, prefix: str) -> dict[int, matplotlib.patches.Rectangle]:
    return {int(gid[len(prefix):].split(":")[0]): patch for gid, drawn in artists(fig, prefix).items()
            for patch in drawn if isinstance(patch, matplotlib.patches.Rectangle)}


@pytest.mark.parametrize(("logits", "k", "top"), [([-0.8, 0.54, 1.96, 1.42], 2, [2, 3]),
                                                  ([0.3, -1.0, 2.5, 0.31, 0.0, 1.2], 3, [2, 5, 3]),
                                                  ([1.0, 1.0, 0.0], 1, [0]),      # tie: lower index
                                                  ([0.5, -0.5], 2, [0, 1])])
def test_topk_renormalisation_shows_probabilities_choice_and_weights(logits, k, top):
    exp = [math.exp(z) for z in logits]
    probs = [v / sum(exp) for v in exp]
    kept = sum(exp[e] for e in top)
    weights = {e: exp[e] / kept for e in top}
    fig = diagrams.topk_renormalisation(torch.tensor(logits, dtype=torch.float64), k)

    drawn = bars(fig, "prob-")
    assert sorted(drawn) == list(range(len(logits)))
    np.testing.assert_allclose([drawn[e].get_height() for e in range(len(logits))], probs, rtol=1e-12)
    assert [text_of(fig, f"prob-{e}") for e in range(len(logits))] == [f"{p:.2f}" for p in probs]
    highlighted = {e for e, bar in drawn.items() if bar.get_facecolor() != to_rgba(diagrams.IDLE)}
    assert highlighted == set(top)
    tagged_chosen = {int(gid.split("-")[1].split(":")[0]) for gid in artists(fig, "prob-") if gid.endswith(":chosen")}
    assert tagged_chosen == set(top)

    weight_bars = bars(fig, "weight-")
    assert sorted(weight_bars) == sorted(top)
    for e, bar in weight_bars.items():
        assert math.isclose(bar.get_height(), weights[e], rel_tol=1e-12)
    assert [text_of(fig, f"weight-{e}") for e in range(len(logits))] == [
        f"{weights[e]:.2f}" if e in weights else "0" for e in range(len(logits))]
    assert text_of(fig, "kept-mass").endswith(f"= {sum(probs[e] for e in top):.2f}")
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert_fits_a_notebook(fig)


@pytest.mark.parametrize(("logits", "k", "error", "match"), [
    ([0.1, 0.2], 3, ValueError, "k must be <= E = 2"),
    ([0.1, 0.2], 0, ValueError, "k must be >= 1"),
    ([0.1, 0.2], 1.0, TypeError, "k must be an int"),
    ([0.1], 1, ValueError, "2 <= E <= 16"),
    ([[0.1, 0.2]], 1, ValueError, r"shape \[E\]"),
    (list(range(17)), 1, ValueError, "2 <= E <= 16"),
    ([0.1, float("inf")], 1, ValueError, "logits must be finite"),
    (["a", "b"], 1, TypeError, "logits must be a 1-D array"),
])
def test_topk_renormalisation_rejects_bad_input(logits, k, error, match):
    with pytest.raises(error, match=match):
        diagrams.topk_renormalisation(logits, k)
