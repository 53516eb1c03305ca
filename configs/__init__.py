"""ml_collections training configs: `--config=configs/<name>.py`, fields overridable with `--config.x=y`."""
