"""What every exercise check must do, shared by the chapters' check tests: pass a right answer
with one stable line (also when it is computed by another numeric path), fail a wrong one naming
the task, call a stub not implemented, and refuse something that is not a function."""

import copy
import functools

import numpy as np
import pytest
import torch

from minimoe.checks import CheckFailure


def stub(task):
    def not_done(*args):
        raise NotImplementedError(f"task {task}")
    return not_done


def _to_float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(np.float64)
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).double()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float64(v) for v in value)
    if isinstance(value, dict):
        return {key: _to_float64(v) for key, v in value.items()}
    return value


def _to_float32(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return value.float()
    if isinstance(value, np.ndarray) and value.dtype == np.float64:
        return value.astype(np.float32)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {key: _to_float32(v) for key, v in value.items()}
    return value


def in_float64(answer):
    """The same correct answer on another numeric path: float32 inputs (tensors, arrays, modules)
    are computed on in float64 and the results rounded back to float32. Its sums differ from the
    float32 reference's as much as another CPU's vector width or thread count could make them, and
    more; a check must still pass it."""
    @functools.wraps(answer)
    def float64_answer(*args):
        float32 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float32
                      or isinstance(a, np.ndarray) and a.dtype == np.float32
                      or isinstance(a, torch.nn.Module) and any(p.dtype == torch.float32 for p in a.parameters())
                      for a in args)
        wide = _to_float64(args)
        result = answer(*wide)
        for original, copy64 in zip(args, wide, strict=True):  # an answer may fill an output argument
            if isinstance(original, torch.Tensor) and original.is_floating_point() and not original.requires_grad:
                original.copy_(copy64)
        return _to_float32(result) if float32 else result
    return float64_answer


def assert_passes(check, task, answer, capsys):
    check(answer)
    assert capsys.readouterr().out == f"task {task}: PASS (3 random cases)\n"


def assert_fails(check, task, wrong, capsys):
    with pytest.raises(CheckFailure, match=f"task {task}"):
        check(wrong)
    assert "PASS" not in capsys.readouterr().out


def assert_stub_not_implemented(check, task):
    with pytest.raises(CheckFailure, match=f"task {task}: not implemented"):
        check(stub(task))


def contract_tests(cases):
    """The four contract tests for a chapter's CASES = [(check, task, [correct answers], [wrong
    answers])], to assign to test_* names in the chapter's test module."""
    correct = [(c[0], c[1], path(a)) for c in cases for a in c[2] for path in (lambda a: a, in_float64)]
    wrong = [(c[0], c[1], w) for c in cases for w in c[3]]

    @pytest.mark.parametrize("check, task, correct", correct,
                             ids=[f"{c[1]}-correct{i}{path}" for c in cases for i in range(len(c[2]))
                                  for path in ("", "-float64")])
    def passes_correct_answers(check, task, correct, capsys):
        assert_passes(check, task, correct, capsys)

    @pytest.mark.parametrize("check, task, wrong", wrong,
                             ids=[f"{c[1]}-wrong{i}" for c in cases for i in range(len(c[3]))])
    def fails_wrong_answers_naming_the_task(check, task, wrong, capsys):
        assert_fails(check, task, wrong, capsys)

    @pytest.mark.parametrize("check, task", [(c[0], c[1]) for c in cases], ids=[c[1] for c in cases])
    def reports_a_stub_as_not_implemented(check, task):
        assert_stub_not_implemented(check, task)

    @pytest.mark.parametrize("check, task", [(c[0], c[1]) for c in cases], ids=[c[1] for c in cases])
    def rejects_a_non_function(check, task):
        with pytest.raises(CheckFailure, match=f"task {task}: expected a function, got NoneType"):
            check(None)

    return (passes_correct_answers, fails_wrong_answers_naming_the_task, reports_a_stub_as_not_implemented,
            rejects_a_non_function)
