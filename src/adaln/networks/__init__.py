"""adaln.networks."""
