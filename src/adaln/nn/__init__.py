"""adaln.nn."""
