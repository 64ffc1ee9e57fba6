"""adaln.models.af3."""
