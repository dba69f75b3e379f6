"""Try-on results measured one way (`atelier evaluate tryon`; docs/tryon-toyworld.md), as VITON-HD
papers report them:

- paired (DATA/test_pairs.txt: each person with its own garment, the person image is the ground
  truth): SSIM and LPIPS of each result against its person image, FID and KID of the results
  against the test person images;
- unpaired (DATA/test_unpaired_pairs.txt: each person with another garment, no ground truth): FID
  and KID of the results against the test person images as the reference distribution;
- on the toy world (DATA/test/cases.jsonl present): the judge's success % and preservation % of
  each setting (`atelier.toyworld.tryon.score_tryon`).

Results are one PNG per pair, named `<person stem>__<garment stem>.png`, under RESULTS/paired/
and RESULTS/unpaired/. A result whose size differs from its person image's is resized to it (PIL
bicubic) first. SSIM, LPIPS, FID and KID are `atelier.evaluate.metrics` / `.distribution`'s (the
reference packages' code); LPIPS needs its ImageNet backbone from local weights: without them it is
reported under "missing" with the reason, never estimated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atelier.errors import UserError

SETTINGS = {"paired": "test_pairs.txt", "unpaired": "test_unpaired_pairs.txt"}


def _pairs(data: Path, setting: str) -> list[tuple[str, str]]:
    from atelier.toyworld.tryon import read_pairs

    path = data / SETTINGS[setting]
    if not path.is_file():
        raise UserError(f"{data} is not a try-on data folder: no {SETTINGS[setting]}")
    pairs = read_pairs(path)
    if not pairs:
        raise UserError(f"{path} lists no pairs")
    return pairs


def _at_size(image: np.ndarray, shape) -> np.ndarray:
    """`image` at the height and width of `shape` (PIL bicubic when it differs)."""
    from PIL import Image

    if image.shape == tuple(shape):
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BICUBIC))


def result_files(results: Path, data: Path, setting: str) -> list[tuple[Path, Path]]:
    """(result file, person image) for each pair of the setting's pairs file; a missing one is an error."""
    from atelier.toyworld.tryon import result_name

    folder = results / setting
    if not folder.is_dir():
        raise UserError(f"no {setting} results: {folder} is not a folder (one <person>__<garment>.png per line of {SETTINGS[setting]})")
    rows = [(folder / result_name(p, g), data / "test" / "image" / p) for p, g in _pairs(data, setting)]
    missing = [r for r, _ in rows if not r.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(rows)} {setting} results are missing (e.g. {missing[0]})")
    absent = [p for _, p in rows if not p.is_file()]
    if absent:
        raise UserError(f"{len(absent)} person images of {SETTINGS[setting]} are missing (e.g. {absent[0]})")
    return rows


