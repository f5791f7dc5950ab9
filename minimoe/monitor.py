"""Watch the routers of any model built from `MoELayer`s, in training and in evaluation.

    monitor = RoutingMonitor(model)      # reads every MoELayer's stats after each of its calls
    ... train or evaluate as usual ...
    monitor.records                     # one dict per (forward call of model, MoE layer)
    monitor.series("logit_max", layer=0) # (steps, values) for your own plots
    monitor.dashboard()                 # one matplotlib Figure of every metric
    monitor.to_tensorboard(writer)      # every metric per layer and step, to TensorBoard
    monitor.detach()                    # or: with RoutingMonitor(model) as monitor: ...

Steps are counted automatically, one per forward call of the monitored model in training mode:
the record of the s-th training call (from 0) has step s. A call in eval mode does not advance
the count; its records carry the number of training calls made so far, so an evaluation after
100 training steps is recorded at step 100 (the convention of `minimoe.train.History.val_step`).
Every record also keeps `call`, the index of the forward call among all of them, and `training`.
Only calls made through the monitored model are recorded, and a layer call on no tokens leaves no record.

A record holds, for one MoE layer and one call (E experts, T tokens):
    step, call, layer, training   where and when (layer: index among the model's MoE layers)
    tokens            T
    load              [E] list of ints, assignments the router sent to each expert (before capacity)
    (these are `minimoe.metrics.MoEStats` fields, as the layer's `stats` holds them)
    load_entropy      entropy of the load / log E: 1 = even, 0 = one expert takes all
    dead_experts      experts that received no assignment
    max_violation     MaxVio, (max load - mean load) / mean load (Wang et al. 2024)
    cv                coefficient of variation of the load, std / mean
    dropped_fraction  share of the assignments dropped by the capacity limit
    logit_max         largest router logit
    logit_rms         root mean square of the router logits
    z_loss            router z-loss, mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022)

Gradients: at the end of every backward pass that accumulates gradients into the model's
parameters, the monitor adds to `grad_records` one dict per MoE layer (fields GRAD_FIELDS):
    step              the step of the latest training call (as above), the one whose loss it follows
    layer             index among the model's MoE layers
    grad_norm         global gradient norm, sqrt of the sum of ||p.grad||^2 over all the model's
                      parameters (what `torch.nn.utils.clip_grad_norm_` measures before clipping)
    expert_grad_norm  [E] list, for expert e: sqrt(||w_gate.grad[e]||^2 + ||w_up.grad[e]||^2 +
                      ||w_down.grad[e]||^2) (a weight without a gradient counts 0)
It reads the gradients as they stand, so with gradient accumulation each backward records the sum
so far. Under expert parallelism each rank records what it holds when its backward ends, before
the Trainer averages over the W ranks: the norm over its own parameters, and its E / W experts,
whose gradients are then the sum over the ranks' losses (W times those of the mean loss).
`grad_series` reads them back; the dashboard gains a row for them once there are any.
"""

import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torch import nn

from minimoe import _checks
from minimoe.layer import moe_layers
from minimoe.losses import router_z_loss
from minimoe.metrics import MoEStats, routing_stats
from minimoe.routing import Routing

FIELDS = ("step", "call", "layer", "training", "tokens", "load", "load_entropy", "dead_experts",
          "max_violation", "cv", "dropped_fraction", "logit_max", "logit_rms", "z_loss")
METRICS = FIELDS[6:]  # the numbers a dashboard plots over steps
GRAD_FIELDS = ("step", "layer", "grad_norm", "expert_grad_norm")

# diagnose(): thresholds, checked in this order
LOGIT_BLOW_UP = 10.0     # "logit blow-up"  when logit_max > 10
COLLAPSED_ENTROPY = 0.5  # "collapsed"      when load_entropy < 0.5
#                          "dead experts"   when dead_experts > 0; else "healthy"

_PANELS = {  # metric: (title, y label)
    "load_entropy": ("normalised load entropy", "entropy / log E (1 = even)"),
    "dead_experts": ("dead experts", "experts with no assignment (count)"),
    "max_violation": ("MaxVio", "(max - mean) / mean load (ratio)"),
    "cv": ("coefficient of variation", "std / mean load (ratio)"),
    "dropped_fraction": ("dropped by capacity", "dropped assignments (%)"),
    "logit_max": ("largest router logit", "logit (unitless)"),
    "logit_rms": ("router logit RMS", "logit (unitless)"),
    "z_loss": ("router z-loss", "mean logsumexp² (unitless)"),
}


