"""Checks for chapter 12 (the capstone): one function per stage of the project.

12.1 capstone_config(world_size, capacity_factor, bias_update_rate)
                        the MoETransformerConfig of the project: d_model 64, 2 blocks of 4 heads,
                        seq_len 64, experts of hidden width 64, 4 experts per rank
                        (num_experts = 4 * world_size), top-2, router "sigmoid_bias" with the
                        given bias_update_rate, aux_loss_coef 0 (aux-loss-free balancing), the
                        given capacity_factor; every other field at its default
12.2 merge_shards(rank_states)
                        the single-process state dict from a list of W per-rank state dicts:
                        expert tensors (names containing ".experts.") concatenated in rank order
                        along dim 0, every other (replicated) tensor taken from rank 0
12.3 routing_summary(records)
                        {"dead_experts": [int], "load_entropy": [float], "dropped_fraction":
                        [float]}, one entry per MoE layer, over RoutingMonitor records (of any
                        number of ranks): the loads summed first, then dead experts and
                        `minimoe.metrics.load_entropy` of the sum; the dropped fraction weighted
                        by each record's assignments
12.4 serving_layer(layer, failed_expert)
                        a new MoELayer for serving: experts int8 (`minimoe.inference.Int8Experts`,
                        router and its bias kept), expert failed_expert unavailable (the router
                        picks among the others and renormalises), dropless; `layer` unchanged

The references are written here from minimoe's parts (`dataclasses.asdict`, `torch.cat`,
`minimoe.metrics`, `minimoe.inference.quantize_experts` and `MoELayer.available_experts`).
Inputs are seeded and random: 1 to 4 ranks, experts that no record ever routes to, sigmoid
routers with a non-zero selection bias, and a capacity factor that would drop tokens.
"""

from dataclasses import asdict

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.checks._inputs import random_floats
from minimoe.inference import quantize_experts
from minimoe.layer import MoELayer
from minimoe.metrics import load_entropy
from minimoe.model import MoETransformerConfig
from minimoe.routing import make_router

__all__ = ["check_capstone_config", "check_merge_shards", "check_routing_summary", "check_serving_layer"]


# ---- 12.1 the model -------------------------------------------------------------------------------

def _config_reference(world_size: int, capacity_factor: float, bias_update_rate: float) -> MoETransformerConfig:
    return MoETransformerConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4, d_hidden=64,
                                num_experts=4 * world_size, k=2, router="sigmoid_bias",
                                bias_update_rate=bias_update_rate, capacity_factor=capacity_factor,
                                aux_loss_coef=0.0)


def _config_fields(config) -> dict:
    """Every field of an MoETransformerConfig as comparable values (None as the string "None")."""
    if not isinstance(config, MoETransformerConfig):
        raise CheckFailure(f"task 12.1: expected a minimoe.model.MoETransformerConfig, got {type(config).__name__}")
    return {name: "None" if value is None else value for name, value in asdict(config).items()}


def check_capstone_config(learner_capstone_config):
    """Task 12.1: capstone_config(world_size, capacity_factor, bias_update_rate) -> MoETransformerConfig."""
    require_function("12.1", learner_capstone_config)

    def make_inputs(rng):
        return (int(rng.choice([1, 2, 4])), float(np.round(rng.uniform(1.0, 2.0), 2)),
                float(np.round(10 ** rng.uniform(-4, -2), 6)))

    run_check("12.1", lambda *args: _config_fields(learner_capstone_config(*args)),
              lambda *args: _config_fields(_config_reference(*args)), make_inputs, atol=0, rtol=0)


# ---- 12.2 one checkpoint from the ranks' shards ---------------------------------------------------

def _merged(rank_states: list[dict]) -> dict:
    """The reference of task 12.2."""
    return {name: torch.cat([state[name] for state in rank_states]) if ".experts." in name else tensor
            for name, tensor in rank_states[0].items()}


def rank_states_inputs(rng: np.random.Generator) -> tuple:
    """Task 12.2's argument: W = 2..4 per-rank state dicts of a model with 1 to 3 blocks, MoE or
    dense, E / W = 1..3 local experts; the replicated tensors (router rows for all E experts
    included) are equal on every rank, the expert shards differ."""
    world, local = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    d, h = int(rng.integers(3, 7)), int(rng.integers(2, 6))
    num_experts = world * local
    replicated = {"token_embedding.weight": random_floats(rng, 10, d)}
    experts = {}
    for b in range(int(rng.integers(1, 4))):
        replicated[f"blocks.{b}.ln1.weight"] = random_floats(rng, d)
        if rng.random() < 0.7 or b == 0:  # an MoE block
            replicated[f"blocks.{b}.ffn.router.proj.weight"] = random_floats(rng, num_experts, d)
            replicated[f"blocks.{b}.ffn.router.expert_bias"] = random_floats(rng, num_experts, scale=0.01)
            for name, shape in (("w_gate", (d, h)), ("w_up", (d, h)), ("w_down", (h, d))):
                experts[f"blocks.{b}.ffn.experts.{name}"] = random_floats(rng, num_experts, *shape)
        else:
            replicated[f"blocks.{b}.ffn.up.weight"] = random_floats(rng, h, d)
    states = []
    for r in range(world):
        state = {name: t.clone() for name, t in replicated.items()}
        state.update({name: t[r * local:(r + 1) * local].clone() for name, t in experts.items()})
        states.append(dict(sorted(state.items())))
    return (states,)


def check_merge_shards(learner_merge_shards):
    """Task 12.2: merge_shards(rank_states: list of W state dicts) -> the single-process state dict."""
    run_check("12.2", learner_merge_shards, _merged, rank_states_inputs, atol=0, rtol=0)


