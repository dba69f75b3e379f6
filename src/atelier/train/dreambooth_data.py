"""The data of DreamBooth-style fine-tuning (train/lora.py): instance images with their captions, class
images for prior preservation (generated with the base model when too few exist), kohya's caption
shuffling and aspect-ratio buckets, and a latent cache.

* Captions: a `.txt` file beside each image (kohya's and the diffusers scripts' custom captions; another
  extension with --caption_extension), else --instance_prompt.
* Caption shuffle (kohya sd-scripts `process_caption`): the caption is split at commas, the first
  `keep_tokens` pieces stay in front, the rest is shuffled, and the pieces are joined by ", ". Each
  sample of each step draws its own order, also when latents are cached (the cache holds images only;
  captions are tokenized every step).
* Buckets (kohya sd-scripts `make_bucket_resolutions` / `BucketManager.select_bucket`): resolutions of
  about resolution² pixels, sides from --min_bucket_reso to --max_bucket_reso in steps of
  --bucket_reso_steps; an image goes to the bucket of the nearest aspect ratio, is scaled to cover it and
  cropped. A batch holds images of one bucket. Without buckets every image is resolution × resolution.
* Crops are decided once per image (centred with --center_crop, else at a seeded random offset, as the
  diffusers scripts crop when they build the dataset); flips (--random_flip) are drawn per sample and
  step. The latent cache holds one latent per image and flip.
* Order: epoch e is a seeded shuffle of every bucket's images (× --repeats) cut into batches, the batches
  shuffled; the k-th batch of the whole run is a function of (seed, k). Training step s, micro-batch m,
  process r of W reads batch (s · accumulation + m) · W + r, so a resumed run reads exactly what an
  uninterrupted one reads, and processes read disjoint batches.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atelier.core.images import IMAGE_SUFFIXES, list_images, pixels_from_image, sidecar_caption
from atelier.errors import UserError



# ---------------------------------------------------------------- captions

def token_pattern(token: str) -> re.Pattern:
    """`token` as a whole word (not inside a longer word: TOK is not replaced in TOKYO)."""
    return re.compile(rf"(?<![\w<]){re.escape(token)}(?![\w>])")


def replace_tokens(text: str, mapping: dict[str, str]) -> str:
    """Every abstraction of `mapping` (--token_abstraction) replaced by its new tokens ("<s0><s1>")."""
    for token, replacement in mapping.items():
        text = token_pattern(token).sub(replacement, text)
    return text


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's caption shuffle: comma-separated pieces, the first `keep_tokens` kept in place."""
    pieces = [p.strip() for p in caption.strip().split(",")]
    fixed, flex = pieces[:keep_tokens], pieces[keep_tokens:]
    rng.shuffle(flex)
    return ", ".join(fixed + flex)


# ---------------------------------------------------------------- buckets

def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, divisible: int) -> list:
    """kohya's bucket resolutions (width, height): the square of the area's side, and every side from
    `min_size` to `max_size` in steps of `divisible` paired with the longest other side that keeps the area."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible * divisible))
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def select_bucket(width: int, height: int, buckets: list) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's choice: the bucket (width, height) of the nearest aspect ratio (the image's own size if it is
    a bucket), and the size the image is scaled to so that it covers the bucket."""
    reso = (width, height)
    if reso not in buckets:
        ratios = np.array([w / h for w, h in buckets])
        reso = tuple(buckets[int(np.abs(ratios - width / height).argmin())])
    if width / height > reso[0] / reso[1]:
        scale = reso[1] / height
    else:
        scale = reso[0] / width
    return reso, (int(width * scale + 0.5), int(height * scale + 0.5))


# ---------------------------------------------------------------- the data

@dataclass
class Item:
    path: Path
    caption: str
    size: tuple[int, int] = (0, 0)  # the file's (width, height)
    bucket: tuple[int, int] = (0, 0)  # (width, height) trained at
    resized: tuple[int, int] = (0, 0)  # (width, height) before the crop
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop in the resized image


