"""`atelier evaluate pie-bench`."""

from __future__ import annotations

import sys

from atelier.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="benchmark editing methods (PIE-Bench)",
                              description="Benchmark editing methods on a local copy of a benchmark.")
    sub = p.add_subparsers(dest="evaluate_command", metavar="BENCHMARK")
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
                   help="LPIPS VGG weights: .safetensors file(s) or folder with VGG16 features and LPIPS linear layers (repeatable)")
    b.add_argument("--allow-pickle", action="store_true", help="also read pickled weights (.bin/.pth)")
    b.add_argument("--device", help="device for the model and the metrics (default: cuda if available, else cpu)")
    b.add_argument("--save-images", action="store_true", help="also write the edited images to --out/images/")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=run_pie_bench_command)


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
