"""Text-guided local editing: source prompt + target prompt -> an image where only the region the
prompts disagree about changes.

    ddpm      edit-friendly DDPM inversion (exact reconstruction by construction), replayed under the
              target prompt with CFG; the mask keeps the inverted latents outside it (LEDITS++-like)
    diffedit  DiffEdit: DDIM inversion under the source prompt, DDIM sampling under the target,
              latents outside the mask taken from the inversion
    turbo     TurboEdit-style for few-step models: DDPM noise maps over 2-4 trailing timesteps,
              pseudo-guidance (target vs source prediction instead of target vs empty); the
              default scale 1 (the target prediction alone, from t = 999) suits toyworld-turbo
    img2img   plain img2img with the target prompt: StreamDiffusion's behaviour, a baseline
    one-step  SwiftEdit (one_step.py): a learned inverter maps the image to the one-step generator's
              noise, the mask comes from the inverter's noise under the two prompts, and one
              generator call with mask-rescaled cross-attention makes the edit; with an IP-Adapter
              (the image branch) the source image is also the generator's image prompt
Masks: "noise" (DiffEdit's noise difference), "attention" (changed words' cross-attention) or "both"
(their intersection, as LEDITS++ intersects its two masks). Outside the mask the source pixels are
pasted back, so the background is exactly the input.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from atelier.core.denoiser import Denoiser
from atelier.core.images import pixels_from_image
from atelier.edit.inversion import ddim_invert, ddim_step, ddpm_noise_maps, ddpm_step, edit_timesteps
from atelier.edit.masks import binary_mask, estimate_masks, pixel_mask, strongest_regions
from atelier.errors import UserError

METHOD_NAMES = ("ddpm", "diffedit", "turbo", "img2img", "one-step")
MASK_SOURCES = ("auto", "noise", "attention", "both", "none")
OUTSIDE_PROMPTS = ("target", "source")


@dataclass
class EditSettings:
    method: str = "auto"
    steps: int | None = None  # default: 25, or 4 for turbo
    strength: float | None = None  # share of the schedule re-run; default per method
    guidance_scale: float | None = None  # default: the model's CFG (turbo: pseudo-guidance 1, i.e. none)
    mask_from: str = "auto"  # noise, attention, both, none; auto: one-step "both", the others "noise"
    mask_threshold: float | None = None  # default: one-step 0.6, the others 0.5
    mask_dilate: int = 1
    mask_regions: int = 0  # keep the mask's N strongest connected regions (0: all; 1: the edit is one object)
    mask_t: int = 500  # timestep at which the mask is estimated
    mask_samples: int = 4
    paste_back: bool = True
    seed: int = 0
    inverter: str | None = None  # one-step: an inverter folder or built-in name (default: the model's)
    edit_scale: float = 1.0  # one-step: cross-attention to the target prompt inside the mask, times this
    keep_scale: float = 1.0  # one-step: cross-attention to the outside prompt outside the mask, times this
    outside_prompt: str = "target"  # one-step: the prompt outside the mask: target (SwiftEdit's ARaM) or source
    noise_release: float = 1.0  # one-step: how far the noise in the mask leaves the source's words (one_step.released)
    image_branch: str = "auto"  # one-step: the source image as image prompt (IP-Adapter): auto, on, off (one_step.py)
    ip_edit_scale: float = 0.2  # one-step image branch: the image prompt's attention inside the mask (mid, up blocks)
    ip_keep_scale: float = 1.0  # one-step image branch: the image prompt's attention outside the mask (mid, up blocks)
    extra: dict = field(default_factory=dict)


@dataclass
class EditResult:
    image: Image.Image
    mask: Image.Image | None
    settings: EditSettings
    seconds: float
    image_branch: str | None = None  # one-step: the IP-Adapter whose image prompt was the source image

    def parameters(self, source: str, target: str, model: str | None) -> str:
        """A1111-style infotext: the target as the prompt, the edit's settings after it."""
        from atelier.core.infotext import format_parameters

        s = self.settings
        fields = {"Steps": s.steps, "Sampler": f"edit {s.method}", "CFG scale": s.guidance_scale, "Seed": s.seed,
                  "Size": f"{self.image.width}x{self.image.height}", "Model": model, "Denoising strength": s.strength,
                  "Edit source": source, "Edit mask": f"{s.mask_from} >= {s.mask_threshold}" if s.method != "img2img" else None,
                  "Mask regions": s.mask_regions or None}
        if s.method == "one-step":
            fields.update({"Outside prompt": s.outside_prompt, "Noise release": s.noise_release})
        if self.image_branch:
            fields.update({"Image branch": self.image_branch, "IP edit scale": s.ip_edit_scale, "IP keep scale": s.ip_keep_scale})
        return format_parameters(target, "", fields)


