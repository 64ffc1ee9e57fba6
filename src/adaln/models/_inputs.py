"""Argument checks at the public boundary of the converted systems (MMDiT, Flux, PixArt-alpha, Lumina 2,
Z-Image), all called ``model(x, t, context=, pooled=, context_mask=, guidance=)``.

Each function checks one kind of argument and raises an error that names it and the expected shape, so a
bad call never reaches a matmul. ``check_placement`` runs last: device and dtype against the parameters.
``ConditionalDiT`` checks its token mask with ``check_token_mask`` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaln.checks import check_tensor


def check_latents(x: object, channels: int, patch_size: int) -> tuple[int, int, int]:
    """x (B, channels, H, W) floating, H and W positive multiples of ``patch_size`` -> (B, H / p, W / p)."""
    check_tensor(x, "x")
    p = patch_size
    if x.dim() != 4 or x.shape[1] != channels or any(s % p or s == 0 for s in x.shape[2:]):
        raise ValueError(
            f"x must have shape (B, {channels}, H, W) with H and W positive multiples of patch_size {p}, "
            f"got {tuple(x.shape)}"
        )
    return x.shape[0], x.shape[2] // p, x.shape[3] // p


def check_per_sample(value: object, name: str, batch: int, device: torch.device) -> Tensor:
    """A number, a 0-dim tensor (broadcast) or a (B,) real tensor -> (B,); a number lands on ``device``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value), device=device)
    if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real torch.Tensor of shape (B,) or a number, got {type(value).__name__}")
    if value.dim() == 0:
        value = value.expand(batch)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},) or be a scalar, got {tuple(value.shape)}")
    return value


def check_unused(system: str, reason: str = "", **arguments: object) -> None:
    """``ValueError`` for the first argument given that ``system`` does not take."""
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{name} must be None: {system} takes no {name} input{reason}")


def check_features(value: object, name: str, batch: int, width: int, *, tokens: bool, min_length: int = 1) -> Tensor:
    """A required conditioning tensor: (B, L, width) with L >= ``min_length`` when ``tokens``, else (B, width).
    ``min_length=0`` where an empty sequence is valid (joint attention always has the image's keys)."""
    shape = f"(B, L, {width})" if tokens else f"(B, {width})"
    if value is None:
        raise ValueError(f"{name} is required: expected shape {shape} with B = {batch}")
    check_tensor(value, name)
    dims = 3 if tokens else 2
    short = tokens and value.dim() == 3 and value.shape[1] < min_length
    if value.dim() != dims or value.shape[0] != batch or value.shape[-1] != width or short:
        lengths = f" and L >= {min_length}" if tokens and min_length else ""
        raise ValueError(f"{name} must have shape {shape} with B = {batch}{lengths}, got {tuple(value.shape)}")
    return value


def check_token_mask(
    mask: object, context: Tensor, name: str = "context_mask", context_name: str = "context"
) -> Tensor | None:
    """None (every token kept) or a (B, L) bool tensor matching ``context`` (True = keep the token)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True = keep the token), got {got}")
    if tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(
            f"{name} must have shape (B, L) = {tuple(context.shape[:2])} to match {context_name} "
            f"{tuple(context.shape)}, got {tuple(mask.shape)}"
        )
    return mask


def check_placement(weight: Tensor, x: Tensor, **tensors: Tensor | None) -> None:
    """Every given tensor on the parameters' device; x in their dtype unless autocast is on."""
    for name, value in {"x": x, **tensors}.items():
        if value is not None and value.device != weight.device:
            raise ValueError(f"{name} is on {value.device} but the model's parameters are on {weight.device}")
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(
            f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast one to the other, "
            "or call the model under torch.autocast"
        )
