"""The PIE-Bench runner: read `mapping_file.json` and its images from a local folder, run an editing
method on every case, measure each result as PIE-Bench's reference code does
(cure-lab/PnPInversion, evaluation/evaluate.py) and average per editing type.

    cases = load_cases("PIE-Bench_v1")
    suite = load_metric_suite(dino=..., clip=..., lpips_vgg=[...])   # missing weights: metric skipped
    result = run_pie_bench("PIE-Bench_v1", "reconstruct", suite=suite, out_dir="results/")

The folder holds `mapping_file.json` and the images under `annotation_images/` (or beside the
mapping file). Each case: image_path, original_prompt, editing_prompt (words to edit in [brackets],
which are stripped), editing_instruction, editing_type_id ("0".."9"), blended_word, and mask: the
edit region as run-length pairs (start, length) over a 512x512 image in row-major order.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atelier.core.io import atomic_open
from atelier.errors import UserError

MAPPING_FILE = "mapping_file.json"
IMAGES_FOLDER = "annotation_images"
MASK_SHAPE = (512, 512)  # PIE-Bench masks are always encoded over 512x512

EDITING_TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute (content)",
    "5": "change attribute (pose)",
    "6": "change attribute (color)",
    "7": "change attribute (material)",
    "8": "change background",
    "9": "change style",
}

# The reference's default metric list, in its order (names as in its CSV columns).
METRICS = (
    "structure_distance",
    "psnr_unedit_part",
    "lpips_unedit_part",
    "mse_unedit_part",
    "ssim_unedit_part",
    "clip_similarity_source_image",
    "clip_similarity_target_image",
    "clip_similarity_target_image_edit_part",
)
# How the PIE-Bench paper prints them (e.g. structure distance x10^3).
PAPER_SCALE = {"structure_distance": 1e3, "lpips_unedit_part": 1e3, "mse_unedit_part": 1e4, "ssim_unedit_part": 1e2}

DINO_REPO = "facebook/dino-vitb8"
CLIP_REPO = "openai/clip-vit-large-patch14"
SKIP_NOTES = {
    "dino": f"structure distance skipped: no DINO ViT-B/8 weights (give --dino FOLDER or cache {DINO_REPO})",
    "lpips": ("LPIPS skipped: no LPIPS VGG weights (give --lpips-vgg FILE: .safetensors with torchvision's "
              "vgg16 `features.N.*`; the lpips package ships its linear layers)"),
    "clip": f"CLIP scores skipped: no CLIP ViT-L/14 weights (give --clip FOLDER or cache {CLIP_REPO})",
}


# ----------------------------------------------------------------------------- dataset


def strip_brackets(prompt: str) -> str:
    """PIE-Bench marks the edited words with [brackets]; the prompts given to models drop them."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(rle, shape=MASK_SHAPE, *, border: bool = True) -> np.ndarray:
    """The edit mask (HxW uint8, 1 = edited) from PIE-Bench's run-length list
    [start, length, start, length, ...] over the row-major flattened image. Runs past the end are
    cut; like the reference, the one-pixel image border counts as edited ("to avoid annotation
    errors in boundary") unless border=False."""
    if not isinstance(rle, (list, tuple)) or len(rle) % 2:
        raise UserError("mask must be a list of (start, length) pairs")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rle):
        raise UserError("mask must hold non-negative integers")
    h, w = shape
    flat = np.zeros(h * w, dtype=np.uint8)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start : start + length] = 1
    mask = flat.reshape(h, w)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def case_mask(rle, size: tuple[int, int]) -> np.ndarray:
    """The edit mask at an image's size (width, height): decoded at 512x512 as PIE-Bench encodes it,
    resized nearest-neighbour when the image is not 512x512, then the border marked as edited."""
    from PIL import Image

    mask = decode_mask(rle, MASK_SHAPE, border=False)
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        mask = np.asarray(Image.fromarray(mask * 255).resize(tuple(size), Image.NEAREST)) > 127
        mask = mask.astype(np.uint8)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


