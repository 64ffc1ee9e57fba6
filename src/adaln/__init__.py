"""adaln: Adaptive-LayerNorm conditioned diffusion transformers in PyTorch."""

__version__ = "0.1.0"
