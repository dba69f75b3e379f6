"""The judge: what objects an image shows, and whether it matches a caption.

Exact on rendered scenes and tolerant of what a model draws:
- every pixel is explained as the background blended with one palette colour at some alpha
  (soft edges and blur give fractional alphas; colour drift gives a residual), and it belongs
  to the palette colour with the smallest residual when that residual is small enough;
- objects are 8-connected components of one colour (alpha ≥ ½) above a minimum area; their area
  and moments are measured from alphas over the component grown by one pixel;
- the shape is the nearest prototype in a small geometric feature space (fill ratio of the box,
  aspect, whether the centre is filled, vertical skew, axis-vs-diagonal kurtosis), prototypes measured on the renderer
  itself; the size from the area against that shape's small/large prototypes; the cell from the
  centroid."""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .render import render
from .scene import BACKGROUND, CELL_BY_INDEX, COLOURS, SHAPES, SIZES, Scene, ToyObject, parse_caption

MAX_RESIDUAL = 60.0  # RGB distance from the best blend of background and a palette colour
MIN_ALPHA = 0.5
MIN_AREA = 12.0  # pixels; the smallest real object (small bar) covers 27
CELL_EDGES = (21.5, 42.5)

_NAMES = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)
_BG = np.array(BACKGROUND, dtype=np.float64)


@dataclass(frozen=True)
class Detected:
    shape: str
    colour: str
    size: str
    cell: str
    area: float
    centroid: tuple[float, float]  # (x, y)

    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.cell)


