"""Edit cases of the toy world: (source scene, source caption, target caption, expected target
scene, edit mask), for the edit types color, shape, size, add and remove (see the contract), and
the contract's partial-caption cases: attribute edits whose captions name only the edited object."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .judge import judge
from .render import box_pixels, render
from .scene import BASE_COLOURS, BASE_SHAPES, CANVAS, CELLS, SIZES, Scene, ToyObject, sample_object, sample_scene

EDIT_TYPES = ("color", "shape", "size", "add", "remove")
PARTIAL_EDIT_TYPES = ("color", "shape", "size")
MASK_DILATION = 2


@dataclass(frozen=True)
class EditCase:
    kind: str
    source: Scene
    target: Scene
    source_caption: str
    target_caption: str
    changed: tuple[ToyObject, ...]  # the source and target objects the edit touches

    def mask(self) -> np.ndarray:
        """Boolean (64, 64): the changed objects' boxes, dilated by 2 px."""
        m = np.zeros((CANVAS, CANVAS), dtype=bool)
        for obj in self.changed:
            x0, y0, x1, y1 = box_pixels(obj)
            m[y0 : y1 + 1, x0 : x1 + 1] = True
        return ndimage.binary_dilation(m, iterations=MASK_DILATION)

    def untouched(self) -> list[ToyObject]:
        return [o for o in self.source.objects if o not in self.changed]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "source_caption": self.source_caption,
            "target_caption": self.target_caption,
            "source": [o.__dict__ for o in self.source.objects],
            "target": [o.__dict__ for o in self.target.objects],
        }


def _captions(source: Scene, target: Scene, rng: random.Random) -> tuple[str, str]:
    """Source caption in random order; the target caption keeps that order (a new object last)."""
    order = list(source.objects)
    rng.shuffle(order)
    src = Scene(tuple(order))
    tgt_objs = []
    for o in order:
        match = next((t for t in target.objects if t.cell == o.cell), None)
        if match is not None:
            tgt_objs.append(match)
    tgt_objs += [t for t in target.objects if t not in tgt_objs]
    return src.caption(), Scene(tuple(tgt_objs)).caption()


def make_edit(source: Scene, kind: str, rng: random.Random, shapes=BASE_SHAPES, colours=tuple(BASE_COLOURS),
              partial: bool = False) -> EditCase:
    """One seeded edit of `source`. With `partial`, an attribute edit whose source and target captions
    name only the edited object ("a large red circle at the top left" -> "a large blue circle ...")."""
    if partial and kind not in PARTIAL_EDIT_TYPES:
        raise ValueError(f"partial-caption edits are {', '.join(PARTIAL_EDIT_TYPES)}, not {kind}")
    objs = list(source.objects)
    if kind == "add":
        if len(objs) >= 3:
            raise ValueError("add needs a source with at most 2 objects")
        free = [c for c in CELLS if source.object_in(c) is None]
        new = sample_object(rng, rng.choice(free), shapes, colours)
        target, changed = source.with_object(new), (new,)
    elif kind == "remove":
        if len(objs) < 2:
            raise ValueError("remove needs a source with at least 2 objects")
        old = rng.choice(objs)
        target, changed = source.replace_object(old, None), (old,)
    else:
        old = rng.choice(objs)
        attr = {"color": "colour", "shape": "shape", "size": "size"}[kind]
        choices = {"colour": colours, "shape": shapes, "size": tuple(SIZES)}[attr]
        value = rng.choice([c for c in choices if c != getattr(old, attr)])
        new = ToyObject(**{**old.__dict__, attr: value})
        target, changed = source.replace_object(old, new), (old, new)
    if partial:  # what a user writes: the edited object before and after
        src_cap, tgt_cap = (obj.phrase() for obj in changed)
    else:
        src_cap, tgt_cap = _captions(source, target, rng)
    return EditCase(kind, source, target, src_cap, tgt_cap, changed)


def _object_counts(kind: str, partial: bool) -> tuple[int, int]:
    """Fewest and most objects of a source scene for an edit of `kind`."""
    if partial:
        return 2, 3  # at least one unmentioned object to keep
    return {"add": (1, 2), "remove": (2, 3)}.get(kind, (1, 3))


def edit_cases(n: int, seed: int = 0, kinds=None, shapes=BASE_SHAPES, colours=tuple(BASE_COLOURS),
               partial: bool = False) -> list[EditCase]:
    """`n` seeded edit cases cycling through `kinds` (default: every type, or every attribute edit
    when `partial`), each on a fresh source scene that allows it.

    `partial`: the contract's partial-caption cases, on scenes of 2-3 objects, whose captions name
    only the edited object. The full-caption cases of a seed do not depend on this option's existence."""
    kinds = kinds or (PARTIAL_EDIT_TYPES if partial else EDIT_TYPES)
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        lo, hi = _object_counts(kind, partial)
        source = sample_scene(rng, rng.randint(lo, hi), shapes, colours)
        cases.append(make_edit(source, kind, rng, shapes, colours, partial))
    return cases


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if where is not None:
        a, b = a[where], b[where]
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass
class EditScore:
    success: bool  # the judge finds the expected target scene
    preservation: float  # share of untouched objects found unchanged (1.0 when there are none)
    background_psnr: float  # dB, source vs result outside the edit mask

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def score_edit(case: EditCase, result, source_image=None) -> EditScore:
    result = np.asarray(result)[..., :3]
    source_image = render(case.source) if source_image is None else np.asarray(source_image)[..., :3]
    verdict = judge(result, case.target)
    found = {d.key() for d in verdict.detected}
    keep = case.untouched()
    preservation = sum(o.key() in found for o in keep) / len(keep) if keep else 1.0
    return EditScore(verdict.match, preservation, psnr(source_image, result, ~case.mask()))
