"""What every exercise check must do, shared by the chapters' check tests: pass a right answer
with one stable line, fail a wrong one naming the task, call a stub not implemented, and refuse
something that is not a function."""

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


def contract_tests(cases):
    """The four contract tests for a chapter's CASES = [(check, task, [correct answers], [wrong
    answers])], to assign to test_* names in the chapter's test module."""
    correct = [(c[0], c[1], a) for c in cases for a in c[2]]
    wrong = [(c[0], c[1], w) for c in cases for w in c[3]]

    @pytest.mark.parametrize("check, task, correct", correct,
                             ids=[f"{c[1]}-correct{i}" for c in cases for i in range(len(c[2]))])
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