@dataclass
class PieCase:
    key: str
    image_path: str
    original_prompt: str  # as in the file, with [brackets]
    editing_prompt: str
    editing_type: str
    mask_rle: list = field(repr=False)
    instruction: str = ""
    blended_word: str = ""

    @property
    def source_prompt(self) -> str:
        return strip_brackets(self.original_prompt)

    @property
    def target_prompt(self) -> str:
        return strip_brackets(self.editing_prompt)


def _dataset_paths(data_dir) -> tuple[Path, Path]:
    data = Path(os.path.expanduser(os.fspath(data_dir)))
    if not data.is_dir():
        raise UserError(f"PIE-Bench data folder not found: {data}")
    mapping = data / MAPPING_FILE
    if not mapping.is_file():
        raise UserError(f"{data} has no {MAPPING_FILE}: give the PIE-Bench folder (PIE-Bench_v1)")
    images = data / IMAGES_FOLDER
    return mapping, images if images.is_dir() else data


def load_cases(data_dir) -> list[PieCase]:
    """The cases of `data_dir/mapping_file.json`, in file order; malformed files are a UserError."""
    mapping, _ = _dataset_paths(data_dir)
    try:
        data = json.loads(mapping.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{mapping} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{mapping} must hold a non-empty JSON object of cases keyed by id")
    cases = []
    for key, item in data.items():
        where = f"{mapping}: case {key}"
        if not isinstance(item, dict):
            raise UserError(f"{where} is not an object")
        missing = [f for f in ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask") if f not in item]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}")
        for name in ("image_path", "original_prompt", "editing_prompt"):
            if not isinstance(item[name], str):
                raise UserError(f"{where}: {name} must be a string")
        editing_type = str(item["editing_type_id"])
        if editing_type not in EDITING_TYPES:
            raise UserError(f"{where}: editing_type_id {editing_type!r} is not one of 0-9")
        try:
            decode_mask(item["mask"])  # validate now, not after hours of editing
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        cases.append(PieCase(
            key=str(key), image_path=item["image_path"], original_prompt=item["original_prompt"],
            editing_prompt=item["editing_prompt"], editing_type=editing_type, mask_rle=item["mask"],
            instruction=str(item.get("editing_instruction", "")), blended_word=str(item.get("blended_word", "")),
        ))
    return cases


# ----------------------------------------------------------------------------- metric models


@dataclass
class MetricSuite:
    """The loaded metric models; a None model means its metrics are skipped (see `notes`)."""

    dino: object = None
    lpips: object = None
    clip: object = None
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        skipped = set()
        if self.dino is None:
            skipped.add("structure_distance")
        if self.lpips is None:
            skipped.add("lpips_unedit_part")
        if self.clip is None:
            skipped.update(m for m in METRICS if m.startswith("clip_"))
        return [m for m in METRICS if m not in skipped]


def cached_hub_folder(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache, if its config is there."""
    from huggingface_hub import try_to_load_from_cache

    from atelier.models.loader import hf_cache_dir

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=os.fspath(hf_cache_dir()))
    return Path(found).parent if isinstance(found, str) else None


def load_metric_suite(dino=None, clip=None, lpips_vgg=None, *, allow_pickle: bool = False, device="cpu") -> MetricSuite:
    """Load what is available. Paths the user gives must work (UserError otherwise); without one,
    DINO and CLIP are looked up in the HF cache, and whatever is not found is skipped with a note."""
    from . import metrics

    suite = MetricSuite()

    def load(kind, given, repo, loader):
        if given:
            return loader(given, allow_pickle=allow_pickle, device=device)
        folder = cached_hub_folder(repo) if repo else None
        if folder is None:
            suite.notes.append(SKIP_NOTES[kind])
            return None
        try:
            return loader(folder, allow_pickle=allow_pickle, device=device)
        except UserError as exc:  # a partial cache entry must not stop the run
            suite.notes.append(f"{SKIP_NOTES[kind].split(':')[0]}: cached {repo} unusable ({exc})")
            return None

    suite.dino = load("dino", dino, DINO_REPO, metrics.load_dino)
    suite.lpips = load("lpips", lpips_vgg, None, metrics.load_lpips_vgg)
    suite.clip = load("clip", clip, CLIP_REPO, metrics.load_clip)
    return suite


def evaluate_case(suite: MetricSuite, source, edited, edit_mask: np.ndarray, source_prompt: str, target_prompt: str) -> dict[str, float]:
    """PIE-Bench's default metrics for one case (NaN where the reference writes "nan": an empty
    background or edit region)."""
    from . import metrics as m

    keep = 1 - edit_mask  # the "unedit part"
    no_background = keep.sum() == 0
    values: dict[str, float] = {}
    if suite.dino is not None:
        values["structure_distance"] = m.structure_distance(suite.dino, source, edited)
    values["psnr_unedit_part"] = math.nan if no_background else m.psnr(source, edited, keep)
    if suite.lpips is not None:
        values["lpips_unedit_part"] = math.nan if no_background else m.lpips(suite.lpips, source, edited, keep)
    values["mse_unedit_part"] = math.nan if no_background else m.mse(source, edited, keep)
    values["ssim_unedit_part"] = math.nan if no_background else m.ssim(source, edited, keep, crop_border=True)
    if suite.clip is not None:
        values["clip_similarity_source_image"] = m.clip_score(suite.clip, source, source_prompt)
        values["clip_similarity_target_image"] = m.clip_score(suite.clip, edited, target_prompt)
        values["clip_similarity_target_image_edit_part"] = (
            math.nan if edit_mask.sum() == 0 else m.clip_score(suite.clip, edited, target_prompt, edit_mask)
        )
    return values


# ----------------------------------------------------------------------------- the run


def summarize(rows: list[dict], metric_names) -> dict[str, dict]:
    """Per-metric means per editing type and over all cases ("all"), NaNs left out (PIE-Bench's
    "nan" entries); an infinite PSNR (a perfect background) makes the mean infinite."""
    groups: dict[str, list[dict]] = {"all": rows}
    for type_id in EDITING_TYPES:
        members = [r for r in rows if r["editing_type_id"] == type_id]
        if members:
            groups[type_id] = members
    summary = {}
    for name, members in groups.items():
        entry: dict = {"cases": len(members)}
        for metric in metric_names:
            values = [r[metric] for r in members if not math.isnan(r[metric])]
            entry[metric] = float(np.mean(values)) if values else math.nan
        summary[name] = entry
    return summary


def run_pie_bench(
    data_dir,
    method,
    *,
    pipe=None,
    suite: MetricSuite | None = None,
    limit: int | None = None,
    seed: int = 0,
    editing_types=None,
    out_dir=None,
    save_images: bool = False,
    progress: Callable[[int, int, PieCase, dict], None] | None = None,
) -> dict:
    """Edit every case with `method` (a name from `atelier.evaluate.methods` or a callable), measure
    it, and return {"method", "cases", "metrics", "notes", "summary", "per_case"}. With `out_dir`,
    results.json, cases.csv and summary.csv are written there (atomically)."""
    from atelier.core.images import open_image

    from .methods import get_method, needs_pipe

    fn = get_method(method) if isinstance(method, str) else method
    name = method if isinstance(method, str) else getattr(method, "__name__", "method")
    if pipe is None and needs_pipe(fn):
        raise UserError(f"method {name!r} needs a model: give --model")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    _, images_root = _dataset_paths(data_dir)
    cases = load_cases(data_dir)
    if editing_types is not None:
        wanted = {str(t) for t in editing_types}
        unknown = sorted(wanted - EDITING_TYPES.keys())
        if unknown:
            raise UserError(f"unknown editing type(s) {unknown}; PIE-Bench types are 0-9")
        cases = [c for c in cases if c.editing_type in wanted]
    cases = cases[:limit] if limit else cases
    if not cases:
        raise UserError("no cases to evaluate")
    suite = suite if suite is not None else load_metric_suite()
    notes = list(suite.notes)
    metric_names = suite.metrics
    rows = []
    for index, case in enumerate(cases):
        source = open_image(images_root / case.image_path).convert("RGB")
        started = time.perf_counter()
        edited = fn(pipe, source, case.source_prompt, case.target_prompt, seed)
        seconds = time.perf_counter() - started
        edited = edited.convert("RGB")
        if edited.size != source.size:
            note = f"edited images of size {edited.size[0]}x{edited.size[1]} were resized to their source's size for the metrics"
            if note not in notes:
                notes.append(note)
            from PIL import Image

            edited = edited.resize(source.size, Image.BICUBIC)
        if out_dir is not None and save_images:
            from atelier.core.images import save_png

            save_png(edited, Path(out_dir) / "images" / Path(case.image_path).with_suffix(".png"),
                     f"{case.target_prompt}\nPIE-Bench {case.key}, method {name}, seed {seed}")
        mask = case_mask(case.mask_rle, source.size)
        values = evaluate_case(suite, source, edited, mask, case.source_prompt, case.target_prompt)
        row = {"key": case.key, "editing_type_id": case.editing_type, "image_path": case.image_path,
               "edit_seconds": round(seconds, 4), **{m: values[m] for m in metric_names}}
        rows.append(row)
        if progress is not None:
            progress(index, len(cases), case, row)
    result = {
        "method": name,
        "model": getattr(pipe, "atelier_source", None) if pipe is not None else None,
        "data": os.fspath(data_dir),
        "seed": seed,
        "cases": len(rows),
        "metrics": metric_names,
        "notes": notes,
        "summary": summarize(rows, metric_names),
        "per_case": rows,
    }
    if out_dir is not None:
        result["out"] = {k: os.fspath(v) for k, v in write_results(result, out_dir).items()}
    return result


# ----------------------------------------------------------------------------- output


def jsonable(value):
    """JSON has no NaN or infinity: NaN -> null, ±inf -> "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(result: dict, out_dir) -> dict[str, Path]:
    """results.json (everything), cases.csv (one row per case) and summary.csv (means per editing
    type and "all"), each written atomically."""
    out = Path(os.path.expanduser(os.fspath(out_dir)))
    metric_names = result["metrics"]
    paths = {"json": out / "results.json", "cases_csv": out / "cases.csv", "summary_csv": out / "summary.csv"}
    _atomic_write_text(paths["json"], json.dumps(jsonable(result), indent=2) + "\n")
    case_header = ["key", "editing_type_id", "image_path", "edit_seconds", *metric_names]
    _atomic_write_text(paths["cases_csv"], _csv_text(case_header, [[row[h] for h in case_header] for row in result["per_case"]]))
    summary_rows = [[group, EDITING_TYPES.get(group, "all types"), entry["cases"], *(entry[m] for m in metric_names)]
                    for group, entry in result["summary"].items()]
    _atomic_write_text(paths["summary_csv"], _csv_text(["editing_type_id", "editing_type", "cases", *metric_names], summary_rows))
    return paths


def format_summary(result: dict) -> str:
    """A text table of the means, scaled as the PIE-Bench paper prints them."""
    metric_names = result["metrics"]
    short = {"structure_distance": "structure", "psnr_unedit_part": "PSNR", "lpips_unedit_part": "LPIPS",
             "mse_unedit_part": "MSE", "ssim_unedit_part": "SSIM", "clip_similarity_source_image": "CLIP src",
             "clip_similarity_target_image": "CLIP whole", "clip_similarity_target_image_edit_part": "CLIP edited"}
    heads = []
    for m in metric_names:
        scale = PAPER_SCALE.get(m)
        heads.append(short[m] + (f" x1e{round(math.log10(scale))}" if scale else ""))
    lines = [f"{'type':<30} {'n':>4} " + " ".join(f"{h:>13}" for h in heads)]
    for group, entry in result["summary"].items():
        label = "all" if group == "all" else f"{group} {EDITING_TYPES[group]}"
        cells = []
        for m in metric_names:
            v = entry[m] * PAPER_SCALE.get(m, 1)
            cells.append(f"{v:>13.2f}" if math.isfinite(v) else f"{str(v):>13}")
        lines.append(f"{label:<30} {entry['cases']:>4} " + " ".join(cells))
    return "\n".join(lines)
