"""`atelier evaluate pie-bench`, and the image metrics on folders: `fid`, `kid`, `clip-score`,
`lpips`, `dists`, `ssim` and `ref-stats` (see docs/evaluation.md); `tryon` (docs/tryon-toyworld.md)."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path

from atelier.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="benchmark editing methods (PIE-Bench) and measure image folders",
                              description="Benchmark editing methods on a local copy of a benchmark, or measure "
                                          "folders of images (FID, KID, CLIP score, LPIPS, DISTS, SSIM).")
    sub = p.add_subparsers(dest="evaluate_command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser(
        "pie-bench", help="run an editing method on PIE-Bench and measure it as the benchmark does",
        description="Run an editing method on every PIE-Bench case (mapping_file.json + annotation_images/ "
                    "in --data) and report PIE-Bench's metrics per editing type. Metric weights are read "
                    "only from local files or the HF cache; a metric without weights is skipped with a note.",
    )
    b.add_argument("--data", required=True, help="the PIE-Bench folder (holding mapping_file.json)")
    b.add_argument("--method", required=True, help="editing method name (see the error of an unknown name for the list)")
    b.add_argument("--model", help="the model the method edits with (built-in name, folder, .safetensors, hub id)")
    b.add_argument("--out", help="folder for results.json, cases.csv and summary.csv")
    b.add_argument("--limit", type=int, help="evaluate only the first N cases")
    b.add_argument("--types", help="comma-separated editing_type_id values to keep (0-9)")
    b.add_argument("--seed", type=int, default=0, help="seed given to the method for every case (default 0)")
    b.add_argument("--dino", help="DINO ViT-B/8 transformers folder (default: facebook/dino-vitb8 in the HF cache)")
    b.add_argument("--clip", help="CLIP ViT-L/14 transformers folder (default: openai/clip-vit-large-patch14 in the HF cache)")
    b.add_argument("--lpips-vgg", action="append", metavar="PATH",
                   help="LPIPS VGG weights: .safetensors file(s) or folder with torchvision's VGG16 features (repeatable; "
                        "the lpips package ships its linear layers)")
    b.add_argument("--allow-pickle", action="store_true", help="also read pickled weights (.bin/.pth)")
    b.add_argument("--device", help="device for the model and the metrics (default: cuda if available, else cpu)")
    b.add_argument("--save-images", action="store_true", help="also write the edited images to --out/images/")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=run_pie_bench_command)
    register_metrics(sub)
    register_report(sub)
    register_tryon(sub)


def run_pie_bench_command(args) -> int:
    from atelier.models import load_pipeline, pick_device_dtype

    from .methods import get_method, needs_pipe
    from .pie_bench import format_summary, jsonable, load_cases, load_metric_suite, run_pie_bench

    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.save_images and not args.out:
        raise UserError("--save-images needs --out")
    method = get_method(args.method)
    load_cases(args.data)  # a bad folder or mapping file fails before any model is loaded
    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
    pipe = None
    if args.model:
        pipe = load_pipeline(args.model, device=args.device, allow_pickle=args.allow_pickle)
    elif needs_pipe(method):
        raise UserError(f"method {args.method!r} needs a model: give --model")
    device, _ = pick_device_dtype(args.device)
    suite = load_metric_suite(dino=args.dino, clip=args.clip, lpips_vgg=args.lpips_vgg,
                              allow_pickle=args.allow_pickle, device=device)
    for note in suite.notes:
        print(f"note: {note}", file=sys.stderr)

    def progress(i, n, case, row):
        psnr = row["psnr_unedit_part"]
        print(f"[{i + 1}/{n}] {case.key} (type {case.editing_type}) background PSNR {psnr:.2f} dB",
              file=sys.stderr)

    result = run_pie_bench(args.data, args.method, pipe=pipe, suite=suite, limit=args.limit, seed=args.seed,
                           editing_types=types, out_dir=args.out, save_images=args.save_images, progress=progress)
    if args.json:
        from atelier.cli import print_json

        print_json(jsonable(result))
    else:
        print(f"PIE-Bench, method {result['method']}, {result['cases']} cases")
        print(format_summary(result))
        for note in result["notes"][len(suite.notes):]:
            print(f"note: {note}")
        if args.out:
            print(f"results written to {result['out']['json']}, {result['out']['summary_csv']}, {result['out']['cases_csv']}")
    return 0


# ----------------------------------------------------------------------------- metrics on folders

DISTRIBUTION = {
    "fid": "Fréchet distance between the feature distributions of two folders (clean-fid's frechet_distance)",
    "kid": "kernel inception distance between two folders (clean-fid's kernel_distance, seeded)",
}
PAIRWISE = {
    "lpips": "LPIPS between images of the same name in two folders (the lpips package)",
    "dists": "DISTS between images of the same name in two folders (DISTS_pytorch)",
    "ssim": "SSIM between images of the same name in two folders (torchmetrics' definition)",
}


def _common(c, *, features: bool) -> None:
    if features:
        c.add_argument("--features", default="inception",
                       help="inception (clean-fid's, default), clip (a transformers CLIP) or toyworld (the shipped toy CLIP)")
        c.add_argument("--mode", default="clean", help="Inception protocol: clean (default), legacy_pytorch or legacy_tensorflow")
    c.add_argument("--weights", help="weights file or folder (default: looked up in the local caches; never downloaded)")
    c.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    c.add_argument("--device", help="device (default: cuda if available, else cpu)")
    c.add_argument("--allow-pickle", action="store_true", help="also read pickled weights (.pth)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")


def register_metrics(sub) -> None:
    for name, help_text in DISTRIBUTION.items():
        c = sub.add_parser(name, help=help_text, description=help_text + ". Images are read recursively; "
                           "compare DIR_A with DIR_B, or with reference statistics made by `atelier evaluate ref-stats`.")
        c.add_argument("dir_a", metavar="DIR_A")
        c.add_argument("dir_b", metavar="DIR_B", nargs="?")
        c.add_argument("--ref-stats", metavar="NAME", help="compare DIR_A with these saved reference statistics")
        if name == "kid":
            c.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default 0)")
        _common(c, features=True)
        c.set_defaults(func=quietly(run_distribution_command), metric=name)

    r = sub.add_parser("ref-stats", help="save reference statistics of a folder for fid/kid --ref-stats NAME",
                       description="Compute the features of every image under DIR once and save mu, sigma and "
                                   "the features as NAME (one file per features and mode, in the atelier cache).")
    r.add_argument("name", metavar="NAME")
    r.add_argument("dir_a", metavar="DIR")
    _common(r, features=True)
    r.set_defaults(func=quietly(run_ref_stats_command))

    c = sub.add_parser("clip-score", help="CLIP score of a folder of images against their prompts (torchmetrics' CLIPScore)",
                       description="torchmetrics' CLIPScore: 100 x cosine of image and prompt embeddings, averaged "
                                   "over the images (the mean floored at 0). Prompts: a JSON file {image_stem: prompt}, "
                                   "or a text file with one prompt per line for the images in sorted order.")
    c.add_argument("dir_a", metavar="DIR")
    c.add_argument("--prompts", required=True, metavar="FILE", help="JSON {image_stem: prompt} or one prompt per line")
    c.add_argument("--features", default="clip", help="clip (default: openai/clip-vit-large-patch14 or --weights) or toyworld")
    _common(c, features=False)
    c.set_defaults(func=quietly(run_clip_score_command))

    for name, help_text in PAIRWISE.items():
        c = sub.add_parser(name, help=help_text, description=help_text + ": the files pair by their path "
                           "inside each folder (without extension); both images must have the same size.")
        c.add_argument("dir_a", metavar="DIR_A")
        c.add_argument("dir_b", metavar="DIR_B")
        if name == "lpips":
            c.add_argument("--net", default="alex", help="LPIPS backbone: alex (default, as torchmetrics), vgg or squeeze")
        if name == "ssim":
            c.add_argument("--json", action="store_true", help="print the result as JSON")
        else:
            _common(c, features=False)
        c.set_defaults(func=quietly(run_pairwise_command), metric=name)


@contextmanager
def _quiet_loading():
    """No model-loading progress bars: a metric command prints its number, or one line of error."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def quietly(run):
    def wrapped(args):
        with _quiet_loading():
            return run(args)

    return functools.update_wrapper(wrapped, run)


