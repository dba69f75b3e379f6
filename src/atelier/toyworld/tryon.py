"""Try-on cases of the toy world (docs/toyworld.md, "Try-on cases"; docs/tryon-toyworld.md): a person
(a rendered scene of 1-3 objects, one of them the garment slot), a garment (a product shot: one
`large` object in the `center` cell), a mask (the slot's 21 × 21 cell box) and the ground truth (the
person with the slot object's shape and colour replaced by the garment's, its size, cell and jitter
kept); the judge's score of a result; and the data set in VITON-HD's folder layout that try-on
trainers read.

    case = tryon_cases(1, seed=0, paired=False)[0]
    score_tryon(render(case.ground_truth), case)   # {"success": True, "preserved": True, ...}
    write_tryon_data("data/tryon", n=1000, test_n=100, seed=0)
    score_tryon_folder("results", "data/tryon")    # results/{paired,unpaired}/<person>__<garment>.png
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atelier.errors import UserError

from .judge import detect
from .render import render
from .scene import BASE_COLOURS, BASE_SHAPES, CANVAS, CELL_CENTRES, CELLS, Scene, ToyObject, sample_scene

GARMENT_CELL = "center"
GARMENT_SIZE = "large"
CELL_BOX = 21  # the mask: a 21 × 21 px square centred on the slot's cell centre
PAIRS_FILES = {"paired": "test_pairs.txt", "unpaired": "test_unpaired_pairs.txt"}
TRAIN_PAIRS = "train_pairs.txt"
CASES_FILE = "cases.jsonl"
MANIFEST = "tryon.json"
RESULT_SEPARATOR = "__"  # results and ground truths: <person stem>__<garment stem>.png


def garment_object(shape: str, colour: str) -> ToyObject:
    """The product shot's object: large, centred in the `center` cell (no jitter)."""
    return ToyObject(shape, colour, GARMENT_SIZE, GARMENT_CELL, 0, 0)


