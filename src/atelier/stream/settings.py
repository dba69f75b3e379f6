"""The stream engine's live settings, declared once in `SETTINGS`.

Both the schema the page builds its controls from (`schema`, served as `/api/settings`) and the
checks `StreamEngine.update` applies (`apply`) come from these declarations, so they cannot
disagree. Numbers are finite and bounded; text has a length limit; nothing else is accepted.
Rules that tie settings together (t_index_list against num_inference_steps, strength against
t_index_list, a reference image against the loaded IP-Adapter) are the engine's, in
`StreamEngine._validated`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from atelier.errors import UserError
from atelier.image_prompts.references import MAX_SCALE

MAX_PROMPT_CHARS = 4000
MAX_STAGES = 8
MAX_STEPS = 1000
CFG_TYPES = ("none", "full", "self", "initialize")
FRAME_REFERENCE = "frame"  # the `reference` value that makes each input frame the image prompt


@dataclass(frozen=True)
class Setting:
    """One setting: a JSON-schema type with its bounds. `read_only` ones are fixed by the model."""

    name: str
    type: str  # "string" | "number" | "integer" | "boolean" | "array" (of integers) | "image"
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[str, ...] | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    read_only: bool = False

    def schema(self, default) -> dict:
        if self.type == "image":  # set by an image (not JSON), "frame" or null; shown as "sha256:HEX"
            return {"type": ["string", "null"], "contentMediaType": "image/*", "default": shown_reference(default),
                    "description": self.description}
        out = {"type": self.type, "default": default}
        if self.read_only:
            out["readOnly"] = True
        if self.enum is not None:
            out["enum"] = list(self.enum)
        bounds = {"minimum": self.minimum, "maximum": self.maximum}
        if self.type == "array":
            out["items"] = {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}
            out.update({k: v for k, v in (("minItems", self.min_items), ("maxItems", self.max_items)) if v is not None})
        else:
            out.update({k: v for k, v in bounds.items() if v is not None})
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.description:
            out["description"] = self.description
        return out

    def check(self, value):
        """`value` in this setting's type and bounds, or a UserError saying what is wrong."""
        if self.type == "string":
            if value is None:
                return ""
            if not isinstance(value, str):
                raise UserError(f"{self.name} must be text, got {type(value).__name__}")
            if self.enum is not None and value not in self.enum:
                raise UserError(f"{self.name} must be one of {', '.join(self.enum)}, got {show(value)}")
            if self.max_length is not None and len(value) > self.max_length:
                raise UserError(f"{self.name} is {len(value)} characters; the limit is {self.max_length}")
            return value
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise UserError(f"{self.name} must be true or false, got {show(value)}")
            return value
        if self.type == "number":
            return number(value, self.name, self.minimum, self.maximum)
        if self.type == "integer":
            return whole_number(value, self.name, self.minimum, self.maximum)
        if self.type == "image":
            return reference(value, self.name)
        if not isinstance(value, (list, tuple)) or not self.min_items <= len(value) <= self.max_items:
            raise UserError(f"{self.name} must be a list of {self.min_items} to {self.max_items} whole numbers, "
                            f"got {show(value)}")
        return [whole_number(v, f"{self.name} entry", self.minimum, self.maximum) for v in value]


