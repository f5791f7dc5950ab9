"""Train an MoE block with expert parallelism for a few steps (chapter 10's demo).

    torchrun --nproc-per-node=2 -m minimoe.parallel --steps 5            # CPU processes, gloo
    torchrun --nproc-per-node=8 -m minimoe.parallel --backend nccl       # one GPU per rank

The model is a classifier on the clustered toy task of `minimoe.data.make_task`: logits =
head(x + moe(x)), with `moe` an MoELayer made expert-parallel by `parallelize` and `head`
replicated. Every rank draws its own batch; after backward, `average_gradients` makes all
gradients those of the mean loss. Rank 0 prints, per step and rank, the loss, the token copies
sent to and received from every rank and the bytes sent to other ranks (dispatch + combine,
forward pass). Without torchrun it runs as a single process (world size 1).
"""

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minimoe.data import make_task
from minimoe.layer import MoELayer
from minimoe.parallel.comm import all_gather, init_process_group
from minimoe.parallel.experts import parallelize
from minimoe.parallel.training import average_gradients


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m minimoe.parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="gloo: CPU; nccl: one GPU per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank and step")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=16)
    p.add_argument("--d-hidden", type=int, default=32)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a stuck collective raises")
    p.add_argument("--json", help="rank 0 writes the per-step, per-rank statistics to this file")
    args = p.parse_args(argv)
    for name in ("steps", "tokens", "experts", "k", "d_model", "d_hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_process_group(args.backend, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    task = make_task(d_model=args.d_model)
    torch.manual_seed(args.seed)  # the same on every rank: equal router and head, and MoELayer's shards
    moe = parallelize(MoELayer(args.d_model, args.d_hidden, args.experts, args.k,
                               capacity_factor=args.capacity_factor).to(device))
    head = nn.Linear(args.d_model, task.num_classes).to(device)
    model = nn.ModuleDict(dict(moe=moe, head=head))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if rank == 0:
        print(f"expert-parallel MoE block: {world} ranks ({args.backend}, {device.type}), {args.experts} experts "
              f"({moe.experts.num_local_experts} per rank), k={args.k}, d_model={args.d_model}, "
              f"{args.tokens} tokens per rank")
        print(f"{'step':>4s} {'rank':>4s} {'loss':>7s}  {'sent to ranks':<22s} {'received from ranks':<22s} "
              f"{'bytes sent':>10s}")
    log = []
    for step in range(args.steps):
        batch = task.sample(args.tokens, seed=(args.seed * 1_000_003 + step) * world + rank)
        x, labels = batch["x"].to(device), batch["labels"].to(device)
        loss = F.cross_entropy(head(x + moe(x)), labels)
        optimizer.zero_grad(set_to_none=True)
        (loss + args.aux_loss_coef * moe.aux_loss).backward()
        average_gradients(model)
        optimizer.step()

        ex = moe.experts.last_exchange
        mine = torch.tensor([loss.item(), ex.bytes_sent, *ex.sent.tolist(), *ex.received.tolist()],
                            dtype=torch.float64, device=device)
        for r, row in enumerate(t.tolist() for t in all_gather(mine, None, "gather step log")):
            entry = dict(step=step, rank=r, loss=row[0], bytes_sent=int(row[1]),
                         sent=[int(v) for v in row[2:2 + world]], received=[int(v) for v in row[2 + world:]])
            log.append(entry)
            if rank == 0:
                print(f"{step:4d} {r:4d} {entry['loss']:7.4f}  {str(entry['sent']):<22s} "
                      f"{str(entry['received']):<22s} {entry['bytes_sent']:10,d}")
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(world_size=world, backend=args.backend, tokens=args.tokens, d_model=args.d_model, k=args.k,
                           experts=args.experts, bytes_per_row=moe.experts.last_exchange.bytes_per_row, log=log), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
