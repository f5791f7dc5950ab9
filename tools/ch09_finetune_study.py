"""Chapter 09's fine-tuning study: the shipped MoE and its dense twin, both trained without
arithmetic (tools/make_checkpoint.py), fine-tuned on a small arithmetic set with all parameters,
the router frozen or the FFN weights frozen, from several seeds; train and validation loss
every few steps go to one JSON file that the chapter reads.

    python tools/ch09_finetune_study.py      # 5 variants x 3 seeds, about 4 CPU-minutes

The chapter reruns seed 0 of two variants itself (`run` and `VARIANTS` are imported from here)
and checks them against this file.
"""

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from minimoe import inference as inf
from minimoe.data import Corpus, load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import TrainConfig, evaluate

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "course" / "checkpoints"
OUT = ROOT / "course" / "results" / "ch09_finetune.json"
TRAIN_CHARS = 2048  # the fine-tuning set: the first 2,048 characters of arithmetic's train split
FINE_TUNE = TrainConfig(steps=150, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=10, eval_every=150,
                        eval_batches=1)
EVAL_EVERY = 25
VARIANTS = {"MoE, all parameters": ("ch09_moe_no_arithmetic.pt", None),
            "MoE, router frozen": ("ch09_moe_no_arithmetic.pt", "router"),
            "MoE, experts frozen": ("ch09_moe_no_arithmetic.pt", "ffn"),
            "dense, all parameters": ("ch09_dense_no_arithmetic.pt", None),
            "dense, FFN frozen": ("ch09_dense_no_arithmetic.pt", "ffn")}


def fine_tune_set(train_chars: int = TRAIN_CHARS) -> Corpus:
    """Arithmetic only: the first train_chars characters of its train split, all of its val split."""
    arithmetic = load_corpus(domains=("arithmetic",))
    return Corpus({"train": arithmetic.tokens["train"][:train_chars], "val": arithmetic.tokens["val"]},
                  {"train": arithmetic.domains["train"][:train_chars], "val": arithmetic.domains["val"]},
                  arithmetic.domain_names, arithmetic.tokenizer)


def load(name: str) -> tuple[MoETransformer, dict]:
    """A shipped checkpoint's model in float32 and the checkpoint dict."""
    checkpoint = torch.load(CHECKPOINTS / name, weights_only=True)
    model = MoETransformer(MoETransformerConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint


def run(variant: str, seed: int, corpus: Corpus | None = None) -> dict:
    """Fine-tune VARIANTS[variant] with FINE_TUNE and this seed (its batches); the curve of
    `inf.fine_tune` plus the final loss on the three domains the model was trained on."""
    name, part = VARIANTS[variant]
    model, checkpoint = load(name)
    curve = inf.fine_tune(model, corpus or fine_tune_set(), dataclasses.replace(FINE_TUNE, seed=seed), part,
                          eval_every=EVAL_EVERY)
    seen = load_corpus(domains=checkpoint["domains"])
    return {"variant": variant, "seed": seed, **curve, "seen_domains_val": evaluate(model, seen, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus, runs, started = fine_tune_set(), [], time.perf_counter()
    for variant in VARIANTS:
        for seed in range(args.seeds):
            runs.append(run(variant, seed, corpus=corpus))
            print(f"{variant:>22} seed {seed}: train {runs[-1]['train'][-1]:.3f} val {runs[-1]['val'][-1]:.3f}",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python tools/ch09_finetune_study.py --seeds {args.seeds}",
        "train_chars": TRAIN_CHARS, "fine_tune": dataclasses.asdict(FINE_TUNE), "eval_every": EVAL_EVERY,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1), "runs": runs},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
