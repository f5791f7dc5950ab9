"""minimoe.checks.ch12: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import copy
import math
from dataclasses import replace

import numpy as np
import torch
from check_contract import contract_tests

from minimoe.checks import ch12
from minimoe.inference import Int8Experts, LostExpertsRouter, quantize_experts
from minimoe.model import MoETransformerConfig

# ---- correct answers, written as a learner would ----

def capstone_config(world_size, capacity_factor, bias_update_rate):
    return MoETransformerConfig(seq_len=64, d_model=64, n_layers=2, n_heads=4, d_hidden=64,
                                num_experts=4 * world_size, k=2, router="sigmoid_bias",
                                bias_update_rate=bias_update_rate, capacity_factor=capacity_factor,
                                aux_loss_coef=0.0)


def capstone_config_by_replace(world_size, capacity_factor, bias_update_rate):
    base = MoETransformerConfig(seq_len=64, d_model=64, n_layers=2, d_hidden=64)
    return replace(base, num_experts=4 * world_size, router="sigmoid_bias", bias_update_rate=bias_update_rate,
                   capacity_factor=capacity_factor, aux_loss_coef=0.0)


def merge_shards(rank_states):
    merged = {}
    for name, tensor in rank_states[0].items():
        if ".experts." in name:
            merged[name] = torch.cat([state[name] for state in rank_states], dim=0)
        else:
            merged[name] = tensor
    return merged


def merge_shards_by_stacking(rank_states):
    """Also correct: stack the shards [W, E / W, ...] and flatten the first two dims."""
    merged = dict(rank_states[0])
    for name in merged:
        if "experts" in name.split("."):
            stacked = torch.stack([state[name] for state in rank_states])
            merged[name] = stacked.reshape(-1, *stacked.shape[2:])
    return merged


def routing_summary(records):
    summary = {"dead_experts": [], "load_entropy": [], "dropped_fraction": []}
    for layer in sorted({r["layer"] for r in records}):
        rows = [r for r in records if r["layer"] == layer]
        load = np.sum([r["load"] for r in rows], axis=0)
        p = load[load > 0] / load.sum()
        summary["dead_experts"].append(int((load == 0).sum()))
        summary["load_entropy"].append(float(-(p * np.log(p)).sum() / math.log(len(load))))
        dropped = sum(r["dropped_fraction"] * sum(r["load"]) for r in rows)
        summary["dropped_fraction"].append(dropped / load.sum())
    return summary


def routing_summary_with_metrics(records):
    from minimoe.metrics import dead_experts, load_entropy
    layers = max(r["layer"] for r in records) + 1
    loads = [torch.zeros(len(records[0]["load"]), dtype=torch.int64) for _ in range(layers)]
    dropped = [0.0] * layers
    for r in records:
        loads[r["layer"]] += torch.tensor(r["load"])
        dropped[r["layer"]] += r["dropped_fraction"] * sum(r["load"])
    return {"dead_experts": [dead_experts(load) for load in loads],
            "load_entropy": [load_entropy(load) for load in loads],
            "dropped_fraction": [d / float(load.sum()) for d, load in zip(dropped, loads, strict=True)]}


def serving_layer(layer, failed_expert):
    served = quantize_experts(layer)
    mask = torch.ones(layer.num_experts, dtype=torch.bool)
    mask[failed_expert] = False
    served.available_experts = mask
    served.capacity_factor = None
    return served


def serving_layer_by_deepcopy(layer, failed_expert):
    served = copy.deepcopy(layer)
    served.experts = Int8Experts(layer.experts)
    served.available_experts = torch.arange(layer.num_experts) != failed_expert
    served.capacity_factor = None
    return served


# ---- wrong answers ----

def config_softmax_router(world_size, capacity_factor, bias_update_rate):
    return replace(capstone_config(world_size, capacity_factor, bias_update_rate), router="topk")


def config_keeps_aux_loss(world_size, capacity_factor, bias_update_rate):
    return replace(capstone_config(world_size, capacity_factor, bias_update_rate), aux_loss_coef=0.01)


def config_eight_experts(world_size, capacity_factor, bias_update_rate):
    return replace(capstone_config(world_size, capacity_factor, bias_update_rate), num_experts=8)


def config_dropless(world_size, capacity_factor, bias_update_rate):
    return replace(capstone_config(world_size, capacity_factor, bias_update_rate), capacity_factor=None)


def config_default_bias_rate(world_size, capacity_factor, bias_update_rate):
    return replace(capstone_config(world_size, capacity_factor, bias_update_rate), bias_update_rate=1e-3)


def config_as_dict(world_size, capacity_factor, bias_update_rate):
    from dataclasses import asdict
    return asdict(capstone_config(world_size, capacity_factor, bias_update_rate))


def merge_concatenating_everything(rank_states):
    return {name: torch.cat([state[name] for state in rank_states]) for name in rank_states[0]}


def merge_ranks_reversed(rank_states):
    return merge_shards(rank_states[::-1])


def merge_summing_replicated(rank_states):
    merged = merge_shards(rank_states)
    return {name: t if ".experts." in name else sum(s[name] for s in rank_states) for name, t in merged.items()}


def merge_rank_zero_only(rank_states):
    return dict(rank_states[0])


def merge_along_the_wrong_dim(rank_states):
    merged = merge_shards(rank_states)
    return {name: torch.cat([s[name] for s in rank_states], dim=-1) if ".experts." in name else t
            for name, t in merged.items()}


def summary_mean_of_record_entropies(records):
    summary = routing_summary(records)
    summary["load_entropy"] = [float(np.mean([r["load_entropy"] for r in records if r["layer"] == layer]))
                               for layer in sorted({r["layer"] for r in records})]
    return summary


def summary_unweighted_drops(records):
    summary = routing_summary(records)
    summary["dropped_fraction"] = [float(np.mean([r["dropped_fraction"] for r in records if r["layer"] == layer]))
                                   for layer in sorted({r["layer"] for r in records})]
    return summary


def summary_dead_per_record(records):
    """Counts an expert dead when any record gave it nothing."""
    summary = routing_summary(records)
    summary["dead_experts"] = [int((np.min([r["load"] for r in records if r["layer"] == layer], axis=0) == 0).sum())
                               for layer in sorted({r["layer"] for r in records})]
    return summary


def summary_natural_log_entropy(records):
    summary = routing_summary(records)
    num_experts = len(records[0]["load"])
    summary["load_entropy"] = [h * math.log(num_experts) for h in summary["load_entropy"]]
    return summary


def summary_all_layers_pooled(records):
    pooled = [dict(r, layer=0) for r in records]
    summary = routing_summary(pooled)
    layers = len({r["layer"] for r in records})
    return {key: values * layers for key, values in summary.items()}


def serving_float_experts(layer, failed_expert):
    served = copy.deepcopy(layer)
    served.available_experts = torch.arange(layer.num_experts) != failed_expert
    served.capacity_factor = None
    return served


def serving_without_renormalising(layer, failed_expert):
    """The failed expert's slot is emptied, the other weight kept (restrict_experts(..., renormalize=False))."""
    served = quantize_experts(layer)
    served.router = LostExpertsRouter(served.router, torch.arange(layer.num_experts) != failed_expert)
    served.capacity_factor = None
    return served


