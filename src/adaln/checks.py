"""Argument checks and dtype rules shared by every layer of the package (imports only torch).

Each check raises at the public boundary with the argument's name and what was expected, so a bad input
never surfaces as a shape error deep inside a matmul.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_TRUSTED = False


def check_tensor(t: object, name: str, min_dim: int = 1) -> Tensor:
    """Raise a clear error unless ``t`` is a floating tensor with at least ``min_dim`` dims."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    return t


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` when it is an int (not a bool) >= ``minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, else ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (statistics and 1+scale overflow/underflow there), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def check_values() -> bool:
    """Whether to run checks of tensor *values* (ranges, finiteness): each makes the host wait for the
    device. False while tracing for torch.compile and inside ``trusted_values``."""
    return not _TRUSTED and not torch.compiler.is_compiling()


@contextmanager
def trusted_values() -> Iterator[None]:
    """Skip value checks for inputs the caller made itself (the training loop's labels and noise levels),
    so a training step never waits for the device; shapes, dtypes and devices are still checked."""
    global _TRUSTED
    before, _TRUSTED = _TRUSTED, True
    try:
        yield
    finally:
        _TRUSTED = before