def evaluate_tryon(results_dir, data_dir, features: str = "toyworld", *, mode: str = "clean", weights=None,
                   lpips_net: str = "vgg", lpips_weights=None, allow_pickle: bool = False, device="cpu",
                   batch_size: int = 64, kid_subsets: int = 100, seed: int = 0, settings=tuple(SETTINGS),
                   judge: bool = True) -> dict:
    """Try-on metrics of RESULTS (paired/ and unpaired/ folders) on the VITON-HD-layout DATA:

        {"features": ..., "paired": {"pairs", "ssim", "lpips", "fid", "kid"},
         "unpaired": {"pairs", "fid", "kid"},
         "judge": {"paired": {"success", "preserved", ...}, "unpaired": {...}},   # when test/cases.jsonl exists
         "missing": {"lpips": "why"}, "resized": N}

    `features`: inception, clip or toyworld (distribution.load_features; `mode`, `weights` as there).
    LPIPS (`lpips_net`, backbone from `lpips_weights` or the caches) is reported under "missing" when
    its weights are not at hand and none were given (given weights must load)."""
    from atelier.evaluate import distribution as d
    from atelier.evaluate import metrics as m

    results = Path(os.path.expanduser(os.fspath(results_dir)))
    data = Path(os.path.expanduser(os.fspath(data_dir)))
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise UserError(f"unknown try-on setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    if not results.is_dir():
        raise UserError(f"no such results folder: {results}")
    files = {s: result_files(results, data, s) for s in settings}  # every file checked before a model loads
    reference_files = d.image_files(data / "test" / "image")
    out: dict = {"results": str(results), "data": str(data), "missing": {}}
    extractor = d.load_features(features, mode=mode, weights=weights, device=device, allow_pickle=allow_pickle)
    out["features"] = extractor.name
    reference_feats = extractor_feats(extractor, [d.read_image(f) for f in reference_files], batch_size)
    out["reference_images"] = len(reference_files)

    lpips_model = None
    if "paired" in settings:
        try:
            lpips_model = m.load_lpips(lpips_net, lpips_weights, allow_pickle=allow_pickle, device=device)
        except UserError as exc:
            if lpips_weights is not None:
                raise
            reason = str(exc).replace("give --weights", "give --lpips-weights")
            out["missing"]["lpips"] = f"LPIPS ({lpips_net}) not computed: {reason}"

    resized = 0
    for setting, rows in files.items():
        images, ssims, lpipses = [], [], []
        for result_file, person_file in rows:
            person, raw = d.read_image(person_file), d.read_image(result_file)
            image = _at_size(raw, person.shape)
            resized += int(raw.shape != person.shape)
            images.append(image)
            if setting == "paired":
                ssims.append(m.ssim(image, person))
                if lpips_model is not None:
                    lpipses.append(m.lpips(lpips_model, image, person))
        feats = extractor_feats(extractor, images, batch_size)
        scores: dict = {"pairs": len(rows)}
        if setting == "paired":
            scores["ssim"] = float(np.mean(ssims))
            scores["lpips"] = float(np.mean(lpipses)) if lpips_model is not None else None
        if min(len(feats), len(reference_feats)) >= 2:
            scores["fid"] = d.fid(feats, reference_feats)
            scores["kid"] = d.kid(feats, reference_feats, num_subsets=kid_subsets, seed=seed)
        else:
            scores["fid"] = scores["kid"] = None
            out["missing"][f"{setting}_fid_kid"] = "FID and KID need at least 2 images a side"
        out[setting] = scores
    out["resized"] = resized

    if judge and (data / "test" / "cases.jsonl").is_file():
        from atelier.toyworld.tryon import read_tryon_cases, score_tryon_folder

        cases = [r for r in read_tryon_cases(data) if r["split"] in settings]
        verdict = score_tryon_folder(results, data, cases)
        out["judge"] = {s: {k: v for k, v in verdict[s].items() if k != "per_case"} for s in verdict}
        out["judge_per_case"] = {s: verdict[s].get("per_case", {}) for s in verdict}
    return out


def extractor_feats(extractor, images, batch_size: int) -> np.ndarray:
    chunks = [extractor.features(images[i:i + batch_size], batch_size) for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, 0))


def format_tryon(result: dict) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    lines = [f"try-on results {result['results']} on {result['data']} ({result['features']} features, "
             f"{result['reference_images']} reference person images)"]
    if "paired" in result:
        p = result["paired"]
        lines.append(f"  paired   ({p['pairs']} pairs): SSIM {num(p['ssim'], '.4f')}  LPIPS {num(p['lpips'], '.4f')}  "
                     f"FID {num(p['fid'], '.4g')}  KID {num(p['kid'], '.4g')}")
    if "unpaired" in result:
        u = result["unpaired"]
        lines.append(f"  unpaired ({u['pairs']} pairs): FID {num(u['fid'], '.4g')}  KID {num(u['kid'], '.4g')}")
    for setting, v in result.get("judge", {}).items():
        lines.append(f"  judge, {setting}: success {v['success']:.1f} %  garment right (any size) {v['garment_right']:.1f} %  "
                     f"preserved {v['preserved']:.1f} %  "
                     f"scene match {v['scene_match']:.1f} %")
    if result.get("resized"):
        lines.append(f"  note: {result['resized']} results were resized to their person image's size")
    for reason in result["missing"].values():
        lines.append(f"  missing: {reason}")
    return "\n".join(lines)
