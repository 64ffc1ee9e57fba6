"""adaln.train."""
