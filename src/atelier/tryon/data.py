"""VITON-HD's layout, read by the trainer and the batch command:

    DIR/train_pairs.txt, DIR/test_pairs.txt, DIR/test_unpaired_pairs.txt   lines "<person file> <garment file>"
    DIR/{train,test}/image/<person file>
    DIR/{train,test}/cloth/<garment file>
    DIR/{train,test}/agnostic-mask/<person stem>_mask.png   (or DIR/{split}/mask/<person stem>.png)

The mask is white where the garment goes (the region drawn anew)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atelier.core.images import pixels_from_image
from atelier.core.io import read_text
from atelier.errors import UserError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Pair:
    person: Path
    garment: Path
    mask: Path

    @property
    def name(self) -> str:
        """The result's file stem, `<person stem>__<garment stem>`: the names `atelier evaluate tryon` reads."""
        return f"{self.person.stem}__{self.garment.stem}"


def mask_path(root: Path, split: str, person: str) -> Path:
    stem = Path(person).stem
    for candidate in (root / split / "agnostic-mask" / f"{stem}_mask.png", root / split / "mask" / f"{stem}.png"):
        if candidate.is_file():
            return candidate
    return root / split / "agnostic-mask" / f"{stem}_mask.png"


def split_of(pairs_file) -> str:
    """VITON-HD's naming: train_pairs.txt is the train split, the others (test_pairs, test_unpaired_pairs) test."""
    return "train" if Path(pairs_file).name.startswith("train") else "test"


def read_pairs(data_dir, split: str = "train", pairs_file=None) -> list[Pair]:
    """The pairs of `split` (from DIR/<split>_pairs.txt, or `pairs_file`: a path, or a name inside DIR),
    every file checked to exist: a missing one is one UserError naming it."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"try-on data folder not found: {root}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    listing = Path(pairs_file) if pairs_file is not None else root / f"{split}_pairs.txt"
    if pairs_file is not None and not listing.is_file() and (root / listing).is_file():
        listing = root / listing
    pairs = []
    for number, line in enumerate(read_text(listing, "pairs file").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{listing}:{number}: expected \"<person file> <garment file>\", got {line.strip()!r}")
        pair = Pair(root / split / "image" / parts[0], root / split / "cloth" / parts[1], mask_path(root, split, parts[0]))
        for what, path in (("person image", pair.person), ("garment image", pair.garment), ("mask", pair.mask)):
            if not path.is_file():
                raise UserError(f"{listing}:{number}: {what} not found: {path}")
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{listing} lists no pairs")
    return pairs


# ---------------------------------------------------------------- pixels

def to_tensor(image, size: tuple[int, int], *, mask: bool = False) -> torch.Tensor:
    """A PIL image as (C, H, W) at `size` (H, W): RGB in [-1, 1] (bicubic), or a mask in {0, 1} (nearest,
    white above half)."""
    from PIL import Image

    height, width = size
    if mask:
        image = image.convert("L")
        if image.size != (width, height):
            image = image.resize((width, height), Image.NEAREST)
        return torch.from_numpy((np.asarray(image) > 127).astype(np.float32))[None]
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    return pixels_from_image(image)


def load_pair(pair: Pair, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(person, garment, mask) tensors at `size`; the mask must have the person image's size."""
    from atelier.core.images import open_image

    person, garment, mask = open_image(pair.person), open_image(pair.garment), open_image(pair.mask)
    check_mask(person, mask, pair.mask)
    return to_tensor(person, size), to_tensor(garment, size), to_tensor(mask, size, mask=True)


def check_mask(person, mask, name) -> None:
    if mask.size != person.size:
        raise UserError(f"mask {name} is {mask.size[0]}x{mask.size[1]}, but the person image is "
                        f"{person.size[0]}x{person.size[1]}: the mask must have the person image's size")
