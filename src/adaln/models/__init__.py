"""adaln.models."""
