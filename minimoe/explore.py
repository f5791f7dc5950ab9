"""Interactive explorers of chapters 04 to 06: move a control, the figure is redrawn.

Each explorer has two halves. A pure function computes what the figure shows for given control
values (`route_batch`, `balancing_run`, `capacity_summary`; tested without any widget), and a
`*_figure` function draws it with `minimoe.viz`. `Explorer` is the thin ipywidgets UI around a
figure function: every change of a control calls it again and shows the new figure. The
`*_explorer` functions build the three UIs; ipywidgets (the course extra) is imported only
when one is built.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

from minimoe import _checks, metrics, viz
from minimoe.dispatch import DROP_POLICIES, expert_capacity, make_plan
from minimoe.experiments import CollapseResult, collapse_experiment
from minimoe.routing import ROUTERS, Routing, make_router

__all__ = [
    "AUX_LOSS_COEFS", "CAPACITY_FACTORS", "NOISE_STDS", "CapacitySummary", "Explorer", "balancing_explorer",
    "balancing_figure", "balancing_run", "capacity_explorer", "capacity_figure", "capacity_summary",
    "route_batch", "routing_explorer", "routing_figure",
]

AUX_LOSS_COEFS = (0.0, 0.001, 0.01, 0.1, 1.0, 10.0)  # chapter 05's alpha slider
NOISE_STDS = (0.0, 0.5, 1.0, 2.0)  # chapter 05's router-noise slider (std of the logit noise)
CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # chapter 06's slider


# ---------------------------------------------------------------------------------------------
# the UI: controls -> figure function -> ipywidgets Output
# ---------------------------------------------------------------------------------------------

class Explorer:
    """Controls (name -> ipywidgets value widget) that redraw `draw(**values) -> Figure` on every
    change. `.figure` is the figure last drawn, `.widget` the box to display (a notebook cell
    ending in the Explorer displays it)."""

    def __init__(self, draw: Callable[..., Figure], controls: dict):
        import ipywidgets

        if not callable(draw):
            raise TypeError(f"draw must be a function of the controls' values returning a Figure, got {draw!r}")
        if not isinstance(controls, dict) or not controls:
            raise ValueError(f"controls must be a non-empty dict name -> widget, got {controls!r}")
        self.draw, self.controls = draw, dict(controls)
        self.output = ipywidgets.Output()
        self.widget = ipywidgets.VBox([ipywidgets.HBox(list(self.controls.values())), self.output])
        self.figure = None
        for control in self.controls.values():
            control.observe(self.redraw, names="value")
        self.redraw()

    def values(self) -> dict:
        """The controls' current values, name -> value."""
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self, change=None) -> None:
        """Draw the figure for the current values and show it in the output area."""
        from IPython import get_ipython
        from IPython.display import display

        figure = self.draw(**self.values())
        if not isinstance(figure, Figure):
            raise TypeError(f"draw must return a matplotlib Figure, got {type(figure).__name__}")
        self.figure = figure
        if get_ipython() is not None:  # in a kernel: replace the shown figure
            with self.output:
                self.output.clear_output(wait=True)
                display(figure)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


# ---------------------------------------------------------------------------------------------
# chapter 04: router type and k on the routing heatmap
# ---------------------------------------------------------------------------------------------

def route_batch(name: str, k: int, x: torch.Tensor, gate_weight: torch.Tensor, token_ids=None,
                vocab_size: int | None = None, training_draw: bool = False, seed: int = 0) -> Routing:
    """Route x [T, d] with the router `name` of minimoe.routing.ROUTERS, its gate set to
    gate_weight [E, d] (hash routing has none: it needs token_ids [T] and vocab_size).

    k: experts per token; for "expert_choice" the capacity factor c (each expert takes its
    ceil(T * c / E) best tokens, a token gets c experts on average); "switch" needs k = 1 and
    "gshard" k = 2. training_draw=False routes in eval mode (no noise, GShard keeps both
    experts); True draws one training-mode routing with torch seed `seed`.
    """
    _checks.choice("name", name, ROUTERS)
    k = _checks.positive_int("k", k)
    x = _checks.tensor("x", x, ndim=2)
    gate_weight = _checks.tensor("gate_weight", gate_weight, ndim=2)
    if gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"gate_weight must be [E, d] with d = x's {x.shape[1]} columns, got shape "
                         f"{tuple(gate_weight.shape)}")
    num_experts = gate_weight.shape[0]
    router = make_router(name, x.shape[1], num_experts, None if name == "expert_choice" else k,
                         capacity_factor=float(k), vocab_size=vocab_size, seed=seed)
    if name != "hash":
        with torch.no_grad():
            router.proj.weight.copy_(gate_weight)
    router.train(bool(training_draw))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        return router(x, token_ids) if name == "hash" else router(x)


