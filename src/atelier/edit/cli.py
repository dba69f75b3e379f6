"""`atelier edit`: local text-guided edits of one image, or a JSONL batch with the model loaded once."""

from __future__ import annotations

import argparse
from pathlib import Path

from atelier.cli import HelpWithDefaults
from atelier.core.io import check_writable, parse_json
from atelier.errors import UserError
from atelier.image_prompts import cli as image_prompts_cli
from atelier.speed import cli as speed_cli

METHOD_CHOICES = ("auto", "ddpm", "diffedit", "turbo", "img2img", "one-step")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="edit an image from a source and a target prompt; only the region they disagree about changes",
        description=(
            "Edit IMAGE so that it shows --target instead of --source (\"a red circle\" -> \"a blue circle\"). "
            "The model estimates where the prompts disagree (the mask); outside it the image is kept exactly. "
            "Batch form: --cases FILE.jsonl --outdir DIR, one JSON object per line: "
            '{"image": PATH, "source": "...", "target": "...", "out": "name.png"} (paths relative to FILE; '
            "every line, image and output name is checked before the model loads; outputs that exist are "
            "skipped unless --overwrite). Outputs are PNG, JPEG or WebP, as the extension says, with the "
            "edit's A1111 parameters."
        ),
        formatter_class=HelpWithDefaults,
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="the image to edit")
    p.add_argument("--source", help="a prompt describing IMAGE")
    p.add_argument("--target", help="the same prompt with the edit made")
    p.add_argument("--cases", metavar="FILE.jsonl", help="edit every case of this file (model loaded once)")
    p.add_argument("--outdir", metavar="DIR", help="where --cases writes its images")
    p.add_argument("--overwrite", action="store_true", help="--cases: redo cases whose output already exists")
    p.add_argument("--method", default="auto", choices=METHOD_CHOICES,
                   help="auto: turbo for Turbo/LCM models, ddpm for multi-step models; one-step: SwiftEdit with "
                        "a learned inverter (one-step models, see --inverter)")
    p.add_argument("--inverter", metavar="PATH",
                   help="one-step: inverter folder from `atelier train inverter` (default: the built-in "
                        "toyworld-inverter for toyworld-turbo)")
    p.add_argument("--edit-scale", type=float, default=1.0, help="one-step: cross-attention scale of the target prompt inside the mask")
    p.add_argument("--keep-scale", type=float, default=1.0, help="one-step: cross-attention scale of the outside prompt outside the mask")
    p.add_argument("--outside-prompt", default="target", choices=("target", "source"),
                   help="one-step: the prompt the generator attends to outside the mask: target (SwiftEdit's ARaM: "
                        "the edit prompt everywhere, the mask rescales it) or source")
    p.add_argument("--noise-release", type=float, default=1.0,
                   help="one-step: inside the mask, move the inverted noise this far away from its inversion under the "
                        "edit prompt (lets go of the replaced words' colour or shape; 0: off)")
    p.add_argument("--image-branch", default="auto", choices=("auto", "on", "off"),
                   help="one-step: SwiftEdit's image branch, the image being edited as the generator's image prompt "
                        "(IP-Adapter). auto: on when the inverter was trained with an adapter or --ip-adapter names "
                        "one; on: also with the model's own adapter; off: text only")
    p.add_argument("--ip-edit-scale", type=float, default=0.2,
                   help="one-step image branch: weight of the image prompt's attention inside the mask (mid and up blocks)")
    p.add_argument("--ip-keep-scale", type=float, default=1.0,
                   help="one-step image branch: weight of the image prompt's attention outside the mask (mid and up blocks)")
    p.add_argument("--model", default="toyworld", help="a diffusers folder, .safetensors file, hub id or built-in name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="schedule length (default 25; turbo 4)")
    p.add_argument("--strength", type=float, help="edit strength: share of the schedule re-run (default ddpm 0.8, turbo 1.0)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the model's; turbo: pseudo-guidance 1)")
    p.add_argument("--mask-from", default="auto", choices=("auto", "noise", "attention", "both", "none"),
                   help="noise: DiffEdit's noise difference; attention: the changed words' cross-attention; both: their "
                        "intersection (one-step: the inverter's noise difference times its attention to the changed "
                        "phrase); auto: both for one-step, noise for the others")
    p.add_argument("--mask-threshold", type=float,
                   help="a soft mask value in [0, 1] above which a cell is edited (default 0.5; one-step 0.6)")
    p.add_argument("--mask-dilate", type=int, default=1, help="grow the mask by this many latent cells")
    p.add_argument("--mask-regions", type=int, default=0, metavar="N",
                   help="keep only the mask's N connected regions with the strongest response (default 0: all; "
                        "1 when the edit changes one object: a second blob elsewhere is then left alone)")
    p.add_argument("--no-paste-back", action="store_true", help="do not copy the source pixels back outside the mask")
    p.add_argument("--out", metavar="FILE", help="output image, .png/.jpg/.jpeg/.webp (single image; default edited.png)")
    p.add_argument("--mask-out", metavar="MASK.png", help="also write the edit mask (single image)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt pickle weights (runs code in the file)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors (kohya, diffusers or peft format) at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="load a textual-inversion embedding as TOKEN (default: the file name); repeatable")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    image_prompts_cli.add_options(p)
    speed_cli.add_speed_options(p)
    p.set_defaults(func=run_edit)


def _settings(args):
    from atelier.edit.methods import EditSettings, check_settings

    return check_settings(EditSettings(
        method=args.method, steps=args.steps, strength=args.strength, guidance_scale=args.guidance,
        mask_from=args.mask_from, mask_threshold=args.mask_threshold, mask_dilate=args.mask_dilate, mask_regions=args.mask_regions,
        paste_back=not args.no_paste_back, seed=args.seed, inverter=args.inverter,
        edit_scale=args.edit_scale, keep_scale=args.keep_scale, outside_prompt=args.outside_prompt,
        noise_release=args.noise_release, image_branch=args.image_branch,
        ip_edit_scale=args.ip_edit_scale, ip_keep_scale=args.ip_keep_scale))


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"cases file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the cases file as UTF-8") from None
    return text.splitlines()


def _output(out, outdir: Path, where: str) -> Path:
    """The file `out` names inside `outdir`, or a UserError saying why it cannot be one."""
    from atelier.core.images import output_format

    if not isinstance(out, str) or not out.strip():
        raise UserError(f"{where}: 'out' must be a file name inside --outdir")
    path = outdir / out
    if outdir.resolve() not in path.resolve().parents:
        raise UserError(f"{where}: 'out' {out!r} is not a file inside --outdir {outdir}")
    try:
        check_writable(path, "output")
        output_format(path)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return path


def read_cases(path: Path, outdir: Path) -> list[dict]:
    """Every line, input image and output name checked before any model work: a bad one fails the
    batch with its line number. Each case gets "out" (its path inside `outdir`) and "line"."""
    from atelier.core.images import open_image

    cases, outputs = [], {}  # outputs: resolved path -> line
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        case = parse_json(line, where, dict, "each line to be a JSON object")
        missing = [k for k in ("image", "source", "target") if not isinstance(case.get(k), str) or not case[k].strip()]
        if missing:
            raise UserError(f"{where}: missing or empty {', '.join(missing)}")
        image = Path(case["image"])
        case["image"] = str(image if image.is_absolute() else path.parent / image)
        try:
            open_image(case["image"])  # header, size limits and a full decode: corrupt files fail now
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        out = _output(case.get("out", f"{image.stem}_edited.png"), outdir, where)
        resolved = out.resolve()
        if resolved in outputs:
            raise UserError(f"{where}: output {out} is also written by line {outputs[resolved]}; give each case its own 'out'")
        outputs[resolved] = number
        cases.append({**case, "out": out, "line": number})
    if not cases:
        raise UserError(f"{path} has no cases")
    for case in cases:
        written_by = outputs.get(Path(case["image"]).resolve())
        if written_by is not None:
            raise UserError(f"{path}:{written_by}: output {Path(case['image']).name} is the input image of line {case['line']}")
    return cases


def _check_single(args) -> list[dict]:
    from atelier.core.images import output_format, open_image

    if not args.image or not args.source or not args.target:
        raise UserError("give IMAGE, --source and --target (or --cases FILE.jsonl --outdir DIR)")
    open_image(args.image)
    out = Path(args.out or "edited.png")
    for path, what in ((out, "--out"), (args.mask_out and Path(args.mask_out), "--mask-out")):
        if path:
            check_writable(path, what)
            output_format(path)
    if args.mask_out and (args.method == "img2img" or args.mask_from == "none"):
        raise UserError("--mask-out needs a mask: img2img and --mask-from none make none")
    if args.mask_out and Path(args.mask_out).resolve() == out.resolve():
        raise UserError("--mask-out and --out name the same file")
    return [{"image": args.image, "source": args.source, "target": args.target, "out": out}]


def _check_batch(args) -> tuple[list[dict], list[dict]]:
    """(cases to run, cases skipped because their output exists)."""
    if args.image or args.source or args.target:
        raise UserError("give either IMAGE with --source/--target, or --cases FILE.jsonl, not both")
    if not args.outdir:
        raise UserError("--cases needs --outdir")
    if args.out or args.mask_out:
        raise UserError("--out and --mask-out are for single edits; --cases writes each case's 'out' into --outdir")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"--outdir {outdir} is a file, not a folder")
    cases = read_cases(Path(args.cases), outdir)
    if args.overwrite:
        return cases, []
    return [c for c in cases if not c["out"].exists()], [c for c in cases if c["out"].exists()]


