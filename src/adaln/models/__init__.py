"""adaln.models: DiT (fb and diffusers settings), ConditionalDiT, the Hyena ResidualDenoiser, SD3/SD3.5's MMDiT,
Flux, Lumina 2, Z-Image, PixArt-alpha, the conformer denoiser and AlphaFold 3's diffusion module (af3/);
``from_diffusers`` converts any supported diffusers transformer, ``SystemVelocity`` makes a converted model a
flow velocity for the samplers."""

from adaln.models.systems import DIFFUSERS_CLASSES, SystemVelocity, from_diffusers, is_system

__all__ = ["DIFFUSERS_CLASSES", "SystemVelocity", "from_diffusers", "is_system"]
