"""Schematic pictures of the course's ideas, drawn from data: where an MoE layer sits in a
transformer block, how sort-based dispatch moves one batch of tokens, and how top-k selection and
renormalisation turn router logits into combine weights.

Like `minimoe.viz`, every function returns a `matplotlib.figure.Figure` built without pyplot, at
most 10 inches wide. The boxes, texts and bars that carry data have a `gid` (e.g. "sorted-3",
"expert-1:chosen") so that tests can read the picture back. Expert e is always drawn in colour e
of seaborn's "colorblind" palette; ids are 0-based, as in the code.
"""

import numbers

import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch, Rectangle

from minimoe import _checks, numpy_ref
from minimoe.dispatch import make_plan, sorted_weights

MAX_EXPERTS = 10      # distinct colours in the palette
MAX_ASSIGNMENTS = 24  # T * k rows still readable in the dispatch picture
IDLE = "0.85"         # face colour of an expert that is not chosen
FONT = 9


def _palette(num_experts: int) -> list:
    return sns.color_palette("colorblind", num_experts)


def _box(ax, x: float, y: float, width: float, height: float, text: str, *, face="white", edge="0.2",
         gid: str | None = None, fontsize: float = FONT, linestyle="-", linewidth=1.2, weight="normal"):
    """A rounded box centred on (x, y) with `text` in it; box and text share the gid."""
    patch = FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                           facecolor=face, edgecolor=edge, linestyle=linestyle, linewidth=linewidth, gid=gid)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, gid=gid, weight=weight)
    return patch


def _arrow(ax, start, end, color="0.25", linewidth=1.2, style="-|>"):
    ax.annotate("", xy=end, xytext=start,
                arrowprops={"arrowstyle": style, "color": color, "linewidth": linewidth, "shrinkA": 0, "shrinkB": 0})


def _canvas(ax, width: float, height: float) -> None:
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()


# ---------------------------------------------------------------------------------------------
# (a) an MoE layer in the place of a transformer block's FFN
# ---------------------------------------------------------------------------------------------