SETTINGS: tuple[Setting, ...] = (
    Setting("prompt", "string", "A1111 syntax: (word:1.3), [word], BREAK", max_length=MAX_PROMPT_CHARS),
    Setting("negative_prompt", "string", "used by cfg_type full and initialize", max_length=MAX_PROMPT_CHARS),
    Setting("blend_prompt", "string", "a second prompt mixed into the first", max_length=MAX_PROMPT_CHARS),
    Setting("blend", "number", "share of the blend prompt", 0.0, 1.0),
    Setting("guidance_scale", "number", "CFG scale; active above 1 when cfg_type is not none", 0.0, 30.0),
    Setting("delta", "number", "RCFG: scale of the virtual negative noise", 0.0, 5.0),
    Setting("cfg_type", "string", "none | full | self (RCFG) | initialize (RCFG, onetime negative)", enum=CFG_TYPES),
    Setting("seed", "integer", "fixed noise", 0, 2**32 - 1),
    # 1 / MAX_STEPS: the smallest share of a schedule one stage can cover (strength = 1 - index / steps).
    Setting("strength", "number", "how far the frame is noised; sets t_index_list", 1 / MAX_STEPS, 1.0),
    Setting("num_inference_steps", "integer", "the schedule t_index_list indexes", 1, MAX_STEPS),
    Setting("t_index_list", "array", "denoising stages, strictly increasing indices below num_inference_steps",
            0, MAX_STEPS - 1, min_items=1, max_items=MAX_STAGES),
    Setting("similarity_filter", "boolean", "skip frames that barely changed"),
    Setting("similarity_threshold", "number", "cosine similarity above which frames may be skipped", 0.5, 0.999),
    Setting("reference", "image", "the image prompt (IP-Adapter): an image, \"frame\" (each input frame), or null "
            "for none"),
    Setting("ip_scale", "number", "how strongly the reference image counts; 0: the text-only stream", 0.0, MAX_SCALE),
    Setting("width", "integer", read_only=True),
    Setting("height", "integer", read_only=True),
    Setting("frame_buffer_size", "integer", "frames per engine call", read_only=True),
    Setting("ip_adapter", "boolean", "whether the model has an image encoder for image prompts", read_only=True),
)
BY_NAME = {s.name: s for s in SETTINGS}
LIVE = tuple(s.name for s in SETTINGS if not s.read_only)


def schema(defaults: dict) -> dict:
    """The JSON schema of every setting, with `defaults` (one value per setting) as defaults."""
    return {s.name: s.schema(defaults[s.name]) for s in SETTINGS}


def apply(current: dict, changes: dict) -> dict:
    """`current` with `changes` checked and applied; a UserError names the first bad one."""
    unknown = sorted(k for k in changes if k not in BY_NAME)
    if unknown:
        raise UserError(f"unknown stream setting(s) {', '.join(map(show, unknown))}; known: {', '.join(LIVE)}")
    fixed = sorted(k for k in changes if BY_NAME[k].read_only)
    if fixed:
        raise UserError(f"{', '.join(fixed)} cannot be changed: fixed by the model")
    new = dict(current)
    for key, value in changes.items():
        new[key] = BY_NAME[key].check(value)
    return new


# ---------------------------------------------------------------------------------------------- values


def number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number from `low` to `high`; booleans, text, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise UserError(f"{name} must be a finite number, got {show(value)}") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {show(value)}")
    if low is not None and value < low or high is not None and value > high:
        raise UserError(f"{name} must be between {low} and {high}, got {value}")
    return value


def whole_number(value, name: str, low: int | float | None = None, high: int | float | None = None) -> int:
    """A whole number (an integral float like 3.0 too) from `low` to `high`."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be a whole number, got {show(value)}")
    if low is not None and value < low or high is not None and value > high:
        raise UserError(f"{name} must be from {low} to {high}, got {show(value)}")
    return value


def reference(value, name: str = "reference"):
    """A reference image setting: None (none), FRAME_REFERENCE (each input frame), or an ImagePrompt
    of an image (PIL, image bytes, a pathlib.Path or an ImagePrompt), opened with atelier's limits.
    Other text is refused: a client's settings must never name a file on the server."""
    from atelier.image_prompts.references import ImagePrompt, open_reference

    if value is None or value == "" or value == FRAME_REFERENCE:
        return value or None
    if isinstance(value, str):
        raise UserError(f'{name} must be an image, "{FRAME_REFERENCE}" or none, not the text {show(value)} '
                        "(a file is given as a pathlib.Path)")
    if isinstance(value, ImagePrompt):
        return ImagePrompt(value.image, value.sha256)
    image, digest = open_reference(value if not isinstance(value, os.PathLike) else os.fspath(value))
    return ImagePrompt(image, digest)


def shown_reference(value):
    """A reference setting as JSON shows it: null, "frame" or "sha256:HEX"."""
    return value if value is None or isinstance(value, str) else f"sha256:{value.sha256}"


def show(value, limit: int = 60) -> str:
    """A short repr for messages: never huge, never failing (deep nesting, giant integers)."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlist, short.maxdict = 2, limit, limit, 6, 6
    shown = short.repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
