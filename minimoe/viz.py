"""Plots of routing: who goes where, how the load moves during training, what capacity drops
(and which slot each assignment takes),
what experts specialise on, how confident the router is.

Every function returns a `matplotlib.figure.Figure` built without pyplot: nothing is shown or
kept open behind your back. A notebook displays the figure returned by a cell; elsewhere call
`fig.savefig(...)`. Lines and bars use seaborn's "colorblind" palette, heatmaps the perceptually
uniform "mako" colormap. Arrays may be torch tensors, NumPy arrays or nested lists.
"""

import math

import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from minimoe import _checks, metrics
from minimoe.dispatch import DROP_POLICIES, make_plan
from minimoe.routing import Routing

HEATMAP_CMAP = "mako"
ANNOTATE_MAX_CELLS = 100  # write the value in each heatmap cell up to this many cells


def _array(name: str, value, ndim: int) -> np.ndarray:
    """value -> float64 ndarray with `ndim` dimensions and finite entries."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}") from err
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(array)).sum())} NaN or inf entries")
    return array


def _labels(name: str, labels, count: int, what: str) -> list[str] | None:
    """None, or `count` labels (one per `what`) as strings."""
    if labels is None:
        return None
    if isinstance(labels, str) or not hasattr(labels, "__len__"):
        raise TypeError(f"{name} must be a sequence of labels, got {type(labels).__name__}")
    if len(labels) != count:
        raise ValueError(f"{name} must hold {count} labels (one per {what}), got {len(labels)}")
    return [str(label) for label in labels]


def _dense_weights(routing: Routing, num_experts: int) -> np.ndarray:
    """Routing -> [T, E] combine weight of each (token, expert), zero where not routed."""
    _checks.expert_ids("weights_or_routing.expert_idx", routing.expert_idx, num_experts)
    weights = routing.weights.detach().double()
    if routing.mask is not None:
        weights = weights * routing.mask
    dense = weights.new_zeros(weights.shape[0], num_experts)
    return dense.scatter_add_(1, routing.expert_idx.long(), weights).cpu().numpy()


def _heatmap(ax, data: np.ndarray, colorbar_label: str, vmax: float | None, **kwargs) -> None:
    sns.heatmap(data, ax=ax, cmap=HEATMAP_CMAP, vmin=0, vmax=vmax, cbar_kws={"label": colorbar_label},
                annot=data.size <= ANNOTATE_MAX_CELLS, **kwargs)
    ax.tick_params(axis="y", rotation=0)


def routing_heatmap(weights_or_routing, num_experts: int | None = None, tokens=None,
                    title: str = "Routing: combine weight per token and expert") -> Figure:
    """Tokens x experts matrix of combine weights; cells where a token does not visit an expert
    are left blank, so a small weight never looks like "not routed".

    weights_or_routing: a `Routing` (its expert_idx, weights and mask are scattered into [T, E])
        or a dense [T, E] tensor / array.
    num_experts: E; by default the Routing's probs width or the array's. Must match an array.
    tokens: optional T labels for the rows (e.g. the decoded tokens).
    """
    if num_experts is not None:
        num_experts = _checks.positive_int("num_experts", num_experts)
    if isinstance(weights_or_routing, Routing):
        data = _dense_weights(weights_or_routing, num_experts or weights_or_routing.probs.shape[1])
    else:
        data = _array("weights_or_routing", weights_or_routing, ndim=2)
        if num_experts is not None and data.shape[1] != num_experts:
            raise ValueError(f"weights_or_routing must have num_experts={num_experts} columns, "
                             f"got shape {data.shape}")
    T, E = data.shape
    tokens = _labels("tokens", tokens, T, "token")
    fig = Figure(figsize=(1.2 + 0.45 * E, 1.5 + 0.22 * min(T, 60)), layout="constrained")
    ax = fig.add_subplot()
    _heatmap(ax, data, "combine weight (unitless)", vmax=max(1.0, data.max()), fmt=".2f",
             yticklabels=tokens or "auto", mask=data == 0)
    ax.set(title=title + " (blank: not routed)", xlabel="expert",
           ylabel="token" if tokens is not None else "token (position)")
    return fig


def load_over_training(loads, entropy=None, steps=None,
                       title: str = "Expert load over training") -> Figure:
    """Each expert's share of the assignments per step (stacked areas), and the normalised load
    entropy per step (1 = even, 0 = one expert takes all: collapse).

    loads: [steps, E] counts or fractions per logged step (each row is normalised to 100%).
    entropy: [steps] normalised entropies; by default `minimoe.metrics.load_entropy` of each row.
    steps: [steps] training step of each row; by default 0, 1, 2, ...
    """
    loads = _array("loads", loads, ndim=2)
    totals = loads.sum(1)
    if (loads < 0).any() or (totals <= 0).any():
        raise ValueError("loads must be non-negative with a positive total in every row, got rows "
                         f"{np.flatnonzero(totals <= 0).tolist()} with total <= 0, min entry {loads.min()}")
    n, E = loads.shape
    steps = np.arange(n, dtype=np.float64) if steps is None else _array("steps", steps, ndim=1)
    if steps.shape != (n,):
        raise ValueError(f"steps must have {n} entries (one per row of loads), got shape {steps.shape}")
    if entropy is None:
        entropy = np.array([metrics.load_entropy(row) for row in loads])
    entropy = _array("entropy", entropy, ndim=1)
    if entropy.shape != (n,):
        raise ValueError(f"entropy must have {n} entries (one per row of loads), got shape {entropy.shape}")

    share = 100 * loads / totals[:, None]
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1.4))
    bottom.sharex(top)
    palette = sns.color_palette("colorblind" if E <= 10 else "viridis", E)
    top.stackplot(steps, share.T, labels=[f"expert {e}" for e in range(E)], colors=palette)
    top.set(title="share of assignments per expert", xlabel="training step",
            ylabel="share of assignments (%)", ylim=(0, 100))
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), ncol=math.ceil(E / 16), fontsize="small")
    bottom.plot(steps, entropy, color=sns.color_palette("colorblind")[0], marker="." if n <= 50 else None)
    bottom.set(title="normalised load entropy", xlabel="training step",
               ylabel="entropy / log E (1 = even)", ylim=(-0.03, 1.03))
    top.margins(x=0)
    bottom.margins(x=0)
    fig.suptitle(title)
    return fig


def dropped_vs_capacity(capacity_factors, dropped: dict,
                        title: str = "Dropped assignments vs capacity factor") -> Figure:
    """One line per policy / routing skew: the share of assignments dropped at each capacity factor.

    capacity_factors: [n] positive factors. dropped: {label: [n] dropped fractions in [0, 1]}.
    """
    factors = _array("capacity_factors", capacity_factors, ndim=1)
    if (factors <= 0).any():
        raise ValueError(f"capacity_factors must be > 0, got {factors.tolist()}")
    if not isinstance(dropped, dict):
        raise TypeError(f"dropped must be a dict label -> dropped fractions, got {type(dropped).__name__}")
    if not dropped:
        raise ValueError("dropped must hold at least one line (label -> dropped fractions), got {}")
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for (label, fractions), color in zip(dropped.items(), sns.color_palette("colorblind", len(dropped)),
                                         strict=True):
        fractions = _array(f"dropped[{label!r}]", fractions, ndim=1)
        if fractions.shape != factors.shape:
            raise ValueError(f"dropped[{label!r}] must have {factors.size} entries (one per capacity factor), "
                             f"got shape {fractions.shape}")
        if (fractions < 0).any() or (fractions > 1).any():
            raise ValueError(f"dropped[{label!r}] must hold fractions in [0, 1], got {fractions.tolist()}")
        ax.plot(factors, 100 * fractions, marker="o", color=color, label=str(label))
    ax.set(title=title, xlabel="capacity factor", ylabel="dropped assignments (%)", ylim=(-2, 102))
    ax.legend()
    return fig


def specialization_heatmap(counts, class_names=None,
                           title: str = "Expert specialisation") -> Figure:
    """Class x expert counts (from `minimoe.metrics.specialization`) shown as each class's split of
    its assignments over the experts (rows sum to 100%); I(class; expert) in bits in the title."""
    counts = _array("counts", counts, ndim=2)
    if (counts < 0).any() or (counts.sum(1) <= 0).any():
        raise ValueError("counts must be non-negative with a positive total in every row (class), got row "
                         f"totals {counts.sum(1).tolist()}")
    C, E = counts.shape
    class_names = _labels("class_names", class_names, C, "class")
    mi = metrics.mutual_information(counts)
    share = 100 * counts / counts.sum(1, keepdims=True)
    fig = Figure(figsize=(1.8 + 0.5 * E, 1.4 + 0.4 * C), layout="constrained")
    ax = fig.add_subplot()
    _heatmap(ax, share, "share of the class's assignments (%)", vmax=100, fmt=".0f",
             yticklabels=class_names or "auto")
    ax.set(title=f"{title}: I(class; expert) = {mi:.3f} bits", xlabel="expert", ylabel="class")
    return fig


def router_probability_histogram(probs, bins: int = 40,
                                 title: str = "Router probabilities") -> Figure:
    """Histograms of all router probabilities [T, E] and of each token's largest one, with the
    uniform 1/E marked: mass piling at 1/E is an undecided router, at 1 a confident (or collapsed) one."""
    probs = _array("probs", probs, ndim=2)
    if (probs < 0).any() or (probs > 1).any():
        raise ValueError(f"probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}]")
    edges = np.linspace(0, 1, _checks.positive_int("bins", bins) + 1)
    T, E = probs.shape
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    colors = sns.color_palette("colorblind", 2)
    panels = [(probs.ravel(), f"all {T} x {E} probabilities", "count (token, expert pairs)"),
              (probs.max(1), f"largest probability of each of {T} tokens", "count (tokens)")]
    for ax, (values, what, ylabel), color in zip(fig.subplots(1, 2), panels, colors, strict=True):
        ax.hist(values, bins=edges, color=color)
        ax.axvline(1 / E, color="black", linestyle="--", linewidth=1, label=f"uniform 1/E = {1 / E:.3g}")
        ax.set(title=what, xlabel="router probability", ylabel=ylabel, xlim=(0, 1))
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def capacity_seats(expert_idx, num_experts: int, capacity: int, policy: str = "position",
                   weights=None) -> tuple[np.ndarray, list[list[int]]]:
    """Which assignment sits in which slot when each expert has `capacity` slots: what
    `capacity_slot_grid` draws. Assignments are numbered a = t * k + j (token t, choice j).

    expert_idx [T, k] (best first); weights [T, k], needed for policy="score".
    Returns seats [E, C] int (the assignment in each slot, filled in priority order, -1 where
    empty) and dropped: for each expert, the assignments it had no slot for, in priority order.
    Which assignments are kept is `minimoe.dispatch.make_plan`'s decision.
    """
    expert_idx = _checks.tensor("expert_idx", expert_idx, ndim=2)
    capacity = _checks.positive_int("capacity", capacity)
    weights = None if weights is None else _checks.tensor("weights", weights, ndim=2)
    plan = make_plan(expert_idx, num_experts, capacity, policy=policy, weights=weights)
    T, k = expert_idx.shape
    slot_major = np.arange(T * k).reshape(T, k).T.ravel()  # every first choice, then every second ...
    if policy == "score":
        by_weight = np.argsort(-weights.detach().double().cpu().numpy().T.ravel(), kind="stable")
        slot_major = slot_major[by_weight]
    flat_expert, kept = expert_idx.reshape(-1).cpu().numpy(), plan.kept.reshape(-1).cpu().numpy()
    seats = np.full((num_experts, capacity), -1, dtype=np.int64)
    filled = np.zeros(num_experts, dtype=np.int64)
    dropped = [[] for _ in range(num_experts)]
    for a in slot_major:
        e = flat_expert[a]
        if kept[a]:
            seats[e, filled[e]] = a
            filled[e] += 1
        else:
            dropped[e].append(int(a))
    return seats, dropped


def capacity_slot_grid(expert_idx, num_experts: int, capacity: int, weights=None,
                       policies=DROP_POLICIES, tokens=None,
                       title: str = "Expert slots: who gets a seat, who is dropped") -> Figure:
    """The E x C slot grid, one panel per drop policy: row e holds expert e's C slots, each
    filled slot shows its token (and weight) coloured by the choice (1st, 2nd, ...) it is, and
    the assignments that found the expert full sit right of the capacity line, hatched.

    expert_idx [T, k] best first; weights [T, k] (needed for "score"; written in the cells);
    capacity: slots per expert; policies: drop policies, one panel each; tokens: T labels.
    Each rectangle's gid reads "kept t=.. j=.. e=.. seat=.." or "dropped t=.. j=.. e=..".
    """
    if isinstance(policies, str) or not policies:
        raise ValueError(f"policies must be a non-empty sequence of names from {DROP_POLICIES}, got {policies!r}")
    policies = [_checks.choice("policies", policy, DROP_POLICIES) for policy in policies]
    expert_idx = _checks.tensor("expert_idx", expert_idx, ndim=2)
    T, k = expert_idx.shape
    tokens = _labels("tokens", tokens, T, "token") or [f"t{t}" for t in range(T)]
    layouts = [capacity_seats(expert_idx, num_experts, capacity, policy, weights) for policy in policies]
    overflow = max(len(d) for _, dropped in layouts for d in dropped)
    width = capacity + (overflow + 0.3 if overflow else 0)
    palette = sns.color_palette("colorblind", 10)
    drop_color, colors = palette[3], [c for i, c in enumerate(palette) if i != 3] * k  # 3: vermillion
    fig = Figure(figsize=(max(7.0, 1.5 + 0.75 * width * len(policies)), 1.6 + 0.5 * num_experts),
                 layout="constrained")
    axes = fig.subplots(1, len(policies), squeeze=False)[0]

    def cell(ax, x, e, a, gid, **style):
        t, j = divmod(int(a), k)
        ax.add_patch(Rectangle((x, e), 1, 1, gid=gid.format(t=t, j=j, e=e), linewidth=1.5, **style))
        text = tokens[t] if weights is None else f"{tokens[t]}\n{float(weights[t, j]):.2f}"
        ax.text(x + 0.5, e + 0.5, text, ha="center", va="center", fontsize="small")

    for ax, policy, (seats, dropped) in zip(axes, policies, layouts, strict=True):
        for e in range(num_experts):
            for c in range(capacity):
                if seats[e, c] < 0:
                    ax.add_patch(Rectangle((c, e), 1, 1, facecolor="white", edgecolor="0.8",
                                           gid=f"empty e={e} seat={c}"))
                else:
                    j = seats[e, c] % k
                    cell(ax, c, e, seats[e, c], f"kept t={{t}} j={{j}} e={{e}} seat={c}",
                         facecolor=(*colors[j], 0.55), edgecolor="white")
            for i, a in enumerate(dropped[e]):
                cell(ax, capacity + 0.3 + i, e, a, "dropped t={t} j={j} e={e}", facecolor="white",
                     edgecolor=drop_color, hatch="//")
        ax.axvline(capacity, color="black", linewidth=2)
        n_dropped = sum(len(d) for d in dropped)
        ax.set(xlim=(0, width), ylim=(num_experts, 0), title=f"{policy} priority: {n_dropped} dropped",
               xlabel=f"slot in the expert's buffer (C = {capacity}; right of the line: dropped)", ylabel="expert",
               xticks=np.arange(capacity) + 0.5, xticklabels=range(capacity),
               yticks=np.arange(num_experts) + 0.5, yticklabels=range(num_experts))
        ax.grid(False)
    handles = [Patch(facecolor=(*colors[j], 0.55), label=f"choice {j + 1} of the token") for j in range(k)]
    handles.append(Patch(facecolor="white", edgecolor=drop_color, hatch="//", label="dropped (no slot)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=k + 1, fontsize="small")
    fig.suptitle(title)
    return fig
