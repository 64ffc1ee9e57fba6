"""Fused kernels and their dispatch.

``reference`` is the PyTorch path every kernel is tested against. Triton kernels are used only where
``triton_supported`` says so; ``force_reference(True)`` (or ``ADALN_FORCE_REFERENCE=1``) routes every
``backend="auto"`` call to the reference path.
"""

from __future__ import annotations

import os

from torch import Tensor

from adaln.kernels import reference

_FORCE_REFERENCE = os.environ.get("ADALN_FORCE_REFERENCE", "0") == "1"


def force_reference(enabled: bool = True) -> None:
    """Route every ``backend="auto"`` call to the PyTorch reference path (a global switch)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(enabled)


def reference_forced() -> bool:
    return _FORCE_REFERENCE


def triton_supported(x: Tensor) -> bool:
    """Whether a fused Triton kernel exists for this input. None ships yet: always False."""
    return False


__all__ = ["force_reference", "reference", "reference_forced", "triton_supported"]