def palette_alphas(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per palette colour k: alpha[k] of the best blend bg + a·(c_k − bg), and its residual."""
    img = image.astype(np.float64)[..., :3] - _BG  # (H, W, 3)
    d = _RGB - _BG  # (K, 3)
    a = np.einsum("hwc,kc->khw", img, d) / (d * d).sum(1)[:, None, None]
    a = np.clip(a, 0.0, 1.0)
    resid = np.linalg.norm(img[None] - a[..., None] * d[:, None, None, :], axis=-1)
    return a, resid


def _features(w: np.ndarray) -> dict:
    ys, xs = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    area = w.sum()
    cx, cy = (w * xs).sum() / area, (w * ys).sum() / area
    width, height = w.max(axis=0).sum(), w.max(axis=1).sum()
    var_y = (w * (ys - cy) ** 2).sum() / area
    skew_y = (w * (ys - cy) ** 3).sum() / area / max(var_y, 1e-6) ** 1.5
    # Kurtosis of the mass projected on the axes minus on the diagonals: a square's projection on
    # an axis is flat and on a diagonal peaked, a diamond's the reverse, a disc's the same in every
    # direction. Blur barely moves it, unlike the fill ratio of a small shape's box.
    def kurtosis(u):
        u = u - (w * u).sum() / area
        return (w * u**4).sum() / area / max(((w * u**2).sum() / area) ** 2, 1e-9)

    dx, dy = xs - cx, ys - cy
    cross = (kurtosis(dx) + kurtosis(dy) - kurtosis((dx + dy) / math.sqrt(2)) - kurtosis((dx - dy) / math.sqrt(2))) / 2
    ix, iy = int(round(cx)), int(round(cy))
    centre = w[max(iy - 0, 0) : iy + 1, max(ix - 0, 0) : ix + 1].mean() if 0 <= iy < w.shape[0] and 0 <= ix < w.shape[1] else 0.0
    return {
        "area": float(area),
        "cx": float(cx),
        "cy": float(cy),
        "fill": float(area / max(width * height, 1e-6)),
        "log_aspect": float(math.log(max(width, 1e-3) / max(height, 1e-3))),
        "centre": float(centre),
        "skew_y": float(skew_y),
        "cross": float(cross),
    }


_FEATURE_SCALE = {"fill": 0.08, "log_aspect": 0.25, "centre": 0.35, "skew_y": 0.25, "cross": 0.15}


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[tuple[str, str], dict]:
    """Feature means of every shape and size, measured on the renderer at each sub-cell jitter."""
    protos = {}
    for shape in SHAPES:
        for size in SIZES:
            feats = []
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    obj = ToyObject(shape, "red", size, "center", dx, dy)
                    found = _components(render(Scene((obj,))))
                    feats.append(found[0][1])
            protos[(shape, size)] = {k: float(np.mean([f[k] for f in feats])) for k in feats[0]}
    return protos


def _components(image: np.ndarray) -> list[tuple[str, dict]]:
    a, resid = palette_alphas(image)
    best = resid.argmin(axis=0)
    out = []
    for k, name in enumerate(_NAMES):
        ok = resid[k] <= MAX_RESIDUAL
        mask = (best == k) & (a[k] >= MIN_ALPHA) & ok
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        for i in range(1, n + 1):
            comp = labels == i
            grown = ndimage.binary_dilation(comp, structure=np.ones((3, 3), dtype=bool))
            w = np.where(grown & ok & ((best == k) | (a[k] < MIN_ALPHA)), a[k], 0.0)
            if w.sum() < MIN_AREA:
                continue
            out.append((name, _features(w)))
    return out


def _classify(feat: dict) -> tuple[str, str]:
    protos = _prototypes()

    def dist(p):
        return sum(((feat[k] - p[k]) / s) ** 2 for k, s in _FEATURE_SCALE.items())

    shape = min(SHAPES, key=lambda s: min(dist(protos[(s, z)]) for z in SIZES))
    small, large = protos[(shape, "small")]["area"], protos[(shape, "large")]["area"]
    size = "small" if feat["area"] < math.sqrt(small * large) else "large"
    return shape, size


def _cell(cx: float, cy: float) -> str:
    col = int(np.searchsorted(CELL_EDGES, cx))
    row = int(np.searchsorted(CELL_EDGES, cy))
    return CELL_BY_INDEX[(col, row)]


def detect(image) -> list[Detected]:
    """Objects the image shows (a (H, W, 3) uint8 array or a PIL image; 64×64 expected)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError("the judge needs an RGB image")
    found = []
    for colour, feat in _components(image):
        shape, size = _classify(feat)
        found.append(Detected(shape, colour, size, _cell(feat["cx"], feat["cy"]), feat["area"], (feat["cx"], feat["cy"])))
    return found


ATTRIBUTES = ("shape", "colour", "size", "cell")


@dataclass
class Verdict:
    match: bool  # the multiset of (shape, colour, size, cell) equals the caption's
    objects_right: bool  # the multiset of (shape, colour, size) equals the caption's, cells aside
    expected: list[tuple[str, str, str, str]]
    detected: list[Detected]
    per_object: list[dict]  # for each expected object: its best detected partner and attribute hits

    @property
    def cells_right(self) -> float:
        if not self.per_object:
            return 1.0
        return sum(p["cell"] for p in self.per_object) / len(self.per_object)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cells_right"] = self.cells_right
        return d


def judge(image, caption: str | Scene) -> Verdict:
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    expected = scene.keys()
    detected = detect(image)
    got = [d.key() for d in detected]
    match = Counter(expected) == Counter(got)
    objects_right = Counter(k[:3] for k in expected) == Counter(k[:3] for k in got)
    # Greedy pairing: each expected object with the unused detection sharing most attributes.
    unused = list(detected)
    per_object = []
    for exp in sorted(expected, key=lambda e: -max((sum(a == b for a, b in zip(e, d.key())) for d in detected), default=0)):
        if unused:
            best = max(unused, key=lambda d: sum(a == b for a, b in zip(exp, d.key())))
            unused.remove(best)
            hits = {attr: exp[i] == best.key()[i] for i, attr in enumerate(ATTRIBUTES)}
            per_object.append({"expected": exp, "detected": best.key(), **hits, "score": sum(hits.values()) / 4})
        else:
            per_object.append({"expected": exp, "detected": None, **{a: False for a in ATTRIBUTES}, "score": 0.0})
    return Verdict(match, objects_right, expected, detected, per_object)
