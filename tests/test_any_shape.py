"""Streaming and generation on non-square sizes (issue 11): every family at 48x32, 40x64 and a 4:3
size; frames of any size (also not multiples of 8) come out at the stream's size; a size a model
cannot take is one clear line."""

import numpy as np
import pytest
from PIL import Image

from atelier.errors import UserError
from atelier.generate import GenerationRequest, generate
from atelier.stream import StreamEngine
from atelier.testing.tiny import tiny_pipeline

SIZES = [(48, 32), (40, 64), (64, 48)]  # width x height; 64x48 is 4:3


@pytest.fixture(scope="module")
def pipes():
    from atelier.models import load_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_pipeline(family) if family.startswith("toyworld") else tiny_pipeline(family)
        return cache[family]

    return get


def _frame(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "toyworld-turbo"])
@pytest.mark.parametrize("width,height", SIZES)
def test_stream_runs_at_non_square_sizes(pipes, family, width, height):
    pipe = pipes(family)
    engine = StreamEngine(pipe, width=width, height=height)
    engine.prepare(prompt="a large red circle in the center", seed=1)
    outputs = [engine(_frame(width, height, seed)) for seed in range(3)]
    for out in outputs:
        assert out.size == (width, height)
        assert np.isfinite(np.asarray(out, dtype=np.float32)).all()
    assert engine.txt2img().size == (width, height)


@pytest.mark.parametrize("frame_size", [(50, 30), (37, 45), (640, 480)])
def test_stream_takes_frames_of_any_size(pipes, frame_size):
    engine = StreamEngine(pipes("sd1"), width=48, height=32)
    engine.prepare(prompt="a large red circle in the center", seed=1)
    assert engine(_frame(*frame_size)).size == (48, 32)


def test_stream_size_the_model_cannot_take_is_one_clear_line(pipes):
    with pytest.raises(UserError, match="multiple of 8"):
        StreamEngine(pipes("sd1"), width=44, height=32)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "toyworld"])
@pytest.mark.parametrize("width,height", SIZES)
def test_generation_at_non_square_sizes(pipes, family, width, height):
    request = GenerationRequest("a large red circle in the center", steps=2, seed=3, width=width, height=height,
                                sampler="Euler")
    image = generate(pipes(family), request, progress=False)[0]
    assert image.image.size == (width, height)
    assert f"Size: {width}x{height}" in image.parameters


def test_img2img_from_a_non_square_init_image(pipes):
    request = GenerationRequest("a large red circle in the center", steps=2, seed=3, sampler="Euler",
                                init_image=_frame(48, 32), strength=0.5)
    image = generate(pipes("sd1"), request, progress=False)[0]
    assert image.image.size == (48, 32)


def test_generation_size_the_model_cannot_take_is_one_clear_line(pipes):
    with pytest.raises(UserError, match="multiple of 8"):
        generate(pipes("sd1"), GenerationRequest("x", steps=1, seed=1, width=44, height=32), progress=False)
