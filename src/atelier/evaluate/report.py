"""`atelier evaluate report RUN_DIR --ref REF`: FID / KID / CLIP score of a generation run
(`atelier bench generate`), overall and per category, as JSON and as an HTML page with a sample
grid per category and bar plots.

The reference is a folder in MJHQ-30K's layout (`REF/{category}/*.jpg|png`: per-category scores
use the matching sub-folder) or a flat folder (overall scores only), or cached statistics
(`--ref-stats NAME`, overall FID only). Features and their protocol are `atelier.evaluate.distribution`'s;
CLIP score is torchmetrics' definition (`metrics.clip_score`) against each image's own prompt.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atelier.core.io import atomic_open
from atelier.errors import UserError

MIN_IMAGES = 2  # a covariance (FID) and an unbiased MMD (KID) need two samples a side
GRID_SAMPLES = 8


@dataclass
class Reference:
    """Reference images by category ("" holds a flat folder's), or cached statistics."""

    folders: dict[str, list[Path]] = field(default_factory=dict)
    stats: dict | None = None  # {"mu", "sigma", "feats"?} from a --ref-stats cache

    @property
    def categories(self) -> list[str]:
        return sorted(c for c in self.folders if c)


def reference_from_folder(folder) -> Reference:
    """MJHQ layout (one sub-folder per category) or a flat folder of images."""
    from atelier.evaluate.distribution import image_files

    root = Path(os.path.expanduser(os.fspath(folder)))
    folders: dict[str, list[Path]] = {}
    for path in image_files(root):  # a missing or imageless folder is refused here, with the reason
        parts = path.relative_to(root).parts
        folders.setdefault(parts[0] if len(parts) > 1 else "", []).append(path)
    return Reference(folders=folders)


def _score(gen: np.ndarray, ref: np.ndarray | None, ref_stats: dict | None, *, kid_subsets: int, seed: int) -> dict:
    from atelier.evaluate.distribution import fid, fid_from_stats, kid, statistics

    out = {"images": int(len(gen))}
    if len(gen) < MIN_IMAGES:
        return out
    if ref is not None:
        if len(ref) < MIN_IMAGES:
            return out
        out["reference_images"] = int(len(ref))
        out["fid"] = fid(gen, ref)
        out["kid"] = kid(gen, ref, num_subsets=kid_subsets, seed=seed)
    elif ref_stats is not None:
        out["fid"] = fid_from_stats(*statistics(gen), ref_stats["mu"], ref_stats["sigma"])
        if ref_stats.get("feats") is not None:
            out["kid"] = kid(gen, ref_stats["feats"], num_subsets=kid_subsets, seed=seed)
    return out


def evaluate_run(run, reference: Reference, extractor, *, clip_scorer=None, batch_size: int = 64,
                 kid_subsets: int = 100, seed: int = 0, progress=None) -> dict:
    """Scores of `run` (an `atelier.bench.read_run` result) against `reference`, overall and for every
    category present on both sides; CLIP score of each image with its prompt when `clip_scorer` is given."""
    from atelier.evaluate.distribution import files_features, read_image
    from atelier.evaluate.metrics import clip_cosines

    items = run.images
    if not items:
        raise UserError(f"{run.dir} holds no finished images")
    # each generated image is read once, for its features and its CLIP score
    feats, cosines = [], []
    for k in range(0, len(items), batch_size):
        batch = items[k:k + batch_size]
        images = [read_image(item.path) for item in batch]
        feats.append(extractor.features(images, batch_size))
        if clip_scorer is not None:
            cosines.append(clip_cosines(clip_scorer, images, [item.prompt for item in batch]))
        if progress is not None:
            progress(k + len(batch), len(items))
    gen_feats = np.concatenate(feats)
    # 100 x cosine per pair; a set's score is torchmetrics' CLIPScore: the mean, floored at 0
    clip = 100 * np.concatenate(cosines) if cosines else None
    ref_feats = {cat: files_features(files, extractor, batch_size, progress) for cat, files in reference.folders.items()}
    all_ref = np.concatenate(list(ref_feats.values())) if ref_feats else None

    def summary(indices, ref, stats) -> dict:
        out = _score(gen_feats[indices], ref, stats, kid_subsets=kid_subsets, seed=seed)
        if clip is not None and len(indices):
            out["clip_score"] = max(float(clip[indices].mean()), 0.0)
        return out

    everything = np.arange(len(items))
    result = {
        "run": str(run.dir),
        "model": run.manifest.get("model"),
        "features": extractor.name,
        "overall": summary(everything, all_ref, reference.stats),
        "categories": {},
    }
    categories = sorted({item.category for item in items if item.category})
    for cat in categories:
        indices = np.array([i for i, item in enumerate(items) if item.category == cat])
        result["categories"][cat] = summary(indices, ref_feats.get(cat), None)
    return result


# ----------------------------------------------------------------------------- files


def json_safe(value):
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_grid(path: Path, files: list[Path], *, columns: int = GRID_SAMPLES, cell: int = 128) -> None:
    from PIL import Image

    files = files[:columns]
    grid = Image.new("RGB", (cell * max(1, len(files)), cell), "white")
    for i, file in enumerate(files):
        with Image.open(file) as image:
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (i * cell, 0))
    with atomic_open(path, "wb") as f:
        grid.save(f, format="PNG")