def _device(args):
    from atelier.models import pick_device_dtype

    return pick_device_dtype(args.device)[0]


def _extractor(args):
    from .distribution import load_features

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return load_features(args.features, mode=args.mode, weights=args.weights, device=_device(args),
                         allow_pickle=args.allow_pickle)


def _report(args, values: dict, text: str) -> int:
    if args.json:
        from atelier.cli import print_json

        print_json(values)
    else:
        print(text)
    return 0


def run_distribution_command(args) -> int:
    from . import distribution as d

    if (args.dir_b is None) == (args.ref_stats is None):
        raise UserError(f"{args.metric} compares two sets: give DIR_B or --ref-stats NAME (one of them)")
    d.image_files(args.dir_a)  # a bad folder fails before any model is loaded
    if args.dir_b is not None:
        d.image_files(args.dir_b)
    extractor = _extractor(args)
    if args.ref_stats is not None:
        ref = d.load_ref_stats(args.ref_stats, extractor)
    feats_a = d.folder_features(args.dir_a, extractor, args.batch_size)
    feats_b = d.folder_features(args.dir_b, extractor, args.batch_size) if args.dir_b is not None else ref["feats"]
    if args.metric == "fid":
        value = (d.fid(feats_a, feats_b) if args.ref_stats is None
                 else d.fid_from_stats(*d.statistics(feats_a), ref["mu"], ref["sigma"]))
    else:
        value = d.kid(feats_a, feats_b, seed=args.seed)
    return _report(args, {args.metric: value}, f"{args.metric.upper()} ({extractor.name}): {value:.6g}")