def _chosen_experts(chosen, weights, num_experts: int) -> tuple[list[int], list[float]]:
    if isinstance(chosen, str | bytes) or not hasattr(chosen, "__len__"):
        raise TypeError(f"chosen must be a sequence of expert ids, got {type(chosen).__name__}")
    chosen = list(chosen)
    if not 1 <= len(chosen) <= num_experts:
        raise ValueError(f"chosen must hold between 1 and num_experts={num_experts} ids, got {len(chosen)}")
    for e in chosen:
        if isinstance(e, bool) or not isinstance(e, numbers.Integral):
            raise TypeError(f"chosen must hold int expert ids, got {e!r} ({type(e).__name__})")
        if not 0 <= e < num_experts:
            raise ValueError(f"chosen must hold ids in [0, {num_experts}), got {e}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"chosen must not repeat an expert, got {chosen}")
    weights = [1 / len(chosen)] * len(chosen) if weights is None else list(weights)
    if len(weights) != len(chosen):
        raise ValueError(f"weights must hold one weight per chosen expert ({len(chosen)}), got {len(weights)}")
    for w in weights:
        _checks.non_negative("each of weights", w)
    return [int(e) for e in chosen], [float(w) for w in weights]


def _residual_stack(ax, x: float, width: float, sublayer_top: float):
    """The parts every pre-norm block shares: input, norm, attention, residual add, norm. Returns
    the y of the second norm's top and of the second residual add."""
    ys = {"input": 0.45, "norm1": 1.35, "attn": 2.35, "add1": 3.35, "norm2": 4.25, "add2": sublayer_top + 0.55}
    ax.text(x, ys["input"], "token vectors $x_t$", ha="center", va="center", fontsize=FONT)
    _box(ax, x, ys["norm1"], width, 0.5, "norm", face="#f2f2f2")
    _box(ax, x, ys["attn"], width, 0.6, "self-attention", face="#dce9f5")
    _box(ax, x, ys["norm2"], width, 0.5, "norm", face="#f2f2f2")
    for y in (ys["add1"], ys["add2"]):
        ax.add_patch(FancyBboxPatch((x - 0.16, y - 0.16), 0.32, 0.32, boxstyle="circle,pad=0", facecolor="white",
                                    edgecolor="0.2"))
        ax.text(x, y, "+", ha="center", va="center", fontsize=FONT + 2)
    _arrow(ax, (x, ys["input"] + 0.15), (x, ys["norm1"] - 0.25))
    _arrow(ax, (x, ys["norm1"] + 0.25), (x, ys["attn"] - 0.3))
    _arrow(ax, (x, ys["attn"] + 0.3), (x, ys["add1"] - 0.16))
    _arrow(ax, (x, ys["add1"] + 0.16), (x, ys["norm2"] - 0.25))
    _arrow(ax, (x, ys["add2"] + 0.16), (x, ys["add2"] + 0.7))
    ax.text(x, ys["add2"] + 0.85, "to the next block", ha="center", va="center", fontsize=FONT)
    skip = x - width / 2 - 0.25
    for low, high in ((ys["input"] + 0.3, ys["add1"]), (ys["add1"], ys["add2"])):  # residual connections
        ax.plot([x, skip, skip], [low, low, high], color="0.45", linewidth=1.2)
        _arrow(ax, (skip, high), (x - 0.16, high), color="0.45")
    ax.text(skip - 0.08, (ys["add1"] + ys["add2"]) / 2, "residual", rotation=90, ha="right", va="center",
            fontsize=FONT - 1, color="0.35")
    return ys["norm2"] + 0.25, ys["add2"]


def moe_block_in_transformer(num_experts: int = 6, chosen=(1, 4), weights=(0.7, 0.3)) -> Figure:
    """Two pre-norm transformer blocks side by side: a dense one, and one whose FFN is replaced by
    a router and `num_experts` experts f_0..f_{E-1}. The `chosen` experts (one token's top-k) are
    highlighted, run on the token, and their outputs, scaled by `weights` (the combine weights
    g_{t,e}, one per chosen expert; default: equal), are summed back into the residual stream.
    """
    num_experts = _checks.positive_int("num_experts", num_experts, minimum=2)
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts must be <= {MAX_EXPERTS} to be drawn legibly, got {num_experts}")
    chosen, weights = _chosen_experts(chosen, weights, num_experts)
    k = len(chosen)
    colors = _palette(num_experts)

    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    _canvas(ax, 10.0, 9.7)
    moe_bottom, moe_top = 4.75, 7.55

    # left: the dense block
    x_dense = 1.45
    ax.text(x_dense, 9.5, "dense transformer block", ha="center", fontsize=FONT + 1, weight="bold")
    ffn_in, _ = _residual_stack(ax, x_dense, 1.5, moe_top)
    _box(ax, x_dense, 6.15, 1.5, 0.8, "FFN\n(one MLP, every token)", face="#fde9d9", gid="dense-ffn")
    _arrow(ax, (x_dense, ffn_in), (x_dense, 5.75))
    _arrow(ax, (x_dense, 6.55), (x_dense, moe_top + 0.55 - 0.16))

    # right: the MoE block
    x_moe = 4.3
    ax.text(6.4, 9.5, "MoE transformer block: the FFN becomes a router and E experts", ha="center",
            fontsize=FONT + 1, weight="bold")
    ffn_in, add2 = _residual_stack(ax, x_moe, 1.5, moe_top)
    ax.add_patch(FancyBboxPatch((3.45, moe_bottom), 6.45, moe_top - moe_bottom, boxstyle="round,pad=0.02",
                                facecolor="none", edgecolor="0.4", linestyle="--", linewidth=1.2))
    ax.text(9.85, moe_bottom + 0.12, f"MoE layer: E = {num_experts}, k = {k}; grey experts are idle (not run "
            "for this token)", ha="right", va="bottom", fontsize=FONT, color="0.3")
    top_k = ", ".join(f"$f_{e}$" for e in chosen)
    _box(ax, x_moe, 5.45, 1.5, 0.9, f"router\n$p_t$ = softmax($z_t$)\ntop-{k}: {top_k}", face="#e8e0f0",
         gid="router")
    _arrow(ax, (x_moe, ffn_in), (x_moe, 5.0))

    centres = np.linspace(5.55, 9.35, num_experts)
    width = min(0.62, 0.8 * (centres[1] - centres[0]))
    y_expert = 6.0
    sum_x, sum_y = 7.45, 6.95
    for e, cx in enumerate(centres):
        is_chosen = e in chosen
        _box(ax, cx, y_expert, width, 0.55, f"$f_{e}$", face=colors[e] if is_chosen else IDLE,
             edge="black" if is_chosen else "0.6", linewidth=2.0 if is_chosen else 0.8,
             gid=f"expert-{e}:{'chosen' if is_chosen else 'idle'}", weight="bold" if is_chosen else "normal")
    for e, g in zip(chosen, weights, strict=True):
        cx = centres[e]
        _arrow(ax, (x_moe + 0.75, 5.45), (cx, y_expert - 0.28), color=colors[e], linewidth=1.6)
        _arrow(ax, (cx, y_expert + 0.28), (sum_x + (cx - sum_x) * 0.12, sum_y - 0.1), color=colors[e], linewidth=1.6)
        ax.text((cx + sum_x) / 2 + (0.12 if cx >= sum_x else -0.12), (y_expert + sum_y) / 2 + 0.08,
                f"× {g:.2f}", ha="left" if cx >= sum_x else "right", va="center", fontsize=FONT,
                color=colors[e], weight="bold", gid=f"weight-{e}")
    ax.add_patch(FancyBboxPatch((sum_x - 0.17, sum_y - 0.17), 0.34, 0.34, boxstyle="circle,pad=0",
                                facecolor="white", edgecolor="0.2"))
    ax.text(sum_x, sum_y, "Σ", ha="center", va="center", fontsize=FONT + 1)
    ax.text(sum_x + 0.3, sum_y + 0.05, "$\\sum_e g_{t,e}\\, f_e(x_t)$", ha="left", va="center", fontsize=FONT)
    ax.plot([sum_x, sum_x], [sum_y + 0.17, add2], color="0.25", linewidth=1.2)
    _arrow(ax, (sum_x, add2), (x_moe + 0.16, add2))

    fig.suptitle(f"An MoE layer in the place of the FFN: each token runs only k = {k} of E = {num_experts} "
                 "experts (coloured)", fontsize=FONT + 2)
    return fig


# ---------------------------------------------------------------------------------------------
# (b) sort-based dispatch, step by step
# ---------------------------------------------------------------------------------------------

def _routing_arrays(expert_idx, weights, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(expert_idx, torch.Tensor):
        try:
            expert_idx = torch.as_tensor(np.asarray(expert_idx))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError("expert_idx must be a [T, k] array of int expert ids, "
                            f"got {type(expert_idx).__name__}") from err
    _checks.expert_ids("expert_idx", expert_idx, num_experts)
    if expert_idx.numel() == 0:
        raise ValueError(f"expert_idx must hold at least one assignment, got shape {tuple(expert_idx.shape)}")
    if expert_idx.numel() > MAX_ASSIGNMENTS:
        raise ValueError(f"expert_idx must hold at most {MAX_ASSIGNMENTS} assignments (T * k) to be drawn "
                         f"legibly, got shape {tuple(expert_idx.shape)}")
    if not isinstance(weights, torch.Tensor):
        try:
            weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"weights must be a [T, k] array of numbers, got {type(weights).__name__}") from err
    weights = weights.detach().double().cpu()
    _checks.same_shape("weights", weights, expert_idx.shape, "expert_idx")
    if not torch.isfinite(weights).all():
        raise ValueError("weights must be finite, got NaN or inf entries")
    return expert_idx.long().cpu(), weights


def _rows(n: int) -> str:
    return f"{n} row" + ("" if n == 1 else "s")


def dispatch_pipeline(expert_idx, weights, num_experts: int) -> Figure:
    """Sort-based dispatch of one small batch, one column per step, computed by
    `minimoe.dispatch.make_plan` (dropless):

    tokens x_t -> (1) route: assignment a = t * k + j goes to expert expert_idx[t, j] with weight
    weights[t, j] -> (2) sort: plan.order, the assignments stably sorted by expert -> (3) permute:
    buffer row i holds x of token order[i] // k, expert groups separated by lines -> (4) grouped
    GEMM: one block per expert, plan.tokens_per_expert rows each -> (5) unpermute + combine:
    row i, times its weight, is added into its token's output y_t.

    expert_idx [T, k] int ids in [0, num_experts); weights [T, k] combine weights.
    At most 24 assignments (T * k) and 10 experts.
    """
    num_experts = _checks.positive_int("num_experts", num_experts)
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts must be <= {MAX_EXPERTS} to be drawn legibly, got {num_experts}")
    expert_idx, weights = _routing_arrays(expert_idx, weights, num_experts)
    T, k = expert_idx.shape
    S = T * k
    plan = make_plan(expert_idx, num_experts)
    order, token_idx = plan.order.tolist(), plan.token_idx.tolist()
    counts = plan.tokens_per_expert.tolist()
    flat_expert = expert_idx.reshape(-1).tolist()
    row_weight = sorted_weights(weights, plan).tolist()
    colors = _palette(num_experts)

    fig = Figure(figsize=(10, 1.9 + 0.36 * S), layout="constrained")
    ax = fig.add_subplot()
    top = S + 1.6
    _canvas(ax, 10.0, top)
    ax.set_ylim(-0.7, top)  # room for empty experts after the last block
    row_y = [S - 0.5 - i for i in range(S)]   # row i of a [S] column, top to bottom
    token_y = [S - k * t - k / 2 for t in range(T)]
    cols = {"x": 0.45, "route": 1.95, "sort": 3.75, "permute": 5.3, "gemm": 6.85, "y": 9.45}
    headers = {"x": "tokens", "route": "1 route\n$a = t k + j$ → expert", "sort": "2 sort by expert\n(stable)",
               "permute": "3 permute\ngather the rows", "gemm": "4 grouped GEMM\none block per expert",
               "y": "5 unpermute\n+ combine"}
    for name, text in headers.items():
        ax.text(cols[name], S + 0.85, text, ha="center", va="center", fontsize=FONT, weight="bold")
    light = [tuple(0.55 + 0.45 * c for c in colors[e]) for e in range(num_experts)]

    for t in range(T):
        _box(ax, cols["x"], token_y[t], 0.7, k - 0.3, f"$x_{t}$", gid=f"token-{t}")
        _box(ax, cols["y"], token_y[t], 0.7, k - 0.3, f"$y_{t}$", gid=f"output-{t}")
    for a in range(S):
        t, e = divmod(a, k)[0], flat_expert[a]
        _arrow(ax, (cols["x"] + 0.35, token_y[t]), (cols["route"] - 0.75, row_y[a]), color="0.5", linewidth=0.8)
        _box(ax, cols["route"], row_y[a], 1.5, 0.74, f"a={a}: $f_{e}$, g={weights.view(-1)[a].item():.2f}",
             face=light[e], edge=colors[e], gid=f"route-{a}", fontsize=FONT - 1)
    for i, a in enumerate(order):
        e = flat_expert[a]
        ax.plot([cols["route"] + 0.75, cols["sort"] - 0.5], [row_y[a], row_y[i]], color=colors[e], linewidth=1.0)
        _box(ax, cols["sort"], row_y[i], 1.0, 0.74, f"a={a}", face=light[e], edge=colors[e], gid=f"sorted-{i}",
             fontsize=FONT - 1)
        _arrow(ax, (cols["sort"] + 0.5, row_y[i]), (cols["permute"] - 0.55, row_y[i]), color="0.5", linewidth=0.8)
        _box(ax, cols["permute"], row_y[i], 1.1, 0.74, f"row {i}: $x_{token_idx[i]}$", face=light[e], edge=colors[e],
             gid=f"buffer-{i}", fontsize=FONT - 1)

    # expert groups: boundaries across the buffer, one GEMM block per non-empty expert
    start = 0
    empties: dict[int, list[int]] = {}
    for e, n in enumerate(counts):
        if n == 0:
            empties.setdefault(start, []).append(e)
            continue
        y_high, y_low = S - start, S - start - n
        ax.add_patch(Rectangle((cols["gemm"] - 0.6, y_low + 0.08), 1.2, n - 0.16, facecolor=colors[e],
                               edgecolor="black", linewidth=1.0, gid=f"gemm-{e}"))
        ax.text(cols["gemm"], (y_high + y_low) / 2, f"$f_{e}$\n{_rows(n)}", ha="center",
                va="center", fontsize=FONT, gid=f"gemm-{e}", weight="bold")
        if start > 0:
            ax.plot([cols["permute"] - 0.6, cols["gemm"] + 0.6], [y_high, y_high], color="black", linewidth=1.2,
                    linestyle="--")
        start += n
    for boundary, experts in empties.items():
        text = ", ".join(f"$f_{e}$" for e in experts) + ": 0 rows"
        y = S - boundary if boundary < S else -0.35
        ax.text(cols["gemm"], y, text, ha="center", va="center", fontsize=FONT - 1, color="0.3", style="italic",
                gid="gemm-empty:" + ",".join(map(str, experts)),
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "0.5", "linestyle": ":"})
    for i in range(S):
        e = flat_expert[order[i]]
        x0 = cols["gemm"] + 0.6
        ax.plot([x0, cols["y"] - 0.35], [row_y[i], token_y[token_idx[i]]], color=colors[e], linewidth=1.0)
        ax.text(x0 + 0.06, row_y[i] + 0.02, f"×{row_weight[i]:.2f}", ha="left", va="bottom", fontsize=FONT - 1,
                color="0.15", gid=f"combine-{i}")

    handles = [Patch(facecolor=colors[e], edgecolor="black", label=f"expert {e} ({_rows(counts[e])})")
               for e in range(num_experts)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(num_experts, 5),
              fontsize=FONT - 1, frameon=False)
    fig.suptitle(f"Sort-based dispatch: T = {T} tokens, k = {k}, E = {num_experts} experts, "
                 f"{S} assignments", fontsize=FONT + 2)
    return fig


