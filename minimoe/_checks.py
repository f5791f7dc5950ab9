"""Argument validation shared by the package: every message names the argument, its value and
what was expected."""

import numbers

import torch


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Return `value` if it is an int >= minimum, else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def positive(name: str, value, *, none_means: str | None = None) -> float | None:
    """Return `value` as a float if it is a real number > 0; None passes too when none_means says
    what None stands for (it goes into the message)."""
    if value is None and none_means is not None:
        return None
    expected = "> 0" if none_means is None else f"> 0 or None ({none_means})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {expected}, got {value!r}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


def tensor(name: str, value, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def expert_ids(name: str, value, num_experts: int) -> torch.Tensor:
    """Check a 2-D tensor of integer ids in [0, num_experts)."""
    tensor(name, value, ndim=2)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {value.dtype}")
    if value.numel() and (value.min() < 0 or value.max() >= num_experts):
        raise ValueError(
            f"{name} must hold ids in [0, {num_experts}), "
            f"got values in [{int(value.min())}, {int(value.max())}]"
        )
    return value


def same_shape(name: str, value: torch.Tensor, shape, expected_from: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (from {expected_from}), got {tuple(value.shape)}"
        )
