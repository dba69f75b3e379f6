"""Image generation with A1111-compatible metadata: `generate(pipe, GenerationRequest(...))`.

    from atelier.models import load_pipeline
    from atelier.generate import GenerationRequest, generate, save_png

    pipe = load_pipeline("toyworld")
    for image in generate(pipe, GenerationRequest("a large red circle in the center", seed=1, n_images=4)):
        save_png(image.image, f"{image.seed}.png", image.parameters)

Names are imported on first use, so that `atelier --help` (which imports this package's `cli`)
does not pay for torch and diffusers.
"""

import importlib

_EXPORTS = {
    "format_parameters": "atelier.generate.metadata",
    "image_parameters": "atelier.generate.metadata",
    "open_image": "atelier.generate.metadata",
    "parse_parameters": "atelier.generate.metadata",
    "read_parameters": "atelier.generate.metadata",
    "save_png": "atelier.generate.metadata",
    "GenerationRequest": "atelier.generate.request",
    "request_from_parameters": "atelier.generate.request",
    "resolve_request": "atelier.generate.request",
    "GeneratedImage": "atelier.generate.run",
    "generate": "atelier.generate.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atelier.generate' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
