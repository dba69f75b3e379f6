"""Bundled diffusers configs (JSON, no weights) for loading single-file checkpoints offline."""
