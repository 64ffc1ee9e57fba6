"""adaln.models: DiT (fb and diffusers settings), ConditionalDiT, the Hyena ResidualDenoiser, the conformer
denoiser and AlphaFold 3's diffusion module (af3/); ``from_diffusers`` converts a diffusers transformer."""

from adaln.models.dit import from_diffusers

__all__ = ["from_diffusers"]
