"""Checks for chapter 08 (stability, monitoring, debugging): one function per task.

8.1 imbalance(load)                 (max_violation, cv) of a load vector [E] (counts or fractions):
                                    MaxVio = (max - mean) / mean, CV = population std / mean
8.2 diagnose(record)                "logit blow-up" if logit_max > 10, else "collapsed" if
                                    load_entropy < 0.5, else "dead experts" if dead_experts > 0,
                                    else "healthy" (a record as `RoutingMonitor` keeps them)
8.3 switch_gate(x, router_weight)   (expert_idx [T], weights [T], aux_loss, z_loss): a Switch
                                    top-1 gate, its load-balancing loss and its router z-loss, the
                                    three bugs of the given gate fixed

References: `minimoe.metrics.max_violation` and `coefficient_of_variation`, `minimoe.monitor.diagnose`
(the thresholds above), and `minimoe.routing.SwitchRouter` with `minimoe.losses.load_balancing_loss`
and `router_z_loss`. 8.1 runs on tables of loads that include perfectly even ones, dead experts,
one expert taking everything, and fractions. 8.2 runs on records of random routings plus records
sitting exactly on each threshold or tripping several at once. 8.3 compares values and the
gradients w.r.t. router_weight (of the weights, the aux loss and the z-loss) on inputs whose
shared offset makes the load uneven, sometimes leaving an expert empty.
"""

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.metrics import coefficient_of_variation, max_violation
from minimoe.monitor import COLLAPSED_ENTROPY, LOGIT_BLOW_UP, diagnose, routing_record
from minimoe.routing import Routing, SwitchRouter

__all__ = ["check_diagnose", "check_imbalance", "check_switch_gate"]

LABELS = ("healthy", "logit blow-up", "collapsed", "dead experts")


# ---- 8.1 --------------------------------------------------------------------------------------

