"""A1111's extra-network tags in prompts: `<lora:name>`, `<lora:name:0.8>`, `<lora:name:te:unet>`
(also `te=` / `unet=`), and the words that name textual-inversion embeddings.

As in A1111 (modules/extra_networks.py `parse_prompt`), every `<type:args>` tag is cut out of the
prompt text before it is encoded, leaving what surrounds it untouched, and a tag's weight defaults to
1. Only the positive prompt's tags apply; A1111 leaves a negative prompt as it is. Pure text:
finding and loading the files is the caller's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atelier.errors import UserError

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_TYPES = ("lora",)


@dataclass(frozen=True)
class LoraTag:
    name: str
    text_weight: float = 1.0  # A1111's te multiplier
    unet_weight: float = 1.0

    @property
    def weight(self):
        """What `atelier.models.activate_loras` takes: one number, or (text encoder, UNet)."""
        return self.text_weight if self.text_weight == self.unet_weight else (self.text_weight, self.unet_weight)


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"cannot read the weight {text!r} in {tag}") from None


def _lora_tag(args: str, tag: str) -> LoraTag:
    items = args.split(":")
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3 or not positional or not positional[0].strip():
        raise UserError(f"cannot read {tag}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    text = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(text)), tag)
    return LoraTag(positional[0].strip(), text, unet)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt with its `<…:…>` tags cut out, and its LoRA tags in order. A tag of another
    extra-network type (hypernetworks, ...) is a UserError: atelier applies LoRAs only."""
    tags: list[LoraTag] = []

    def cut(match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in LORA_TYPES:
            raise UserError(f"the prompt uses {match.group(0)}: atelier applies <lora:…> extra networks only")
        tags.append(_lora_tag(args, match.group(0)))
        return ""

    return _TAG.sub(cut, prompt), tags


def lora_tag(name: str, weight: float) -> str:
    """The tag A1111 reads back: `<lora:name:0.8>`."""
    weight = float(weight)
    return f"<lora:{name}:{int(weight) if weight.is_integer() else round(weight, 6)}>"


def mentions_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a word of its own, ignoring case (as A1111 finds an
    embedding's name among the prompt's tokens): `easynegative` in "(EasyNegative:1.2), blurry"."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, flags=re.IGNORECASE) is not None
