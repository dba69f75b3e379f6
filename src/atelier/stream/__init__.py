"""Real-time img2img and txt2img for video frames, StreamDiffusion-style.

    StreamEngine     stream batch over every denoising stage, residual CFG, similarity filter,
                     cached prompt embeddings and fixed noise; every setting live-updatable
    stream_math      the per-stage arithmetic as small pure functions
    frames           PIL / uint8 array / [-1, 1] tensor frames in and out
    image_prompt     the reference image (IP-Adapter) every UNet call of the stream batch gets

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "StreamEngine": "atelier.stream.engine",
    "SimilarityFilter": "atelier.stream.similarity",
    "strength_to_t_indices": "atelier.stream.stream_math",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
