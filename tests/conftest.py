"""Fixtures shared by the CLI test modules."""

import pytest


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny SD 1.x pipeline saved as a diffusers folder, for commands that take --model."""
    from atelier.testing import save_tiny_pipeline, tiny_pipeline

    return str(save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1"))


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """`kill_after_checkpoint(step, loop=None)`: from then on every TrainLoop raises KeyboardInterrupt
    right after writing the checkpoint of `step` (only the loop named `loop`, if given), as a run killed
    there; `kill_after_checkpoint(None)` puts the real save back."""
    from atelier.train.loop import TrainLoop

    real_save = TrainLoop.save

    def arm(step, loop=None):
        if step is None:
            monkeypatch.setattr(TrainLoop, "save", real_save)
            return

        def save_then_die(self):
            real_save(self)
            if self.step == step and (loop is None or self.name == loop):
                raise KeyboardInterrupt  # as if killed right after this checkpoint

        monkeypatch.setattr(TrainLoop, "save", save_then_die)

    return arm


@pytest.fixture(scope="module")
def turbo():
    """toyworld-turbo on the CPU, one per test module (a module's tests may change it)."""
    from atelier.models import load_pipeline

    return load_pipeline("toyworld-turbo", device="cpu")