def run_ref_stats_command(args) -> int:
    from . import distribution as d

    d.image_files(args.dir_a)
    extractor = _extractor(args)
    d.ref_stats_path(args.name, extractor)  # a bad name fails before the features are computed
    feats = d.folder_features(args.dir_a, extractor, args.batch_size)
    path = d.save_ref_stats(args.name, feats, extractor)
    return _report(args, {"name": args.name, "features": extractor.name, "images": len(feats), "path": str(path)},
                   f"reference statistics {args.name!r} ({extractor.name}, {len(feats)} images) saved to {path}")


def read_prompts(path, files) -> list[str]:
    """The prompt of each image: a JSON object {image_stem: prompt}, or one prompt per line in the
    order of the sorted image files."""
    from atelier.core.io import parse_json, read_text

    path = Path(path)
    text = read_text(path, "prompts file")
    if path.suffix == ".json":
        table = parse_json(text, path, dict, "a JSON object {image_stem: prompt}")
        missing = [f.stem for f in files if not isinstance(table.get(f.stem), str)]
        if missing:
            raise UserError(f"{path} has no prompt for {len(missing)} images (e.g. {missing[0]!r})")
        return [table[f.stem] for f in files]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != len(files):
        raise UserError(f"{path} has {len(lines)} prompts for {len(files)} images (one line per image, sorted by name)")
    return lines


def run_clip_score_command(args) -> int:
    from . import distribution as d
    from .metrics import clip_score_mean, load_clip

    files = d.image_files(args.dir_a)
    prompts = read_prompts(args.prompts, files)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.features == "clip":
        folder = d.clip_folder(args.weights)
    elif args.features == "toyworld":
        folder = d.toyworld_clip_folder() if args.weights is None else args.weights
    else:
        raise UserError(f"unknown features {args.features!r} for a CLIP score; choose from clip, toyworld")
    scorer = load_clip(folder, allow_pickle=args.allow_pickle, device=_device(args))
    score, per_image = clip_score_mean(scorer, [d.read_image(f) for f in files], prompts, batch_size=args.batch_size)
    root = Path(args.dir_a).expanduser()
    return _report(args, {"clip_score": score, "per_image": {str(f.relative_to(root)): v for f, v in zip(files, per_image)}},
                   f"CLIP score: {score:.4f} over {len(files)} images")


