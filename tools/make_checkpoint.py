"""Train chapter 09's two models once and ship them in course/checkpoints/.

A model trained on the reader's machine differs from one trained on ours in more than the last
digit: float sums depend on the CPU's vector width and thread count, and 300 steps of training
amplify those differences until another expert turns out to be the most important one. Chapter 09
studies one trained model, so it loads this file instead of training: the same weights on every
machine, and only the evaluation's float32 round-off (about 1e-6) left to differ.

    python tools/make_checkpoint.py     # writes ch09_moe.pt and ch09_moe_no_arithmetic.pt

ch09_moe.pt is trained on all four domains of the corpus; ch09_moe_no_arithmetic.pt on prose,
code and records only, so that arithmetic is a domain it has never seen (section 3). Each file
holds the model's config, its state dict, the validation loss measured right after
training (`minimoe.train.evaluate`: 8 fixed batches of 32 x 64 validation characters), the
command and the versions and CPU it was made with. tests/test_checkpoint.py loads it into
today's code and checks that validation loss again, so a model change that breaks it is caught.
"""

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import TrainConfig, Trainer, evaluate

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "course" / "checkpoints"
DOMAINS = {"ch09_moe.pt": ("prose", "code", "arithmetic", "records"),
           "ch09_moe_no_arithmetic.pt": ("prose", "code", "records")}

# chapter 07's small MoE GPT: 2 MoE blocks, 8 SwiGLU experts of width 64 each, top-2, combine
# weights summing to 1 (the shipped files predate the default routed_scaling_factor = k and the
# GPT-2 init of the FFNs, so a rerun trains a model of the same config from another init)
MODEL = MoETransformerConfig(d_model=64, n_layers=2, n_heads=4, seq_len=64, d_hidden=64, num_experts=8, k=2,
                             routed_scaling_factor=1.0)
TRAINING = TrainConfig(steps=300, batch_size=16, eval_every=100)


def make(domains: tuple[str, ...], seed: int = 0) -> dict:
    """Train MODEL with TRAINING on `domains` from torch.manual_seed(seed); the checkpoint dict."""
    torch.manual_seed(seed)
    model, corpus = MoETransformer(MODEL), load_corpus(domains=domains)
    started = time.perf_counter()
    Trainer(model, corpus, TRAINING).run(progress=False)
    seconds = time.perf_counter() - started
    return {
        "config": dataclasses.asdict(MODEL),
        "train_config": dataclasses.asdict(TRAINING),
        "domains": list(domains),
        "seed": seed,
        "state_dict": {name: value.detach().clone() for name, value in model.state_dict().items()},
        "val_loss": evaluate(model.eval(), corpus),
        "made_with": {
            "command": "python tools/make_checkpoint.py" + (f" --seed {seed}" if seed else ""),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "train_seconds": round(seconds, 1),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, domains in DOMAINS.items():
        checkpoint, path = make(domains, args.seed), args.out_dir / name
        torch.save(checkpoint, path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): validation loss {checkpoint['val_loss']:.4f} "
              f"nats/char, {checkpoint['made_with']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
