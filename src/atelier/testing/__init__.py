"""Helpers for tests and benchmarks: tiny, seeded diffusers pipelines built from small configs."""

from atelier.testing.tiny import (
    TINY_FAMILIES,
    TINY_WORDS,
    save_single_file,
    save_tiny_pipeline,
    tiny_components,
    tiny_pipeline,
    tiny_safety_checker,
    tiny_scheduler,
)

__all__ = [
    "TINY_FAMILIES",
    "TINY_WORDS",
    "save_single_file",
    "save_tiny_pipeline",
    "tiny_components",
    "tiny_pipeline",
    "tiny_safety_checker",
    "tiny_scheduler",
]
