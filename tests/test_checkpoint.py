"""The models shipped in course/checkpoints/ load into today's code and still compute what they
computed when tools/make_checkpoint.py made them: a change to the model's parameters, names or
forward pass that breaks chapter 09's models fails here."""

from pathlib import Path

import pytest
import torch

from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.train import evaluate

CHECKPOINTS = sorted((Path(__file__).resolve().parents[1] / "course" / "checkpoints").glob("*.pt"))


def test_chapter_09_checkpoints_are_shipped_small():
    assert [path.name for path in CHECKPOINTS] == ["ch09_dense_no_arithmetic.pt", "ch09_moe.pt",
                                                   "ch09_moe_no_arithmetic.pt"]
    assert all(path.stat().st_size < 1.7e6 for path in CHECKPOINTS)  # float16 weights (float32: 3.2 MB)


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_checkpoint_reproduces_its_recorded_validation_loss(path, dtype):
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["made_with"]["command"].startswith("python tools/make_checkpoint.py")
    weights = checkpoint["state_dict"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    model = MoETransformer(MoETransformerConfig(**checkpoint["config"]))
    model.load_state_dict(weights)  # strict: every name and shape must match
    corpus = load_corpus(domains=checkpoint["domains"])
    loss = evaluate(model.to(dtype).eval(), corpus)
    # recorded in float32 from the same float16 weights; evaluation differs by round-off only
    assert loss == pytest.approx(checkpoint["val_loss"], abs=1e-4)
    # rounding the trained float32 weights to float16 cost little
    assert loss == pytest.approx(checkpoint["val_loss_float32_weights"], abs=2e-3)
    assert 1.0 < loss < 1.7  # chapter 07's FULL run reaches 1.36-1.45; an untrained model gives ln 96 = 4.56