@dataclass(frozen=True)
class TryOnCase:
    person: Scene
    slot: ToyObject  # the person's object the garment replaces (one of person.objects)
    garment: ToyObject  # the product shot's object (large, center)

    @property
    def garment_scene(self) -> Scene:
        return Scene((self.garment,))

    @property
    def worn(self) -> ToyObject:
        """The slot object wearing the garment: its shape and colour, the slot's size, cell and jitter."""
        return ToyObject(**{**self.slot.__dict__, "shape": self.garment.shape, "colour": self.garment.colour})

    @property
    def ground_truth(self) -> Scene:
        return self.person.replace_object(self.slot, self.worn)

    @property
    def paired(self) -> bool:
        """Whether the garment is the slot's own (the ground truth is the person)."""
        return (self.garment.shape, self.garment.colour) == (self.slot.shape, self.slot.colour)

    def untouched(self) -> list[ToyObject]:
        return [o for o in self.person.objects if o is not self.slot]

    def mask(self) -> np.ndarray:
        """uint8 (64, 64): 255 on the slot cell's 21 × 21 box, 0 elsewhere."""
        return cell_mask(self.slot.cell)

    def to_dict(self) -> dict:
        return {"person_scene": [o.__dict__ for o in self.person.objects], "slot": self.slot.__dict__,
                "garment_object": self.garment.__dict__, "expected": [o.__dict__ for o in self.ground_truth.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "TryOnCase":
        person = Scene(tuple(ToyObject(**o) for o in d["person_scene"]))
        slot = ToyObject(**d["slot"])
        slot = next((o for o in person.objects if o == slot), None)
        if slot is None:
            raise ValueError("the slot is not one of the person's objects")
        return cls(person, slot, ToyObject(**d["garment_object"]))


def cell_mask(cell: str) -> np.ndarray:
    col, row, _ = CELLS[cell]
    cx, cy = CELL_CENTRES[col], CELL_CENTRES[row]
    half = CELL_BOX // 2
    m = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    m[cy - half : cy + half + 1, cx - half : cx + half + 1] = 255
    return m


def make_tryon_case(person: Scene, slot: ToyObject, garment: ToyObject | None = None) -> TryOnCase:
    """A case from its parts; without `garment`, the paired one (the slot's own shape and colour)."""
    if not any(o is slot for o in person.objects):
        raise ValueError("the slot must be one of the person's objects")
    if garment is None:
        garment = garment_object(slot.shape, slot.colour)
    if (garment.size, garment.cell) != (GARMENT_SIZE, GARMENT_CELL):
        raise ValueError("a garment is a large object in the center cell")
    return TryOnCase(person, slot, garment)


def sample_tryon_case(rng: random.Random, paired: bool = True, shapes=BASE_SHAPES, colours=tuple(BASE_COLOURS)) -> TryOnCase:
    """A person of 1-3 objects, a random slot among them, and its own garment (`paired`) or a random one."""
    person = sample_scene(rng, None, shapes, colours)
    slot = rng.choice(person.objects)
    garment = None if paired else garment_object(rng.choice(shapes), rng.choice(colours))
    return make_tryon_case(person, slot, garment)


def tryon_cases(n: int, seed: int = 0, paired: bool = True) -> list[TryOnCase]:
    """`n` seeded cases (the same seed gives the same cases)."""
    rng = random.Random(f"tryon:{'paired' if paired else 'unpaired'}:{seed}")
    return [sample_tryon_case(rng, paired) for _ in range(n)]


# ----------------------------------------------------------------------------- scoring


def score_tryon(result, case: TryOnCase) -> dict:
    """The judge's verdict on a try-on result (a 64×64 RGB array or PIL image):

    - success: the slot cell holds exactly one object, of the garment's shape and colour at the slot's size;
    - garment_right: the same without the size. The contract's inputs do not show the slot's size (the
      mask hides the whole cell and every garment is a large product shot), so no method can know it:
      success can only reach the share of slots whose size the method happens to draw;
    - preserved: every other object of the person is found unchanged (shape, colour, size, cell);
    - preservation: the share of them found (1.0 when the person has no other object);
    - scene_match: the judge finds exactly the ground-truth scene (nothing else anywhere);
    - objects: per person object, its role (slot / kept), what was expected and what the cell shows."""
    image = np.asarray(result.convert("RGB") if hasattr(result, "convert") else result)[..., :3]
    if image.shape[:2] != (CANVAS, CANVAS):
        raise ValueError(f"the judge reads {CANVAS}x{CANVAS} images, not {image.shape[1]}x{image.shape[0]}")
    detected = detect(image)
    keys = {d.key() for d in detected}
    objects = []
    for obj in case.person.objects:
        slot = obj is case.slot
        expected = case.worn if slot else obj
        in_cell = [d.key() for d in detected if d.cell == obj.cell]
        ok = in_cell == [expected.key()] if slot else expected.key() in keys
        objects.append({"role": "slot" if slot else "kept", "cell": obj.cell, "expected": expected.key(),
                        "found": in_cell, "ok": ok,
                        "garment_right": slot and [k[:2] for k in in_cell] == [expected.key()[:2]]})
    kept = [o for o in objects if o["role"] == "kept"]
    slot = objects[[o["role"] for o in objects].index("slot")]
    return {"success": slot["ok"], "garment_right": slot["garment_right"],
            "preserved": all(o["ok"] for o in kept),
            "preservation": sum(o["ok"] for o in kept) / len(kept) if kept else 1.0,
            "scene_match": Counter(d.key() for d in detected) == Counter(case.ground_truth.keys()),
            "objects": objects}


def result_name(person: str, garment: str) -> str:
    """`<person stem>__<garment stem>.png`: a result's (and a ground truth's) file name."""
    return f"{Path(person).stem}{RESULT_SEPARATOR}{Path(garment).stem}.png"


def read_tryon_cases(data_dir) -> list[dict]:
    """The lines of DATA/test/cases.jsonl, each with its `case` (a TryOnCase) added."""
    from atelier.core.io import parse_json, read_text

    path = Path(os.path.expanduser(os.fspath(data_dir))) / "test" / CASES_FILE
    rows = []
    for i, line in enumerate(read_text(path, "try-on cases file").splitlines()):
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{i + 1}", dict, "a JSON object per line")
        try:
            row["case"] = TryOnCase.from_dict(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}:{i + 1}: not a try-on case ({exc})") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no cases")
    return rows


def read_result(path, size=(CANVAS, CANVAS)) -> np.ndarray:
    """A result image as HxWx3 uint8 at `size` (width, height); another size is resized (PIL bicubic)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != tuple(size):
                image = image.resize(tuple(size), Image.BICUBIC)
            return np.asarray(image)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def score_tryon_folder(results_dir, data_dir, cases: list[dict] | None = None) -> dict:
    """Score every test case of DATA (test/cases.jsonl) with its result
    RESULTS/{paired,unpaired}/<person stem>__<garment stem>.png: per split the number of cases,
    success %, preserved %, mean preservation and scene-match %, and each case's score.
    A split without a results folder is reported as missing; a folder lacking some results is an error."""
    results = Path(os.path.expanduser(os.fspath(results_dir)))
    cases = read_tryon_cases(data_dir) if cases is None else cases
    out = {}
    for split in PAIRS_FILES:
        rows = [r for r in cases if r["split"] == split]
        folder = results / split
        if not rows:
            continue
        if not folder.is_dir():
            out[split] = {"missing": f"no results folder {folder}"}
            continue
        absent = [r["result"] for r in rows if not (results / r["result"]).is_file()]
        if absent:
            raise UserError(f"{len(absent)} of {len(rows)} {split} results are missing in {results} (e.g. {absent[0]})")
        scores = [score_tryon(read_result(results / r["result"]), r["case"]) for r in rows]
        n = len(scores)
        out[split] = {"cases": n,
                      "success": 100.0 * sum(s["success"] for s in scores) / n,
                      "garment_right": 100.0 * sum(s["garment_right"] for s in scores) / n,
                      "preserved": 100.0 * sum(s["preserved"] for s in scores) / n,
                      "preservation": float(np.mean([s["preservation"] for s in scores])),
                      "scene_match": 100.0 * sum(s["scene_match"] for s in scores) / n,
                      "per_case": {r["result"]: {k: s[k] for k in ("success", "garment_right", "preserved", "preservation", "scene_match")}
                                   for r, s in zip(rows, scores)}}
    return out


# ----------------------------------------------------------------------------- the data set (VITON-HD's layout)


def _stem(i: int) -> str:
    return f"{i:06d}"


def _split_cases(kind: str, n: int, seed: int) -> list[TryOnCase]:
    """The paired cases of the train or test split: each split has its own stream, so changing the
    size of one never changes the other."""
    rng = random.Random(f"tryon-data:{kind}:{seed}")
    return [sample_tryon_case(rng, paired=True) for _ in range(n)]


def _unpaired_garments(n: int, seed: int) -> list[int]:
    """For each test person, the test case whose garment it is shown with: another one at random
    (VITON-HD's unpaired setting), itself only when the split has a single case."""
    rng = random.Random(f"tryon-data:unpaired:{seed}")
    return [rng.choice([j for j in range(n) if j != i]) if n > 1 else i for i in range(n)]


def tryon_test_rows(test_n: int, seed: int = 0) -> list[dict]:
    """The test split's cases.jsonl lines: test_n paired cases (person i with garment i), then test_n
    unpaired ones (person i with the garment of another random test case)."""
    paired = _split_cases("test", test_n, seed)
    rows = []
    for split, garments in (("paired", list(range(test_n))), ("unpaired", _unpaired_garments(test_n, seed))):
        for i, j in enumerate(garments):
            case = make_tryon_case(paired[i].person, paired[i].slot, paired[j].garment)
            person, garment = f"{_stem(i)}.png", f"{_stem(j)}.png"
            name = result_name(person, garment)
            rows.append({"split": split, "pairs": PAIRS_FILES[split], "person": person, "garment": garment,
                         "mask": f"{_stem(i)}_mask.png", "result": f"{split}/{name}", "ground_truth": f"ground-truth/{name}",
                         "same_garment": case.paired, **case.to_dict(), "case": case})
    return rows


def _write_split(root: Path, cases: list[TryOnCase]) -> None:
    from PIL import Image

    from atelier.core.images import save_png
    from atelier.core.io import remove_stale_temporaries

    for sub in ("image", "cloth", "agnostic-mask"):
        remove_stale_temporaries(root / sub)
    for i, case in enumerate(cases):
        stem = _stem(i)
        save_png(Image.fromarray(render(case.person)), root / "image" / f"{stem}.png", case.person.caption())
        save_png(Image.fromarray(render(case.garment_scene)), root / "cloth" / f"{stem}.png", case.garment_scene.caption())
        save_png(Image.fromarray(case.mask()), root / "agnostic-mask" / f"{stem}_mask.png",
                 f"try-on mask: {case.slot.cell}")


def write_tryon_data(out, n: int = 1000, test_n: int = 100, seed: int = 0) -> dict:
    """Write the toy try-on data set in VITON-HD's layout (docs/tryon-toyworld.md):

        OUT/train_pairs.txt, OUT/test_pairs.txt, OUT/test_unpaired_pairs.txt   "<person> <garment>" lines
        OUT/{train,test}/image/000000.png            persons
        OUT/{train,test}/cloth/000000.png            garments (product shots); person i wears garment i
        OUT/{train,test}/agnostic-mask/000000_mask.png
        OUT/test/cases.jsonl                         one line per test pair, paired then unpaired
        OUT/test/ground-truth/<person>__<garment>.png
        OUT/tryon.json                               what was written (seed, counts)

    Every file is written atomically and the whole set again on a re-run (the same seed gives the same
    bytes); the pairs files, cases.jsonl and tryon.json come last, so they never name a missing image."""
    from PIL import Image

    from atelier.core.images import save_png
    from atelier.core.io import atomic_write_bytes, remove_stale_temporaries

    if n < 1 or test_n < 1:
        raise UserError(f"a try-on data set needs at least 1 training and 1 test case (got {n} and {test_n})")
    out = Path(os.path.expanduser(os.fspath(out)))
    train = _split_cases("train", n, seed)
    rows = tryon_test_rows(test_n, seed)
    _write_split(out / "train", train)
    _write_split(out / "test", [r["case"] for r in rows if r["split"] == "paired"])
    remove_stale_temporaries(out / "test" / "ground-truth")
    for r in rows:
        gt = r["case"].ground_truth
        save_png(Image.fromarray(render(gt)), out / "test" / r["ground_truth"], gt.caption())

    def pairs(lines):
        return "".join(f"{p} {g}\n" for p, g in lines).encode("utf-8")

    atomic_write_bytes(out / TRAIN_PAIRS, pairs((f"{_stem(i)}.png", f"{_stem(i)}.png") for i in range(n)))
    for split, name in PAIRS_FILES.items():
        atomic_write_bytes(out / name, pairs((r["person"], r["garment"]) for r in rows if r["split"] == split))
    jsonl = "".join(json.dumps({k: v for k, v in r.items() if k != "case"}) + "\n" for r in rows)
    atomic_write_bytes(out / "test" / CASES_FILE, jsonl.encode("utf-8"))
    summary = {"out": str(out), "seed": seed, "train": n, "test_paired": test_n, "test_unpaired": test_n,
               "unpaired_differs": sum(not r["same_garment"] for r in rows if r["split"] == "unpaired"),
               "size": [CANVAS, CANVAS]}
    atomic_write_bytes(out / MANIFEST, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary


def read_pairs(path) -> list[tuple[str, str]]:
    """The (person, garment) file names of a VITON-HD pairs file."""
    from atelier.core.io import read_text

    pairs = []
    for i, line in enumerate(read_text(path, "pairs file").splitlines()):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise UserError(f"{path}:{i + 1}: expected '<person file> <garment file>', got {line.strip()!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


__all__ = [
    "TryOnCase", "garment_object", "cell_mask", "make_tryon_case", "sample_tryon_case", "tryon_cases", "score_tryon",
    "result_name", "read_tryon_cases", "read_result", "score_tryon_folder", "tryon_test_rows", "write_tryon_data",
    "read_pairs", "CELL_BOX", "PAIRS_FILES", "TRAIN_PAIRS", "CASES_FILE", "RESULT_SEPARATOR",
]