def write_bar_plot(path: Path, result: dict, metric: str, label: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(cat, s[metric]) for cat, s in result["categories"].items() if s.get(metric) is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.5))
    ax.bar([r[0] for r in rows], [r[1] for r in rows], color="#4a78b5")
    overall = result["overall"].get(metric)
    if overall is not None:
        ax.axhline(overall, color="#c0392b", lw=1, ls="--", label=f"overall {overall:.3g}")
        ax.legend()
    ax.set_ylabel(label)
    ax.set_title(f"{label} by category ({result['features']} features)")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


METRIC_COLUMNS = (("fid", "FID"), ("kid", "KID"), ("clip_score", "CLIP score"))


def _cells(summary: dict) -> str:
    shown = []
    for key, _ in METRIC_COLUMNS:
        value = summary.get(key)
        shown.append("–" if value is None else (f"{value:.5f}" if key == "kid" else f"{value:.3f}"))
    return "".join(f"<td>{v}</td>" for v in shown) + f"<td>{summary.get('images', 0)}</td>"


def write_report(result: dict, run, out_dir) -> dict[str, Path]:
    """report.json, report.html, one sample grid per category and the bar plots, in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "report.json", "html": out / "report.html"}
    with atomic_open(written["json"], "w", encoding="utf-8") as f:
        json.dump(json_safe(result), f, indent=2)
        f.write("\n")

    by_category: dict[str, list[Path]] = {}
    for item in run.images:
        by_category.setdefault(item.category or "", []).append(item.path)
    grids = {}
    for n, (cat, files) in enumerate(sorted(by_category.items())):
        grids[cat] = out / f"grid_{n:02d}.png"
        write_grid(grids[cat], files)
    plots = [name for name, (metric, label) in {"fid_by_category.png": ("fid", "FID"),
                                                "clip_by_category.png": ("clip_score", "CLIP score")}.items()
             if write_bar_plot(out / name, result, metric, label)]

    rows = [f"<tr><th>overall</th>{_cells(result['overall'])}</tr>"]
    rows += [f"<tr><th>{html.escape(cat)}</th>{_cells(s)}</tr>" for cat, s in result["categories"].items()]
    header = "".join(f"<th>{label}</th>" for _, label in METRIC_COLUMNS) + "<th>images</th>"
    sections = [f"<h3>{html.escape(cat or 'all images')}</h3><img src='{grids[cat].name}' alt='samples'>"
                for cat in sorted(grids)]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>atelier report: {html.escape(str(result.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} img{{max-width:100%}}</style></head>
<body><h1>Generation report</h1>
<p>model <b>{html.escape(str(result.get('model')))}</b>, {result['overall'].get('images', 0)} images,
features <b>{html.escape(result['features'])}</b></p>
<table><tr><th></th>{header}</tr>{''.join(rows)}</table>
{''.join(f"<p><img src='{name}' alt='{name}'></p>" for name in plots)}
<h2>Samples</h2>{''.join(sections)}
</body></html>
"""
    with atomic_open(written["html"], "w", encoding="utf-8") as f:
        f.write(page)
    written.update({name: out / name for name in plots})
    return written
