"""Pieces shared by the Next-DiT family (Lumina 2's ``Lumina2``, Z-Image's ``ZImage``): patches, caption
compaction, 3-axis RoPE positions, and the checks of their constructors and of their calling convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from adaln.checks import check_int
from adaln.models._inputs import (
    check_features,
    check_latents,
    check_per_sample,
    check_placement,
    check_token_mask,
    check_unused,
)


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
    check_unused(system, pooled=pooled, guidance=guidance)
    b, _, _ = check_latents(x, model.in_channels, model.patch_size)
    t = check_per_sample(t, "t", b, x.device)
    context = check_features(context, "context", b, model.context_dim, tokens=True)
    context_mask = check_token_mask(context_mask, context)
    check_placement(model.x_embedder.weight, x, t=t, context=context, context_mask=context_mask)
    return t, context_mask
