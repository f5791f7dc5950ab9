"""Expert parallelism with torch.distributed, applied from outside the model: each rank owns
E / W experts of every MoE layer, tokens travel to their experts and back by all-to-all
(chapters 10 and 12).

    dist.init_process_group("gloo")                    # torchrun sets up the environment
    torch.manual_seed(0)                               # the same seed on every rank
    layer = parallelize(MoELayer(64, 128, num_experts=8, k=2))   # or any model holding MoELayers
    y = layer(x_local)                                 # each rank its own tokens; collective
    y.square().mean().backward(); average_gradients(layer)

    trainer = Trainer(MoETransformer(config), corpus, train_config, parallel=Parallel())

Modules: `comm` (process group setup and every collective), `experts` (`parallelize`,
`ExpertParallelExperts`), `training` (gradients, clipping, checkpoints, `Parallel`), `cost`
(`all_to_all_cost`, an alpha-beta model of dispatch + combine at scales a laptop cannot run),
`deepep` (DeepEP's published measurements to hold it against), `ep_dp` (expert x data parallel
process groups; not imported here: run it as `python -m minimoe.parallel.ep_dp` under torchrun),
`viz`; `python -m minimoe.parallel` (under torchrun) trains an MoE block with expert parallelism.
"""

from minimoe.parallel.comm import ExpertParallelError
from minimoe.parallel.cost import AllToAllCost, all_to_all_cost, expected_nodes_per_token, traffic_bytes
from minimoe.parallel.experts import (
    ExchangeStats,
    ExpertParallelExperts,
    expert_major_order,
    parallelize,
    sharded_parameters,
    split_by_rank,
)
from minimoe.parallel.training import (
    Parallel,
    average_gradients,
    clip_grad_norm,
    full_state_dict,
    gather_optimizer_state,
    shard_optimizer_state,
)

__all__ = [
    "AllToAllCost", "ExchangeStats", "ExpertParallelError", "ExpertParallelExperts", "Parallel", "all_to_all_cost",
    "all_to_all_diagram", "average_gradients", "clip_grad_norm", "expected_nodes_per_token", "expert_major_order",
    "full_state_dict", "gather_optimizer_state", "parallelize", "shard_optimizer_state", "sharded_parameters",
    "split_by_rank", "traffic_bytes",
]


def __getattr__(name: str):
    """all_to_all_diagram on first use: its plotting imports cost a second that training
    processes (which import this package through the command lines) should not pay."""
    if name == "all_to_all_diagram":
        from minimoe.parallel.viz import all_to_all_diagram
        return all_to_all_diagram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
