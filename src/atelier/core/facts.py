"""Facts about a loaded pipeline that every capability asks: its name, native size and size step."""

from __future__ import annotations

from pathlib import Path

from atelier.errors import UserError

MAX_IMAGE_SIDE = 4096  # larger images are refused (inputs before their pixels are decoded)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def size_step(pipe) -> int:
    """Width and height must be multiples of this: 8 (diffusers' check) and the VAE's downscale."""
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    step = 8
    while step % vae_scale:
        step *= 2
    return step


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8) or 8)


def check_size(width: int, height: int, step: int, names=("width", "height")) -> None:
    for name, value in zip(names, (width, height)):
        if value <= 0 or value % step:
            raise UserError(f"{name} {value} must be a positive multiple of {step} for this model")
        if value > MAX_IMAGE_SIDE:
            raise UserError(f"{name} {value} is larger than the limit of {MAX_IMAGE_SIDE}")


def model_name(pipe) -> str | None:
    """The name recorded as `Model:` in metadata: a built-in name, a file's stem or a folder's name."""
    name = getattr(pipe, "atelier_source", None) or getattr(pipe, "name_or_path", None)
    if not name:
        return None
    return source_name(str(name))


def source_name(source: str) -> str:
    """A file's stem or a folder's name for a local path; a built-in name or hub id as given."""
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return path.stem if path.suffix in WEIGHT_SUFFIXES else source