def read_instance_folder(folder, instance_prompt: str | None, caption_extension: str = ".txt") -> list[Item]:
    """The images of `folder`, each with the caption of its `.txt` file (else `instance_prompt`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--instance_data_dir {folder}: no such folder")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"--instance_data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for path in paths:
        caption = sidecar_caption(path, caption_extension)
        if not caption:
            if not instance_prompt:
                raise UserError(f"{path.name} has no caption ({path.with_suffix(caption_extension).name}) and no "
                                "--instance_prompt was given")
            caption = instance_prompt
        items.append(Item(path, caption))
    return items


def class_items(paths, class_prompt: str, caption_extension: str = ".txt") -> list[Item]:
    """Class images for prior preservation, each with the caption of its `.txt` file when it has one
    (kohya's captioned regularisation images), else `class_prompt` (the DreamBooth scripts' one prompt)."""
    items = []
    for path in paths:
        caption = sidecar_caption(Path(path), caption_extension)
        if not caption and not class_prompt:
            raise UserError(f"class image {Path(path).name} has no caption ({Path(path).with_suffix(caption_extension).name}) "
                            "and no --class_prompt was given")
        items.append(Item(Path(path), caption or class_prompt))
    return items


def _open(path: Path):
    from PIL import ImageOps

    from atelier.core.images import open_image

    return ImageOps.exif_transpose(open_image(path)).convert("RGB")


def place(items: list[Item], buckets: list | None, resolution: int, center_crop: bool, seed: int) -> None:
    """Give every item its bucket, its resized size and its crop (seeded, or centred)."""
    for index, item in enumerate(items):
        item.size = _open(item.path).size
        if buckets:
            item.bucket, item.resized = select_bucket(*item.size, buckets)
        else:
            item.bucket = (resolution, resolution)
            w, h = item.size
            scale = max(resolution / w, resolution / h)
            item.resized = (max(resolution, int(w * scale + 0.5)), max(resolution, int(h * scale + 0.5)))
        spare_w, spare_h = item.resized[0] - item.bucket[0], item.resized[1] - item.bucket[1]
        if center_crop:
            item.crop = (spare_h // 2, spare_w // 2)
        else:
            rng = random.Random(seed * 7919 + index)
            item.crop = (rng.randint(0, spare_h), rng.randint(0, spare_w))


def pixels(item: Item, bucket: tuple[int, int] | None = None, flip: bool = False) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: the item scaled and cropped to its bucket (or to `bucket`, centred), flipped."""
    from PIL import Image

    image = _open(item.path)
    if bucket is None or tuple(bucket) == tuple(item.bucket):
        (w, h), (top, left), resized = item.bucket, item.crop, item.resized
    else:  # a class image read at the size of the instance batch it joins
        w, h = bucket
        scale = max(w / image.width, h / image.height)
        resized = (max(w, int(image.width * scale + 0.5)), max(h, int(image.height * scale + 0.5)))
        top, left = (resized[1] - h) // 2, (resized[0] - w) // 2
    if image.size != tuple(resized):
        image = image.resize(resized, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + w, top + h))
    x = pixels_from_image(image)
    return x.flip(-1) if flip else x


def time_ids(item: Item, bucket: tuple[int, int], flip: bool) -> list[int]:
    """SDXL's micro-conditioning of a sample: original (h, w), crop (top, left), target (h, w). A flipped
    sample's crop is measured from the right edge, as kohya does."""
    top, left = item.crop if tuple(bucket) == tuple(item.bucket) else (0, 0)
    if flip and tuple(bucket) == tuple(item.bucket):
        left = item.resized[0] - left - bucket[0]
    return [item.size[1], item.size[0], top, left, bucket[1], bucket[0]]


def batch_index(step: int, micro: int, accumulation: int, rank: int = 0, world: int = 1) -> int:
    """Which batch of the run process `rank` of `world` reads at `step`, micro-batch `micro`."""
    return (step * accumulation + micro) * world + rank


@dataclass
class Sample:
    """One training batch: instance items (and class items, for prior preservation) with their flips."""
    items: list[Item]
    flips: list[bool]
    captions: list[str]
    bucket: tuple[int, int]
    classes: list[Item]
    class_flips: list[bool]