def serving_keeps_capacity(layer, failed_expert):
    served = quantize_experts(layer)
    served.available_experts = torch.arange(layer.num_experts) != failed_expert
    return served


def serving_zeroes_the_failed_expert(layer, failed_expert):
    """The router still sends tokens to the failed expert, which now outputs zeros."""
    served = copy.deepcopy(layer)
    with torch.no_grad():
        served.experts.w_down[failed_expert] = 0.0
    served = quantize_experts(served)
    served.capacity_factor = None
    return served


def serving_in_place(layer, failed_expert):
    layer.experts = Int8Experts(layer.experts)
    layer.available_experts = torch.arange(layer.num_experts) != failed_expert
    layer.capacity_factor = None
    return layer


def serving_fails_the_wrong_expert(layer, failed_expert):
    return serving_layer(layer, (failed_expert + 1) % layer.num_experts)


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch12.check_capstone_config, "12.1", [capstone_config, capstone_config_by_replace], [
        config_softmax_router, config_keeps_aux_loss, config_eight_experts, config_dropless,
        config_default_bias_rate, config_as_dict,
    ]),
    (ch12.check_merge_shards, "12.2", [merge_shards, merge_shards_by_stacking], [
        merge_concatenating_everything, merge_ranks_reversed, merge_summing_replicated, merge_rank_zero_only,
        merge_along_the_wrong_dim,
    ]),
    (ch12.check_routing_summary, "12.3", [routing_summary, routing_summary_with_metrics], [
        summary_mean_of_record_entropies, summary_unweighted_drops, summary_dead_per_record,
        summary_natural_log_entropy, summary_all_layers_pooled,
    ]),
    (ch12.check_serving_layer, "12.4", [serving_layer, serving_layer_by_deepcopy], [
        serving_float_experts, serving_without_renormalising, serving_keeps_capacity,
        serving_zeroes_the_failed_expert, serving_in_place, serving_fails_the_wrong_expert,
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_summary_inputs_have_an_expert_no_record_routes_to_and_one_some_records_miss():
    """Task 12.3's cases include a dead expert in layer 0 and, in some case, an expert that some
    records miss but others do not (so "dead in any record" differs from "dead over all")."""
    partly = False
    for case in range(3):
        (records,) = ch12.records_inputs(np.random.default_rng(1000 * case + 7))
        loads = np.array([r["load"] for r in records if r["layer"] == 0])
        assert (loads.sum(0) == 0).sum() >= 1
        partly |= bool(((loads.min(0) == 0) & (loads.sum(0) > 0)).any())
    assert partly


def test_serving_inputs_would_drop_tokens_with_their_capacity():
    """A layer that keeps the training capacity drops assignments on the check's tokens (after
    the failure moves them), which is what makes `serving_keeps_capacity` fail."""
    for case in range(3):
        layer, failed, x = ch12.serving_inputs(np.random.default_rng(1000 * case + 7))
        served = serving_keeps_capacity(layer, failed)
        served(x)
        assert served.stats.dropped_fraction > 0
