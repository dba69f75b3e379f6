"""A1111's hires fix: txt2img at the base size, then the picture is upscaled and redrawn by an img2img
pass at the "Denoising strength" (A1111 modules/processing.py, StableDiffusionProcessingTxt2Img).

The upscale follows A1111's `sample_hr_pass`: the "Latent" upscalers interpolate the first pass's
latents with `torch.nn.functional.interpolate` (the modes of A1111's `latent_upscale_modes`);
"Lanczos", "Nearest" and "None" resize the decoded pixels with PIL, as A1111's `resize_image`
does, and the img2img pass encodes them again. Upscaler models (ESRGAN, SwinIR, LDSR, ...) are not
available. The hires pass runs exactly `Hires steps` steps (the first pass's count when 0) at the
end of a schedule of int(steps / strength) steps, as A1111's `setup_img2img_steps` does when it is
given the steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from atelier.core.facts import MAX_IMAGE_SIDE
from atelier.errors import UserError

# A1111 shared.latent_upscale_modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
MAX_HIRES_SCALE = 4.0  # A1111's "Upscale by" slider
# Infotext fields of A1111 hires-fix options atelier's hires pass does not take.
UNSUPPORTED_FIELDS = {
    "Hires prompt": "a separate hires prompt",
    "Hires negative prompt": "a separate hires negative prompt",
    "Hires checkpoint": "a separate hires checkpoint",
    "Hires sampler": "a separate hires sampler",
    "Hires schedule type": "a separate hires schedule type",
    "Hires CFG Scale": "a separate hires CFG scale",
}
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class HiresTarget:
    """Where the first pass is upscaled to, and how much is cropped off afterwards (latent units per
    side, A1111's truncate_x / truncate_y) to reach the final size."""

    upscale_width: int
    upscale_height: int
    crop_x: int
    crop_y: int
    width: int  # the final image
    height: int


@dataclass(frozen=True)
class HiresFix:
    upscaler: str = "Latent"
    scale: float = 2.0  # "Hires upscale"; ignored when a resize is given
    resize_x: int = 0  # "Hires resize": a target size instead (0 = follow the aspect ratio)
    resize_y: int = 0
    steps: int = 0  # "Hires steps"; 0 = as many as the first pass

    @property
    def is_latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS

    @property
    def resizes(self) -> bool:
        return bool(self.resize_x or self.resize_y)

    def validate(self, first_steps: int | None, strength: float) -> None:
        from atelier.generate.request import MAX_STEPS

        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in PIXEL_UPSCALERS:
            raise UserError(
                f"hires upscaler {self.upscaler!r} is not supported (upscaler models such as ESRGAN are not "
                f"available); choose one of: {', '.join([*LATENT_UPSCALERS, *PIXEL_UPSCALERS])}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or not 1.0 <= self.scale <= MAX_HIRES_SCALE:
            raise UserError(f"hires upscale must be in [1, {MAX_HIRES_SCALE:g}], not {self.scale}")
        for name, value in (("hires resize width", self.resize_x), ("hires resize height", self.resize_y)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_IMAGE_SIDE:
                raise UserError(f"{name} must be between 0 and {MAX_IMAGE_SIDE}, not {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 0 <= self.steps <= MAX_STEPS:
            raise UserError(f"hires steps must be between 0 (as the first pass) and {MAX_STEPS}, not {self.steps!r}")
        if first_steps is not None:
            _, total, _ = self.schedule(first_steps, strength)
            if total > MAX_STEPS:
                raise UserError(
                    f"the hires pass at denoising strength {strength} needs a schedule of {total} steps, more "
                    f"than {MAX_STEPS}; raise the strength or lower the hires steps"
                )

    def schedule(self, first_steps: int, strength: float) -> tuple[int, int, float]:
        """(steps run, schedule length, the img2img strength that makes diffusers start where A1111 does).

        diffusers' img2img runs int(length * strength) steps; A1111 runs `steps` of a schedule of
        int(steps / strength); a strength of (steps + 1/2) / length makes the two agree exactly."""
        run = self.steps or first_steps
        total = max(run, int(run / min(strength, 0.999)))
        return run, total, min(1.0, (run + 0.5) / total)

    def target(self, width: int, height: int, step: int, factor: int) -> HiresTarget:
        """The hires size for a first pass of `width` x `height` (A1111's calculate_target_resolution),
        on a model whose sizes are multiples of `step` and whose latents are `factor` times smaller."""
        crop_x = crop_y = 0
        rx, ry = self.resize_x, self.resize_y
        if not self.resizes:
            up_w, up_h = int(width * self.scale), int(height * self.scale)
        elif ry == 0:
            up_w, up_h = rx, rx * height // width
        elif rx == 0:
            up_w, up_h = ry * width // height, ry
        else:
            if width / height < rx / ry:
                up_w, up_h = rx, rx * height // width
            else:
                up_w, up_h = ry * width // height, ry
        up_w, up_h = max(step, up_w // step * step), max(step, up_h // step * step)
        if rx and ry:
            crop_x, crop_y = max(0, (up_w - rx) // factor), max(0, (up_h - ry) // factor)
        final_w, final_h = up_w - crop_x * factor, up_h - crop_y * factor
        for name, value in (("width", final_w), ("height", final_h)):
            if value > MAX_IMAGE_SIDE:
                raise UserError(f"the hires fix makes the {name} {value}, larger than the limit of {MAX_IMAGE_SIDE}")
            if value % step:
                raise UserError(f"the hires resize makes the {name} {value}, not a multiple of {step} for this model")
        return HiresTarget(up_w, up_h, crop_x, crop_y, final_w, final_h)


def hires_from_parameters(params: dict[str, str], *, source: str = "the image") -> HiresFix | None:
    """The hires fix recorded in a parsed infotext, or None. A1111's reader splits a `WxH` value
    into `-1` / `-2` keys; both spellings are read."""
    resize = params.get("Hires resize")
    if resize is None and ("Hires resize-1" in params or "Hires resize-2" in params):
        resize = f"{params.get('Hires resize-1', 0)}x{params.get('Hires resize-2', 0)}"
    if not ({"Hires upscale", "Hires upscaler", "Hires steps"} & params.keys()) and resize is None:
        return None
    for key, what in UNSUPPORTED_FIELDS.items():
        if key in params:
            raise UserError(f"{source}: the hires fix with {what} ({key}: {params[key]}) is not supported")

    def number(key, kind, default):
        try:
            return kind(params[key]) if key in params else default
        except ValueError:
            raise UserError(f"{source}: cannot read {key}: {params[key]!r}") from None

    resize_x = resize_y = 0
    if resize is not None:
        match = _SIZE.match(resize)
        if not match:
            raise UserError(f"{source}: cannot read Hires resize: {resize!r}")
        resize_x, resize_y = int(match.group(1)), int(match.group(2))
    return HiresFix(
        upscaler=params.get("Hires upscaler") or "Latent",
        scale=number("Hires upscale", float, 2.0),
        resize_x=resize_x,
        resize_y=resize_y,
        steps=number("Hires steps", int, 0),
    )


def upscale_latents(latents, target: HiresTarget, upscaler: str, factor: int):
    """Interpolate first-pass latents to the hires size and crop them (A1111's latent path)."""
    import torch

    mode, antialias = LATENT_UPSCALERS[upscaler]
    size = (target.upscale_height // factor, target.upscale_width // factor)
    out = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)
    cx, cy = target.crop_x, target.crop_y
    out = out[:, :, cy // 2: out.shape[2] - (cy + 1) // 2, cx // 2: out.shape[3] - (cx + 1) // 2]
    return out.to(latents.dtype)


def upscale_image(image, target: HiresTarget, upscaler: str, factor: int):
    """Resize a first-pass picture to the hires size (A1111's resize_image with an upscaler), then crop
    it where A1111 crops the latents."""
    from PIL import Image

    size = (target.upscale_width, target.upscale_height)
    if upscaler != "None":
        scale = max(size[0] / image.width, size[1] / image.height)
        method = Image.NEAREST if upscaler == "Nearest" else Image.LANCZOS
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=method)
    if image.size != size:
        image = image.resize(size, resample=Image.LANCZOS)
    cx, cy = target.crop_x, target.crop_y
    if cx or cy:
        left, top = cx // 2 * factor, cy // 2 * factor
        image = image.crop((left, top, left + target.width, top + target.height))
    return image
