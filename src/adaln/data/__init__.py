"""adaln.data."""
