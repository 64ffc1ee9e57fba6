"""adaln.diffusion."""
