"""Expert parallelism with torch.distributed: each rank owns E / W experts, tokens travel to
their experts and back by all-to-all (chapter 10).

    dist.init_process_group("gloo")                    # torchrun sets up the environment
    torch.manual_seed(0)                               # the same seed on every rank
    layer = ExpertParallelMoE.from_layer(MoELayer(64, 128, num_experts=8, k=2))
    y = layer(x_local)                                 # each rank its own tokens; collective
    y.square().mean().backward(); average_gradients(layer)

`all_to_all_cost` models dispatch + combine at scales a laptop cannot run;
`python -m minimoe.parallel` (under torchrun) trains an MoE block with expert parallelism.
"""

from minimoe.parallel.comm import ExpertParallelError
from minimoe.parallel.cost import AllToAllCost, all_to_all_cost, expected_nodes_per_token, traffic_bytes
from minimoe.parallel.layer import (
    ExchangeStats,
    ExpertParallelMoE,
    average_gradients,
    expert_major_order,
    split_by_rank,
)

__all__ = [
    "AllToAllCost", "ExchangeStats", "ExpertParallelError", "ExpertParallelMoE", "all_to_all_cost",
    "all_to_all_diagram", "average_gradients", "expected_nodes_per_token", "expert_major_order", "split_by_rank",
    "traffic_bytes",
]


def __getattr__(name: str):
    """all_to_all_diagram on first use: its plotting imports cost a second that training
    processes (which import this package through minimoe.model) should not pay."""
    if name == "all_to_all_diagram":
        from minimoe.parallel.viz import all_to_all_diagram
        return all_to_all_diagram
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
