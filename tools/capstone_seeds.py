"""Chapter 12's project over several seeds: course/results/ch12_seeds.json, which the lesson prints.

    OMP_NUM_THREADS=1 python tools/capstone_seeds.py           # seeds 0, 1, 2 (about 3 minutes on 2 cores)

For each seed: the lesson's own training program (the `%%writefile` cell of
course/12_capstone.ipynb, run as it is) on 2 gloo ranks with the capstone config of task 12.1
(capacity 1.25, bias step 1e-3), then the lesson's serving steps on its checkpoint, on the same
8 validation batches: dropless, int8 experts, and int8 with the busiest expert of each block
failed. The seed sets both the initial weights and the batches.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from minimoe.checks.ch12 import _config_reference
from minimoe.data import load_corpus
from minimoe.inference import inference_capacity, quantize_experts, restrict_experts, swap_moe_layers
from minimoe.layer import moe_layers
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "course" / "12_capstone.ipynb"
MAGIC = "%%writefile {workdir}/train_capstone.py\n"


def training_program() -> str:
    """The source of the lesson's training program (its %%writefile cell, the magic line removed)."""
    for cell in json.loads(LESSON.read_text())["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and source.startswith(MAGIC):
            return source[len(MAGIC):]
    raise LookupError(f"{LESSON} has no cell starting with {MAGIC!r}")


def serve(run: Path, corpus) -> dict:
    """The lesson's serving measurements on the checkpoint of one run."""
    history = json.loads((run / "history.json").read_text())
    model = MoETransformer(MoETransformerConfig(**json.loads((run / "config.json").read_text())))
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    share = np.array(history["load_share"][-100:])
    busiest = [int(np.argmax(share[:, layer].sum(0))) for layer in range(len(moe_layers(model)))]
    available = [torch.arange(model.config.num_experts) != e for e in busiest]
    result = {"val_loss_run": history["val_loss"][-1], "busiest": busiest}
    with inference_capacity(model, None):
        result["val_loss_dropless"] = evaluate(model, corpus, num_batches=8, batch_size=16)
    with swap_moe_layers(model, [quantize_experts(layer) for layer in moe_layers(model)]), \
            inference_capacity(model, None):
        result["val_loss_int8"] = evaluate(model, corpus, num_batches=8, batch_size=16)
        with restrict_experts(model, available):
            result["val_loss_int8_failed"] = evaluate(model, corpus, num_batches=8, batch_size=16)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "course" / "results" / "ch12_seeds.json")
    args = parser.parse_args(argv)
    corpus, runs = load_corpus(), {}
    with tempfile.TemporaryDirectory(prefix="minimoe12_seeds_") as folder:
        program = Path(folder) / "train_capstone.py"
        program.write_text(training_program())
        for seed in args.seeds:
            run = Path(folder) / f"seed{seed}"
            run.mkdir()
            (run / "config.json").write_text(json.dumps(asdict(_config_reference(2, 1.25, 1e-3))))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            str(program), str(run), str(args.steps), str(seed)], check=True)
            runs[str(seed)] = serve(run, corpus)
            print(seed, runs[str(seed)], flush=True)
    record = {"steps": args.steps, "config": asdict(_config_reference(2, 1.25, 1e-3)), "torch": torch.__version__,
              "seeds": runs}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
