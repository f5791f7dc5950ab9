"""Train chapter 09's models once and ship them in course/checkpoints/.

A model trained on the reader's machine differs from one trained on ours in more than the last
digit: float sums depend on the CPU's vector width and thread count, and 2000 steps of training
amplify those differences until another expert turns out to be the most important one. Chapter 09
studies trained models, so it loads these files instead of training: the same weights on every
machine, and only the evaluation's round-off (about 1e-6) left to differ.

    python tools/make_checkpoint.py                    # all three files (about 10 CPU-minutes)
    python tools/make_checkpoint.py --only ch09_moe.pt

Every model is chapter 07's FULL shape (d_model 96, 3 blocks, 4 heads, windows of 96
characters, batch 24, 2000 steps, today's defaults), the shape of
`tools/moe_vs_dense_study.py --full`:
- ch09_moe.pt: its MoE (16 SwiGLU experts of width 48 per block, top-4), on all four domains;
- ch09_moe_no_arithmetic.pt: the same MoE trained on prose, code and records only, so that
  arithmetic is a domain it has never seen (chapter 09, sections 3 and 10);
- ch09_dense_no_arithmetic.pt: its dense twin (one FFN of width 4 x 48 = 192 per block, the
  MoE's active width) on the same three domains, the baseline of section 10's fine-tuning.

The weights are stored in float16 (a file of about 1.6 MB for the MoE instead of 3.2 MB). The
recorded validation loss (`minimoe.train.evaluate`: 8 fixed batches of 32 x 96 validation
characters) is measured on the model as loaded from those float16 weights, cast to float32, so
the loss that tests/test_checkpoint.py recomputes must match it to round-off. Each file also
holds the config, the training config, the loss of the float32 weights before rounding, the
run's validation curve (`history`, measured by the Trainer on batches of 24 windows, so its last
value differs from val_loss), the command and the versions and CPU it was made with.
"""

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

from minimoe.data import DOMAINS, load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import TrainConfig, Trainer, evaluate

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "course" / "checkpoints"
STORED_DTYPE = torch.float16

FULL = dict(d_model=96, n_layers=3, n_heads=4, seq_len=96)  # tools/moe_vs_dense_study.py's "full" shape
MOE = MoETransformerConfig(**FULL, d_hidden=48, num_experts=16, k=4)
DENSE = MoETransformerConfig(**FULL, d_hidden=MOE.k * MOE.d_hidden, num_experts=1, k=1)
NO_ARITHMETIC = tuple(name for name in DOMAINS if name != "arithmetic")
MODELS = {"ch09_moe.pt": (MOE, DOMAINS),
          "ch09_moe_no_arithmetic.pt": (MOE, NO_ARITHMETIC),
          "ch09_dense_no_arithmetic.pt": (DENSE, NO_ARITHMETIC)}
TRAINING = TrainConfig(steps=2000, batch_size=24, eval_every=200)


def stored(state_dict: dict) -> dict:
    """state_dict with every floating tensor rounded to STORED_DTYPE (integer buffers kept)."""
    return {name: t.detach().to(STORED_DTYPE) if t.is_floating_point() else t.detach().clone()
            for name, t in state_dict.items()}


def load(checkpoint: dict, dtype: torch.dtype = torch.float32) -> MoETransformer:
    """The model of a checkpoint dict, its stored weights cast to dtype, in eval mode."""
    model = MoETransformer(MoETransformerConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])  # strict; copies (and casts) into float32 parameters
    return model.to(dtype).eval()


def make(config: MoETransformerConfig, domains: tuple[str, ...], seed: int, command: str) -> dict:
    """Train `config` with TRAINING on `domains` from torch.manual_seed(seed); the checkpoint dict."""
    torch.manual_seed(seed)
    model, corpus = MoETransformer(config), load_corpus(domains=domains)
    started = time.perf_counter()
    history = Trainer(model, corpus, dataclasses.replace(TRAINING, seed=seed)).run(progress=False)
    seconds = time.perf_counter() - started
    checkpoint = {
        "config": dataclasses.asdict(config),
        "train_config": dataclasses.asdict(dataclasses.replace(TRAINING, seed=seed)),
        "domains": list(domains),
        "seed": seed,
        "state_dict": stored(model.state_dict()),
        "val_loss_float32_weights": evaluate(model.eval(), corpus),
        "history": {"val_step": history.val_step, "val_loss": history.val_loss},
        "made_with": {
            "command": command, "stored_dtype": str(STORED_DTYPE),
            "torch": str(torch.__version__), "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "train_seconds": round(seconds, 1),
        },
    }
    checkpoint["val_loss"] = evaluate(load(checkpoint), corpus)  # as loaded: float16 weights in float32
    return checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=sorted(MODELS), help="files to make (default all)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODELS:
        config, domains = MODELS[name]
        command = f"python tools/make_checkpoint.py --only {name}" + (f" --seed {args.seed}" if args.seed else "")
        checkpoint, path = make(config, domains, args.seed, command), args.out_dir / name
        torch.save(checkpoint, path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): validation loss {checkpoint['val_loss']:.4f} "
              f"nats/char (float32 weights: {checkpoint['val_loss_float32_weights']:.4f}), {checkpoint['made_with']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
