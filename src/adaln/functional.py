"""AdaLN tensor ops: validation, broadcasting and backend dispatch.

Conventions (see DESIGN.md): ``x`` is channels-last ``(B, *spatial, C)``. A condition tensor (shift,
scale, gate) is either global ``(B, C)``, broadcast over every token axis, or per-token with exactly
``x``'s shape. With bf16/fp16 inputs the statistics and ``1 + scale`` are computed in fp32 and the
result is returned in the input dtype.

NaN in a condition is not checked (that would force a host sync on every call): it propagates to the
outputs of the samples (or tokens) it belongs to and to no others.
"""

from __future__ import annotations

from torch import Tensor

from adaln import kernels
from adaln.checks import check_choice, check_tensor
from adaln.kernels import reference

NORMS = ("layer", "rms")
GATES = ("linear", "tanh", "sigmoid")
BACKENDS = ("auto", "torch", "triton")



def broadcast_condition(x: Tensor, c: Tensor | None, name: str) -> Tensor | None:
    """View a global ``(B, C)`` condition as ``(B, 1, ..., 1, C)``; pass per-token ones through.

    Raises ``ValueError`` naming ``name`` when ``c`` is neither ``(B, C)`` nor ``x.shape``.
    """
    if c is None:
        return None
    check_tensor(c, name)
    b, ch = x.shape[0], x.shape[-1]
    if c.dim() == 2 and tuple(c.shape) == (b, ch):
        return c.view(b, *([1] * (x.dim() - 2)), ch)
    if c.shape == x.shape:
        return c
    raise ValueError(
        f"{name} must be global (B, C) = {(b, ch)} or per-token {tuple(x.shape)} to match x; "
        f"got {tuple(c.shape)}"
    )


def _check_x(x: Tensor) -> Tensor:
    return check_tensor(x, "x", min_dim=2)



def use_triton(backend: str, x: Tensor) -> bool:
    """Resolve ``backend`` for input ``x``: True selects the fused Triton kernel.

    ``"triton"`` also runs CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
    ``"auto"`` uses kernels on CUDA only.
    """
    check_choice(backend, "backend", BACKENDS)
    if backend == "torch":
        return False
    if backend == "triton":
        if not kernels.triton_runnable(x):
            raise RuntimeError(
                "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), an installed triton, "
                f"dtype in {kernels.SUPPORTED_DTYPES} and C <= {kernels.MAX_CHANNELS}; "
                f"got device={x.device}, dtype={x.dtype}, shape={tuple(x.shape)}"
            )
        return True
    return kernels.triton_supported(x) and not kernels.reference_forced()


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor, *, backend: str = "auto") -> Tensor:
    """``x * (1 + scale) + shift`` (shift None means 0: Lumina 2 / Z-Image).

    x: (B, *spatial, C); shift, scale: (B, C) or (B, *spatial, C). Returns x's shape and dtype.
    """
    _check_x(x)
    scale = broadcast_condition(x, scale, "scale")
    shift = broadcast_condition(x, shift, "shift")
    if use_triton(backend, x):
        return kernels.modulate(x, shift, scale)
    return reference.modulate(x, shift, scale)


def norm_modulate(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` with ``norm`` LayerNorm or RMSNorm over the last axis.

    x: (B, *spatial, C); shift, scale: (B, C) or (B, *spatial, C); weight, bias: optional (C,) affine
    of the norm (RMSNorm takes no bias). eps default 1e-6 is DiT's.
    """
    _check_x(x)
    check_choice(norm, "norm", NORMS)
    scale = broadcast_condition(x, scale, "scale")
    shift = broadcast_condition(x, shift, "shift")
    _check_affine(x, weight, bias, norm)
    if use_triton(backend, x):
        return kernels.norm_modulate(x, shift, scale, norm, eps, weight, bias)
    return reference.norm_modulate(x, shift, scale, norm, eps, weight, bias)


def gate_residual(
    x: Tensor, y: Tensor, gate: Tensor, *, kind: str = "linear", backend: str = "auto"
) -> Tensor:
    """``x + act(gate) * y``; act is identity (DiT ``"linear"``), tanh (Lumina 2) or sigmoid (AF3).

    x, y: (B, *spatial, C); gate: (B, C) or (B, *spatial, C).
    """
    _check_x(x)
    check_tensor(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_choice(kind, "kind", GATES)
    gate = broadcast_condition(x, gate, "gate")
    if use_triton(backend, x):
        return kernels.gate_residual(x, y, gate, kind)
    return reference.gate_residual(x, y, gate, kind)


def gate_residual_norm_modulate(
    x: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    kind: str = "linear",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """``h = x + act(gate) * y`` then ``out = norm(h) * (1 + scale) + shift``; returns ``(h, out)``.

    The boundary between two DiT sub-blocks (residual of one branch, modulated input of the next) in
    one pass. h is stored in x's dtype and out normalises that stored h, as the two separate ops would.
    x, y: (B, *spatial, C); gate, shift, scale: (B, C) or (B, *spatial, C); weight, bias: optional (C,).
    """
    _check_x(x)
    check_tensor(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_choice(kind, "kind", GATES)
    check_choice(norm, "norm", NORMS)
    gate = broadcast_condition(x, gate, "gate")
    scale = broadcast_condition(x, scale, "scale")
    shift = broadcast_condition(x, shift, "shift")
    _check_affine(x, weight, bias, norm)
    if use_triton(backend, x):
        return kernels.gate_residual_norm_modulate(x, y, gate, shift, scale, norm, eps, kind, weight, bias)
    return reference.gate_residual_norm_modulate(x, y, gate, shift, scale, norm, eps, kind, weight, bias)


def af3_adaptive_layernorm(
    x: Tensor, scale_logits: Tensor, bias: Tensor, *, eps: float = 1e-5, backend: str = "auto"
) -> Tensor:
    """AlphaFold3 adaptive LayerNorm's elementwise part: ``sigmoid(scale_logits) * LN(x) + bias``.

    LN has no affine; x: (..., N, C); scale_logits, bias: x's shape (per-token, as in AF3) or (B, C).
    """
    _check_x(x)
    scale_logits = broadcast_condition(x, scale_logits, "scale_logits")
    bias = broadcast_condition(x, bias, "bias")
    if use_triton(backend, x):
        return kernels.af3_adaptive_layernorm(x, scale_logits, bias, eps)
    return reference.af3_adaptive_layernorm(x, scale_logits, bias, eps)


def _check_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, norm: str) -> None:
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (check_tensor(t, name).shape != (c,)):
            raise ValueError(f"{name} must have shape ({c},) to match x's channels, got {tuple(t.shape)}")
    if norm == "rms" and bias is not None:
        raise ValueError("bias is not defined for norm='rms' (RMSNorm has a scale only)")