def _fields(stats: MoEStats, z_loss: float) -> dict:
    """The record fields that come from one call's statistics."""
    return dict(tokens=stats.tokens, load=stats.load.tolist(), load_entropy=stats.load_entropy,
                dead_experts=stats.dead_experts, max_violation=stats.max_violation, cv=stats.cv,
                logit_max=stats.logit_max, logit_rms=stats.logit_rms, z_loss=z_loss)


def routing_record(routing: Routing, num_experts: int) -> dict:
    """The load and logit metrics of one router call (T >= 1 tokens) -> dict with the record
    fields tokens, load, load_entropy, dead_experts, max_violation, cv, logit_max, logit_rms, z_loss."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a minimoe.routing.Routing, got {type(routing).__name__}")
    if routing.logits.shape[0] == 0:
        raise ValueError("routing must hold at least one token, got logits of shape (0, E)")
    if routing.logits.shape[1] != num_experts:
        raise ValueError(f"num_experts must be the routing's {routing.logits.shape[1]}, got {num_experts}")
    return _fields(routing_stats(routing), float(router_z_loss(routing.logits.detach())))


def _expert_squares(layer) -> torch.Tensor:
    """[E] float64 on the weights' device: for expert e, the sum of squares of the .grad slices [e]
    of w_gate, w_up and w_down (a weight without a .grad counts 0). [E / W] under expert
    parallelism: this rank's experts (`num_local_experts`)."""
    experts = layer.experts
    total = torch.zeros(getattr(experts, "num_local_experts", experts.num_experts), dtype=torch.float64)
    for name in ("w_gate", "w_up", "w_down"):
        weight = getattr(experts, name, None)
        if weight is not None and weight.grad is not None:
            grad = weight.grad.detach()
            total = total.to(grad.device) + grad.double().pow(2).reshape(grad.shape[0], -1).sum(1)
    return total


def expert_grad_norms(layer) -> list[float]:
    """Gradient norm of each expert an MoELayer holds: for expert e, the norm of the .grad slices
    [e] of w_gate, w_up and w_down taken together (a weight without a .grad counts 0)."""
    return _expert_squares(layer).sqrt().tolist()


def diagnose(record: dict) -> str:
    """One word on a record's health, by the thresholds above, checked in order:
    "logit blow-up", "collapsed", "dead experts", else "healthy"."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict (a RoutingMonitor record), got {type(record).__name__}")
    missing = {"logit_max", "load_entropy", "dead_experts"} - set(record)
    if missing:
        raise ValueError(f"record must have the keys logit_max, load_entropy and dead_experts, "
                         f"missing {sorted(missing)}")
    if record["logit_max"] > LOGIT_BLOW_UP:
        return "logit blow-up"
    if record["load_entropy"] < COLLAPSED_ENTROPY:
        return "collapsed"
    if record["dead_experts"] > 0:
        return "dead experts"
    return "healthy"


def _load_share(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps [n], share [n, E]): per step, the share of the assignments of its records."""
    steps = np.unique([r["step"] for r in rows])
    loads = np.zeros((len(steps), len(rows[0]["load"])))
    for r in rows:
        loads[np.searchsorted(steps, r["step"])] += r["load"]
    return steps, loads / loads.sum(1, keepdims=True)


