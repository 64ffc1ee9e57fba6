"""The Triton kernels as torch custom ops (``torch.ops.adaln.*``) with fake and autograd registrations.

Being custom ops, they are opaque to ``torch.compile``: the graph keeps them as single nodes (no graph
break), shapes come from the fake implementations, and the backward is another custom op. All tensors
are 2-D rows: x ``(M, C)``, a condition ``(G, C)`` with G = B (global) or M (per-token); see
``triton_kernels``. Triton is imported on the first call, not at import.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

import torch
from torch import Tensor


def _triton_kernels() -> ModuleType:
    return import_module("adaln.kernels.triton_kernels")


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _like(t: Tensor | None) -> Tensor | None:
    """Fake output with ``t``'s shape and dtype, contiguous like the real kernels' outputs."""
    return None if t is None else t.new_empty(t.shape)


def _present(*ts: Tensor | None) -> list[Tensor]:
    return [t for t in ts if t is not None]


# ----------------------------------------------------------------------------------------------------
# norm(x) * mod(scale) + shift  (modulate: norm "none"; AF3 adaptive LayerNorm: modulation "sigmoid")
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("adaln::norm_modulate", mutates_args=())
def norm_modulate(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    norm: str,
    modulation: str,
    eps: float,
) -> Tensor:
    """out = norm(x) * mod(scale) + shift; norm "none" | "layer" | "rms", mod "one_plus" | "sigmoid"."""
    args = map(_contiguous, (x, None, None, shift, scale, weight, bias))
    return _triton_kernels().norm_modulate_forward(*args, norm, modulation, None, eps)[1]


@norm_modulate.register_fake
def _(x, shift, scale, weight, bias, norm, modulation, eps):
    return _like(x)


@torch.library.custom_op("adaln::norm_modulate_backward", mutates_args=())
def norm_modulate_backward(
    dout: Tensor,
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    norm: str,
    modulation: str,
    eps: float,
) -> list[Tensor]:
    """[dx, dscale, dshift?, dweight?, dbias?] (absent inputs are skipped)."""
    args = map(_contiguous, (dout, None, x, None, None, shift, scale, weight, bias))
    g = _triton_kernels().norm_modulate_backward(*args, norm, modulation, None, eps)
    return _present(g["x"], g["scale"], g.get("shift"), g.get("weight"), g.get("bias"))


@norm_modulate_backward.register_fake
def _(dout, x, shift, scale, weight, bias, norm, modulation, eps):
    return _present(*map(_like, (x, scale, shift, weight, bias)))


def _norm_modulate_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, norm, modulation, eps = inputs
    ctx.save_for_backward(x, shift, scale, weight, bias)
    ctx.config = (norm, modulation, eps)


def _norm_modulate_grad(ctx, dout):
    x, shift, scale, weight, bias = ctx.saved_tensors
    grads = iter(torch.ops.adaln.norm_modulate_backward(dout, x, shift, scale, weight, bias, *ctx.config))
    dx, dscale = next(grads), next(grads)
    dshift, dweight, dbias = (None if t is None else next(grads) for t in (shift, weight, bias))
    return dx, dshift, dscale, dweight, dbias, None, None, None


norm_modulate.register_autograd(_norm_modulate_grad, setup_context=_norm_modulate_setup)


# ----------------------------------------------------------------------------------------------------
# h = x + act(gate) * y, then norm(h) * (1 + scale) + shift: the boundary between two DiT sub-blocks
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("adaln::gate_residual_norm_modulate", mutates_args=())
def gate_residual_norm_modulate(
    x: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    kind: str,
    norm: str,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(h, out) with h = x + act(gate) * y and out = norm(h) * (1 + scale) + shift."""
    args = map(_contiguous, (x, y, gate, shift, scale, weight, bias))
    return _triton_kernels().norm_modulate_forward(*args, norm, "one_plus", kind, eps)


@gate_residual_norm_modulate.register_fake
def _(x, y, gate, shift, scale, weight, bias, kind, norm, eps):
    return _like(x), _like(x)


@torch.library.custom_op("adaln::gate_residual_norm_modulate_backward", mutates_args=())
def gate_residual_norm_modulate_backward(
    dh: Tensor | None,
    dout: Tensor,
    h: Tensor,
    y: Tensor,
    gate: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    kind: str,
    norm: str,
    eps: float,
) -> list[Tensor]:
    """[dx, dy, dgate, dscale, dshift?, dweight?, dbias?] (absent inputs are skipped)."""
    args = map(_contiguous, (dout, dh, h, y, gate, shift, scale, weight, bias))
    g = _triton_kernels().norm_modulate_backward(*args, norm, "one_plus", kind, eps)
    return _present(g["x"], g["y"], g["gate"], g["scale"], g.get("shift"), g.get("weight"), g.get("bias"))


@gate_residual_norm_modulate_backward.register_fake
def _(dh, dout, h, y, gate, shift, scale, weight, bias, kind, norm, eps):
    return _present(*map(_like, (h, y, gate, scale, shift, weight, bias)))


def _gate_residual_norm_modulate_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, kind, norm, eps = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale, weight, bias)
    ctx.config = (kind, norm, eps)
    # an unused h gets dh None (not a zeros tensor the kernel would have to read)
    ctx.set_materialize_grads(False)


def _gate_residual_norm_modulate_grad(ctx, dh, dout):
    h, y, gate, shift, scale, weight, bias = ctx.saved_tensors
    dout = torch.zeros_like(h) if dout is None else dout
    grads = iter(
        torch.ops.adaln.gate_residual_norm_modulate_backward(
            dh, dout, h, y, gate, shift, scale, weight, bias, *ctx.config
        )
    )
    dx, dy, dgate, dscale = (next(grads) for _ in range(4))
    dshift, dweight, dbias = (None if t is None else next(grads) for t in (shift, weight, bias))
    return dx, dy, dgate, dshift, dscale, dweight, dbias, None, None, None


gate_residual_norm_modulate.register_autograd(
    _gate_residual_norm_modulate_grad, setup_context=_gate_residual_norm_modulate_setup
)


# ----------------------------------------------------------------------------------------------------
# h = x + act(gate) * y alone
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("adaln::gate_residual", mutates_args=())
def gate_residual(x: Tensor, y: Tensor, gate: Tensor, kind: str) -> Tensor:
    """h = x + act(gate) * y with act identity ("linear"), tanh or sigmoid."""
    return _triton_kernels().gate_residual_forward(x.contiguous(), y.contiguous(), gate.contiguous(), kind)


@gate_residual.register_fake
def _(x, y, gate, kind):
    return _like(x)


@torch.library.custom_op("adaln::gate_residual_backward", mutates_args=())
def gate_residual_backward(dh: Tensor, y: Tensor, gate: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(dy, dgate); dx is dh itself."""
    return _triton_kernels().gate_residual_backward(dh.contiguous(), y.contiguous(), gate.contiguous(), kind)


@gate_residual_backward.register_fake
def _(dh, y, gate, kind):
    return _like(y), _like(gate)


def _gate_residual_setup(ctx, inputs, output):
    x, y, gate, kind = inputs
    ctx.save_for_backward(y, gate)
    ctx.kind = kind


def _gate_residual_grad(ctx, dh):
    y, gate = ctx.saved_tensors
    dy, dgate = torch.ops.adaln.gate_residual_backward(dh, y, gate, ctx.kind)
    return dh, dy, dgate, None


gate_residual.register_autograd(_gate_residual_grad, setup_context=_gate_residual_setup)