def paired_files(dir_a, dir_b):
    """(name, file in dir_a, file in dir_b) for the images whose path without extension matches."""
    from .distribution import image_files

    def by_name(folder):
        files = image_files(folder)
        root = Path(folder).expanduser()
        return {str(f.relative_to(root).with_suffix("")): f for f in files}

    a, b = by_name(dir_a), by_name(dir_b)
    unpaired = sorted(a.keys() ^ b.keys())
    if unpaired:
        raise UserError(f"{len(unpaired)} images have no partner of the same name in the other folder (e.g. {unpaired[0]!r})")
    return [(name, a[name], b[name]) for name in sorted(a)]


def run_pairwise_command(args) -> int:
    import numpy as np

    from . import metrics
    from .distribution import read_image

    pairs = paired_files(args.dir_a, args.dir_b)
    if args.metric == "lpips":
        model = metrics.load_lpips(args.net, args.weights, allow_pickle=args.allow_pickle, device=_device(args))
        measure = lambda x, y: metrics.lpips(model, x, y)  # noqa: E731
    elif args.metric == "dists":
        model = metrics.load_dists(args.weights, allow_pickle=args.allow_pickle, device=_device(args))
        measure = lambda x, y: metrics.dists(model, x, y)  # noqa: E731
    else:
        measure = metrics.ssim
    values = {}
    for name, file_a, file_b in pairs:
        x, y = read_image(file_a), read_image(file_b)
        if x.shape != y.shape:
            raise UserError(f"{name}: sizes differ ({x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]})")
        values[name] = measure(x, y)
    mean = float(np.mean(list(values.values())))
    return _report(args, {args.metric: mean, "per_image": values},
                   f"{args.metric.upper()}: {mean:.6g} (mean over {len(values)} pairs)")


