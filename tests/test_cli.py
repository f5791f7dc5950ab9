"""The `minimoe` command line: `doctor` reports what is really installed and what the course will
skip; `train` runs the chapter-07 Trainer and writes its history."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy
import pytest
import torch

from minimoe import train_cli
from minimoe.cli import main


def test_doctor_reports_installed_versions_and_gpus(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith(" "))
    assert lines["torch"] == torch.__version__
    assert lines["numpy"] == numpy.__version__
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert lines["cuda"] == "no GPU" if gpus == 0 else lines["cuda"].startswith(f"{gpus} GPU(s)")
    if gpus == 0:
        assert "NCCL expert parallelism" in out  # the GPU-only parts are listed as skipped


def test_doctor_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "minimoe", "doctor"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("python")


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_train_subcommand_runs_the_trainer_and_writes_its_history(tmp_path):
    options = ["--steps", "3", "--seq-len", "16", "--d-model", "16", "--n-heads", "2", "--d-hidden", "16",
               "--num-experts", "4", "--batch-size", "4", "--warmup-steps", "1", "--eval-every", "3",
               "--eval-batches", "1", "--no-progress", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "minimoe", "train", *options],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step 3: train loss" in result.stdout
    record = json.loads((tmp_path / "history.json").read_text())
    assert record["world_size"] == 1 and (tmp_path / "checkpoint.pt").exists()

    from minimoe.data import load_corpus
    from minimoe.model import MoETransformer
    from minimoe.train import Trainer, learning_rate
    from minimoe.train_cli import configs, parse_args

    model_config, train_config = configs(parse_args(options), world=1)
    torch.manual_seed(0)
    trainer = Trainer(MoETransformer(model_config), load_corpus(), train_config)
    trainer.run(progress=False)
    assert record["history"]["step"] == [0, 1, 2]
    assert numpy.allclose(record["history"]["loss"], trainer.history.loss, rtol=0, atol=1e-5)

    resumed = subprocess.run([sys.executable, "-m", "minimoe", "train", "--resume", "--steps", "5", "--no-progress",
                              "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((tmp_path / "history.json").read_text())["history"]
    assert history["step"] == [0, 1, 2, 3, 4] and history["loss"][:3] == record["history"]["loss"]
    longer = replace(train_config, steps=5)  # the schedule of the new length from step 3 on
    assert history["lr"][3:] == pytest.approx([learning_rate(3, longer), learning_rate(4, longer)])


def test_train_subcommand_passes_help_and_bad_options_to_the_trainer():
    help_text = subprocess.run([sys.executable, "-m", "minimoe", "train", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--num-experts" in help_text and "--resume" in help_text
    bad = subprocess.run([sys.executable, "-m", "minimoe", "train", "--save-every", "-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--save-every must be >= 0, got -1" in bad.stderr
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):  # 0 is not "the ranks"
        train_cli.configs(train_cli.parse_args(["--micro-batches", "0"]), world=2)
