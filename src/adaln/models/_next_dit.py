"""Pieces shared by the Next-DiT family (Lumina 2's ``Lumina2``, Z-Image's ``ZImage``): patches, caption
compaction, 3-axis RoPE positions, and the checks of their constructors and of their calling convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaln.checks import check_int, check_tensor


#################################################################################
#                       Patches, captions and positions                         #
#################################################################################


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): row-major patches, features ordered (row, col, C)."""
    b, c, hh, ww = x.shape
    p = patch_size
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(tokens: Tensor, h: int, w: int, patch_size: int, channels: int) -> Tensor:
    """(B, h * w, p * p * C) -> (B, C, h * p, w * p), the inverse of ``patchify``."""
    p = patch_size
    x = tokens.reshape(tokens.shape[0], h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(tokens.shape[0], channels, h * p, w * p)


def compact_captions(context: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Kept caption tokens first, in order, padding zeroed: (B, L, C), (B, L) bool -> same shapes.

    The returned mask is a prefix mask (sample i keeps its first ``mask[i].sum()`` slots); a prefix mask
    comes back unchanged. Zeroing makes the padding's content irrelevant (no NaN can leak through a
    masked key).
    """
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    keep = mask.gather(1, order)
    context = context.gather(1, order[..., None].expand_as(context))
    return torch.where(keep[..., None], context, context.new_zeros(())), keep


def image_ids(first: Tensor, h: int, w: int) -> Tensor:
    """(B, h * w, 3) positions (first[b], row, col) of row-major image tokens; first (B,) integer."""
    rows = torch.arange(h, device=first.device).repeat_interleave(w)
    cols = torch.arange(w, device=first.device).repeat(h)
    b, n = first.shape[0], h * w
    return torch.stack([first[:, None].expand(b, n), rows.expand(b, n), cols.expand(b, n)], dim=-1)


def caption_ids(length: int, start: int, device: torch.device) -> Tensor:
    """(length, 3) positions (start + j, 0, 0) of caption slot j."""
    ids = torch.zeros(length, 3, dtype=torch.long, device=device)
    ids[:, 0] = torch.arange(start, start + length, device=device)
    return ids


def cat_freqs(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate two token runs' (cos, sin) along tokens; shared (N, d) frequencies broadcast to batch."""
    batch = max(f.shape[0] for f in (*a, *b) if f.dim() == 3)

    def grow(f: Tensor) -> Tensor:
        return f.expand(batch, *f.shape) if f.dim() == 2 else f

    cos, sin = (torch.cat([grow(fa), grow(fb)], dim=1) for fa, fb in zip(a, b))
    return cos, sin


#################################################################################
#                       Constructor and input checks                            #
#################################################################################


def check_config(
    hidden_size: int, num_heads: int, num_refiner_layers: int, axes_dim: Sequence[int], norm_eps: float,
    **positive: int,
) -> tuple[int, ...]:
    """Every width and count (``hidden_size``, ``num_heads``, ``**positive`` >= 1, ``num_refiner_layers`` >= 0),
    heads dividing the width, ``axes_dim`` 3 RoPE widths summing to the head width, ``norm_eps`` > 0.
    Returns ``axes_dim`` as a tuple."""
    for name, v in (("hidden_size", hidden_size), ("num_heads", num_heads), *positive.items()):
        check_int(v, name)
    check_int(num_refiner_layers, "num_refiner_layers", minimum=0)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    axes_dim = tuple(axes_dim)
    if len(axes_dim) != 3 or sum(axes_dim) != hidden_size // num_heads:
        raise ValueError(
            f"axes_dim must be 3 RoPE widths (caption, row, column) summing to the head width "
            f"hidden_size // num_heads = {hidden_size // num_heads}, got {axes_dim}"
        )
    if not norm_eps > 0:
        raise ValueError(f"norm_eps must be > 0, got {norm_eps!r}")
    return axes_dim


def check_inputs(
    model: nn.Module,
    system: str,
    x: object,
    t: object,
    context: object,
    pooled: object,
    context_mask: object,
    guidance: object,
) -> tuple[Tensor, Tensor | None]:
    """Every argument against the calling convention; returns t as (B,) and the mask (None: all kept).

    ``model`` has ``patch_size``, ``in_channels``, ``context_dim`` and an ``x_embedder`` Linear.
    """
    for name, value in (("pooled", pooled), ("guidance", guidance)):
        if value is not None:
            raise ValueError(f"{name} must be None: {system} takes no {name} input")
    p, c = model.patch_size, model.in_channels
    check_tensor(x, "x")
    if x.dim() != 4 or x.shape[1] != c or x.shape[2] % p or x.shape[3] % p or 0 in x.shape[2:]:
        raise ValueError(f"x must have shape (B, {c}, H, W) with H and W multiples of {p}, got {tuple(x.shape)}")
    b = x.shape[0]
    weight = model.x_embedder.weight
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}")
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(
            f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast one to the other, "
            "or call the model under torch.autocast"
        )
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), device=x.device)
    if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t must be a real torch.Tensor of shape (B,) or a number, got {type(t).__name__}")
    if t.dim() == 0:
        t = t.expand(b)
    if tuple(t.shape) != (b,):
        raise ValueError(f"t must have shape (B,) = ({b},) or be a scalar, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device} but x is on {x.device}")
    width = model.context_dim
    if context is None:
        raise ValueError(f"context is required: the caption features, shape (B, L, {width}) with B = {b}")
    check_tensor(context, "context")
    if context.dim() != 3 or context.shape[0] != b or context.shape[2] != width or context.shape[1] < 1:
        raise ValueError(
            f"context must have shape (B, L, context_dim) = ({b}, L, {width}) with L >= 1, got {tuple(context.shape)}"
        )
    if context.device != x.device:
        raise ValueError(f"context is on {context.device} but x is on {x.device}")
    if context_mask is None:
        return t, None
    if not isinstance(context_mask, Tensor) or context_mask.dtype != torch.bool:
        got = context_mask.dtype if isinstance(context_mask, Tensor) else type(context_mask).__name__
        raise TypeError(f"context_mask must be a bool tensor (True = keep the token), got {got}")
    if tuple(context_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(
            f"context_mask must have shape (B, L) = {tuple(context.shape[:2])} to match context, "
            f"got {tuple(context_mask.shape)}"
        )
    if context_mask.device != x.device:
        raise ValueError(f"context_mask is on {context_mask.device} but x is on {x.device}")
    return t, context_mask