def routing_figure(routing: Routing, name: str, k: int, tokens=None) -> Figure:
    """`viz.routing_heatmap` of `routing` with the load per expert in the title."""
    num_experts = routing.probs.shape[1]
    load = metrics.expert_load(routing.expert_idx, num_experts, routing.mask).tolist()
    what = f"c = {k}" if name == "expert_choice" else f"k = {k}"
    return viz.routing_heatmap(routing, num_experts, tokens=tokens,
                               title=f"{name}, {what}: tokens per expert\n{load}\n")


def routing_explorer(x: torch.Tensor, gate_weight: torch.Tensor, token_ids=None, vocab_size: int | None = None,
                     tokens=None, name: str = "topk", k: int = 2) -> Explorer:
    """Chapter 04: a router menu, a k slider (1 to 4) and a training-draw box on the heatmap of
    `route_batch`. Choosing Switch or GShard sets k to 1 or 2 and locks the slider."""
    import ipywidgets

    fixed_k = {"switch": 1, "gshard": 2}
    choices = [r for r in ROUTERS if r != "hash" or token_ids is not None]
    router = ipywidgets.Dropdown(options=choices, value=_checks.choice("name", name, tuple(choices)),
                                 description="router")
    slider = ipywidgets.IntSlider(value=fixed_k.get(name, k), min=1, max=4, description="k (c)",
                                  continuous_update=False, disabled=name in fixed_k)
    draw_box = ipywidgets.Checkbox(value=False, description="one training-mode draw")

    def lock_k(change):
        slider.disabled = change["new"] in fixed_k
        slider.value = fixed_k.get(change["new"], slider.value)

    router.observe(lock_k, names="value")  # observed first: k is right before the figure redraws

    def draw(name, k, training_draw):
        routing = route_batch(name, k, x, gate_weight, token_ids, vocab_size, training_draw)
        return routing_figure(routing, name, k, tokens)

    return Explorer(draw, {"name": router, "k": slider, "training_draw": draw_box})


# ---------------------------------------------------------------------------------------------
# chapter 05: the aux-loss coefficient and router noise against collapse
# ---------------------------------------------------------------------------------------------

def balancing_run(aux_loss_coef: float, noise_std: float = 0.0, steps: int = 300, seed: int = 0) -> CollapseResult:
    """`collapse_experiment` (Switch-style top-1, E = 8) trained with aux_loss_coef * the Switch
    aux loss ("none" when 0) and training-mode logit noise of std noise_std."""
    coef = _checks.non_negative("aux_loss_coef", aux_loss_coef)
    return collapse_experiment("aux_loss" if coef > 0 else "none", steps, seed, aux_loss_coef=coef,
                               noise_std=_checks.non_negative("noise_std", noise_std))


def balancing_figure(result: CollapseResult, aux_loss_coef: float, noise_std: float) -> Figure:
    """`viz.load_over_training` of a `balancing_run`, with its held-out results in the title."""
    final = result.final
    entropy = round(final.load_entropy, 3) + 0.0  # a collapsed load's entropy may round to -0.000
    return viz.load_over_training(
        result.trace.load, result.trace.load_entropy,
        title=f"alpha = {aux_loss_coef:g}, noise std {noise_std:g}: held-out load entropy "
              f"{entropy:.3f}, {final.dead_experts} dead experts, accuracy {final.accuracy:.3f}")


