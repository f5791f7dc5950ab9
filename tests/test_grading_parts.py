"""The grader's parts without a kernel: the static scan on small programs, the harness's result
format (nothing the kernel writes can run code in the grader) and its guard, and the table of
minimoe's implementations."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minimoe import numpy_ref
from minimoe.checks import ch01
from minimoe.grading import harness
from minimoe.grading.implementations import IMPLEMENTATIONS, resolve
from minimoe.grading.scan import Cell, scan

ROOT = Path(__file__).resolve().parents[1]
LEARNERS = {"1.1": "softmax_gate", "1.2": "mixture_input_grad"}
IMPLEMENTED = {task: [resolve(path) for path in IMPLEMENTATIONS[task]] for task in LEARNERS}
CHECKS = [Cell("from minimoe.checks import ch01\nch01.check_softmax_gate(softmax_gate)", True, "1.1"),
          Cell("from minimoe.checks import ch01\nch01.check_mixture_input_grad(mixture_input_grad)", True, "1.2")]


def findings(*student_cells: str, lesson: str = "import numpy as np") -> dict[str, list[str]]:
    cells = [Cell(lesson, True), *(Cell(source, False) for source in student_cells), *CHECKS]
    return scan(cells, LEARNERS, IMPLEMENTED)


USES_SOFTMAX = "uses minimoe's implementation of the task: minimoe.numpy_ref.softmax"


FOLLOWED = {
    "attribute": "import minimoe.numpy_ref\ndef softmax_gate(x):\n    return minimoe.numpy_ref.softmax(x)",
    "alias-helper-lambda": "from minimoe import numpy_ref as nr\nf = nr.softmax\ndef helper(x): return f(x)\n"
                           "softmax_gate = lambda x: helper(x)",
    "constant-getattr": "import minimoe\nsoftmax_gate = getattr(minimoe.numpy_ref, 'softmax')",
    "try": "try:\n    from minimoe.numpy_ref import softmax as softmax_gate\nexcept ImportError:\n"
           "    def softmax_gate(x): return x",
    "global": "from minimoe import numpy_ref\ndef setup():\n    global softmax_gate\n"
              "    softmax_gate = numpy_ref.softmax\nsetup()",
    "star": "from minimoe.numpy_ref import *\nsoftmax_gate = softmax\ndef mixture_input_grad(*args): pass",
    "setattr": "from minimoe import numpy_ref\nclass Gate: pass\nsoftmax_gate = Gate()\n"
               "setattr(softmax_gate, 'f', numpy_ref.softmax)",
    "append": "from minimoe import numpy_ref\ngates = []\ngates.append(numpy_ref.softmax)\nsoftmax_gate = gates[0]",
    "time-magic": "%time from minimoe.numpy_ref import softmax as softmax_gate",
    "capture-magic": "%%capture\nfrom minimoe.numpy_ref import softmax as softmax_gate",
}


@pytest.mark.parametrize("source", FOLLOWED.values(), ids=FOLLOWED.keys())
def test_scan_follows_the_learner_to_minimoe_s_implementation(source):
    found = findings(source)
    assert len(found["1.1"]) == 1 and found["1.1"][0].startswith(USES_SOFTMAX)
    assert re.search(r"\(code cell 2, line \d\)$", found["1.1"][0])
    assert not any("mixture" in f for f in found["1.2"])


def test_scan_reports_the_implementation_for_its_task_only():
    found = findings("from minimoe.checks.ch01 import _input_grad_reference as mixture_input_grad")
    assert found == {"1.1": [], "1.2": ["uses minimoe's implementation of the task: "
                                        "minimoe.checks.ch01._input_grad_reference (code cell 2, line 1)"]}


def test_scan_reports_minimoe_internals_that_the_learner_reaches():
    found = findings("from minimoe.checks import ch01\ndef softmax_gate(x):\n    return ch01._logits(x)")
    assert found["1.1"] == ["uses minimoe's internals: minimoe.checks.ch01._logits (code cell 2, line 3)"]


@pytest.mark.parametrize("source", [
    "from minimoe.numpy_ref import softmax\ndef softmax_gate(x):\n    return np.exp(x) / np.exp(x).sum(1, keepdims=1)\n"
    "print(np.allclose(softmax_gate(np.eye(2)), softmax(np.eye(2))))",  # a check of one's own
    "def softmax_gate(logits):\n    raise NotImplementedError\nfrom minimoe.numpy_ref import softmax as softmax_gate\n"
    "def softmax_gate(logits):\n    return logits",  # rebound: the last definition is the answer
    "%timeit -n 3 np.exp(np.ones(3))\n%matplotlib inline\n!ls\ndef softmax_gate(x): return x",
    "import sys, gc, inspect\nsys.path.append('.')\ngc.collect()\nprint(inspect.signature(np.exp))\n"
    "def softmax_gate(x): return x",
    "from minimoe.numpy_ref import softmax\ndef softmax_gate(x: softmax) -> softmax:\n"  # types run nothing
    "    y: softmax = x\n    assert not isinstance(y, softmax)\n    return y",
])
def test_scan_leaves_honest_code_alone(source):
    assert findings(source) == {"1.1": [], "1.2": []}


@pytest.mark.parametrize("source, what", [
    ("exec('softmax_gate = lambda x: x')", "exec"),
    ("import importlib\nm = importlib.import_module('minimoe.numpy_' + 'ref')", "importlib"),
    ("import minimoe.numpy_ref as nr\nsoftmax_gate = getattr(nr, 'soft' + 'max')", "getattr"),
    ("globals()['softmax_gate'] = print", "globals"),
    ("import sys\nsys.modules['minimoe.checks.ch01'] = None", "sys.modules"),
    ("import pickle\nf = pickle.loads(b'')", "pickle"),
    ("def softmax_gate(x): pass\nsoftmax_gate.__code__ = abs.__code__", ".__code__"),
    ("import minimoe\nopen(minimoe.__file__).read()", ".__file__"),
    ("get_ipython().showtraceback = print", "get_ipython"),
    ("%%writefile helper.py\nfrom minimoe.numpy_ref import softmax as softmax_gate", "%writefile"),
    ("%run helper.py", "%run"),
    ("import minimoe.checks\nminimoe.checks.run_check = print", "minimoe.checks.run_check"),
])
def test_scan_fails_every_later_task_for_what_it_cannot_follow(source, what):
    found = findings(source)
    assert found["1.1"] and found["1.1"] == found["1.2"]
    assert what in found["1.1"][0] and "(code cell 2, line" in found["1.1"][0]


def test_scan_does_not_blame_earlier_tasks_or_lesson_cells():
    cells = [Cell("import numpy as np\nexec('x = 1')", True), Cell("def softmax_gate(x): return x", False), CHECKS[0],
             Cell("exec('y = 2')", False), Cell("def mixture_input_grad(*a): pass", False), CHECKS[1]]
    found = scan(cells, LEARNERS, IMPLEMENTED)
    assert found["1.1"] == [] and len(found["1.2"]) == 1 and "code cell 4" in found["1.2"][0]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb")))
def test_every_task_of_the_course_lists_implementations_that_resolve(name):
    notebook = json.loads((ROOT / "solutions" / name).read_text())
    tasks = {t[5:] for c in notebook["cells"] for t in c["metadata"].get("tags", []) if t.startswith("task-")}
    assert tasks and tasks <= set(IMPLEMENTATIONS)
    for task in tasks:
        for path in IMPLEMENTATIONS[task]:
            obj = resolve(path)
            assert callable(obj), path


# ---- the harness --------------------------------------------------------------------------------

def test_results_round_trip_as_data(tmp_path):
    value = {"loss": torch.tensor(1.5), "pair": (np.arange(3), [1, 2.5, None]), "label": "healthy",
             "big": 2**70, "flag": True, "half": torch.ones(2, dtype=torch.bfloat16)}
    arrays = {}
    harness.write_result(str(tmp_path / "r.npz"), [harness.encode(value, arrays)], None, ["x"], arrays)
    result = harness.read_result(tmp_path / "r.npz")
    got = result["outputs"][0]
    assert result["error"] is None and result["called"] == ["x"]
    assert isinstance(got["loss"], torch.Tensor) and float(got["loss"]) == 1.5
    assert got["pair"][0].tolist() == [0, 1, 2] and got["pair"][1] == [1, 2.5, None]
    assert (got["label"], got["big"], got["flag"]) == ("healthy", 2**70, True)
    assert got["half"].dtype == torch.float32 and got["half"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("value", [object(), {1: 2}, np.array([object()]), [{"a": {"b": print}}]])
def test_encode_refuses_what_is_not_data(value):
    with pytest.raises(TypeError):
        harness.encode(value, {})


def test_read_result_refuses_pickles_links_and_junk(tmp_path):
    with open(tmp_path / "pickled.npz", "wb") as f:  # an object array would need unpickling
        np.savez(f, tree=np.array(json.dumps({"outputs": [["array", "a0"]], "error": None, "called": []})),
                 a0=np.array([{"x": 1}], dtype=object))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "link.npz").symlink_to(tmp_path / "junk.npz")
    malformed = tmp_path / "malformed.npz"
    with open(malformed, "wb") as f:
        np.savez(f, tree=np.array(json.dumps({"outputs": [["tensor", "missing"]], "error": None, "called": []})))
    for name in ("pickled.npz", "junk.npz", "link.npz", "malformed.npz", "absent.npz"):
        with pytest.raises(ValueError):
            harness.read_result(tmp_path / name)


def test_guard_blocks_every_alias_of_an_implementation_and_restores_it():
    alias, x = numpy_ref.softmax, np.array([[0.0, 1.0]])
    expected = numpy_ref.softmax(x)
    guard = harness.Guard(["minimoe.numpy_ref.softmax", "minimoe.checks.ch01._input_grad_reference"], block=True)
    with guard, pytest.raises(harness.ImplementationUsed, match="minimoe.numpy_ref.softmax"):
        alias(x)  # bound before the guard: its code is what changed
    assert guard.called == ["minimoe.numpy_ref.softmax"]
    np.testing.assert_array_equal(alias(x), expected)
    assert harness.GUARD_NAME not in vars(numpy_ref) and harness.GUARD_NAME not in vars(ch01)


def test_guard_that_only_warns_runs_the_original_and_records_the_call():
    guard = harness.Guard(["minimoe.routing.TopKRouter"], block=False)
    from minimoe.routing import TopKRouter
    with guard:
        routing = TopKRouter(4, 3, k=2)(torch.randn(5, 4))  # methods, super() and all
    assert routing.expert_idx.shape == (5, 2)
    assert guard.called[0] == "minimoe.routing.TopKRouter.__init__" and len(guard.called) > 1
