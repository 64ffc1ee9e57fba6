"""Rotary position embedding (RoPE) over several position axes: Flux, Lumina 2, Z-Image.

Each token has one position per axis (Flux: (t, h, w), a text token at (0, 0, 0), image token
(0, row, col)); each axis owns a slice of every head's channels. Conventions, as a formula:

- ``ids`` (N, n_axes) or (B, N, n_axes): integer or float positions; ``axes_dim`` (even widths,
  one per axis, summing to ``head_dim``); ``theta`` one base for every axis or one per axis.
- Axis a with width d_a has frequencies ``omega_{a,j} = theta_a ** (-2j / d_a)``, j = 0 .. d_a/2 - 1,
  and angles ``pos_a * omega_{a,j}``; the angles of the axes are concatenated in axis order, giving
  ``head_dim / 2`` angles per token (pair i of the head uses angle i).
- Pairs are **interleaved**: channels (2i, 2i+1) are rotated together,
  ``y_2i = x_2i cos - x_2i+1 sin``, ``y_2i+1 = x_2i sin + x_2i+1 cos``, i.e. the complex product
  ``(x_2i + i x_2i+1) * exp(i angle_i)``.

This is diffusers' ``get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)`` with
``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` (``embeddings.py``; Flux's
``FluxPosEmbed``, which stores each cos/sin twice, ``repeat_interleave``), the same math as its complex
form ``get_1d_rotary_pos_embed(use_real=False)`` + ``apply_rotary_emb(use_real=False)`` (Lumina 2,
Z-Image: ``view_as_complex`` on consecutive pairs) and as black-forest-labs/flux ``math.py``
(``rope``, ``apply_rope``). The split-halves layout (``use_real_unbind_dim=-2``, Stable Audio, CogView4)
is a different pairing and is not this module's.

Precision: angles are computed in float64 (diffusers' ``FluxPosEmbed`` uses ``freqs_dtype=float64`` on
CUDA and CPU); ``angle_dtype=float32`` rounds them to float32 before cos/sin, as Z-Image's
``RopeEmbedder.precompute_freqs_cis`` does (``.float()`` before ``torch.polar``). cos and sin are
returned in ``dtype`` (float32 default). ``apply_rope`` rotates in fp32 for half inputs (float64 stays
float64) and returns x's dtype, as diffusers does (``x.float() * cos ... .to(x.dtype)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaln.checks import check_tensor, compute_dtype

__all__ = ["RotaryEmbedding", "apply_rope", "rope_angles", "rope_frequencies"]

RopeFrequencies = tuple[Tensor, Tensor]  # (cos, sin), each (N, head_dim // 2) or (B, N, head_dim // 2)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_axes(
    axes_dim: Sequence[int], theta: float | Sequence[float]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``axes_dim`` as positive even ints; ``theta`` as one positive base per axis."""
    dims = tuple(axes_dim) if isinstance(axes_dim, Sequence) else ()
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in dims):
        raise ValueError(f"axes_dim must be a non-empty sequence of positive even ints (one per axis), got {axes_dim}")
    thetas = (theta,) * len(dims) if _is_number(theta) else tuple(theta) if isinstance(theta, Sequence) else ()
    if len(thetas) != len(dims) or any(not _is_number(t) or t <= 0 for t in thetas):
        raise ValueError(f"theta must be a positive number or {len(dims)} positive numbers (one per axis), got {theta}")
    return dims, tuple(float(t) for t in thetas)


def _check_ids(ids: object, n_axes: int) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype == torch.bool or ids.is_complex():
        kind = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"ids must be a real (integer or float) torch.Tensor of positions, got {kind}")
    if ids.dim() not in (2, 3) or ids.shape[-1] != n_axes:
        raise ValueError(
            f"ids must have shape (N, {n_axes}) or (B, N, {n_axes}) (one position per axis), got {tuple(ids.shape)}"
        )
    return ids


def rope_angles(ids: Tensor, axes_dim: Sequence[int], theta: float | Sequence[float] = 10000.0) -> Tensor:
    """Rotation angles ``pos_a * theta_a ** (-2j / d_a)`` of every pair, axes concatenated in order.

    ids: (N, n_axes) or (B, N, n_axes) -> (N, sum(axes_dim) // 2) or (B, N, sum(axes_dim) // 2), float64.
    """
    dims, thetas = _check_axes(axes_dim, theta)
    ids = _check_ids(ids, len(dims))
    pos = ids.to(torch.float64)
    angles = []
    for a, (d, th) in enumerate(zip(dims, thetas)):
        # diffusers' operation order: 1 / (theta ** (arange(0, d, 2) / d)), then outer(pos, freqs)
        omega = 1.0 / th ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append(pos[..., a, None] * omega)
    return torch.cat(angles, dim=-1)


