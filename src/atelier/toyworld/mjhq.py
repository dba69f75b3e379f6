"""A toy MJHQ-30K: toy-world captions in MJHQ's `meta_data.json` format, ten categories, and the
rendered reference images in MJHQ's layout (`mjhq30k_imgs/{category}/{id}.png`).

The categories split scenes by what they hold, and no scene fits two of them:
- `circle`, `square`, `triangle`, `diamond`: one object of that shape;
- `circles`, `squares`, `triangles`, `diamonds`: two or three objects, all of that shape;
- `mixed-pair`: two objects of different shapes; `mixed-trio`: three objects, not all of one shape.
Colours, sizes, cells and jitter are drawn freely from the base world.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .scene import BASE_SHAPES, Scene, sample_scene

META_FILE = "meta_data.json"
IMAGES_DIR = "mjhq30k_imgs"
CATEGORIES = (*BASE_SHAPES, *(f"{s}s" for s in BASE_SHAPES), "mixed-pair", "mixed-trio")


def category_of(scene: Scene) -> str:
    """The toy MJHQ category a scene belongs to."""
    shapes = {o.shape for o in scene.objects}
    n = len(scene.objects)
    if len(shapes) == 1:
        (shape,) = shapes
        return shape if n == 1 else f"{shape}s"
    return "mixed-pair" if n == 2 else "mixed-trio"


def sample_category(rng: random.Random, category: str) -> Scene:
    """A random scene of `category`."""
    if category in BASE_SHAPES:
        return sample_scene(rng, 1, shapes=(category,))
    if category.endswith("s") and category[:-1] in BASE_SHAPES:
        return sample_scene(rng, rng.randint(2, 3), shapes=(category[:-1],))
    if category not in CATEGORIES:
        raise ValueError(f"unknown toy MJHQ category {category!r}")
    n = 2 if category == "mixed-pair" else 3
    while True:  # rejection: the draw of a scene of one shape is rare (1/4 or 1/16)
        scene = sample_scene(rng, n)
        if category_of(scene) == category:
            return scene


def toy_mjhq(per_category: int, seed: int = 0) -> list[tuple[str, str, str, Scene]]:
    """(id, category, caption, scene) of every entry, category by category; the same for a seed.
    Ids are 16 hex digits, like MJHQ's hashes."""
    rng = random.Random(seed)
    entries = []
    for category in CATEGORIES:
        for i in range(per_category):
            scene = sample_category(rng, category)
            caption = scene.caption(rng)
            digest = hashlib.sha1(f"{seed}/{category}/{i}/{caption}".encode()).hexdigest()[:16]
            entries.append((digest, category, caption, scene))
    return entries


def write_toy_mjhq(out, per_category: int, seed: int = 0) -> Path:
    """Write `out/meta_data.json` and `out/mjhq30k_imgs/{category}/{id}.png` (each file atomic; the
    meta_data.json last, so that its presence means the set is whole). Returns its path."""
    from atelier.core.images import save_png
    from atelier.core.io import atomic_write_bytes

    from .render import render_pil

    out = Path(out)
    meta = {}
    for entry_id, category, caption, scene in toy_mjhq(per_category, seed):
        save_png(render_pil(scene), out / IMAGES_DIR / category / f"{entry_id}.png", caption)
        meta[entry_id] = {"category": category, "prompt": caption}
    path = out / META_FILE
    atomic_write_bytes(path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return path
