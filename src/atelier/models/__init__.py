"""Model loading: diffusers folders, single-file checkpoints, hub ids and built-in models."""
