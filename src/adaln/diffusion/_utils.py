"""Shared checks and per-sample random draws for the diffusion package.

A ``generator`` argument is ``None`` (global RNG), one ``torch.Generator`` for the whole batch, or a
list with one generator per sample. With a list, sample ``i`` draws only from generator ``i``
(``torch.randn(shape[1:], generator=g_i)``), so a seed gives the same sample in a batch of 1 or 64.
Draws happen on the generator's device and are then moved, so a CPU generator reproduces on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]

from adaln.checks import check_values


def check_shape(shape: object, name: str = "shape", min_dim: int = 2) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with at least ``min_dim`` entries, else a clear error."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(type(s) is int for s in shape):
        raise TypeError(f"{name} must be a tuple of ints (B, ...), got {shape!r}")
    if len(shape) < min_dim or any(s < 1 for s in shape):
        raise ValueError(f"{name} must have at least {min_dim} positive dims (B, ...), got {tuple(shape)}")
    return tuple(shape)


def check_steps(steps: object, name: str = "steps") -> int:
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"{name} must be an int >= 1, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")
    return steps


def check_generator(generator: GeneratorArg, batch: int) -> GeneratorArg:
    """Validate a generator argument against batch size ``batch``; lists must have one per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator list must contain only torch.Generator objects")
        if len(generator) != batch:
            raise ValueError(
                f"generator list must have one generator per sample: got {len(generator)}, batch {batch}"
            )
        return generator
    raise TypeError(
        f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}"
    )


def randn(
    shape: tuple[int, ...],
    generator: GeneratorArg,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal ``(B, ...)``; with a generator list, row ``i`` comes from generator ``i`` only."""
    return _draw(torch.randn, shape, generator, dtype, device)


def rand(
    shape: tuple[int, ...],
    generator: GeneratorArg,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform [0, 1) ``(B, ...)``, drawn per sample as :func:`randn`."""
    return _draw(torch.rand, shape, generator, dtype, device)


def _draw(fn, shape: tuple[int, ...], generator: GeneratorArg, dtype: torch.dtype,
          device: torch.device | str | None) -> Tensor:
    if generator is None:
        return fn(shape, dtype=dtype, device=device)
    if isinstance(generator, torch.Generator):
        return fn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.stack([fn(shape[1:], generator=g, dtype=dtype, device=g.device).to(device) for g in generator])


def check_nonnegative(value: float, name: str) -> float:
    """``value`` as a float when finite and >= 0 (inf and nan would turn every level into NaN)."""
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def check_positive(value: float, name: str) -> float:
    """``value`` as a float when finite and > 0."""
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def as_sigma(sigma: float | Tensor, batch: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A noise level as a ``(B,)`` tensor of ``dtype``; floats and 0-dim tensors broadcast to the batch.

    Negative, infinite and NaN values raise ``ValueError`` (one host sync per call; skipped while
    compiling).
    """
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        check_nonnegative(float(sigma), "sigma")
        return torch.full((batch,), float(sigma), dtype=dtype, device=device)
    if not isinstance(sigma, Tensor):
        raise TypeError(f"sigma must be a float or a (B,) tensor, got {type(sigma).__name__}")
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(
            f"sigma must be a float or a (B,) = ({batch},) tensor, got shape {tuple(sigma.shape)}"
        )
    sigma = sigma.to(dtype=dtype, device=device)
    if check_values() and not bool(((sigma >= 0) & (sigma < math.inf)).all()):
        raise ValueError("sigma must be finite and >= 0 everywhere")
    return sigma



def expand_to(v: Tensor, x: Tensor) -> Tensor:
    """View a per-sample ``(B,)`` tensor as ``(B, 1, ..., 1)`` to broadcast over ``x``'s non-batch dims."""
    return v.view(v.shape[0], *([1] * (x.dim() - 1)))
