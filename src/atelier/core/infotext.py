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

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's modules/infotext_utils.py: a key, then either a JSON string or anything up to a comma.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# EXIF UserComment, where A1111 puts the infotext of JPEG and WebP files.
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


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


def exif_user_comment(text: str) -> bytes:
    """An EXIF UserComment holding `text` as A1111 writes it into JPEG and WebP files (piexif's
    `UserComment.dump(text, encoding="unicode")`: an 8-byte character code, then UTF-16 big-endian)."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def image_parameters(image) -> str | None:
    """The infotext stored in an opened image: PNG text chunk, or EXIF UserComment (JPEG/WebP)."""
    text = image.info.get(PARAMETERS_KEY)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return text
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
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


def parse_hash_list(text: str) -> dict[str, str]:
    """A1111's `Lora hashes` / `TI hashes` value, "name: 1234567890ab, other: ...", as {name: hash}."""
    out = {}
    for item in text.split(","):
        name, sep, digest = item.strip().rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out


def format_hash_list(hashes: dict[str, str]) -> str:
    """{name: hash} as A1111 writes it, names without the ':' and ',' the list is made of."""
    return ", ".join(f"{hash_list_name(name)}: {digest}" for name, digest in hashes.items())


def hash_list_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")