class RoutingMonitor:
    """Forward hooks on `model` and on every MoELayer in it (found by isinstance; `model` may be
    an MoELayer itself): after each layer call, its `stats` and `z_loss` become a record, one
    per layer per forward call of `model`. See the module docstring for the step convention and
    the record fields."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError(f"model must contain an MoELayer, got a {type(model).__name__} without one")
        self.model = model
        self.records: list[dict] = []
        self.steps = 0  # forward calls of model in training mode so far
        self.calls = 0  # all forward calls of model so far
        self._call: dict | None = None  # step, call, training of the call in progress
        self._handles = [model.register_forward_pre_hook(self._begin)]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._record(i)))
        self._handles.append(model.register_forward_hook(self._end))  # after the layers' hooks
        self.grad_records: list[dict] = []
        self._grads_queued = False  # a gradient record waits for the end of the running backward
        self._handles += [p.register_post_accumulate_grad_hook(self._queue_gradients)
                          for p in model.parameters() if p.requires_grad]

    # ---- hooks ----
    def _begin(self, model, args):
        self._grads_queued = False  # a backward that failed midway left its record unqueued
        self._call = dict(step=self.steps, call=self.calls, training=model.training)

    def _record(self, i: int):
        def hook(layer, args, output):
            stats = layer.stats
            if self._call is None or stats.tokens == 0:
                return  # a call not made through the monitored model, or no tokens
            values = dict(self._call, layer=i, dropped_fraction=stats.dropped_fraction,
                          **_fields(stats, float(layer.z_loss.detach())))
            self.records.append({name: values[name] for name in FIELDS})
        return hook

    def _end(self, model, args, output):
        self.steps += self._call["training"]
        self.calls += 1
        self._call = None

    def _queue_gradients(self, param):
        # the first accumulation of a backward pass queues one record for its end (as DDP does)
        if not self._grads_queued:
            self._grads_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._record_gradients)

    def _record_gradients(self):
        self._grads_queued = False
        # the model's parameters now, not at construction: parallelize() may have swapped the experts
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        total = (torch.stack([g.double().pow(2).sum().to(device) for g in grads]).sum().reshape(1) if grads
                 else torch.zeros(1, dtype=torch.float64, device=device))
        experts = [_expert_squares(layer).to(device) for layer in self.layers]
        values = torch.cat([total, *experts]).sqrt().tolist()  # the one read of the device
        step, start = max(self.steps - 1, 0), 1
        for i, squares in enumerate(experts):
            self.grad_records.append(dict(step=step, layer=i, grad_norm=values[0],
                                          expert_grad_norm=values[start:start + len(squares)]))
            start += len(squares)

    # ---- lifetime ----
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook (records are kept). Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call = None

    def __enter__(self) -> "RoutingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- reading the records ----
    def to_dataframe(self):
        """The records as a pandas DataFrame (one row per record, columns FIELDS) when pandas is
        installed, else as a plain dict {field: list of values} (pandas is not a dependency)."""
        try:
            import pandas as pd
        except ImportError:
            return {name: [record[name] for record in self.records] for name in FIELDS}
        return pd.DataFrame(self.records, columns=list(FIELDS))

    def series(self, name: str, layer: int = 0, training: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(steps [n], values [n]) of one metric for one layer, over the training-mode records
        (training=False: the eval-mode ones), averaged over the calls that share a step."""
        _checks.choice("name", name, METRICS)
        rows = self._rows(layer, training)
        steps = np.array([r["step"] for r in rows])
        values = np.array([r[name] for r in rows], dtype=float)
        unique, which = np.unique(steps, return_inverse=True)
        return unique, np.bincount(which, weights=values) / np.bincount(which)

    def grad_series(self, layer: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps [n], grad_norm [n], expert_grad_norm [n, E]) of one MoE layer's gradient
        records, averaged over the backward passes that share a step."""
        _checks.positive_int("layer", layer, minimum=0)
        if layer >= len(self.layers):
            raise ValueError(f"layer must be < {len(self.layers)} (the model's MoE layers), got {layer}")
        rows = [r for r in self.grad_records if r["layer"] == layer]
        if not rows:
            raise ValueError("no gradient records yet: call backward on a loss of the model while the "
                             "monitor is attached")
        steps, which = np.unique([r["step"] for r in rows], return_inverse=True)
        counts = np.bincount(which)[:, None]
        values = np.zeros((len(steps), 1 + len(rows[0]["expert_grad_norm"])))
        np.add.at(values, which, [[r["grad_norm"], *r["expert_grad_norm"]] for r in rows])
        values /= counts
        return steps, values[:, 0], values[:, 1:]

    def _rows(self, layer: int, training: bool) -> list[dict]:
        _checks.positive_int("layer", layer, minimum=0)
        if layer >= len(self.layers):
            raise ValueError(f"layer must be < {len(self.layers)} (the model's MoE layers), got {layer}")
        rows = [r for r in self.records if r["layer"] == layer and r["training"] == bool(training)]
        if not rows:
            mode = "training" if training else "eval"
            raise ValueError(f"no {mode}-mode records for layer {layer} yet: run the model in {mode} mode "
                             f"while the monitor is attached ({len(self.records)} records in all)")
        return rows

    def to_tensorboard(self, writer, prefix: str = "routing", eval_prefix: str | None = None):
        """Write the training-mode records to TensorBoard, one point per MoE layer i and step (the
        mean over the calls that share it, as `series`): every metric as the scalar
        `{prefix}/layer{i}/{metric}`, and the step's load share (its calls' loads summed) as the
        histogram over expert ids `{prefix}/layer{i}/load_share`. eval_prefix: the eval-mode
        records too, under that prefix (e.g. "routing_eval"). writer: a
        `torch.utils.tensorboard.SummaryWriter` (flushed, left open), or a log directory (a
        writer is made there, then closed; needs `pip install minimoe[tensorboard]`)."""
        from minimoe._tensorboard import add_load_share, summary_writer

        tb, made = summary_writer(writer)
        for training, tags in ((True, prefix), (False, eval_prefix)):
            if tags is None:
                continue
            for i in range(len(self.layers)):
                for name in METRICS:
                    for step, value in zip(*self.series(name, i, training), strict=True):
                        tb.add_scalar(f"{tags}/layer{i}/{name}", value, int(step))
                for step, share in zip(*_load_share(self._rows(i, training)), strict=True):
                    add_load_share(tb, f"{tags}/layer{i}/load_share", share, int(step))
        if made:
            tb.close()
        else:
            tb.flush()

    def dashboard(self, training: bool = True, load_layer: int = 0,
                  title: str = "Routing dashboard") -> Figure:
        """One figure: each metric over steps (one line per MoE layer), and the share of the
        assignments each expert received at each step in layer `load_layer` (heatmap). With
        gradient records (training mode), a fourth row: the global gradient norm with each MoE
        layer's expert-gradient norm, and the gradient norm of each expert of `load_layer` (heatmap)."""
        rows = self._rows(load_layer, training)  # checks the arguments before drawing
        gradients = training and bool(self.grad_records)
        fig = Figure(figsize=(14, 13 if gradients else 10), layout="constrained")
        axes = fig.subplots(4 if gradients else 3, 3).flat
        colors = sns.color_palette("colorblind", len(self.layers))
        scale = {"dropped_fraction": 100.0}
        for ax, (name, (panel_title, ylabel)) in zip(axes, _PANELS.items(), strict=False):
            for i, color in enumerate(colors):
                if any(r["layer"] == i and r["training"] == bool(training) for r in self.records):
                    steps, values = self.series(name, i, training)
                    ax.plot(steps, scale.get(name, 1.0) * values, color=color, label=f"MoE layer {i}")
            ax.set(title=panel_title, xlabel="training step", ylabel=ylabel)
        axes[0].set_ylim(-0.03, 1.03)
        axes[0].legend(fontsize="small")
        steps, share = _load_share(rows)
        ax = axes[8]
        mesh = ax.pcolormesh(steps, np.arange(share.shape[1]), 100 * share.T, cmap="mako", vmin=0,
                             shading="nearest")
        fig.colorbar(mesh, ax=ax, label="share of assignments (%)")
        ax.set(title=f"load per expert, MoE layer {load_layer}", xlabel="training step", ylabel="expert")
        if gradients:
            self._gradient_panels(axes[9], axes[10], load_layer, colors)
            axes[11].remove()
        mode = "training" if training else "eval"
        fig.suptitle(f"{title} ({mode}-mode calls, mean per step)")
        return fig

    def _gradient_panels(self, norms_ax, heatmap_ax, load_layer: int, colors) -> None:
        """The dashboard's gradient row: norms over steps, and layer load_layer's experts."""
        for i, color in enumerate(colors):
            steps, grad_norm, per_expert = self.grad_series(i)
            if i == 0:
                norms_ax.plot(steps, grad_norm, color="black", label="all parameters")
            norms_ax.plot(steps, np.sqrt((per_expert ** 2).sum(1)), color=color, label=f"experts of MoE layer {i}")
        norms_ax.set(title="gradient norm", xlabel="training step", ylabel="L2 norm of the gradient (unitless)")
        norms_ax.legend(fontsize="small")
        steps, _, per_expert = self.grad_series(load_layer)
        mesh = heatmap_ax.pcolormesh(steps, np.arange(per_expert.shape[1]), per_expert.T, cmap="rocket",
                                     vmin=0, shading="nearest")
        heatmap_ax.figure.colorbar(mesh, ax=heatmap_ax, label="gradient norm (unitless)")
        heatmap_ax.set(title=f"gradient norm per expert, MoE layer {load_layer}", xlabel="training step",
                       ylabel="expert")