def register_report(sub) -> None:
    r = sub.add_parser(
        "report", help="FID / KID / CLIP score of an `atelier bench generate` run, overall and per category",
        description="Score a generation run (the folder `atelier bench generate` wrote) against reference images: "
                    "FID and KID (clean-fid), CLIP score of each image with its own prompt (torchmetrics' "
                    "definition), overall and per category. --ref is a folder in MJHQ-30K's layout (one "
                    "sub-folder per category, e.g. mjhq30k_imgs/) or a flat folder (overall only); --ref-stats "
                    "uses saved statistics instead (overall only). Writes report.json, report.html, a sample "
                    "grid per category and bar plots to --out (default RUN_DIR/report).")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--ref", metavar="DIR", help="reference images (MJHQ layout: REF/CATEGORY/*.jpg)")
    r.add_argument("--ref-stats", metavar="NAME", help="saved reference statistics (`atelier evaluate ref-stats`)")
    r.add_argument("--out", help="report folder (default RUN_DIR/report)")
    r.add_argument("--clip", metavar="FOLDER",
                   help="CLIP model for the CLIP score (default: the features' own CLIP for clip/toyworld features, "
                        "else openai/clip-vit-large-patch14 in the HF cache; skipped with a note when absent)")
    r.add_argument("--no-clip-score", action="store_true", help="skip the CLIP score")
    r.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (clean-fid's default 100)")
    r.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets (default 0)")
    _common(r, features=True)
    r.set_defaults(func=quietly(run_report_command))


def _report_clip_scorer(args, extractor):
    """The CLIP the score is measured with, or None (with a note) when there is none at hand."""
    from .distribution import ClipFeatures, clip_folder
    from .metrics import load_clip

    if args.no_clip_score:
        return None
    if args.clip is None and isinstance(extractor, ClipFeatures):
        return extractor.scorer
    try:
        return load_clip(clip_folder(args.clip), allow_pickle=args.allow_pickle, device=_device(args))
    except UserError as exc:
        if args.clip is not None:
            raise
        print(f"note: CLIP score skipped: {exc}", file=sys.stderr)
        return None


def run_report_command(args) -> int:
    from atelier.bench import read_run

    from . import distribution as d
    from .report import Reference, evaluate_run, reference_from_folder, write_report

    if (args.ref is None) == (args.ref_stats is None):
        raise UserError("report compares the run with a reference: give --ref DIR or --ref-stats NAME (one of them)")
    if args.kid_subsets < 1:
        raise UserError("--kid-subsets must be at least 1")
    run = read_run(args.run_dir)
    reference = reference_from_folder(args.ref) if args.ref is not None else None
    extractor = _extractor(args)
    if reference is None:
        reference = Reference(stats=d.load_ref_stats(args.ref_stats, extractor))
    scorer = _report_clip_scorer(args, extractor)
    result = evaluate_run(run, reference, extractor, clip_scorer=scorer, batch_size=args.batch_size,
                          kid_subsets=args.kid_subsets, seed=args.seed)
    written = write_report(result, run, args.out or Path(run.dir) / "report")
    result["files"] = {k: str(v) for k, v in written.items()}
    overall = result["overall"]
    lines = [f"{run.dir}: {overall['images']} images, {extractor.name} features"]
    for name, summary in [("overall", overall), *result["categories"].items()]:
        shown = "  ".join(f"{key} {summary[key]:.4g}" for key in ("fid", "kid", "clip_score") if key in summary)
        lines.append(f"  {name:<24} {shown or '(too few images)'}")
    lines.append(f"report: {written['html']}")
    if args.json:
        from .report import json_safe

        return _report(args, json_safe(result), "")
    return _report(args, result, "\n".join(lines))


def register_tryon(sub) -> None:
    t = sub.add_parser(
        "tryon", help="virtual try-on results: paired SSIM / LPIPS / FID / KID, unpaired FID / KID, the toy judge",
        description="Measure try-on results on a data folder in VITON-HD's layout (test_pairs.txt, "
                    "test_unpaired_pairs.txt, test/image/): paired SSIM, LPIPS, FID and KID against the person "
                    "images, unpaired FID and KID against the test person images, and, when DATA/test/cases.jsonl "
                    "exists (`atelier toyworld tryon-data`), the toy judge's success and preservation. Results: "
                    "RESULTS/paired/<person stem>__<garment stem>.png and RESULTS/unpaired/... (docs/tryon-toyworld.md). "
                    "LPIPS without local backbone weights is reported as missing.")
    t.add_argument("--results", required=True, metavar="DIR", help="folder holding paired/ and unpaired/ results")
    t.add_argument("--data", required=True, metavar="DIR", help="the try-on data folder (VITON-HD layout)")
    t.add_argument("--settings", default="paired,unpaired", help="which settings to measure (default paired,unpaired)")
    t.add_argument("--features", default="toyworld",
                   help="FID/KID features: toyworld (default, the shipped toy CLIP), inception (clean-fid's) or clip")
    t.add_argument("--mode", default="clean", help="Inception protocol: clean (default), legacy_pytorch or legacy_tensorflow")
    t.add_argument("--weights", help="feature extractor weights file or folder (default: the local caches)")
    t.add_argument("--lpips-net", default="vgg", help="LPIPS backbone: vgg (default), alex or squeeze")
    t.add_argument("--lpips-weights", action="append", metavar="PATH",
                   help="LPIPS backbone weights (.safetensors file or folder of torchvision's network; repeatable)")
    t.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (clean-fid's default 100)")
    t.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets (default 0)")
    t.add_argument("--no-judge", action="store_true", help="skip the toy judge even when test/cases.jsonl exists")
    t.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    t.add_argument("--device", help="device (default: cuda if available, else cpu)")
    t.add_argument("--allow-pickle", action="store_true", help="also read pickled weights (.pth)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=quietly(run_tryon_command))


def run_tryon_command(args) -> int:
    from .tryon import evaluate_tryon, format_tryon

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.kid_subsets < 1:
        raise UserError("--kid-subsets must be at least 1")
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    result = evaluate_tryon(args.results, args.data, args.features, mode=args.mode, weights=args.weights,
                            lpips_net=args.lpips_net, lpips_weights=args.lpips_weights, allow_pickle=args.allow_pickle,
                            device=_device(args), batch_size=args.batch_size, kid_subsets=args.kid_subsets,
                            seed=args.seed, settings=settings, judge=not args.no_judge)
    if not args.json:
        result.pop("judge_per_case", None)
    return _report(args, result, format_tryon(result))
