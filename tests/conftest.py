"""Fixtures shared by the CLI test modules."""

import pytest


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny SD 1.x pipeline saved as a diffusers folder, for commands that take --model."""
    from atelier.testing import save_tiny_pipeline, tiny_pipeline

    return str(save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1"))
