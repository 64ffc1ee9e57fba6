"""The one door to the converted systems: ``from_diffusers`` for any supported diffusers transformer, and
the wrappers that make a converted model the callable the samplers take.

A converted model (MMDiT, Flux, Lumina 2, Z-Image, PixArt-alpha) is called ``model(x, t, context=None,
pooled=None, context_mask=None, guidance=None)`` with ``t`` exactly what its diffusers transformer receives;
it carries ``flow_timestep(sigma)`` (the ``t`` its pipeline passes at flow level sigma) and
``velocity_sign`` (+1 when it predicts ``noise - data``, -1 for ``data - noise``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

from adaln.checks import check_tensor

DIFFUSERS_CLASSES = {
    "DiTTransformer2DModel": "adaln.models.dit",
    "SD3Transformer2DModel": "adaln.models.mmdit",
    "FluxTransformer2DModel": "adaln.models.flux",
    "Lumina2Transformer2DModel": "adaln.models.lumina2",
    "ZImageTransformer2DModel": "adaln.models.zimage",
    "PixArtTransformer2DModel": "adaln.models.pixart",
}


def from_diffusers(model: nn.Module) -> nn.Module:
    """Our model with a diffusers transformer's config and weights (see each module's ``from_diffusers``)."""
    name = type(model).__name__
    if name not in DIFFUSERS_CLASSES:
        raise TypeError(f"from_diffusers converts {', '.join(DIFFUSERS_CLASSES)}; got {name}")
    return importlib.import_module(DIFFUSERS_CLASSES[name]).from_diffusers(model)


def is_system(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a DDP/FSDP wrapper holds) follows the converted-model convention."""
    inner = getattr(model, "module", model)
    return hasattr(inner, "flow_timestep") and hasattr(inner, "velocity_sign")


class SystemVelocity:
    """``v(x, sigma, **cond) = velocity_sign * model(x, model.flow_timestep(sigma), **cond)``: a converted
    model (or our own trained in its convention) as a flow velocity ``noise - data``. ``model`` may be a
    DDP/FSDP wrapper; the convention is read from the module it holds."""

    def __init__(self, model: nn.Module) -> None:
        if not is_system(model):
            raise TypeError(f"{type(model).__name__} has no flow_timestep / velocity_sign: not a converted system")
        self.model, self.inner = model, getattr(model, "module", model)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        check_tensor(x, "x", min_dim=4)
        out = self.model(x, self.inner.flow_timestep(sigma), **cond)
        return out if self.inner.velocity_sign == 1.0 else -out
