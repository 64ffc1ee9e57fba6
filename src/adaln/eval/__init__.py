"""adaln.eval."""
