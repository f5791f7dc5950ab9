"""tools/capstone_seeds.py reads the lesson's own training program, and the shipped results file
it wrote still describes the capstone's config (a change to the config means: run the tool again)."""

import ast
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

from minimoe.checks.ch12 import _config_reference

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("capstone_seeds", ROOT / "tools" / "capstone_seeds.py")
capstone_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(capstone_seeds)


def test_the_training_program_is_the_lessons_writefile_cell_and_takes_a_seed():
    source = capstone_seeds.training_program()
    ast.parse(source)  # valid Python once the magic line is gone
    assert not source.startswith("%%") and "Trainer(" in source and "Parallel()" in source
    assert "int(sys.argv[3])" in source and "seed=seed" in source


def test_the_shipped_results_match_the_capstone_config():
    record = json.loads((ROOT / "course" / "results" / "ch12_seeds.json").read_text())
    assert record["config"] == json.loads(json.dumps(asdict(_config_reference(2, 1.25, 1e-3))))
    assert record["steps"] == 600 and sorted(record["seeds"]) == ["0", "1", "2"]
    for run in record["seeds"].values():
        assert run["val_loss_int8_failed"] > run["val_loss_int8"] and run["val_loss_run"] < 2.4
