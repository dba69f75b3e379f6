"""Scenes of the toy world (see docs/toyworld.md, the contract): objects, seeded sampling,
captions and the caption parser."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

from atelier.errors import UserError

CANVAS = 64
BACKGROUND = (245, 245, 245)
CELL_CENTRES = (11, 32, 53)
MAX_JITTER = 1

BASE_SHAPES = ("circle", "square", "triangle", "diamond")
RESERVED_SHAPES = ("ring", "bar")
SHAPES = BASE_SHAPES + RESERVED_SHAPES

BASE_COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 70, 190),
    "orange": (245, 130, 40),
}
RESERVED_COLOURS = {"teal": (40, 170, 170)}
COLOURS = {**BASE_COLOURS, **RESERVED_COLOURS}

SIZES = {"small": 9, "large": 16}

# cell name -> (column, row, caption phrase)
CELLS = {
    "top left": (0, 0, "at the top left"),
    "top": (1, 0, "at the top"),
    "top right": (2, 0, "at the top right"),
    "left": (0, 1, "on the left"),
    "center": (1, 1, "in the center"),
    "right": (2, 1, "on the right"),
    "bottom left": (0, 2, "at the bottom left"),
    "bottom": (1, 2, "at the bottom"),
    "bottom right": (2, 2, "at the bottom right"),
}
CELL_BY_INDEX = {(c, r): name for name, (c, r, _) in CELLS.items()}


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    cell: str
    dx: int = 0  # jitter of the centre from the cell centre, in pixels
    dy: int = 0

    @property
    def centre(self) -> tuple[int, int]:
        col, row, _ = CELLS[self.cell]
        return CELL_CENTRES[col] + self.dx, CELL_CENTRES[row] + self.dy

    @property
    def px(self) -> int:
        return SIZES[self.size]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {CELLS[self.cell][2]}"

    def key(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.cell)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...] = field(default_factory=tuple)

    def caption(self, rng: random.Random | None = None) -> str:
        """Object phrases in random order (seeded by `rng`), joined by ', ' and ' and '."""
        objs = list(self.objects)
        if rng is not None:
            rng.shuffle(objs)
        return join_phrases([o.phrase() for o in objs])

    def keys(self) -> list[tuple[str, str, str, str]]:
        return sorted(o.key() for o in self.objects)

    def object_in(self, cell: str) -> ToyObject | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def replace_object(self, old: ToyObject, new: ToyObject | None) -> "Scene":
        objs = [o for o in self.objects if o is not old]
        if new is not None:
            objs.insert(list(self.objects).index(old), new)
        return Scene(tuple(objs))

    def with_object(self, obj: ToyObject) -> "Scene":
        return Scene(self.objects + (obj,))


def join_phrases(phrases: list[str]) -> str:
    if not phrases:
        return ""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def sample_object(rng: random.Random, cell: str, shapes=BASE_SHAPES, colours=tuple(BASE_COLOURS)) -> ToyObject:
    return ToyObject(
        shape=rng.choice(shapes),
        colour=rng.choice(colours),
        size=rng.choice(tuple(SIZES)),
        cell=cell,
        dx=rng.randint(-MAX_JITTER, MAX_JITTER),
        dy=rng.randint(-MAX_JITTER, MAX_JITTER),
    )


def sample_scene(
    rng: random.Random,
    n_objects: int | None = None,
    shapes=BASE_SHAPES,
    colours=tuple(BASE_COLOURS),
) -> Scene:
    """1 to 3 objects (or exactly `n_objects`), each in its own cell."""
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 9:
        raise ValueError("a scene holds 1 to 9 objects")
    cells = rng.sample(list(CELLS), n)
    return Scene(tuple(sample_object(rng, c, shapes, colours) for c in cells))


_CELL_BY_PHRASE = {phrase: name for name, (_, _, phrase) in CELLS.items()}
_PHRASE_RE = re.compile(
    r"a (?P<size>{sizes}) (?P<colour>{colours}) (?P<shape>{shapes}) (?P<cell>{cells})".format(
        sizes="|".join(SIZES),
        colours="|".join(COLOURS),
        shapes="|".join(SHAPES),
        # longest first so "at the top left" wins over "at the top"
        cells="|".join(sorted(_CELL_BY_PHRASE, key=len, reverse=True)),
    )
)


def parse_caption(text: str) -> Scene:
    """Parse a caption written the contract's way back into a Scene (centres without jitter).

    Raises UserError naming the part that is not a toy-world object phrase."""
    text = " ".join(text.strip().lower().split())
    if not text:
        return Scene(())
    objs = []
    pos = 0
    while pos < len(text):
        m = _PHRASE_RE.match(text, pos)
        if not m:
            raise UserError(f"not a toy-world caption: cannot read {text[pos:pos + 40]!r}")
        objs.append(ToyObject(m["shape"], m["colour"], m["size"], _CELL_BY_PHRASE[m["cell"]]))
        pos = m.end()
        for sep in (", ", " and "):
            if text.startswith(sep, pos):
                pos += len(sep)
                break
        else:
            if pos != len(text):
                raise UserError(f"not a toy-world caption: cannot read {text[pos:pos + 40]!r}")
    cells = [o.cell for o in objs]
    if len(set(cells)) != len(cells):
        raise UserError("not a toy-world caption: two objects in the same cell")
    return Scene(tuple(objs))


def vocabulary() -> list[str]:
    """Every word a caption can use (reserved concepts included)."""
    words = {"a", "and", ","}
    words.update(SIZES)
    words.update(COLOURS)
    words.update(SHAPES)
    for _, _, phrase in CELLS.values():
        words.update(phrase.split())
    return sorted(words)


__all__ = [
    "ToyObject", "Scene", "sample_scene", "sample_object", "parse_caption", "join_phrases",
    "CELLS", "SHAPES", "BASE_SHAPES", "RESERVED_SHAPES", "COLOURS", "BASE_COLOURS",
    "RESERVED_COLOURS", "SIZES", "CANVAS", "BACKGROUND", "vocabulary", "replace",
]
