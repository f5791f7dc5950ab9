"""What each rank runs in tests/test_ep_training.py (spawned processes import this module, not
the test module): a tiny MoETransformer trained by a Trainer with parallel=Parallel() (which
makes it expert-parallel) on a gloo group, checkpointed halfway; results written as JSON, one
file per rank."""

import functools
from dataclasses import asdict
from pathlib import Path

import torch
from gloo_ranks import run_jobs

from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.monitor import RoutingMonitor
from minimoe.parallel import ExpertParallelExperts, Parallel
from minimoe.train import TrainConfig, Trainer

TINY = dict(seq_len=32, d_model=32, n_layers=2, n_heads=4, d_hidden=32, num_experts=4, k=2)
# grad_clip 0.05 clips every step, so the clipping norm over the sharded experts is exercised
TRAIN = TrainConfig(steps=6, batch_size=8, micro_batches=2, warmup_steps=2, eval_every=3, eval_batches=2,
                    grad_clip=0.05)
HALF = 3  # the checkpoint is taken after this many steps
RUNS = {"topk": dict(TINY), "sigmoid_bias": dict(TINY, router="sigmoid_bias", bias_update_rate=0.01),
        "noisy_topk": dict(TINY, router="noisy_topk")}  # its noise must not depend on the rank


def train(name: str, out_dir: str) -> dict:
    torch.manual_seed(0)
    single = MoETransformer(MoETransformerConfig(**RUNS[name]))
    monitor = RoutingMonitor(single)  # built before the Trainer makes the model expert-parallel (chapter 12)
    trainer = Trainer(single, load_corpus(), TRAIN, parallel=Parallel())
    model = trainer.model
    trainer.run(steps=HALF, progress=False)
    trainer.save(Path(out_dir, f"{name}.pt"))
    trainer.run(progress=False)
    resumed = Trainer.load(Path(out_dir, f"{name}.pt"), load_corpus(), parallel=Parallel())  # re-sharded
    resumed.run(progress=False)
    return dict(history=asdict(trainer.history), resumed_loss=resumed.history.loss, params=model.num_params(),
                active_params=model.num_params(active=True), held_params=sum(p.numel() for p in model.parameters()),
                expert_types=[type(layer.experts).__name__ for layer in model.moe_layers],
                all_expert_parallel=all(isinstance(layer.experts, ExpertParallelExperts) for layer in model.moe_layers),
                biases=[layer.router.expert_bias.tolist() for layer in model.moe_layers
                        if getattr(layer.router, "expert_bias", None) is not None],
                stats_tokens=[int(s.load.sum()) for s in model.routing_stats()],
                expert_grad_norms=[r["expert_grad_norm"] for r in monitor.grad_records][:2 * HALF])


def run(rank: int, world: int, store: str, out_dir: str) -> None:
    run_jobs(rank, world, store, out_dir, {name: functools.partial(train, name, out_dir) for name in RUNS},
             stop_on_error=True)
