"""What every exercise check must do, shared by the chapters' check tests: pass a right answer
with one stable line, fail a wrong one naming the task, and call a stub not implemented."""

import pytest

from minimoe.checks import CheckFailure


def stub(task):
    def not_done(*args):
        raise NotImplementedError(f"task {task}")
    return not_done


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
