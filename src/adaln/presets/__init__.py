"""Training presets: YAML files, each naming its task (read by adaln.engine.config)."""
