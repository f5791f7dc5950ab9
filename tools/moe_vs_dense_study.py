"""Chapter 07's study: does an MoE beat its dense twin at equal active compute, and which choices
decide it? Every variant is trained from several seeds; the results go to one JSON file that the
chapter draws (mean, spread, validation curves, step times).

    python tools/moe_vs_dense_study.py                      # chapter 07's default shape, 3 seeds
    python tools/moe_vs_dense_study.py --full --steps 3000  # its FULL shape
    python tools/moe_vs_dense_study.py --only dense E16k4   # some variants
    python tools/moe_vs_dense_study.py --steps 4000 --only dense E16k4 --out course/results/ch07_gap_default_4000.json

Each run is one process with one thread (two run at a time by default, --jobs), so its losses do
not depend on how busy the machine is; its step times do, and are recorded with the machine's
name. `legacy` variants rebuild the recipe chapter 07 used before this study (experts and dense
FFNs initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in)), combine weights summing to 1, routers
weight-decayed) to measure what each change bought.
"""

import argparse
import json
import math
import multiprocessing
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import TrainConfig, Trainer, evaluate

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"default": dict(d_model=64, n_layers=2, n_heads=4, seq_len=64),
          "full": dict(d_model=96, n_layers=3, n_heads=4, seq_len=96)}
BATCH = {"default": 16, "full": 24}
ACTIVE = {"default": 128, "full": 192}  # the dense twin's FFN width = k * d_hidden of every MoE variant

FIXED_EVAL = dict(num_batches=32, batch_size=32, seed=1000)  # 1024 windows, the same for every run

# name -> (config fields, recipe changes); h is derived from k so that k * h = ACTIVE
VARIANTS = {
    "dense": (dict(num_experts=1, k=1), {}),
    "dense_legacy": (dict(num_experts=1, k=1), dict(legacy_init=True)),
    "E16k4_legacy_init": (dict(num_experts=16, k=4), dict(legacy_init=True)),
    "dense_total": (dict(num_experts=1, k=1, total=8), {}),  # a dense FFN as wide as all 8 of E8k2's experts
    "E8k2_legacy": (dict(num_experts=8, k=2, routed_scaling_factor=1.0), dict(legacy_init=True, router_decay=True)),
    "E8k2_init": (dict(num_experts=8, k=2, routed_scaling_factor=1.0), dict(router_decay=True)),
    "E8k2_init_scale": (dict(num_experts=8, k=2), dict(router_decay=True)),
    "E8k2": (dict(num_experts=8, k=2), {}),
    "E8k1": (dict(num_experts=8, k=1), {}),
    "E16k2": (dict(num_experts=16, k=2), {}),
    "E16k4": (dict(num_experts=16, k=4), {}),
    "E32k4": (dict(num_experts=32, k=4), {}),
    "E32k8": (dict(num_experts=32, k=8), {}),
    "E16k3_shared": (dict(num_experts=16, k=3, num_shared_experts=1), {}),
    "E16k4_router_lr0.3": (dict(num_experts=16, k=4), dict(router_lr_scale=0.3)),
    "E16k4_scale1": (dict(num_experts=16, k=4, routed_scaling_factor=1.0), {}),
    "dense_lr2x": (dict(num_experts=1, k=1), dict(lr_scale=2.0)),  # lr and min_lr twice the default
    "E16k4_lr2x": (dict(num_experts=16, k=4), dict(lr_scale=2.0)),
    "dense_lr4x": (dict(num_experts=1, k=1), dict(lr_scale=4.0)),
    "E16k4_lr0.5x": (dict(num_experts=16, k=4), dict(lr_scale=0.5)),
    "dense_lr0.5x": (dict(num_experts=1, k=1), dict(lr_scale=0.5)),
    "dense_lr0.25x": (dict(num_experts=1, k=1), dict(lr_scale=0.25)),
    "E16k4_lr0.25x": (dict(num_experts=16, k=4), dict(lr_scale=0.25)),
}


def model_config(shape: str, fields: dict) -> MoETransformerConfig:
    fields = dict(fields)
    total = fields.pop("total", None)
    k, shared = fields["k"], fields.get("num_shared_experts", 0)
    if fields["num_experts"] == 1:
        d_hidden = ACTIVE[shape] * (total // 2 if total else 1)
    else:
        d_hidden = ACTIVE[shape] // (k + shared)
    return MoETransformerConfig(**SHAPES[shape], d_hidden=d_hidden, **fields)


def legacy_init(model: MoETransformer) -> None:
    """The FFN initialisation before this study: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (nn.Linear's)."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("w_gate", "w_up", "w_down")):
                bound = 1 / math.sqrt(weight.shape[-2])
                weight.uniform_(-bound, bound)


def train_one(job: tuple) -> dict:
    shape, name, seed, steps = job
    torch.set_num_threads(1)
    fields, recipe = VARIANTS[name]
    config = model_config(shape, fields)
    torch.manual_seed(seed)
    model = MoETransformer(config)
    if recipe.get("legacy_init"):
        legacy_init(model)
    lr_scale = recipe.get("lr_scale", 1.0)
    train = TrainConfig(steps=steps, batch_size=BATCH[shape], eval_every=max(steps // 10, 1), seed=seed,
                        lr=TrainConfig.lr * lr_scale, min_lr=TrainConfig.min_lr * lr_scale,
                        router_lr_scale=recipe.get("router_lr_scale", 1.0))
    trainer = Trainer(model, load_corpus(), train)
    if recipe.get("router_decay"):  # the routers back in the decayed group
        decay, _, router = trainer.optimizer.param_groups
        decay["params"] += router["params"]
        router["params"] = []
    started = time.perf_counter()
    history = trainer.run(progress=False)
    seconds = time.perf_counter() - started
    # the training loop validates on 8 batches of windows drawn with the run's own seed: seeds
    # then differ in the text they are measured on, not only in training. The fixed windows below
    # are the same for every run and cover about the whole validation split; the training split's
    # loss on as many windows says how much of the validation loss is the train / validation gap
    fixed = {split: evaluate(model, trainer.corpus, **FIXED_EVAL, split=split) for split in ("val", "train")}
    tokens = BATCH[shape] * config.seq_len
    return {"shape": shape, "variant": name, "seed": seed, "steps": steps,
            "config": asdict(config), "recipe": recipe,
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "val_step": history.val_step, "val_loss": history.val_loss, "fixed_val_loss": fixed["val"],
            "fixed_train_loss": fixed["train"],
            "median_step_s": float(np.median([tokens / r for r in history.tokens_per_s])),
            "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="chapter 07's FULL shape")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = "full" if args.full else "default"
    out = args.out or ROOT / "course" / "results" / f"ch07_study_{shape}_{args.steps}.json"
    names = args.only or list(VARIANTS)
    jobs = [(shape, name, seed, args.steps) for name in names for seed in range(args.seeds)]
    results = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["variant"], r["seed"]) for r in results}
    jobs = [j for j in jobs if (j[1], j[2]) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for result in pool.imap_unordered(train_one, jobs):
            results.append(result)
            print(f"{result['variant']:>20} seed {result['seed']}: val {result['val_loss'][-1]:.4f} "
                  f"({result['median_step_s'] * 1e3:.1f} ms/step)", flush=True)
            out.write_text(json.dumps({
                "command": "python tools/moe_vs_dense_study.py" + (" --full" if args.full else "")
                           + f" --steps {args.steps} --seeds {args.seeds}"
                           + (" --only " + " ".join(args.only) if args.only else "")
                           + (f" --out {args.out}" if args.out else ""),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "torch": str(torch.__version__), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
