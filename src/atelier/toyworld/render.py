"""Anti-aliased rendering of toy-world scenes, with the contract's exact geometry.

Pixel (i, j) is the unit square centred on (x=j, y=i); its colour is the background blended with
each object's colour by the fraction of the square the object covers (8×8 supersampling)."""

from __future__ import annotations

import numpy as np

from .scene import BACKGROUND, CANVAS, COLOURS, Scene, ToyObject

SUPERSAMPLE = 8


def inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Whether points at offset (u, v) from an object's centre lie in the shape of half-size r."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    if shape == "triangle":  # apex (0, -r), base corners (±r, r)
        return (v <= r) & (np.abs(u) <= (v + r) / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "ring":  # annulus, inner diameter half the outer
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (r / 2) ** 2)
    if shape == "bar":  # as wide as the box, a third as tall
        return (np.abs(u) <= r) & (np.abs(v) <= r / 3)
    raise ValueError(f"unknown shape {shape!r}")


def box_pixels(obj: ToyObject) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive pixel range any part of the object's box touches."""
    x, y = obj.centre
    r = obj.px / 2
    lo = lambda c: max(0, int(np.floor(c - r + 0.5)))  # noqa: E731
    hi = lambda c: min(CANVAS - 1, int(np.ceil(c + r - 0.5)))  # noqa: E731
    return lo(x), lo(y), hi(x), hi(y)


def coverage(obj: ToyObject) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fraction of each pixel of the object's box region that the object covers."""
    x0, y0, x1, y1 = box_pixels(obj)
    cx, cy = obj.centre
    # Sample offsets nudged off the grid by different amounts in x and y, so that no sample falls
    # exactly on an edge of the shapes (axis-aligned or 45°), which would bias the coverage.
    offs = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    xs = (np.arange(x0, x1 + 1)[:, None] + offs[None, :] + 0.25 / SUPERSAMPLE).reshape(-1) - cx
    ys = (np.arange(y0, y1 + 1)[:, None] + offs[None, :] + 0.125 / SUPERSAMPLE).reshape(-1) - cy
    hit = inside(obj.shape, xs[None, :], ys[:, None], obj.px / 2)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    cov = hit.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))
    return cov, (x0, y0, x1, y1)


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 array."""
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for obj in scene.objects:
        cov, (x0, y0, x1, y1) = coverage(obj)
        region = img[y0 : y1 + 1, x0 : x1 + 1]
        region += cov[..., None] * (np.asarray(COLOURS[obj.colour], dtype=np.float64) - region)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_pil(scene: Scene):
    from PIL import Image

    return Image.fromarray(render(scene))
