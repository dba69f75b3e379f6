"""Image generation with A1111-compatible metadata: `generate(pipe, GenerationRequest(...))`.

    from atelier.models import load_pipeline
    from atelier.generate import GenerationRequest, generate, save_png

    pipe = load_pipeline("toyworld")
    for image in generate(pipe, GenerationRequest("a large red circle in the center", seed=1, n_images=4)):
        save_png(image.image, f"{image.seed}.png", image.parameters)

`GenerationRequest(..., hires=HiresFix(...))` adds A1111's hires fix; `networks=NetworkSources(lora_dir=...,
embeddings_dir=...)` finds the files of `<lora:name:w>` tags and embedding names; `comfyui_parameters` reads
the settings of ComfyUI PNGs in A1111's form.

Names are imported on first use, so that `atelier --help` (which imports this package's `cli`)
does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "format_parameters": "atelier.generate.metadata",
    "image_parameters": "atelier.generate.metadata",
    "open_image": "atelier.generate.metadata",
    "parse_parameters": "atelier.generate.metadata",
    "read_parameters": "atelier.generate.metadata",
    "save_png": "atelier.generate.metadata",
    "HiresFix": "atelier.generate.hires",
    "comfyui_parameters": "atelier.generate.comfyui",
    "GenerationRequest": "atelier.generate.request",
    "NetworkSources": "atelier.generate.request",
    "request_from_parameters": "atelier.generate.request",
    "resolve_request": "atelier.generate.request",
    "GeneratedImage": "atelier.generate.run",
    "generate": "atelier.generate.run",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
