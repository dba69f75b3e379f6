"""Concept-learning sets of the toy world: the reserved shapes `ring` and `bar` and the colour
`teal` (docs/toyworld.md), which base training never shows, taught to a model from a few
rendered instance images (DreamBooth, textual inversion, LoRA).

An example is a scene in which one object carries the concept, captioned the contract's way but
with a token (`sks`) standing where the concept's word would: `a large red sks at the top left`
teaches the shape `ring`, `a small sks circle in the center` the colour `teal`. The held-out
examples are scenes none of the instance images show; a generated image is scored by the judge
against the scene the token stands for."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .judge import ATTRIBUTES, judge
from .scene import (BASE_COLOURS, BASE_SHAPES, CELLS, RESERVED_COLOURS, RESERVED_SHAPES, Scene, ToyObject, join_phrases,
                    sample_object)

CONCEPTS = {**{shape: "shape" for shape in RESERVED_SHAPES}, **{colour: "colour" for colour in RESERVED_COLOURS}}
HELD_OUT_SEED = 1_000_003  # the held-out scenes come from their own stream, never the instances'


@dataclass(frozen=True)
class ConceptExample:
    scene: Scene  # what the image shows (the concept object first)
    caption: str  # the caption with the token in place of the concept's word
    true_caption: str  # the same caption with the concept's word

    def carrier_phrase(self) -> str:
        """The caption's phrase of the object that carries the concept (the token in place)."""
        phrases, true = re.split(r", | and ", self.caption), re.split(r", | and ", self.true_caption)
        return phrases[true.index(self.scene.objects[0].phrase())]

    def to_dict(self) -> dict:
        return {"caption": self.caption, "true_caption": self.true_caption,
                "objects": [o.__dict__ for o in self.scene.objects]}


def check_concept(concept: str) -> str:
    if concept not in CONCEPTS:
        from atelier.errors import UserError

        raise UserError(f"unknown concept {concept!r}; the toy world reserves {', '.join(CONCEPTS)}")
    return CONCEPTS[concept]


def concept_scene(rng: random.Random, concept: str, n_objects: int) -> Scene:
    """One object with the concept (its other attributes random), then n_objects - 1 base objects."""
    kind = check_concept(concept)
    cells = rng.sample(list(CELLS), n_objects)
    first = sample_object(rng, cells[0])
    first = ToyObject(**{**first.__dict__, kind: concept})
    return Scene((first,) + tuple(sample_object(rng, c, BASE_SHAPES, tuple(BASE_COLOURS)) for c in cells[1:]))


def tokenised(phrase: str, concept: str, token: str) -> str:
    return " ".join(token if word == concept else word for word in phrase.split(" "))


def example(scene: Scene, concept: str, token: str, rng: random.Random) -> ConceptExample:
    order = list(scene.objects)
    rng.shuffle(order)
    phrases = [o.phrase() for o in order]
    return ConceptExample(scene, join_phrases([tokenised(p, concept, token) for p in phrases]), join_phrases(phrases))


def _examples(concept: str, n: int, seed: int, token: str, objects: tuple[int, ...], exclude=frozenset()) -> list[ConceptExample]:
    rng = random.Random(f"{concept}:{seed}")
    out, seen = [], set(exclude)
    while len(out) < n:
        scene = concept_scene(rng, concept, rng.choice(objects))
        key = tuple(scene.keys())
        if key in seen:
            continue
        seen.add(key)
        out.append(example(scene, concept, token, rng))
    return out


def instance_examples(concept: str, n: int = 8, seed: int = 0, token: str = "sks", objects=(1, 2)) -> list[ConceptExample]:
    """The few training images of a concept: scenes of 1-2 objects, one of them the concept."""
    return _examples(concept, n, seed, token, tuple(objects))


def held_out_examples(concept: str, n: int = 50, token: str = "sks", objects=(1, 2),
                      instances: list[ConceptExample] = ()) -> list[ConceptExample]:
    """Captions to generate from after training, none of them an instance image's scene."""
    exclude = frozenset(tuple(e.scene.keys()) for e in instances)
    return _examples(concept, n, HELD_OUT_SEED, token, tuple(objects), exclude)


def score_concept(image, ex: ConceptExample, concept: str) -> dict:
    """concept_right: the judge names the concept on the object that carries it; rest_right: every
    other attribute of the caption is right (that object's other attributes, every other object);
    match: the whole scene (no extra objects either)."""
    kind = check_concept(concept)
    verdict = judge(image, ex.scene)
    carrier = ex.scene.objects[0].key()
    concept_right, rest_right = False, True
    for entry in verdict.per_object:
        if tuple(entry["expected"]) == carrier and not concept_right:
            concept_right = bool(entry[kind])
            rest_right &= all(entry[a] for a in ATTRIBUTES if a != kind)
        else:
            rest_right &= all(entry[a] for a in ATTRIBUTES)
    return {"concept_right": concept_right, "rest_right": bool(rest_right), "match": bool(verdict.match)}


def composites(instances: list[ConceptExample], images, backgrounds, n: int, seed: int = 0) -> list[tuple]:
    """n composite training images, the instances in turn: each instance's concept object cut out of its
    image and pasted into a background whose caption leaves that object's cell free (at most two objects
    there), captioned with both, phrases in random order. `images`: the instances' pictures, (64, 64, 3)
    uint8 each; `backgrounds`: (picture, base-world caption) pairs, e.g. the base model's own drawings of
    base captions (the prior-preservation class images), so that a composite shows nothing the instance
    images and the base model do not. Returns (picture, caption) pairs.

    The object's pixels are the instance image's own; the renderer supplies only its coverage (where it
    lies, anti-aliased edges included), which removes the instance's background exactly:
    composite = instance + (background picture - BACKGROUND) * (1 - coverage) inside the object's box."""
    import numpy as np

    from atelier.errors import UserError

    from .render import coverage
    from .scene import BACKGROUND, parse_caption

    parsed = []
    for picture, caption in backgrounds:
        try:
            parsed.append((np.asarray(picture, dtype=np.float64)[..., :3], parse_caption(caption)))
        except (UserError, ValueError):
            continue  # a background whose caption is not a base-world scene says nothing of its free cells
    rng = random.Random(f"composites:{seed}")
    out = []
    for k in range(n):
        index = k % len(instances)
        ex, picture = instances[index], np.asarray(images[index], dtype=np.float64)[..., :3]
        carrier = ex.scene.objects[0]
        free = [(base, scene) for base, scene in parsed
                if len(scene.objects) <= 2 and carrier.cell not in {o.cell for o in scene.objects}]
        if not free:
            raise UserError(f"no background leaves the {carrier.cell} cell free for instance {index}: give more backgrounds")
        base, scene = rng.choice(free)
        cov, (x0, y0, x1, y1) = coverage(carrier)
        result = base.copy()
        box = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        result[box] = picture[box] + (base[box] - np.asarray(BACKGROUND, dtype=np.float64)) * (1 - cov[..., None])
        phrases = [o.phrase() for o in scene.objects] + [ex.carrier_phrase()]
        rng.shuffle(phrases)
        out.append((result.round().clip(0, 255).astype(np.uint8), join_phrases(phrases)))
    return out
