"""The training loop and its components (optimizer, step, checkpoints, distributed, metrics)."""
