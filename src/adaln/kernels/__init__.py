"""Fused Triton kernels for the AdaLN ops, and their dispatch.

``reference`` is the PyTorch path every kernel is tested against. The functions below run the Triton
kernels unconditionally (same argument order as ``reference``) and are differentiable; each is a
``torch.ops.adaln.*`` custom op, so ``torch.compile`` keeps it as one node without a graph break.

Dispatch from ``adaln.functional``:
- ``backend="auto"`` uses a kernel when ``triton_supported(x)`` (a CUDA tensor of a supported dtype and
  width) unless ``force_reference(True)`` or ``ADALN_FORCE_REFERENCE=1`` routes it to the reference.
- ``backend="triton"`` uses a kernel when ``triton_runnable(x)``: additionally CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the first kernel call (Triton's interpreter: slow, for tests).

Inputs: x ``(B, *spatial, C)`` of dtype fp32/bf16/fp16 with ``C <= MAX_CHANNELS``; a condition is
global ``(B, C)`` or ``(B, 1, ..., 1, C)``, or per-token with x's shape, of any float dtype. Statistics
and modulation are fp32; outputs are x's dtype; gradients take their input's dtype. Non-contiguous
inputs are copied to contiguous ones.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import torch
from torch import Tensor

from adaln.checks import check_choice
from adaln.kernels import ops, reference

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHANNELS = 8192
_NORMS = ("layer", "rms")
_GATES = ("linear", "tanh", "sigmoid")

_FORCE_REFERENCE = os.environ.get("ADALN_FORCE_REFERENCE", "0") == "1"
_HAS_TRITON = find_spec("triton") is not None


def force_reference(enabled: bool = True) -> None:
    """Route every ``backend="auto"`` call to the PyTorch reference path (a global switch)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = bool(enabled)


def reference_forced() -> bool:
    return _FORCE_REFERENCE


def _shape_supported(x: Tensor) -> bool:
    return _HAS_TRITON and x.dtype in SUPPORTED_DTYPES and x.dim() >= 2 and 1 <= x.shape[-1] <= MAX_CHANNELS


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET``, read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_supported(x: Tensor) -> bool:
    """Whether ``backend="auto"`` may use a fused kernel for ``x``: CUDA, triton installed, dtype and C."""
    return x.is_cuda and _shape_supported(x)


def triton_runnable(x: Tensor) -> bool:
    """Whether a kernel can run on ``x`` at all: ``triton_supported`` or a CPU tensor under the interpreter."""
    return triton_supported(x) or (x.device.type == "cpu" and interpreter_enabled() and _shape_supported(x))


def _rows(x: Tensor) -> Tensor:
    """x as (M, C) rows, after checking a kernel can run on it."""
    if not _HAS_TRITON:
        raise RuntimeError("the fused kernels need triton (pip install triton)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be one of {SUPPORTED_DTYPES} for the fused kernels, got {x.dtype}")
    if x.dim() < 2 or not 1 <= x.shape[-1] <= MAX_CHANNELS:
        raise ValueError(f"x must be (B, *spatial, C) with 1 <= C <= {MAX_CHANNELS}, got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def _cond_rows(x: Tensor, c: Tensor | None, name: str) -> Tensor | None:
    """A condition as (B, C) rows (global) or (M, C) rows (per-token)."""
    if c is None:
        return None
    if not c.is_floating_point() or c.device != x.device:
        raise TypeError(f"{name} must be a floating tensor on {x.device}, got {c.dtype} on {c.device}")
    b, ch = x.shape[0], x.shape[-1]
    if c.shape == x.shape:
        return c.reshape(-1, ch)
    if c.dim() in (2, x.dim()) and c.shape[0] == b and c.shape[-1] == ch and c.numel() == b * ch:
        return c.reshape(b, ch)
    raise ValueError(
        f"{name} must be global (B, C) / (B, 1, ..., 1, C) with (B, C) = {(b, ch)} or per-token "
        f"{tuple(x.shape)}; got {tuple(c.shape)}"
    )


def _affine(x: Tensor, t: Tensor | None, name: str) -> Tensor | None:
    if t is not None and (t.shape != x.shape[-1:] or not t.is_floating_point() or t.device != x.device):
        raise ValueError(f"{name} must be a floating ({x.shape[-1]},) tensor on {x.device}, got {tuple(t.shape)}")
    return t



def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` (shift None means 0). x: (B, *spatial, C)."""
    xr = _rows(x)
    shift, scale = _cond_rows(x, shift, "shift"), _cond_rows(x, scale, "scale")
    return ops.norm_modulate(xr, shift, scale, None, None, "none", "one_plus", 0.0).view(x.shape)


def norm_modulate(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    norm: str,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``norm(x) * (1 + scale) + shift``, norm LayerNorm or RMSNorm with optional (C,) affine."""
    xr = _rows(x)
    shift, scale = _cond_rows(x, shift, "shift"), _cond_rows(x, scale, "scale")
    weight, bias = _affine(x, weight, "weight"), _affine(x, bias, "bias")
    out = ops.norm_modulate(xr, shift, scale, weight, bias, check_choice(norm, "norm", _NORMS), "one_plus", eps)
    return out.view(x.shape)


def gate_residual(x: Tensor, y: Tensor, gate: Tensor, kind: str) -> Tensor:
    """``x + act(gate) * y``, act identity ("linear"), tanh or sigmoid. x, y: (B, *spatial, C)."""
    xr = _rows(x)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    gate = _cond_rows(x, gate, "gate")
    return ops.gate_residual(xr, y.reshape(xr.shape), gate, check_choice(kind, "kind", _GATES)).view(x.shape)


def gate_residual_norm_modulate(
    x: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    norm: str,
    eps: float,
    kind: str,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``h = x + act(gate) * y`` and ``norm(h) * (1 + scale) + shift`` in one pass; returns (h, out)."""
    xr = _rows(x)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    gate, shift, scale = (_cond_rows(x, c, n) for c, n in ((gate, "gate"), (shift, "shift"), (scale, "scale")))
    weight, bias = _affine(x, weight, "weight"), _affine(x, bias, "bias")
    h, out = ops.gate_residual_norm_modulate(
        xr, y.reshape(xr.shape), gate, shift, scale, weight, bias,
        check_choice(kind, "kind", _GATES), check_choice(norm, "norm", _NORMS), eps,
    )  # fmt: skip
    return h.view(x.shape), out.view(x.shape)


def af3_adaptive_layernorm(x: Tensor, scale_logits: Tensor, bias: Tensor, eps: float) -> Tensor:
    """AF3 Algorithm 26's elementwise part ``sigmoid(scale_logits) * LN(x) + bias`` (LN without affine)."""
    xr = _rows(x)
    scale_logits, bias = _cond_rows(x, scale_logits, "scale_logits"), _cond_rows(x, bias, "bias")
    return ops.norm_modulate(xr, bias, scale_logits, None, None, "layer", "sigmoid", eps).view(x.shape)


__all__ = [
    "MAX_CHANNELS",
    "SUPPORTED_DTYPES",
    "af3_adaptive_layernorm",
    "force_reference",
    "gate_residual",
    "gate_residual_norm_modulate",
    "interpreter_enabled",
    "modulate",
    "norm_modulate",
    "reference",
    "reference_forced",
    "triton_runnable",
    "triton_supported",
]