def rope_frequencies(
    ids: Tensor,
    axes_dim: Sequence[int],
    theta: float | Sequence[float] = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    angle_dtype: torch.dtype = torch.float64,
) -> RopeFrequencies:
    """``(cos, sin)`` of ``rope_angles``, one entry per pair (not repeated), in ``dtype``.

    ``angle_dtype`` is the precision of the angles when cos/sin are taken: float64 (diffusers' Flux)
    or float32 (Z-Image). ids: (N, n_axes) or (B, N, n_axes) -> each (N | B, N, sum(axes_dim) // 2).
    """
    if angle_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"angle_dtype must be torch.float32 or torch.float64, got {angle_dtype}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    angles = rope_angles(ids, axes_dim, theta).to(angle_dtype)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, freqs: RopeFrequencies) -> Tensor:
    """Rotate interleaved pairs of x's channels: ``(x_2i + i x_2i+1) * exp(i angle_i)``.

    x: (B, heads, N, head_dim) (q or k); freqs: ``(cos, sin)`` from ``rope_frequencies``, each
    (N, head_dim // 2), shared by the batch, or (B, N, head_dim // 2), per sample. Returns x's shape
    and dtype; the rotation runs in fp32 for half inputs.
    """
    check_tensor(x, "x")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape (B, heads, N, head_dim) with an even head_dim, got {tuple(x.shape)}")
    if not isinstance(freqs, (tuple, list)) or len(freqs) != 2:
        raise TypeError(f"freqs must be a (cos, sin) pair of tensors, got {type(freqs).__name__}")
    cos, sin = freqs
    b, _, n, d = x.shape
    for name, f in (("cos", cos), ("sin", sin)):
        check_tensor(f, f"freqs {name}")
        if tuple(f.shape) not in ((n, d // 2), (b, n, d // 2)):
            raise ValueError(
                f"freqs {name} must have shape (N, head_dim // 2) = {(n, d // 2)} or (B, N, head_dim // 2) = "
                f"{(b, n, d // 2)} to match x {tuple(x.shape)}, got {tuple(f.shape)}"
            )
    ct = torch.promote_types(compute_dtype(x.dtype), cos.dtype)
    cos, sin = cos.to(ct), sin.to(ct)
    if cos.dim() == 3:  # per-sample positions broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x0, x1 = x.to(ct).unflatten(-1, (d // 2, 2)).unbind(-1)
    # diffusers' operation order (x * cos + rotated * sin per channel), so float32 results agree exactly
    y0 = x0 * cos + (-x1) * sin
    y1 = x1 * cos + x0 * sin
    return torch.stack([y0, y1], dim=-1).flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Multi-axis RoPE frequencies from position ids (diffusers ``FluxPosEmbed``, BFL ``EmbedND``).

    ``axes_dim``: per-axis rotary widths (Flux (16, 56, 56) for head_dim 128); ``theta``: one base or one
    per axis (Flux 10000, Z-Image 256). No parameters. forward(ids (N, n_axes) or (B, N, n_axes)) ->
    ``(cos, sin)`` each (..., N, head_dim // 2) in ``dtype``, for ``apply_rope``.
    """

    def __init__(
        self,
        axes_dim: Sequence[int],
        theta: float | Sequence[float] = 10000.0,
        *,
        angle_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.axes_dim, thetas = _check_axes(axes_dim, theta)
        self.theta = thetas[0] if _is_number(theta) else thetas
        self.head_dim = sum(self.axes_dim)
        if angle_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"angle_dtype must be torch.float32 or torch.float64, got {angle_dtype}")
        self.angle_dtype = angle_dtype

    def forward(self, ids: Tensor, *, dtype: torch.dtype = torch.float32) -> RopeFrequencies:
        return rope_frequencies(ids, self.axes_dim, self.theta, dtype=dtype, angle_dtype=self.angle_dtype)

    def extra_repr(self) -> str:
        return f"axes_dim={self.axes_dim}, theta={self.theta}, angle_dtype={self.angle_dtype}"
