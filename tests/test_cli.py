"""`minimoe doctor` reports what is really installed and what the course will skip."""

import subprocess
import sys

import numpy
import pytest
import torch

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
