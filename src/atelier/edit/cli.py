"""`atelier edit`: local text-guided edits of one image, or a JSONL batch with the model loaded once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atelier.errors import UserError

METHOD_CHOICES = ("auto", "ddpm", "diffedit", "turbo", "img2img", "one-step")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit an image from a source and a target prompt; only the region they disagree about changes",
        description=(
            "Edit IMAGE so that it shows --target instead of --source (\"a red circle\" -> \"a blue circle\"). "
            "The model estimates where the prompts disagree (the mask); outside it the image is kept exactly. "
            "Batch form: --cases FILE.jsonl --outdir DIR, one JSON object per line: "
            '{"image": PATH, "source": "...", "target": "...", "out": "name.png"} (paths relative to FILE).'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the image to edit")
    p.add_argument("--source", help="a prompt describing IMAGE")
    p.add_argument("--target", help="the same prompt with the edit made")
    p.add_argument("--cases", metavar="FILE.jsonl", help="edit every case of this file (model loaded once)")
    p.add_argument("--outdir", metavar="DIR", help="where --cases writes its images")
    p.add_argument("--method", default="auto", choices=METHOD_CHOICES,
                   help="auto: turbo for Turbo/LCM models, ddpm for multi-step models; one-step: SwiftEdit with "
                        "a learned inverter (one-step models, see --inverter)")
    p.add_argument("--inverter", metavar="PATH",
                   help="one-step: inverter folder from `atelier train inverter` (default: the built-in "
                        "toyworld-inverter for toyworld-turbo)")
    p.add_argument("--edit-scale", type=float, default=1.0, help="one-step: cross-attention scale of the target prompt inside the mask")
    p.add_argument("--keep-scale", type=float, default=1.0, help="one-step: cross-attention scale of the source prompt outside the mask")
    p.add_argument("--model", default="toyworld", help="a diffusers folder, .safetensors file, hub id or built-in name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="schedule length (default 25; turbo 4)")
    p.add_argument("--strength", type=float, help="edit strength: share of the schedule re-run (default ddpm 0.8, turbo 1.0)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the model's; turbo: pseudo-guidance 1)")
    p.add_argument("--mask-from", default="noise", choices=("noise", "attention", "both", "none"),
                   help="noise: DiffEdit's noise difference; attention: the changed words' cross-attention; both: their intersection")
    p.add_argument("--mask-threshold", type=float, default=0.5, help="a soft mask value in [0, 1] above which a cell is edited")
    p.add_argument("--mask-dilate", type=int, default=1, help="grow the mask by this many latent cells")
    p.add_argument("--no-paste-back", action="store_true", help="do not copy the source pixels back outside the mask")
    p.add_argument("--out", default="edited.png", help="output PNG (single image)")
    p.add_argument("--mask-out", metavar="MASK.png", help="also write the edit mask (single image)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt pickle weights (runs code in the file)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run_edit)


def _settings(args):
    from atelier.edit.methods import EditSettings

    return EditSettings(method=args.method, steps=args.steps, strength=args.strength, guidance_scale=args.guidance,
                        mask_from=args.mask_from, mask_threshold=args.mask_threshold, mask_dilate=args.mask_dilate,
                        paste_back=not args.no_paste_back, seed=args.seed, inverter=args.inverter,
                        edit_scale=args.edit_scale, keep_scale=args.keep_scale)


def read_cases(path: Path) -> list[dict]:
    """Every line checked before any model work: a bad line fails the batch with its line number."""
    if not path.is_file():
        raise UserError(f"cases file not found: {path}")
    cases = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(case, dict):
            raise UserError(f"{path}:{number}: each line must be a JSON object")
        missing = [k for k in ("image", "source", "target") if not isinstance(case.get(k), str) or not case[k].strip()]
        if missing:
            raise UserError(f"{path}:{number}: missing or empty {', '.join(missing)}")
        image = Path(case["image"])
        case["image"] = str(image if image.is_absolute() else path.parent / image)
        out = case.get("out") or f"{Path(case['image']).stem}_edited.png"
        if not isinstance(out, str) or Path(out).is_absolute() or ".." in Path(out).parts:
            raise UserError(f"{path}:{number}: 'out' must be a file name inside --outdir")
        case["out"] = out
        cases.append(case)
    if not cases:
        raise UserError(f"{path} has no cases")
    return cases


def run_edit(args) -> int:
    from atelier.cli import print_json

    if args.cases:
        if args.image or args.source or args.target:
            raise UserError("give either IMAGE with --source/--target, or --cases FILE.jsonl, not both")
        if not args.outdir:
            raise UserError("--cases needs --outdir")
        cases = read_cases(Path(args.cases))
    else:
        if not args.image or not args.source or not args.target:
            raise UserError("give IMAGE, --source and --target (or --cases FILE.jsonl --outdir DIR)")
        cases = [{"image": args.image, "source": args.source, "target": args.target, "out": args.out}]
    settings = _settings(args)
    for case in cases:  # before the model loads
        if not Path(case["image"]).is_file():
            raise UserError(f"image not found: {case['image']}")

    from atelier.edit.methods import Editor, resolve_settings
    from atelier.core.images import open_image, save_png
    from atelier.models import load_pipeline

    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    resolve_settings(pipe, settings)  # bad options fail before any work
    editor = Editor(pipe)
    if settings.method == "one-step":
        editor.one_step(settings.inverter)  # a missing or unfit inverter fails before any work
    outdir = Path(args.outdir) if args.cases else None
    summary = []
    for case in cases:
        image = open_image(case["image"])
        result = editor.edit(image, case["source"], case["target"], settings)
        out = outdir / case["out"] if outdir else Path(case["out"])
        save_png(result.image, out, result.parameters(case["source"], case["target"], args.model))
        mask_path = None
        if result.mask is not None and (args.mask_out and not args.cases):
            mask_path = args.mask_out
            save_png(result.mask, mask_path, f"edit mask for {out}")
        summary.append({"image": case["image"], "out": str(out), "mask": mask_path, "method": result.settings.method,
                        "seconds": round(result.seconds, 3)})
        if not args.json:
            print(f"{out}  ({result.settings.method}, {result.seconds:.2f} s)")
    if args.json:
        print_json(summary if args.cases else summary[0])
    return 0
