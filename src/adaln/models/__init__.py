"""adaln.models."""

from adaln.models.dit import from_diffusers

__all__ = ["from_diffusers"]