def balancing_explorer(aux_loss_coef: float = 0.1, noise_std: float = 0.0, steps: int = 300,
                       seed: int = 0) -> Explorer:
    """Chapter 05: sliders for alpha (AUX_LOSS_COEFS) and the noise std (NOISE_STDS); each move
    trains the model again (about a second) and redraws its load over training."""
    import ipywidgets

    alpha = ipywidgets.SelectionSlider(options=AUX_LOSS_COEFS, value=aux_loss_coef, description="alpha",
                                       continuous_update=False)
    noise = ipywidgets.SelectionSlider(options=NOISE_STDS, value=noise_std, description="noise std",
                                       continuous_update=False)

    def draw(aux_loss_coef, noise_std):
        return balancing_figure(balancing_run(aux_loss_coef, noise_std, steps, seed), aux_loss_coef, noise_std)

    return Explorer(draw, {"aux_loss_coef": alpha, "noise_std": noise})


# ---------------------------------------------------------------------------------------------
# chapter 06: capacity factor and drop policy on the slot grid
# ---------------------------------------------------------------------------------------------

@dataclass
class CapacitySummary:
    """One batch of T tokens (top-k, E experts) at one capacity factor and drop policy.

    capacity            slots per expert, expert_capacity(T, E, k, capacity_factor)
    kept                [T, k] bool, the assignments that got a slot (make_plan)
    dropped_fraction    share of the T * k assignments without a slot
    tokens_without_expert   tokens whose k assignments were all dropped
    first_choices_dropped   tokens that lost their first choice
    """

    capacity: int
    kept: np.ndarray
    dropped_fraction: float
    tokens_without_expert: int
    first_choices_dropped: int


def capacity_summary(expert_idx: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity_factor: float,
                     policy: str = "position") -> CapacitySummary:
    """What capacity_factor and policy do to the batch expert_idx [T, k] with weights [T, k]."""
    expert_idx = _checks.tensor("expert_idx", expert_idx, ndim=2)
    T, k = expert_idx.shape
    capacity = expert_capacity(T, num_experts, k, capacity_factor)
    kept = make_plan(expert_idx, num_experts, capacity, policy=policy, weights=weights).kept.cpu().numpy()
    return CapacitySummary(capacity, kept, float(1 - kept.mean()), int((~kept.any(1)).sum()), int((~kept[:, 0]).sum()))


def capacity_figure(expert_idx: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity_factor: float,
                    policy: str = "position", tokens=None) -> Figure:
    """`viz.capacity_slot_grid` of one policy at one capacity factor, its summary in the title."""
    summary = capacity_summary(expert_idx, weights, num_experts, capacity_factor, policy)
    title = (f"capacity factor {capacity_factor:g}: C = {summary.capacity} slots per expert, "
             f"\n{100 * summary.dropped_fraction:.0f}% of the assignments dropped, "
             f"{summary.tokens_without_expert} token{'' if summary.tokens_without_expert == 1 else 's'} with no expert")
    return viz.capacity_slot_grid(expert_idx, num_experts, summary.capacity, weights, policies=(policy,),
                                  tokens=tokens, title=title)


def capacity_explorer(expert_idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                      capacity_factor: float = 1.0, policy: str = "position", tokens=None) -> Explorer:
    """Chapter 06: a capacity-factor slider (CAPACITY_FACTORS) and a drop-policy toggle on the
    slot grid of the batch expert_idx [T, k] with weights [T, k]."""
    import ipywidgets

    factor = ipywidgets.SelectionSlider(options=CAPACITY_FACTORS, value=capacity_factor,
                                        description="capacity factor", continuous_update=False,
                                        style={"description_width": "initial"})
    toggle = ipywidgets.ToggleButtons(options=DROP_POLICIES, value=_checks.choice("policy", policy, DROP_POLICIES),
                                      description="priority")

    def draw(capacity_factor, policy):
        return capacity_figure(expert_idx, weights, num_experts, capacity_factor, policy, tokens)

    return Explorer(draw, {"capacity_factor": factor, "policy": toggle})

