"""Images in and out: opening files or bytes with limits checked before decoding, and writing PNG,
JPEG or WebP files with their generation parameters atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

from atelier.core.facts import MAX_IMAGE_SIDE
from atelier.core.infotext import EXIF_IFD, EXIF_USER_COMMENT, PARAMETERS_KEY, exif_user_comment, image_parameters
from atelier.core.io import atomic_open
from atelier.errors import UserError


# What `save_image` writes, by extension.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LOSSY_QUALITY = 95


class ImageTooLarge(UserError):
    """An image over the size limit (refused from its header, before decoding)."""


def open_image(source, *, max_side: int = MAX_IMAGE_SIDE, formats=None, name: str | None = None, load: bool = True):
    """Open an image file (a path) or image bytes, refusing what is missing, not an image, corrupt or
    too large.

    The size is checked from the header, before any pixel is decoded, so a decompression bomb never
    reaches memory; PIL's own bomb check is turned into an error too. `formats` limits the formats
    PIL tries; `load=False` stops after the header check.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        name = name or "image data"
        opener = io.BytesIO(source)
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise UserError(f"image not found: {path}")
        opener = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(opener, formats=formats)
            width, height = image.size
            if width > max_side or height > max_side:
                raise ImageTooLarge(f"image too large: {name} is {width}x{height}; the limit is {max_side}x{max_side}")
            if width < 1 or height < 1:
                raise UserError(f"{name} has no pixels ({width}x{height})")
            if load:
                image.load()
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large: {name} ({exc})") from None
    except UnidentifiedImageError:
        kinds = f" ({', '.join(formats)})" if formats else " (or a format PIL cannot read)"
        raise UserError(f"not an image{kinds}: {name}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"corrupt image: {name} ({exc})") from None
    return image


def pixels_from_image(image):
    """A PIL image as a (3, H, W) float32 tensor in [-1, 1] (RGB), the range the VAEs read."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def read_parameters(path) -> str | None:
    """The infotext of the image at `path`, or None when it has none."""
    return image_parameters(open_image(path))


def save_png(image, path, parameters: str, extra_text: dict[str, str] | None = None) -> Path:
    """Write `image` as a PNG carrying `parameters` in its "parameters" text chunk.

    The file appears complete or not at all: it is written to a temporary file in the same folder and
    moved into place with os.replace.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    for key, value in (extra_text or {}).items():
        info.add_text(key, value)
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return Path(path)


def output_format(path) -> str:
    """The PIL format an output path's extension names; other extensions are refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        known = ", ".join(OUTPUT_FORMATS)
        what = f"unknown image extension {suffix!r}" if suffix else "no image extension"
        raise UserError(f"cannot write {path}: {what}; use one of {known}")
    return OUTPUT_FORMATS[suffix]


def save_image(image, path, parameters: str) -> Path:
    """Write `image` in the format its extension names, atomically, with `parameters` where A1111
    puts them: the PNG "parameters" text chunk, or the EXIF UserComment of a JPEG or WebP file."""
    from PIL import Image

    fmt = output_format(path)
    if fmt == "PNG":
        return save_png(image, path, parameters)
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = exif_user_comment(parameters)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    with atomic_open(path, "wb") as f:
        image.save(f, format=fmt, quality=LOSSY_QUALITY, exif=exif)
    return Path(path)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what folders of training or calibration images may hold


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def sidecar_caption(image: Path, caption_extension: str = ".txt") -> str:
    """The caption in the file beside `image` (kohya's `.txt`), or "" when there is none."""
    side = Path(image).with_suffix(caption_extension)
    return side.read_text(encoding="utf-8-sig").strip() if side.is_file() else ""