class DreamBoothData:
    """Instance (and class) images, their captions and batches; see the module docstring."""

    def __init__(self, items: list[Item], *, batch_size: int, seed: int, repeats: int = 1, random_flip: bool = False,
                 shuffle: bool = False, keep_tokens: int = 0, token_map: dict[str, str] | None = None,
                 classes: list[Item] | None = None, class_prompt: str = ""):
        self.items, self.classes = items, classes or []
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats
        self.random_flip, self.shuffle, self.keep_tokens = random_flip, shuffle, keep_tokens
        self.token_map = token_map or {}
        self.class_prompt = replace_tokens(class_prompt, self.token_map)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            by_bucket.setdefault(tuple(item.bucket), []).append(index)
        self.buckets = dict(sorted(by_bucket.items()))
        self.batches_per_epoch = sum(math.ceil(len(v) * repeats / batch_size) for v in self.buckets.values())
        self._epoch: tuple[int, list] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            batches = []
            for indices in self.buckets.values():
                order = [i for i in indices for _ in range(self.repeats)]
                rng.shuffle(order)
                batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def batch(self, k: int) -> Sample:
        """The k-th batch of the run (k counts over epochs): a pure function of (seed, k)."""
        epoch, index = divmod(k, self.batches_per_epoch)
        picks = [self.items[i] for i in self.epoch_batches(epoch)[index]]
        rng = random.Random((self.seed * 1_000_003 + k) * 31 + 7)
        flips = [self.random_flip and rng.random() < 0.5 for _ in picks]
        captions = [replace_tokens(item.caption, self.token_map) for item in picks]
        if self.shuffle:
            captions = [shuffle_caption(c, self.keep_tokens, rng) for c in captions]
        classes, class_flips = [], []
        if self.classes:
            first = k * self.batch_size
            classes = [self.classes[(first + j) % len(self.classes)] for j in range(len(picks))]
            class_flips = [self.random_flip and rng.random() < 0.5 for _ in picks]
        return Sample(picks, flips, captions, tuple(picks[0].bucket), classes, class_flips)


class LatentCache:
    """Latents of images by (file, bucket, flip), encoded on first use; captions are not cached."""

    def __init__(self, encode):
        self.encode, self.store = encode, {}

    def __call__(self, item: Item, bucket, flip: bool) -> torch.Tensor:
        key = (str(item.path), tuple(bucket), bool(flip))
        if key not in self.store:
            self.store[key] = self.encode(pixels(item, bucket, flip)[None])[0]
        return self.store[key]


# ---------------------------------------------------------------- class images

def ensure_class_images(pipe, folder, prompt: str, count: int, *, resolution: int, seed: int,
                        rank: int = 0, world: int = 1, wait=None) -> list[Path]:
    """At least `count` images in `folder` for prior preservation: those there are reused, the missing
    ones generated with the base model (`atelier.generate`, its default sampler, steps and guidance;
    A1111 metadata in each PNG), `class-<k>.png` from seed + k, each written atomically, so an
    interrupted generation resumes where it stopped. Processes split the work; `wait()` joins them."""
    from atelier.core.images import save_png
    from atelier.generate import GenerationRequest, generate

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--class_data_dir {folder} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    have = list_images(folder)
    todo, k = [], 0
    while len(have) + len(todo) < count:
        if not (folder / f"class-{k:05d}.png").exists():
            todo.append(k)
        k += 1
    if todo and not prompt:
        raise UserError(f"--class_data_dir {folder} holds {len(have)} of --num_class_images {count} images: "
                        "give --class_prompt to generate the rest")
    mine = todo[rank::world]
    if mine:
        from tqdm.auto import tqdm

        for k in tqdm(mine, desc="class images", disable=rank != 0):
            request = GenerationRequest(prompt, seed=seed + k, width=resolution, height=resolution)
            image = generate(pipe, request, progress=False)[0]
            save_png(image.image, folder / f"class-{k:05d}.png", image.parameters)
    if wait is not None:
        wait()
    return list_images(folder)[:count]
