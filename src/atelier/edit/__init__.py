"""Local text-guided editing: inversions, masks from the model, and the methods that combine them.

    Editor(pipe).edit(image, source, target, EditSettings(method="auto"))  -> EditResult
    METHODS: name -> edit(pipe, image, source, target, seed) for evaluation runners

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "Editor": "atelier.edit.methods",
    "EditSettings": "atelier.edit.methods",
    "EditResult": "atelier.edit.methods",
    "METHOD_NAMES": "atelier.edit.methods",
    "METHODS": "atelier.edit.registry",
    "Denoiser": "atelier.core.denoiser",
    "CrossAttentionStore": "atelier.edit.masks",
    "estimate_masks": "atelier.edit.masks",
    "ddpm_noise_maps": "atelier.edit.inversion",
    "ddim_invert": "atelier.edit.inversion",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
