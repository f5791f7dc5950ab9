"""Train the chapter-07 MoE transformer from the command line: one process, or W ranks with data
parallelism for everything replicated (embeddings, attention, norms, routers, dense FFNs) and
expert parallelism for the experts (chapter 12).

    minimoe train --steps 300 --out run                                # one process
    torchrun --nproc-per-node=2 -m minimoe train --steps 40 --out run  # 2 CPU processes, gloo
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        -m minimoe train --backend nccl --out run                      # 16 GPUs, one per rank

Each global batch of --batch-size rows is cut into --micro-batches shards (default: one per
rank); rank r runs the shards s with s % W == r. A one-process run with the same
--micro-batches takes the same steps (see minimoe.train). Rank 0 shows the progress bar and
writes OUT/history.json (the History, per-shard loads included) and OUT/checkpoint.pt, a
single-process checkpoint (expert shards gathered) that `Trainer.load` or --resume continues.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from minimoe.data import load_corpus
from minimoe.model import MODEL_ROUTERS, MoETransformer, MoETransformerConfig
from minimoe.parallel import Parallel
from minimoe.parallel.comm import init_process_group
from minimoe.train import TrainConfig, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minimoe train", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl when CUDA GPUs are present, else gloo on CPU")
    p.add_argument("--out", type=Path, default=Path("run"), help="folder for checkpoint.pt and history.json")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (on any number of ranks); the model and training "
                        "options come from the checkpoint, except --steps and --micro-batches when given")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every this many steps (0: at the end)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective raises")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = p.add_argument_group("model (MoETransformerConfig)")
    for name, default in (("seq_len", 64), ("d_model", 64), ("n_layers", 2), ("n_heads", 4), ("d_hidden", 64),
                          ("num_experts", 8), ("k", 2), ("moe_every", 1), ("num_shared_experts", 0)):
        model.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    model.add_argument("--router", choices=MODEL_ROUTERS, default="topk")
    model.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    model.add_argument("--aux-loss-coef", type=float, default=0.01)
    model.add_argument("--z-loss-coef", type=float, default=1e-3)
    train = p.add_argument_group("training (TrainConfig)")
    train.add_argument("--steps", type=int, default=None, help="total steps (default: 300, or the checkpoint's)")
    for name, default in (("batch_size", 16), ("warmup_steps", 20), ("eval_every", 50),
                          ("eval_batches", 8), ("seed", 0)):
        train.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    train.add_argument("--micro-batches", type=int, default=None, help="shards per batch (default: the ranks)")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.save_every < 0:
        p.error(f"--save-every must be >= 0, got {args.save_every}")
    return args


def configs(args: argparse.Namespace, world: int) -> tuple[MoETransformerConfig, TrainConfig]:
    """The model and training configs the arguments describe (raise ValueError on bad values)."""
    model = MoETransformerConfig(**{name: getattr(args, name) for name in (
        "seq_len", "d_model", "n_layers", "n_heads", "d_hidden", "num_experts", "k", "moe_every",
        "num_shared_experts", "router", "capacity_factor", "aux_loss_coef", "z_loss_coef")})
    train = TrainConfig(**{name: getattr(args, name) for name in (
        "batch_size", "warmup_steps", "eval_every", "eval_batches", "seed", "lr", "min_lr")},
                        steps=300 if args.steps is None else args.steps,
                        micro_batches=world if args.micro_batches is None else args.micro_batches)
    return model, train


def write_history(trainer: Trainer, args: argparse.Namespace) -> None:
    model = trainer.model
    record = dict(world_size=trainer.world, backend=args.backend, model_config=asdict(model.config),
                  train_config=asdict(trainer.config), params=model.num_params(),
                  active_params=model.num_params(active=True),
                  params_per_rank=sum(p.numel() for p in model.parameters()), history=asdict(trainer.history))
    (args.out / "history.json").write_text(json.dumps(record))


def main(argv=None) -> None:
    args = parse_args(argv)
    args.backend = ("nccl" if torch.cuda.is_available() else "gloo") if args.backend == "auto" else args.backend
    device = init_process_group(args.backend, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel = Parallel() if world > 1 else None
    corpus, checkpoint = load_corpus(), args.out / "checkpoint.pt"
    if args.resume:
        changes = {name: getattr(args, name) for name in ("steps", "micro_batches") if getattr(args, name) is not None}
        trainer = Trainer.load(checkpoint, corpus, parallel=parallel, device=device, **changes)
    else:
        model_config, train_config = configs(args, world)
        torch.manual_seed(args.seed)  # the same on every rank: equal replicated weights, and the shards of one model
        trainer = Trainer(MoETransformer(model_config).to(device), corpus, train_config, parallel=parallel)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        model = trainer.model
        print(f"{world} rank(s), {args.backend} on {device.type}: {model.num_params():,} parameters "
              f"({model.num_params(active=True):,} active per token, {sum(p.numel() for p in model.parameters()):,} "
              f"held per rank), {trainer.config.micro_batches} shard(s) of "
              f"{trainer.config.batch_size // trainer.config.micro_batches} rows per step", flush=True)
    chunk = args.save_every or trainer.config.steps
    while trainer.step < trainer.config.steps:
        trainer.run(steps=min(chunk, trainer.config.steps - trainer.step), progress=not args.no_progress)
        trainer.save(checkpoint)
        if rank == 0:
            write_history(trainer, args)
    if rank == 0:
        h = trainer.history
        print(f"step {trainer.step}: train loss {h.loss[-1]:.4f}, val loss {h.val_loss[-1]:.4f} nats/char; "
              f"wrote {checkpoint} and {args.out / 'history.json'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