def _loads(rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Task 8.1's arguments: 8 loads [E], shuffled: Dirichlet-skewed counts (some with dead experts),
    an even load, one expert taking everything, and skewed fractions (float64)."""
    loads = []
    for _ in range(5):
        E = int(rng.integers(2, 33))
        counts = rng.multinomial(int(rng.integers(E, 50 * E)), rng.dirichlet(np.full(E, rng.uniform(0.2, 3.0))))
        loads.append(torch.from_numpy(counts.astype(np.int64)))
    E = int(rng.integers(2, 17))
    loads.append(torch.full((E,), int(rng.integers(1, 100)), dtype=torch.int64))
    loads.append(torch.zeros(E, dtype=torch.int64).index_fill_(0, torch.tensor([int(rng.integers(E))]), 64))
    loads.append(torch.from_numpy(rng.dirichlet(np.ones(int(rng.integers(2, 17))))))
    return tuple(loads[i] for i in rng.permutation(len(loads)))


def _per_load(fn):
    """fn(load) -> (max_violation, cv) becomes a function of several loads -> {"imbalance([..])": pair}."""
    def apply(*loads):
        results = {}
        for load in loads:
            shown = [round(v, 4) for v in load.tolist()] if load.dtype.is_floating_point else load.tolist()
            results[f"imbalance({shown})"] = fn(load.clone())
        return results
    return apply


def check_imbalance(learner_imbalance):
    """Task 8.1: imbalance(load [E]) -> (max_violation, cv) as floats (or 0-dim tensors)."""
    require_function("8.1", learner_imbalance)
    run_check("8.1", _per_load(learner_imbalance),
              _per_load(lambda load: (max_violation(load), coefficient_of_variation(load))), _loads,
              atol=1e-9, rtol=1e-7)


# ---- 8.2 --------------------------------------------------------------------------------------

def _random_record(rng: np.random.Generator) -> dict:
    """A full monitor record of a random top-2 routing: logit scale, per-expert skew and
    temperature vary, so all four labels occur."""
    T, E = int(rng.integers(16, 129)), int(rng.integers(4, 17))
    skew = rng.normal(0.0, rng.choice([0.1, 1.0, 4.0]), E)
    logits = torch.from_numpy(rng.normal(0.0, 1.0, (T, E)) + skew) * float(rng.choice([0.5, 2.0, 6.0]))
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    record = routing_record(Routing(logits, probs, top.indices, top.values), E)
    return dict(step=int(rng.integers(1000)), call=0, layer=int(rng.integers(4)), training=True,
                dropped_fraction=0.0, **record)


def _edge_records(rng: np.random.Generator) -> list[dict]:
    """Records on the thresholds (which are strict), records that trip several checks, so the
    order of the checks decides the label, and one whose logits are all below -10 (no blow-up)."""
    base = _random_record(rng)
    edges = [(LOGIT_BLOW_UP, 0.9, 0), (LOGIT_BLOW_UP + 0.01, 0.9, 0), (3.0, COLLAPSED_ENTROPY, 0),
             (3.0, COLLAPSED_ENTROPY - 0.01, 0), (3.0, 0.9, 1), (3.0, COLLAPSED_ENTROPY, 2),
             (30.0, 0.2, 5), (30.0, 0.95, 2), (5.0, 0.3, 4), (-12.0, 0.9, 0)]
    return [base | dict(logit_max=m, load_entropy=h, dead_experts=d, logit_rms=float(rng.uniform(0.1, 2)))
            for m, h, d in edges]


def _records(rng: np.random.Generator) -> tuple[tuple[dict, ...]]:
    """Task 8.2's argument: 30 random and 10 edge records, shuffled."""
    records = [_random_record(rng) for _ in range(30)] + _edge_records(rng)
    return (tuple(records[i] for i in rng.permutation(len(records))),)


def _per_record(fn):
    """fn(record) -> label becomes a function of records -> {"record i (its thresholds' fields)": label};
    a learner's answer that is not one of LABELS fails at once, naming the labels."""
    def apply(records):
        results = {}
        for i, record in enumerate(records):
            shown = ", ".join(f"{key}={record[key]:.4g}" for key in ("logit_max", "load_entropy", "dead_experts"))
            label = fn(dict(record))
            if label not in LABELS:
                raise CheckFailure(f"task 8.2: record with {shown} (and load={record['load']}): got {label!r}, "
                                   f"not one of the labels {LABELS}")
            results[f"record {i} ({shown})"] = label
        return results
    return apply


def check_diagnose(learner_diagnose):
    """Task 8.2: diagnose(record dict) -> one of "healthy", "logit blow-up", "collapsed",
    "dead experts", on 30 random and 10 edge records per case."""
    require_function("8.2", learner_diagnose)
    run_check("8.2", _per_record(learner_diagnose), _per_record(diagnose), _records)


# ---- 8.3 --------------------------------------------------------------------------------------

def _gate_inputs(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] with a shared offset (an uneven load, sometimes an empty expert), router_weight [E, d]."""
    T, d, E = int(rng.integers(6, 48)), int(rng.integers(4, 17)), int(rng.integers(3, 11))
    shift = rng.normal(0.0, 1.0, d) * rng.uniform(0.5, 2.0)
    x = rng.normal(0.0, 1.0, (T, d)) + shift
    weight = rng.normal(0.0, rng.uniform(0.3, 1.5), (E, d)) / np.sqrt(d)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(weight.astype(np.float32))


def _with_gradients(gate):
    """gate(x, router_weight) -> {values, and gradients w.r.t. router_weight of sum(weights * probe),
    aux_loss and z_loss} (a missing gradient counts as zeros, so a detached output shows)."""
    def run(x, router_weight):
        router_weight = router_weight.clone().requires_grad_(True)
        out = gate(x, router_weight)
        if not isinstance(out, tuple) or len(out) != 4:
            raise CheckFailure("task 8.3: expected a tuple (expert_idx, weights, aux_loss, z_loss), got "
                               f"{type(out).__name__}{f' of length {len(out)}' if isinstance(out, tuple) else ''}")
        expert_idx, weights, aux_loss, z_loss = out
        for name, value in (("expert_idx", expert_idx), ("weights", weights), ("aux_loss", aux_loss),
                            ("z_loss", z_loss)):
            if not isinstance(value, torch.Tensor):
                raise CheckFailure(f"task 8.3: {name} must be a torch tensor, got {type(value).__name__}")
        probe = torch.linspace(0.5, 1.5, weights.numel(), dtype=weights.dtype).view(weights.shape)
        result = {"expert_idx": expert_idx, "weights": weights.detach(), "aux_loss": aux_loss.detach(),
                  "z_loss": z_loss.detach()}
        for name, value in (("weights * probe", weights * probe), ("aux_loss", aux_loss), ("z_loss", z_loss)):
            grad = None
            if value.requires_grad:
                (grad,) = torch.autograd.grad(value.sum(), router_weight, retain_graph=True, allow_unused=True)
            result[f"d({name}) / d router_weight"] = torch.zeros_like(router_weight) if grad is None else grad
        return result
    return run


def _switch_gate(x: torch.Tensor, router_weight: torch.Tensor):
    """minimoe's SwitchRouter run with proj.weight = router_weight (autograd graph kept), its
    load-balancing loss and z-loss."""
    E, d = router_weight.shape
    routing = torch.func.functional_call(SwitchRouter(d, E), {"proj.weight": router_weight}, (x,))
    return (routing.expert_idx[:, 0], routing.weights[:, 0], load_balancing_loss(routing.probs, routing.expert_idx),
            router_z_loss(routing.logits))


def check_switch_gate(learner_switch_gate):
    """Task 8.3: switch_gate(x [T, d], router_weight [E, d]) -> (expert_idx [T] int64, weights [T],
    aux_loss, z_loss); values and gradients w.r.t. router_weight equal minimoe's."""
    require_function("8.3", learner_switch_gate)
    run_check("8.3", _with_gradients(learner_switch_gate), _with_gradients(_switch_gate), _gate_inputs,
              atol=1e-5, rtol=1e-4)