# ---------------------------------------------------------------------------------------------
# (c) top-k selection and renormalisation of one token
# ---------------------------------------------------------------------------------------------

def topk_renormalisation(logits, k: int) -> Figure:
    """One token's router probabilities p = softmax(z) over E experts with its top-k highlighted
    (left), and the renormalised combine weights g_e = p_e / sum of the chosen p (right), every
    bar annotated with its value. logits: [E] for one token (2 <= E <= 16); 1 <= k <= E."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    try:
        logits = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"logits must be a 1-D array of numbers, got {type(logits).__name__}") from err
    if logits.ndim != 1 or not 2 <= logits.size <= 16:
        raise ValueError(f"logits must have shape [E] with 2 <= E <= 16 (one token), got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError(f"logits must be finite, got {logits.tolist()}")
    E = logits.size
    k = _checks.positive_int("k", k)
    if k > E:
        raise ValueError(f"k must be <= E = {E} (the number of logits), got {k}")
    probs = numpy_ref.softmax(logits)
    chosen = numpy_ref.top_k(logits[None], k)[0].tolist()
    renormalised = numpy_ref.gate(logits[None], k, renormalize=True)[0]
    kept_mass = probs[chosen].sum()
    colors = _palette(2)
    highlight, idle = colors[0], IDLE

    fig = Figure(figsize=(min(10, max(8, 4 + 0.75 * E)), 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    experts = np.arange(E)
    for e in experts:
        is_chosen = e in chosen
        left.bar(e, probs[e], color=highlight if is_chosen else idle, edgecolor="black" if is_chosen else "0.6",
                 linewidth=1.5 if is_chosen else 0.6, gid=f"prob-{e}:{'chosen' if is_chosen else 'idle'}")
        left.text(e, probs[e] + 0.02, f"{probs[e]:.2f}", ha="center", va="bottom", fontsize=FONT, gid=f"prob-{e}")
        if is_chosen:
            right.bar(e, renormalised[e], color=colors[1], edgecolor="black", linewidth=1.5, gid=f"weight-{e}")
            right.text(e, renormalised[e] + 0.02, f"{renormalised[e]:.2f}", ha="center", va="bottom",
                       fontsize=FONT, weight="bold", gid=f"weight-{e}")
        else:
            right.text(e, 0.02, "0", ha="center", va="bottom", fontsize=FONT, color="0.5", gid=f"weight-{e}")
    kept_sum = " + ".join(f"$p_{e}$" for e in sorted(chosen))
    left.set(title=f"probabilities $p$ = softmax($z$), top-{k} highlighted", xlabel="expert e",
             ylabel="router probability $p_e$", ylim=(0, 1.12))
    left.text(0.98, 0.95, f"kept mass {kept_sum} = {kept_mass:.2f}", transform=left.transAxes,
              ha="right", va="top", fontsize=FONT, gid="kept-mass")
    right.set(title=f"combine weights $g_e = p_e$ / {kept_mass:.2f}, sum 1", xlabel="expert e",
              ylabel="combine weight $g_e$")
    right.yaxis.set_tick_params(labelleft=True)
    for ax in (left, right):
        ax.set_xticks(experts)
        ax.set_xlim(-0.6, E - 0.4)
        ax.grid(False, axis="x")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Top-{k} selection and renormalisation of one token's router output (E = {E})",
                 fontsize=FONT + 2)
    return fig