# name: (low, high, whole numbers only, low itself excluded); a None setting means "the method's default"
LIMITS = {"steps": (1, 1000, True, False), "strength": (0, 1, False, True), "guidance_scale": (0, 50, False, False),
          "mask_threshold": (0, 1, False, False), "mask_dilate": (0, 64, True, False),
          "mask_regions": (0, 64, True, False), "mask_t": (0, 999, True, False),
          "mask_samples": (1, 64, True, False), "seed": (0, 2**64 - 1, True, False),
          "edit_scale": (0, 10, False, False), "keep_scale": (0, 10, False, False), "noise_release": (0, 10, False, False),
          "ip_edit_scale": (0, 10, False, False), "ip_keep_scale": (0, 10, False, False)}
CLI_OPTIONS = {"guidance_scale": "--guidance", "mask_t": None, "mask_samples": None}  # others: --the-field-name


def _within(value, low, high, integer: bool, low_open: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and (not math.isfinite(value) or (integer and not value.is_integer())):
        return False
    return (low < value if low_open else low <= value) and value <= high


def check_settings(settings: EditSettings) -> EditSettings:
    """Refuse numbers no model can take (NaN, infinities, out of range) before any model is loaded."""
    for name, (low, high, integer, low_open) in LIMITS.items():
        value = getattr(settings, name)
        if value is None or _within(value, low, high, integer, low_open):
            continue
        span = f"an integer from {low} to {high}" if integer else f"a number in {'(' if low_open else '['}{low}, {high}]"
        option = CLI_OPTIONS.get(name, "--" + name.replace("_", "-"))
        raise UserError(f"{name}{f' ({option})' if option else ''} must be {span}, got {value}")
    return settings


def resolve_settings(pipe, settings: EditSettings) -> EditSettings:
    """Fill the defaults the method and model family call for; refuse impossible values."""
    from atelier.models.families import detect_family

    check_settings(settings)
    family = detect_family(pipe)
    few_step = family.is_turbo or family.is_lcm
    method = settings.method
    if method == "auto":
        method = "turbo" if few_step else "ddpm"
    if method not in METHOD_NAMES:
        raise UserError(f"unknown edit method {settings.method!r}; choose from auto, {', '.join(METHOD_NAMES)}")
    if settings.mask_from not in MASK_SOURCES:
        raise UserError(f"--mask-from must be one of {', '.join(MASK_SOURCES)}, got {settings.mask_from!r}")
    if settings.image_branch not in ("auto", "on", "off"):
        raise UserError(f"--image-branch must be auto, on or off, got {settings.image_branch!r}")
    if settings.image_branch == "on" and method != "one-step":
        raise UserError("the image branch (--image-branch on) is the one-step method's; the other methods take "
                        "a reference image with --ip-image")
    if settings.outside_prompt not in OUTSIDE_PROMPTS:
        raise UserError(f"--outside-prompt must be target or source, got {settings.outside_prompt!r}")
    if method == "one-step":
        if settings.mask_from not in ("auto", "noise", "both", "none"):
            raise UserError("the one-step method makes its mask from the inverter's noise and attention: "
                            "use --mask-from both, noise or none")
        return replace(settings, method=method, steps=1, strength=1.0, guidance_scale=0.0,
                       mask_from="both" if settings.mask_from == "auto" else settings.mask_from,
                       mask_threshold=0.6 if settings.mask_threshold is None else settings.mask_threshold)
    settings = replace(settings, mask_from="noise" if settings.mask_from == "auto" else settings.mask_from,
                       mask_threshold=0.5 if settings.mask_threshold is None else settings.mask_threshold)
    steps = settings.steps or (4 if method == "turbo" or (method == "img2img" and few_step) else 25)
    strength = settings.strength if settings.strength is not None else {"turbo": 1.0, "img2img": 0.6}.get(method, 0.8)
    guidance = settings.guidance_scale
    if guidance is None and method == "img2img":
        guidance = family.guidance_scale
    elif guidance is None:
        guidance = 1.0 if method == "turbo" else (family.guidance_scale if family.guidance_scale > 1 else 7.5)
    train_steps = len(pipe.scheduler.alphas_cumprod)
    if settings.mask_t >= train_steps:
        raise UserError(f"mask_t must be below the model's {train_steps} training timesteps, got {settings.mask_t}")
    return check_settings(replace(settings, method=method, steps=steps, strength=strength, guidance_scale=guidance))


def padded(image: Image.Image, step: int) -> Image.Image:
    """`image` grown on the right and bottom to multiples of `step` by mirroring its edge pixels."""
    right, bottom = -image.width % step, -image.height % step
    if not right and not bottom:
        return image
    return Image.fromarray(np.pad(np.asarray(image), ((0, bottom), (0, right), (0, 0)), mode="symmetric"))


def _pixels(image: Image.Image) -> torch.Tensor:
    return pixels_from_image(image)[None]


def _image(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(((pixels[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())


class Editor:
    """Holds one pipeline (loaded once) and edits images with any method."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.den = Denoiser(pipe)
        self._img2img = None
        self._one_step: dict = {}  # inverter name -> OneStepEditor

    def check_image(self, image: Image.Image) -> Image.Image:
        """The image in RGB, or a UserError for a size no model takes (no pixels, over the limit)."""
        from atelier.core.facts import MAX_IMAGE_SIDE

        if image.width < 1 or image.height < 1:
            raise UserError(f"image size {image.width}x{image.height} has no pixels")
        if max(image.size) > MAX_IMAGE_SIDE:
            raise UserError(f"image size {image.width}x{image.height} is larger than the limit of {MAX_IMAGE_SIDE}")
        return image.convert("RGB")

    @torch.no_grad()
    def edit(self, image: Image.Image, source: str, target: str, settings: EditSettings | None = None) -> EditResult:
        """Edit `image` (any size: a side that is not a multiple of the model's size step is padded by
        reflection for the edit and cropped back, so the result has the input's size and pixels)."""
        from atelier.core.facts import size_step

        s = resolve_settings(self.pipe, settings or EditSettings())
        for name, text in (("source", source), ("target", target)):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"the {name} prompt is empty")
        image = self.check_image(image)
        started = time.perf_counter()
        box = (0, 0, image.width, image.height)
        source_image, image = image, padded(image, size_step(self.pipe))
        if s.method == "img2img":
            return EditResult(self._run_img2img(image, target, s).crop(box), None, s, time.perf_counter() - started)
        pixels = _pixels(image)
        x0 = self.den.encode_image(pixels)
        branch = None
        if s.method == "one-step":
            one = self.one_step(s.inverter)
            branch = one.image_branch(s.image_branch)
            latents, latent_mask = one.edit_latents(x0, source, target, s, source_image, branch)
        else:
            latent_mask = self.mask(x0, source, target, s)
            generator = torch.Generator("cpu").manual_seed(s.seed)
            run = {"ddpm": self._ddpm, "turbo": self._ddpm, "diffedit": self._diffedit}[s.method]
            latents = run(x0, source, target, s, latent_mask, generator)
        edited = self.den.decode_latents(latents).cpu()
        mask_image = None
        if latent_mask is not None:
            soft = pixel_mask(latent_mask.cpu(), image.height, image.width)
            mask_image = Image.fromarray((soft.numpy() * 255).round().astype(np.uint8), "L").crop(box)
            if s.paste_back:
                edited = soft * edited + (1 - soft) * pixels
        return EditResult(_image(edited).crop(box), mask_image, s, time.perf_counter() - started,
                          image_branch=" + ".join(branch.names) if branch is not None else None)

    def one_step(self, inverter: str | None = None):
        """The SwiftEdit editor for an inverter (loaded once per name), with the adapter it was trained with."""
        from atelier.edit.one_step import OneStepEditor, default_inverter, inverter_folder, load_inverter, recorded_adapter

        name = inverter or default_inverter(self.pipe)
        if name not in self._one_step:
            inverter_unet = load_inverter(name, device=self.den.device, dtype=self.den.dtype)
            self._one_step[name] = OneStepEditor(self.den, inverter_unet, recorded_adapter(inverter_folder(name)))
        return self._one_step[name]

    def mask(self, x0: torch.Tensor, source: str, target: str, s: EditSettings) -> torch.Tensor | None:
        if s.mask_from == "none":
            return None
        maps = estimate_masks(self.den, x0, source, target, t=s.mask_t, samples=s.mask_samples, seed=s.seed,
                              attention=s.mask_from in ("attention", "both"))
        if s.mask_from == "both":
            mask = binary_mask(maps["noise"], s.mask_threshold, 0) * binary_mask(maps["attention"], s.mask_threshold, 0)
            if s.mask_regions:
                mask = strongest_regions(maps["noise"] * maps["attention"], mask.bool(), s.mask_regions).float()
            mask = binary_mask(mask, 0.5, s.mask_dilate)
        else:
            mask = binary_mask(maps[s.mask_from], s.mask_threshold, s.mask_dilate, s.mask_regions)
        return mask.to(x0.device, x0.dtype)

    def _guided(self, hidden, pooled, s: EditSettings, pseudo: bool):
        """eps functions for the source prompt and the target prompt, as the method guides them."""
        den, g = self.den, s.guidance_scale

        def predict(x, t, rows):
            h = hidden[rows]
            p = None if pooled is None else pooled[rows]
            return den.x0_eps(x.expand(len(rows), -1, -1, -1), t, h, p)[1]

        def source_eps(x, t):
            if pseudo or g == 1:  # u + 1 * (c - u) is c: no need to compute u
                return predict(x, t, [1])
            u, c = predict(x, t, [0, 1]).chunk(2)
            return u + g * (c - u)

        def target_eps(x, t):
            if g == 1:
                return predict(x, t, [2])
            base, c = predict(x, t, [1 if pseudo else 0, 2]).chunk(2)
            return base + g * (c - base)

        return source_eps, target_eps

    def _schedule(self, s: EditSettings) -> list[int]:
        ts = edit_timesteps(self.pipe, s.steps)
        start = s.steps - max(1, round(s.steps * s.strength))
        return ts[start:]

    def _ddpm(self, x0, source, target, s, mask, generator):
        hidden, pooled = self.den.conditioning(["", source, target], negative=[True, False, False])
        source_eps, target_eps = self._guided(hidden, pooled, s, pseudo=s.method == "turbo")
        ts = self._schedule(s)
        xs, zs = ddpm_noise_maps(self.den, x0, ts, source_eps, generator)
        x = xs[0]
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = ddpm_step(self.den, x, target_eps(x, t), t, t_prev, zs[i])
            if mask is not None:
                x = mask * x + (1 - mask) * xs[i + 1]
        return x

    def _diffedit(self, x0, source, target, s, mask, generator):
        hidden, pooled = self.den.conditioning(["", source, target], negative=[True, False, False])
        _, target_eps = self._guided(hidden, pooled, s, pseudo=False)
        ts = self._schedule(s)

        def source_cond(x, t):  # inversion without guidance, as DDIM inversion is only stable there
            return self.den.x0_eps(x, t, hidden[1:2], None if pooled is None else pooled[1:2])[1]

        xs = ddim_invert(self.den, x0, ts, source_cond)
        x = xs[0]
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = ddim_step(self.den, x, target_eps(x, t), t, t_prev)
            if mask is not None:
                x = mask * x + (1 - mask) * xs[i + 1]
        return x

    def _run_img2img(self, image, target, s):
        from atelier.models import to_img2img

        if self._img2img is None:
            self._img2img = to_img2img(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(s.seed)
        return self._img2img(target, image=image, strength=s.strength, guidance_scale=s.guidance_scale,
                             num_inference_steps=s.steps, generator=generator).images[0]


def settings_dict(settings: EditSettings) -> dict:
    return asdict(settings)