def run_edit(args) -> int:
    from atelier.cli import print_json

    from atelier.prompts.extra_networks import extract_lora_tags

    settings = _settings(args)
    cases, skipped = _check_batch(args) if args.cases else (_check_single(args), [])
    if any(extract_lora_tags(c[k])[1] for c in cases for k in ("source", "target")):
        raise UserError("edit applies LoRAs with --lora FILE[:SCALE]; <lora:…> tags in prompts are for generate")
    image_prompts = image_prompts_cli.plan(args, args.model, one_step=args.method == "one-step")
    speed_cli.speed_options(args).check()  # before the model loads
    summary = [{"image": c["image"], "out": str(c["out"]), "skipped": True} for c in skipped]
    if skipped and not args.json:
        print(f"skipped {len(skipped)} of {len(cases) + len(skipped)} cases whose output exists (--overwrite redoes them)")
    speed = None
    if cases:
        speed, done = _run(args, settings, cases, image_prompts)
        summary += done
    if args.json:
        if args.cases:
            print_json(summary)
        else:
            print_json({**summary[0], "speed": speed})
    return 0


def _run(args, settings, cases: list[dict], image_prompts) -> tuple[dict, list[dict]]:
    """(what apply_speed did, one summary per case)."""
    from atelier.core.images import open_image, save_image
    from atelier.edit.methods import Editor, resolve_settings
    from atelier.generate import cli as generate_cli
    from atelier.generate.networks import hash_fields, with_lora_tags
    from atelier.models import apply_embedding, load_pipeline

    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, lora=generate_cli._lora_args(args.lora) or None)
    for path, token in generate_cli._embedding_args(args.embedding):
        apply_embedding(pipe, path, token, allow_pickle=args.allow_pickle)
    speed = speed_cli.apply_from_args(pipe, args, inference_mode=False)
    ip_fields = image_prompts.apply_to_edit(pipe, resolve_settings(pipe, settings))  # bad options fail before any work
    editor = Editor(pipe)
    if settings.method == "one-step":  # a missing or unfit inverter or adapter fails before any work
        editor.one_step(settings.inverter).image_branch(settings.image_branch)
    summary = []
    for case in cases:
        try:
            result = editor.edit(open_image(case["image"]), case["source"], case["target"], settings)
        except UserError as exc:
            raise UserError(f"{args.cases}:{case['line']}: {exc}" if args.cases else str(exc)) from None
        out = case["out"]
        parameters = result.parameters(case["source"], with_lora_tags(pipe, case["target"]), args.model)
        networks = {k: v for k, v in hash_fields(pipe, [case["source"], case["target"]]).items() if v}
        parameters = image_prompts_cli.with_fields(parameters, {**networks, **ip_fields})
        save_image(result.image, out, parameters)
        mask_path = None
        if result.mask is not None and args.mask_out:
            mask_path = args.mask_out
            save_image(result.mask, mask_path, f"edit mask for {out}")
        summary.append({"image": case["image"], "out": str(out), "mask": mask_path, "method": result.settings.method,
                        "seconds": round(result.seconds, 3)})
        if not args.json:
            print(f"{out}  ({result.settings.method}, {result.seconds:.2f} s)")
    return speed, summary
