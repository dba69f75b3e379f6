"""Reference images: opened with atelier's limits, identified by SHA-256, and recorded in the PNG
`parameters` text the way A1111 writes extension fields (`IP-Adapter: name, IP-Adapter image:
sha256:..., IP-Adapter scale: 0.6`; a second adapter as `IP-Adapter 2`, ...)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.errors import UserError

MAX_SCALE = 5.0


@dataclass
class ImagePrompt:
    """One reference image for one loaded adapter (by index), at a scale (a number, or an InstantStyle
    dict of per-block scales), optionally confined to a mask (white: where the reference applies)."""

    image: Any  # PIL RGB
    sha256: str
    adapter: int = 0
    scale: float | dict = 1.0
    mask: Any = None  # PIL "L"
    mask_sha256: str | None = None
    owner: Any = field(default=None, repr=False, compare=False)  # the IPAdapters that made it


def sha256_of(source) -> str:
    """The SHA-256 of a file's bytes, of bytes, or of a PIL image's RGB pixels (with its size)."""
    if isinstance(source, (str, Path)):
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise UserError(f"cannot read {source}: {exc.strerror}") from None
        return digest.hexdigest()
    if isinstance(source, (bytes, bytearray)):
        return hashlib.sha256(source).hexdigest()
    image = source.convert("RGB")
    return hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()


def open_reference(source, mode: str = "RGB"):
    """(PIL image, SHA-256) of a path, bytes or PIL image."""
    from atelier.core.images import open_image

    if isinstance(source, (str, Path, bytes, bytearray)):
        image = open_image(source, name=None if isinstance(source, (str, Path)) else "reference image")
        return image.convert(mode), sha256_of(source)
    if not hasattr(source, "convert"):
        raise UserError(f"a reference image must be a path, bytes or a PIL image, not {type(source).__name__}")
    return source.convert(mode), sha256_of(source)


def check_scale(scale):
    """A scale as diffusers' set_ip_adapter_scale takes it: a number, or a dict of per-block scales."""
    if isinstance(scale, dict):
        return scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise UserError(f"IP-Adapter scale must be a number or a dict of per-block scales, not {scale!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
        raise UserError(f"IP-Adapter scale must be between 0 and {MAX_SCALE:g}, not {scale}")
    return value


def parse_scale(text: str):
    """A scale from the command line or the metadata: "0.6", or JSON such as
    '{"up": {"block_0": [0.0, 1.0, 0.0]}}' (InstantStyle: style only)."""
    text = str(text).strip()
    if text.startswith("{"):
        try:
            scale = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"IP-Adapter scale {text!r} is not valid JSON ({exc.msg})") from None
        return check_scale(scale)
    return check_scale(text)


def format_scale(scale) -> str | float | int:
    if isinstance(scale, dict):
        return json.dumps(scale, separators=(",", ":"), sort_keys=True)
    value = float(scale)
    return int(value) if value.is_integer() else round(value, 6)


def _key(index: int, suffix: str = "") -> str:
    return ("IP-Adapter" if index == 0 else f"IP-Adapter {index + 1}") + suffix


def infotext_fields(names: list[str], prompts: list[ImagePrompt]) -> dict:
    """The metadata fields of these image prompts, per adapter (`names` are the loaded adapters')."""
    fields: dict = {}
    for index, name in enumerate(names):
        group = [p for p in prompts if p.adapter == index]
        if not group:
            continue
        fields[_key(index)] = name
        fields[_key(index, " image")] = " ".join(f"sha256:{p.sha256}" for p in group)
        fields[_key(index, " scale")] = format_scale(group[0].scale)
        if any(p.mask_sha256 for p in group):
            fields[_key(index, " mask")] = " ".join(f"sha256:{p.mask_sha256}" if p.mask_sha256 else "none" for p in group)
    return fields


@dataclass
class RecordedImagePrompt:
    """What a PNG's metadata says about one adapter's image prompts."""

    name: str
    sha256: list[str]
    scale: Any
    masked: bool


def recorded_image_prompts(params: dict[str, str]) -> list[RecordedImagePrompt]:
    """The adapters recorded in a parsed infotext (`parse_parameters`), in order."""
    recorded = []
    index = 0
    while _key(index) in params:
        hashes = params.get(_key(index, " image"), "").split()
        if not hashes or not all(h.startswith("sha256:") for h in hashes):
            raise UserError(f"cannot read {_key(index, ' image')}: {params.get(_key(index, ' image'))!r}")
        scale = parse_scale(params.get(_key(index, " scale"), "1"))
        recorded.append(RecordedImagePrompt(params[_key(index)], [h.removeprefix("sha256:") for h in hashes], scale,
                                            _key(index, " mask") in params))
        index += 1
    return recorded
