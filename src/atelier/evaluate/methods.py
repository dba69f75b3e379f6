"""Editing methods the benchmark can run, by name.

A method is a callable `edit(pipe, image, source_prompt, target_prompt, seed) -> PIL.Image`.
Built in here: "reconstruct" (returns the input: the upper bound on preservation) and "img2img"
(the model's img2img at strength 0.6 with the target prompt). The methods of `atelier.edit`
(its `METHODS` dict, when that module exists) are looked up lazily and join these; a name they
share with a built-in replaces it.

A method that does not use the pipeline may say so with a `needs_pipe = False` attribute; the
runner then does not ask for a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from atelier.errors import UserError

IMG2IMG_STRENGTH = 0.6


def reconstruct(pipe, image, source_prompt: str, target_prompt: str, seed: int):
    """No edit at all: the source image itself."""
    return image.copy()


reconstruct.needs_pipe = False


def img2img(pipe, image, source_prompt: str, target_prompt: str, seed: int):
    """SDEdit-style: noise the image to strength 0.6 and denoise it towards the target prompt, with
    the model's default steps and CFG."""
    import torch

    from atelier.models import detect_family, to_img2img

    working = getattr(pipe, "_atelier_eval_img2img", None)
    if working is None:
        working = to_img2img(pipe)
        pipe._atelier_eval_img2img = working
    family = detect_family(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    out = working(
        prompt=target_prompt,
        image=image.convert("RGB"),
        strength=IMG2IMG_STRENGTH,
        num_inference_steps=family.steps,
        guidance_scale=family.guidance_scale,
        generator=generator,
    )
    return out.images[0]


BUILTIN_METHODS: dict[str, Callable] = {"reconstruct": reconstruct, "img2img": img2img}


def _edit_methods() -> dict[str, Callable]:
    """`atelier.edit.METHODS` if that module exists (an error inside it is not hidden)."""
    try:
        module = importlib.import_module("atelier.edit")
    except ModuleNotFoundError as exc:
        if exc.name in ("atelier.edit", "atelier"):
            return {}
        raise
    return dict(getattr(module, "METHODS", {}) or {})


def available_methods() -> dict[str, Callable]:
    return {**BUILTIN_METHODS, **_edit_methods()}


def get_method(name: str) -> Callable:
    methods = available_methods()
    if name not in methods:
        raise UserError(f"unknown editing method {name!r}; known methods: {', '.join(sorted(methods))}")
    return methods[name]


def needs_pipe(method: Callable) -> bool:
    return bool(getattr(method, "needs_pipe", True))
