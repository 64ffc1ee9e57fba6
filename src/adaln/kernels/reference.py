"""The PyTorch reference path of every fused op.

Inputs arrive already validated and broadcast by ``adaln.functional``: ``x`` is ``(..., C)`` and every
condition tensor has ``x.ndim`` dims, broadcastable to ``x``. Low-precision inputs (bf16/fp16) are
computed in fp32 and returned in the input dtype; float64 stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adaln.checks import compute_dtype



def normalize(
    x: Tensor, norm: str, eps: float, weight: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """LayerNorm or RMSNorm over the last axis, in the compute dtype (not cast back)."""
    xf = x.to(compute_dtype(x.dtype))
    w = None if weight is None else weight.to(xf.dtype)
    if norm == "layer":
        return F.layer_norm(xf, xf.shape[-1:], w, None if bias is None else bias.to(xf.dtype), eps)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift``."""
    ct = compute_dtype(x.dtype)
    y = x.to(ct) * (1 + scale.to(ct))
    if shift is not None:
        y = y + shift.to(ct)
    return y.to(x.dtype)


def norm_modulate(
    x: Tensor,
    shift: Tensor | None,
    scale: Tensor,
    norm: str,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``norm(x) * (1 + scale) + shift``."""
    y = normalize(x, norm, eps, weight, bias) * (1 + scale.to(compute_dtype(x.dtype)))
    if shift is not None:
        y = y + shift.to(y.dtype)
    return y.to(x.dtype)


def apply_gate(gate: Tensor, kind: str) -> Tensor:
    """The gate multiplier: DiT ``"linear"`` (g), Lumina 2 ``"tanh"`` (tanh g), AF3 ``"sigmoid"``."""
    if kind == "linear":
        return gate
    if kind == "tanh":
        return torch.tanh(gate)
    return torch.sigmoid(gate)


def gate_residual(x: Tensor, y: Tensor, gate: Tensor, kind: str) -> Tensor:
    """``x + act(gate) * y``."""
    ct = compute_dtype(x.dtype)
    return (x.to(ct) + apply_gate(gate.to(ct), kind) * y.to(ct)).to(x.dtype)


def af3_adaptive_layernorm(x: Tensor, scale_logits: Tensor, bias: Tensor, eps: float) -> Tensor:
    """AF3 Algorithm 26's elementwise part: ``sigmoid(scale_logits) * LN(x) + bias``."""
    y = normalize(x, "layer", eps)
    return (torch.sigmoid(scale_logits.to(y.dtype)) * y + bias.to(y.dtype)).to(x.dtype)


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
    """``h = x + act(gate) * y`` (stored in x's dtype), then ``norm(h) * (1 + scale) + shift``; (h, out)."""
    h = gate_residual(x, y, gate, kind)
    return h, norm_modulate(h, shift, scale, norm, eps, weight, bias)
