"""Generation parameters in A1111's "infotext" format, stored in PNG files.

An infotext is the prompt (one or more lines), an optional `Negative prompt: ...` line (which may
continue over several lines), and one last line of `Key: value` pairs joined by ", ":

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512

Values containing a comma, a colon or a newline are written as JSON strings, the way A1111's
`infotext_utils.quote` does, and read back by the same regular expression A1111 uses, so files
written here paste into A1111 and files written by A1111 read here. This is a file format; there
is no library for it, so it is written out by hand.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from atelier._io import atomic_open
from atelier.errors import UserError

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads
NEGATIVE_PREFIX = "Negative prompt:"
MAX_IMAGE_SIDE = 4096  # larger inputs are refused before their pixels are decoded

# A1111's modules/infotext_utils.py: a key, then either a JSON string or anything up to a comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# EXIF UserComment, where A1111 puts the infotext of JPEG and WebP files.
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    """The infotext for one image. `params` keeps its order; entries whose value is None are left out."""
    fields = ", ".join(
        key if key == value else f"{key}: {quote(value)}" for key, value in params.items() if value is not None
    )
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{fields}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """Read an infotext back into {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}.

    Values stay strings, unquoted; the prompt and negative prompt keep their line breaks. A last line
    with fewer than three `Key: value` pairs is taken as part of the prompt, as A1111 does.
    """
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM_RE.findall(last_line):
        value = value.strip()
        result[key] = unquote(value) if value.startswith('"') else value
    return result


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


def image_parameters(image) -> str | None:
    """The infotext stored in an opened image: PNG text chunk, or EXIF UserComment (JPEG/WebP)."""
    text = image.info.get(PARAMETERS_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return text
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and len(comment) > 8:
        code, body = comment[:8], comment[8:]
        # piexif (used by A1111) writes UNICODE as UTF-16 big-endian; some tools write little-endian.
        if code.startswith(b"UNICODE"):
            for encoding in ("utf-16-be", "utf-16-le"):
                try:
                    decoded = body.decode(encoding)
                except UnicodeDecodeError:
                    continue
                if decoded.isprintable() or "\n" in decoded:
                    return decoded
        return body.decode("utf-8", errors="replace").strip("\0") or None
    if isinstance(comment, str) and comment:
        return comment
    return None


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


def model_hash(path, cache_file=None) -> str:
    """A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its SHA-256.

    Hashing gigabytes takes seconds, so results are kept in a small JSON cache keyed by the file's
    path, size and modification time (A1111 keeps a cache.json the same way).
    """
    import hashlib
    import json as _json

    from atelier.models.loader import atelier_cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = Path(cache_file) if cache_file else atelier_cache_dir() / "model_hashes.json"
    try:
        cache = _json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()[:10]
        try:
            with atomic_open(cache_file, "w", encoding="utf-8") as f:
                _json.dump(cache, f, indent=1)
        except OSError:
            pass  # an unwritable cache only costs time
    return cache[key]