# ---- 12.3 the monitor's summary -------------------------------------------------------------------

def _summary(records: list[dict]) -> dict:
    """The reference of task 12.3."""
    layers = sorted({r["layer"] for r in records})
    dead, entropy, dropped = [], [], []
    for layer in layers:
        rows = [r for r in records if r["layer"] == layer]
        load = np.sum([r["load"] for r in rows], axis=0)
        dead.append(int((load == 0).sum()))
        entropy.append(load_entropy(torch.as_tensor(load)))
        dropped.append(float(sum(r["dropped_fraction"] * sum(r["load"]) for r in rows) / load.sum()))
    return {"dead_experts": dead, "load_entropy": entropy, "dropped_fraction": dropped}


def records_inputs(rng: np.random.Generator) -> tuple:
    """Task 12.3's argument: RoutingMonitor-like records of 1 to 4 ranks x 2 to 6 steps x 1 to 3
    MoE layers, with E = 4..12 experts, uneven loads, experts that get nothing in some records
    and one (in the first layer) that gets nothing in any, and uneven token counts."""
    ranks, steps, layers = int(rng.integers(1, 5)), int(rng.integers(2, 7)), int(rng.integers(1, 4))
    num_experts, k = int(rng.integers(4, 13)), int(rng.integers(1, 3))
    popularity = [rng.dirichlet(np.full(num_experts, 0.8)) for _ in range(layers)]
    popularity[0][int(rng.integers(num_experts))] = 0.0
    records = []
    for step in range(steps):
        for _rank in range(ranks):
            for layer in range(layers):
                tokens = int(rng.integers(20, 120))
                p = popularity[layer] / popularity[layer].sum()
                load = np.bincount(rng.choice(num_experts, size=k * tokens, p=p), minlength=num_experts)
                records.append(dict(step=step, call=step, layer=layer, training=True, tokens=tokens,
                                    load=[int(n) for n in load], load_entropy=load_entropy(torch.as_tensor(load)),
                                    dead_experts=int((load == 0).sum()),
                                    dropped_fraction=float(np.round(rng.uniform(0.0, 0.2), 4) * (rng.random() < 0.8)),
                                    logit_max=float(rng.uniform(1, 4)), logit_rms=float(rng.uniform(0.5, 2)),
                                    z_loss=float(rng.uniform(0.2, 2))))
    return (records,)


def check_routing_summary(learner_routing_summary):
    """Task 12.3: routing_summary(records: list of RoutingMonitor records) -> {"dead_experts":
    [int], "load_entropy": [float], "dropped_fraction": [float]}, one entry per MoE layer."""
    run_check("12.3", learner_routing_summary, _summary, records_inputs, atol=1e-9, rtol=1e-7)


# ---- 12.4 serving: int8 experts, one of them failed -----------------------------------------------

def _serving(layer: MoELayer, failed_expert: int) -> MoELayer:
    """The reference of task 12.4."""
    served = quantize_experts(layer)
    available = torch.ones(layer.num_experts, dtype=torch.bool)
    available[failed_expert] = False
    served.available_experts = available
    served.capacity_factor = None
    return served


def serving_inputs(rng: np.random.Generator) -> tuple:
    """Task 12.4's arguments: a trained-looking MoELayer (sigmoid router with a non-zero expert
    bias, capacity factor 1, so a layer that keeps it drops tokens), the failed expert (the one
    its router likes best, so that ignoring the failure shows) and tokens x [T, d]."""
    d, h, num_experts = int(rng.integers(8, 25)), int(rng.integers(8, 25)), int(rng.integers(4, 9))
    torch.manual_seed(int(rng.integers(2**31)))
    router = make_router("sigmoid_bias", d, num_experts, 2, bias_update_rate=1e-3)
    layer = MoELayer(d, h, num_experts, 2, router=router, capacity_factor=1.0)
    with torch.no_grad():
        router.expert_bias.copy_(random_floats(rng, num_experts, scale=0.05))
        for name in ("w_gate", "w_up", "w_down"):
            getattr(layer.experts, name).mul_(3.0)
    layer.eval()
    x = random_floats(rng, int(rng.integers(20, 61)), d)
    with torch.no_grad():
        favourite = int(layer.router(x).expert_idx[:, 0].bincount(minlength=num_experts).argmax())
    return layer, favourite, x


def check_serving_layer(learner_serving_layer):
    """Task 12.4: serving_layer(layer: MoELayer, failed_expert: int) -> a new MoELayer. Compared
    on the tokens x: its output, its load per expert, its dropped fraction, whether its experts
    hold int8 weights, and whether `layer` still computes what it did."""
    require_function("12.4", learner_serving_layer)

    def run(serve, layer, failed_expert, x):
        with torch.no_grad():
            before = layer(x)
            served = serve(layer, failed_expert)
            if not isinstance(served, MoELayer):
                raise CheckFailure(f"task 12.4: expected an MoELayer, got {type(served).__name__}")
            dtype = next(served.parameters()).dtype
            y = served(x.to(dtype)).float()
            int8 = [b.dtype == torch.int8 for name, b in served.experts.named_buffers() if name.endswith("_q")]
            return {"output": y, "load": served.stats.load, "dropped_fraction": served.stats.dropped_fraction,
                    "experts_int8": int(bool(int8) and all(int8)),
                    "layer_unchanged": int(torch.equal(layer(x), before))}

    run_check("12.4", lambda *args: run(learner_serving_layer, *args), lambda *args: run(_serving, *args),
              serving_inputs, atol=1e-5, rtol=1e-4)
