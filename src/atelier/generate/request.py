"""What to generate: one `GenerationRequest`, checked, with the model's defaults filled in."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from atelier.errors import UserError
from atelier.core.facts import MAX_IMAGE_SIDE, check_size, native_size, size_step  # noqa: F401
from atelier.core.facts import model_name as _model_name
from atelier.core.infotext import parse_hash_list
from atelier.generate.hires import HiresFix, hires_from_parameters

# Seeds: ComfyUI's are 64-bit and a torch generator takes any of them; a random seed is drawn from
# A1111's range, so that it also pastes into A1111.
MAX_SEED = 2**64 - 1
RANDOM_SEED_MAX = 2**32 - 1

# Bounds on every number, so that a typo or a corrupt file is an error instead of a run that never ends.
# Steps: SD models are trained on 1000 timesteps, so 1000 steps already visit every one of them
# (the full DDPM chain); A1111's UI stops at 150, which refuses DDPM-style runs its API accepts.
MAX_STEPS = 1000
MAX_CFG_SCALE = 100.0  # ComfyUI's KSampler maximum (A1111's UI stops at 30)
MAX_PAG_SCALE = 100.0  # the same maximum for perturbed-attention guidance
MAX_CLIP_SKIP = 12  # A1111's UI maximum: the 12 layers of SD 1.x's CLIP text encoder
MAX_IMAGES = 1000  # per prompt (A1111: at most 100 batches of 8)
MAX_BATCH_SIZE = 64  # per pipeline call; it only trades memory for speed


@dataclass
class NetworkSources:
    """Where a request's `<lora:name>` tags and embedding names are found, and the files they must be.

    lora_dir: A1111's LoRA folder (subfolders searched): `<lora:name>` is `name.safetensors` there.
    lora_files: {name: file} taking precedence over the folder (the CLI's --lora files an image names).
    embeddings_dir: A1111's embeddings folder: a file whose name is a word of the prompt or the
      negative prompt is loaded, under that name.
    lora_hashes, ti_hashes: {name: A1111 short hash} the files must have (`--from`: the image's).
    """

    lora_dir: str | Path | None = None
    lora_files: dict = field(default_factory=dict)
    embeddings_dir: str | Path | None = None
    allow_pickle: bool = False
    lora_hashes: dict = field(default_factory=dict)
    ti_hashes: dict = field(default_factory=dict)
    source: str = "the image"  # what lora_hashes / ti_hashes come from, for messages


@dataclass
class GenerationRequest:
    """Everything that decides the pixels of a txt2img or img2img generation.

    Fields left as None are filled by `resolve_request`: steps, CFG scale and sampler from the model's
    recommended defaults, the size from the model's native resolution (or the init image's), the seed
    at random. Image k of the request is made from seed + k, whatever the batch size.

    `per_image`, when set, gives every image its own prompt and seed: image k is made from the pair
    per_image[k] = (prompt, seed) instead of (prompt, seed + k), so that one pipeline call can take
    images of different prompts; n_images must be its length, and `prompt` and `seed` are not used.
    The negative prompt and every other setting stay common to all the images.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None  # a name `atelier.samplers` knows, e.g. "DPM++ 2M"
    schedule: str | None = None  # schedule type, e.g. "Karras"; None: the sampler's own
    cfg_scale: float | None = None
    guidance_rescale: float = 0.0  # Lin et al. 2023 (sec. 3.4), 0 = off
    pag_scale: float = 0.0  # perturbed-attention guidance, 0 = off
    clip_skip: int | None = None  # A1111 convention: 1 = last layer, 2 = the one before, ...
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    n_images: int = 1
    batch_size: int = 1  # images per pipeline call (memory), never changes the pixels
    init_image: Any = None  # PIL image: img2img when set
    strength: float = 0.75  # img2img denoising strength, or the hires pass's
    hires: HiresFix | None = None  # A1111's hires fix: a second, img2img pass at a larger size
    emphasis: str = "Original"
    wildcard_dir: str | Path | None = None
    model_name: str | None = None  # recorded in the metadata
    model_hash: str | None = None  # recorded in the metadata
    extra_parameters: dict = field(default_factory=dict)  # more infotext fields to record
    image_prompts: list = field(default_factory=list)  # IP-Adapter references (atelier.image_prompts)
    per_image: list[tuple[str, int]] | None = None  # (prompt, seed) of each image; see above
    networks: NetworkSources = field(default_factory=NetworkSources)  # <lora:…> tags and embeddings

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def seeds(self) -> list[int]:
        if self.per_image is not None:
            return [seed for _, seed in self.per_image]
        if self.seed is None:
            raise ValueError("resolve the request first: the seed is not set")
        return [self.seed + k for k in range(self.n_images)]

    def prompts(self) -> list[str]:
        """Each image's prompt, before wildcard expansion."""
        if self.per_image is not None:
            return [prompt for prompt, _ in self.per_image]
        return [self.prompt] * self.n_images


def _check_number(name: str, value, low, high, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value) or value > high or (value <= low if low_open else value < low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise UserError(f"{name} must be in {interval}, not {value}")


def _check_whole(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low} and {high}, not {value}")


def _check_per_image(per_image, n_images: int) -> None:
    if not isinstance(per_image, (list, tuple)):
        raise UserError(f"per_image must be a list of (prompt, seed) pairs, not {type(per_image).__name__}")
    if len(per_image) != n_images:
        raise UserError(f"per_image has {len(per_image)} (prompt, seed) pairs for {n_images} images; "
                        "give one pair per image")
    for k, pair in enumerate(per_image):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"per_image[{k}] must be a (prompt, seed) pair, not {pair!r}")
        if not isinstance(pair[0], str):
            raise UserError(f"per_image[{k}]: the prompt must be text, not {pair[0]!r}")
        _check_whole(f"per_image[{k}]: seed", pair[1], 0, MAX_SEED)


def validate_request(request: GenerationRequest) -> None:
    """Refuse values no model accepts and numbers out of bounds (not finite, or so large that the run
    would never end), with a message naming the field."""
    if not isinstance(request.prompt, str):
        raise UserError("the prompt must be text")
    if request.steps is not None:
        _check_whole("steps", request.steps, 1, MAX_STEPS)
    if request.cfg_scale is not None:
        _check_number("CFG scale", request.cfg_scale, 0, MAX_CFG_SCALE)
    _check_number("guidance rescale", request.guidance_rescale, 0, 1)
    _check_number("PAG scale", request.pag_scale, 0, MAX_PAG_SCALE)
    if request.clip_skip is not None:
        _check_whole("clip skip", request.clip_skip, 1, MAX_CLIP_SKIP)
    for name in ("width", "height"):
        value = getattr(request, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number, not {value!r}")
            check_size(value, value, 8, names=(name, name))  # the model's own step: resolve_request
    _check_whole("the number of images", request.n_images, 1, MAX_IMAGES)
    _check_whole("the batch size", request.batch_size, 1, MAX_BATCH_SIZE)
    if request.seed is not None:
        _check_whole("seed", request.seed, 0, MAX_SEED)
        if request.per_image is None and request.seed + request.n_images - 1 > MAX_SEED:
            raise UserError(f"seed {request.seed} + {request.n_images} images runs past the largest seed {MAX_SEED}")
    if request.per_image is not None:
        _check_per_image(request.per_image, request.n_images)
    from atelier.prompts.chunks import check_emphasis

    check_emphasis(request.emphasis)
    if request.is_img2img and request.hires is not None:
        raise UserError("the hires fix is a txt2img second pass; img2img takes no hires settings")
    if request.is_img2img or request.hires is not None:
        _check_number("denoising strength", request.strength, 0, 1, low_open=True)
    if request.is_img2img and request.steps is not None and int(request.steps * request.strength) < 1:
        raise UserError(
            f"{request.steps} steps at denoising strength {request.strength} leave no step to run; "
            "raise --steps or --strength"
        )
    if request.hires is not None:
        request.hires.validate(request.steps, request.strength)
    if request.wildcard_dir is not None and not Path(request.wildcard_dir).is_dir():
        raise UserError(f"wildcard folder not found: {request.wildcard_dir}")
    for what, folder in (("LoRA", request.networks.lora_dir), ("embeddings", request.networks.embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{what} folder not found: {folder}")


def resolve_request(pipe, request: GenerationRequest) -> GenerationRequest:
    """A copy of `request` with every None that has a default filled in, checked against the model."""
    from atelier.models import detect_family

    validate_request(request)
    family = detect_family(pipe)
    steps = request.steps if request.steps is not None else family.steps
    cfg = request.cfg_scale if request.cfg_scale is not None else family.guidance_scale
    sampler, schedule = request.sampler, request.schedule
    if sampler is None:
        from atelier.samplers import from_a1111_fields

        # The family names its sampler A1111-style ("DPM++ 2M Karras"), perhaps with a schedule type.
        sampler, default_schedule = from_a1111_fields(family.sampler, getattr(family, "schedule", None))
        schedule = schedule if schedule is not None else default_schedule

    step = size_step(pipe)
    width, height = request.width, request.height
    if request.is_img2img:
        # Without a size, img2img keeps the init image's size, rounded down to what the model takes.
        init_w, init_h = request.init_image.size
        width = width or max(step, init_w // step * step)
        height = height or max(step, init_h // step * step)
    else:
        width = width or native_size(pipe)
        height = height or native_size(pipe)
    check_size(width, height, step)
    if request.hires is not None:
        request.hires.target(width, height, step, getattr(pipe, "vae_scale_factor", 8) or 8)  # checks the size

    seed = request.seed if request.seed is not None else random.randrange(RANDOM_SEED_MAX - request.n_images)
    model_name = request.model_name or _model_name(pipe)
    resolved = replace(
        request, steps=steps, cfg_scale=float(cfg), sampler=sampler, schedule=schedule,
        width=width, height=height, seed=seed, model_name=model_name,
    )
    validate_request(resolved)
    return resolved


def request_from_parameters(params: dict[str, str], *, source: str = "the image") -> dict:
    """GenerationRequest keyword arguments from a parsed infotext (`parse_parameters`), so that the
    same model, seed and settings make the same picture again. Keys missing from the infotext are
    left out (the model's defaults apply)."""
    from atelier.samplers import from_a1111_fields

    def convert(key, kind):
        try:
            return kind(params[key])
        except (TypeError, ValueError):
            raise UserError(f"{source}: cannot read {key}: {params[key]!r}") from None

    out: dict = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    numbers = {
        "Steps": ("steps", int),
        "CFG scale": ("cfg_scale", float),
        "Seed": ("seed", int),
        "Clip skip": ("clip_skip", int),
        "Denoising strength": ("strength", float),
        "CFG Rescale phi": ("guidance_rescale", float),
        "PAG scale": ("pag_scale", float),
    }
    for key, (name, kind) in numbers.items():
        if key in params:
            out[name] = convert(key, kind)
    if "Size" in params:
        try:
            width, height = (int(v) for v in params["Size"].lower().split("x"))
        except ValueError:
            raise UserError(f"{source}: cannot read Size: {params['Size']!r}") from None
        out.update(width=width, height=height)
    if params.get("Sampler"):
        out["sampler"], out["schedule"] = from_a1111_fields(params["Sampler"], params.get("Schedule type"))
    hires = hires_from_parameters(params, source=source)
    if hires is not None:
        if "strength" not in out:
            raise UserError(f"{source} has hires fix settings but no Denoising strength for the hires pass")
        out["hires"] = hires
    if params.get("Emphasis"):
        out["emphasis"] = params["Emphasis"]
    for key, name in (("Model", "model_name"), ("Model hash", "model_hash")):
        if params.get(key):
            out[name] = params[key]
    for key, name in (("Lora hashes", "lora_hashes"), ("TI hashes", "ti_hashes")):
        if params.get(key):
            out[name] = parse_hash_list(params[key])
    return out
