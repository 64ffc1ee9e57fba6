"""Training presets (YAML files read by adaln.train.config)."""
