"""Expert parallelism x data parallelism (chapter 10, section 5): W = EP * DP ranks in a grid.

Rank r = d * EP + e. The ranks d * EP .. d * EP + EP - 1 form an **EP group**: together they hold
all experts, E / EP each, and exchange tokens by all-to-all. The ranks e, EP + e, 2 EP + e, ...
form a **DP group**: they hold the same expert shard (and, like every rank, the replicated
router), so their gradients are averaged with an all-reduce, the expert-data-parallel
all-reduce of DeepSpeed-MoE. Under torchrun:

    torchrun --nproc-per-node=4 -m minimoe.parallel.ep_dp --ep 2 --json report.json

checks that one training step's outputs and gradients equal one process holding the whole layer
and every rank's tokens (the loss: the mean of the W ranks' losses).
"""

import argparse
import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from minimoe import _checks
from minimoe.layer import MoELayer
from minimoe.parallel.comm import all_reduce, rank_and_world
from minimoe.parallel.experts import parallelize
from minimoe.parallel.training import average_gradients


class Groups(NamedTuple):
    """This rank's two process groups and their ranks (global numbering)."""
    ep: dist.ProcessGroup
    dp: dist.ProcessGroup
    ep_ranks: list[int]
    dp_ranks: list[int]


def ep_dp_groups(ep_size: int) -> Groups:
    """Cut the default group (W ranks) into W / EP groups of EP consecutive ranks and EP groups of
    W / EP ranks spaced EP apart. Collective: every rank creates every group, in the same order."""
    rank, world = rank_and_world()
    ep_size = _checks.positive_int("ep_size", ep_size)
    if world % ep_size:
        raise ValueError(f"ep_size must divide the world size {world}, got {ep_size}")
    ep_lists = [list(range(d * ep_size, (d + 1) * ep_size)) for d in range(world // ep_size)]
    dp_lists = [list(range(e, world, ep_size)) for e in range(ep_size)]
    ep_groups, dp_groups = [dist.new_group(r) for r in ep_lists], [dist.new_group(r) for r in dp_lists]
    d, e = divmod(rank, ep_size)
    return Groups(ep_groups[d], dp_groups[e], ep_lists[d], dp_lists[e])


@torch.no_grad()
def average_gradients_ep_dp(model: nn.Module, groups: Groups) -> None:
    """After backward on every rank: every gradient becomes that of the mean of all W ranks'
    losses. Inside the EP group `average_gradients` (replicated: all-reduce / EP; experts hold the
    group's sum already: / EP); then every gradient is all-reduced over the DP group / DP."""
    average_gradients(model, groups.ep)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), groups.dp, "expert-data-parallel gradients")
    for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(summed.view_as(g) / len(groups.dp_ranks))


def check_against_one_process(ep_size: int, *, dp_all_reduce: bool = True, seed: int = 0) -> dict:
    """One forward + backward of an MoELayer (8 experts, k=2, d=16) on EP x DP ranks against one
    process; -> this rank's report: groups, experts held, max differences. Collective.
    dp_all_reduce=False skips the DP all-reduce (what goes wrong without it)."""
    groups = ep_dp_groups(ep_size)
    rank, world = rank_and_world()
    torch.manual_seed(seed)
    layer = MoELayer(16, 32, num_experts=8, k=2)
    ep = parallelize(copy.deepcopy(layer), groups.ep)
    xs = [torch.randn(12 + 4 * s, 16, generator=torch.Generator().manual_seed(seed + s)) for s in range(world)]

    y = ep(xs[rank])
    y.square().mean().backward()  # this rank's own loss
    if dp_all_reduce:
        average_gradients_ep_dp(ep, groups)
    else:
        average_gradients(ep, groups.ep)
    outputs = [layer(x) for x in xs]  # one process: every rank's tokens, the mean of the losses
    (sum(out.square().mean() for out in outputs) / world).backward()

    local = ep.experts.num_local_experts
    first = groups.ep_ranks.index(rank) * local
    diffs = {
        "output": (y - outputs[rank]).abs().max().item(),
        "router grad": (ep.router.proj.weight.grad - layer.router.proj.weight.grad).abs().max().item(),
        "expert grads": max((p.grad - getattr(layer.experts, n).grad[first:first + local]).abs().max().item()
                            for n, p in ep.experts.named_parameters()),
    }
    return dict(rank=rank, ep_ranks=groups.ep_ranks, dp_ranks=groups.dp_ranks, experts=[first, first + local - 1],
                tokens=xs[rank].shape[0], diffs=diffs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, default=2, help="ranks per expert-parallel group")
    parser.add_argument("--json", type=Path, help="rank 0 writes every rank's report here")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    report = check_against_one_process(args.ep)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        for rep in reports:
            print(rep)
        if args.json:
            args.json.write_text(json.dumps(reports))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
