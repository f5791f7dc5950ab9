"""Checks for the course's exercises: run the learner's function on seeded random inputs and
compare with minimoe's tested reference.

A check prints one stable line, `task N.M: PASS (3 random cases)`, which the locked check cell
of an exercise compares with `# NBVAL_CHECK_OUTPUT`. On a mismatch it raises AssertionError
naming the case, the output, the shapes, the largest difference and the first index that
differs. Random inputs (several shapes and seeds) make a hard-coded answer fail.
The chapter modules (`minimoe.checks.ch01`, ...) hold one function per task.
`read_check` tells what a check runs without running it (`minimoe grade` compares in its own process).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Check", "CheckFailure", "assert_close", "case_rng", "read_check", "require_function", "run_check"]


class CheckFailure(AssertionError):
    """A learner's answer differs from the reference."""


def _as_array(value, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise CheckFailure(f"{what}: expected numbers, got {type(value).__name__} ({error})") from None


def assert_close(got, expected, what: str = "output", atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Compare numbers, arrays or tensors, strings (exactly), and tuples / lists / dicts of them, recursively."""
    if isinstance(expected, str):
        if got != expected:
            raise CheckFailure(f"{what}: got {got!r}, expected {expected!r}")
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise CheckFailure(f"{what}: expected a dict with keys {sorted(expected)}, got {keys}")
        for key in expected:
            assert_close(got[key], expected[key], f"{what}[{key!r}]", atol, rtol)
        return
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            size = len(got) if isinstance(got, (tuple, list)) else type(got).__name__
            raise CheckFailure(f"{what}: expected {len(expected)} values, got {size}")
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_close(g, e, f"{what}[{i}]", atol, rtol)
        return
    if got is None:
        raise CheckFailure(f"{what}: got None; did the function forget to return?")
    got_a, expected_a = _as_array(got, what), _as_array(expected, what)
    if got_a.shape != expected_a.shape:
        raise CheckFailure(f"{what}: expected shape {expected_a.shape}, got shape {got_a.shape}")
    bad = ~np.isclose(got_a, expected_a, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        diff = np.abs(got_a - expected_a)
        raise CheckFailure(
            f"{what}: shape {got_a.shape}, {int(bad.sum())} of {bad.size} entries differ, "
            f"max abs difference {np.nanmax(np.where(np.isnan(diff), np.inf, diff)):.3g}; first at index "
            f"{first}: got {got_a[first]:.6g}, expected {expected_a[first]:.6g}")


def require_function(task: str, learner_fn) -> None:
    """Raise CheckFailure unless the learner's answer is a function (checks that wrap it call this
    first, since the wrapper is always callable)."""
    if not callable(learner_fn):
        raise CheckFailure(f"task {task}: expected a function, got {type(learner_fn).__name__}")


def case_rng(case: int) -> np.random.Generator:
    """The seeded generator of a check's case number `case` (0, 1, ...)."""
    return np.random.default_rng(1000 * case + 7)


@dataclass(frozen=True)
class Check:
    """The arguments of one run_check call: what a check compares, on which inputs."""
    task: str
    learner_fn: Callable  # the learner's function, or the check's wrapper around it
    reference_fn: Callable
    make_inputs: Callable
    cases: int
    atol: float
    rtol: float


_recorded: list[Check] | None = None  # while read_check runs: run_check records here instead of running


def read_check(check: Callable, learner_fn) -> Check:
    """The Check that `check(learner_fn)` would run, without running it. Raises what the check
    raises before it gets there (a CheckFailure for a non-function), and CheckFailure if the
    check does not call run_check exactly once."""
    global _recorded
    _recorded = []
    try:
        check(learner_fn)
        recorded = _recorded
    finally:
        _recorded = None
    if len(recorded) != 1:
        raise CheckFailure(f"{getattr(check, '__name__', check)!r} called run_check {len(recorded)} times, not once")
    return recorded[0]


def run_check(task: str, learner_fn: Callable, reference_fn: Callable, make_inputs: Callable,
              cases: int = 3, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Call learner_fn and reference_fn on make_inputs(rng) for `cases` seeded rngs; print PASS.

    make_inputs(rng) returns a tuple of positional arguments; each function gets its own copy,
    so a learner's function that modifies its inputs cannot change the reference's.
    """
    require_function(task, learner_fn)
    if _recorded is not None:
        _recorded.append(Check(task, learner_fn, reference_fn, make_inputs, cases, atol, rtol))
        return
    for case in range(cases):
        args = make_inputs(case_rng(case))
        expected = reference_fn(*_copy(args))
        try:
            got = learner_fn(*_copy(args))
        except NotImplementedError:
            raise CheckFailure(f"task {task}: not implemented yet") from None
        try:
            assert_close(got, expected, "output", atol, rtol)
        except CheckFailure as failure:
            shapes = ", ".join(str(np.shape(a)) for a in args)
            raise CheckFailure(f"task {task}: case {case + 1} of {cases} (input shapes {shapes}): {failure}") from None
    print(f"task {task}: PASS ({cases} random cases)")


def _copy(args: tuple) -> tuple:
    """Fresh copies of the tensors and arrays among args (torch tensors clone, NumPy arrays copy)."""
    return tuple(a.clone() if hasattr(a, "clone") else a.copy() if hasattr(a, "copy") else a for a in args)
