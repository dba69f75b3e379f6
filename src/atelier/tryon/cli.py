"""`atelier tryon`: dress a person in a garment with a try-on model (CatVTON or OOTDiffusion), one pair or
a VITON-HD pairs file."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from atelier.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tryon", help="virtual try-on: a person wearing a garment (CatVTON, OOTDiffusion)",
        description=(
            "Draw PERSON wearing GARMENT inside --mask (white: the region drawn anew; it must have the person "
            "image's size). Images of any size are resized to the model's resolution and the result back to "
            "the person's size; outside the mask the person's pixels are kept exactly. Batch form: --pairs "
            "FILE --data DIR --outdir DIR over a VITON-HD pairs file (result <person>__<garment>.png, the names `atelier evaluate tryon` reads, and "
            "results.jsonl). Every PNG carries A1111 'parameters' metadata with the inputs' SHA-256."
        ),
    )
    p.add_argument("person", nargs="?", help="the person image")
    p.add_argument("garment", nargs="?", help="the garment image")
    p.add_argument("--mask", help="the inpainting mask (white where the garment goes)")
    p.add_argument("--model", default="toyworld-tryon", help="a try-on model folder (`atelier train tryon`'s "
                                                             "OUTPUT_DIR/final) or a built-in name (default toyworld-tryon)")
    p.add_argument("--method", help="catvton or ootd: checks the model's method, or picks one in a folder holding both")
    p.add_argument("--guidance", type=float, help="classifier-free guidance on the garment (1 = off, one UNet call "
                                                  "per step; default: the model's, catvton 2.5, ootd 2.0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the result image (.png)")
    p.add_argument("--pairs", help="batch: a pairs file (lines \"<person file> <garment file>\")")
    p.add_argument("--data", help="batch: the data folder in VITON-HD's layout")
    p.add_argument("--split", help="batch: train or test (default: from the pairs file's name, train_* is train)")
    p.add_argument("--outdir", help="batch: the results folder")
    p.add_argument("--limit", type=int, help="batch: the first N pairs only")
    p.add_argument("--device", help="cpu, cuda, mps (default: the best there is)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines or library warnings")
    p.set_defaults(func=run)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parameters(model, *, steps: int, guidance: float, seed: int, size, person, garment, mask) -> str:
    """The result's A1111-style infotext: no prompt, one line of settings."""
    from atelier.core.infotext import format_parameters

    return format_parameters("", "", {
        "Try-on method": model.method, "Steps": steps, "Guidance": guidance, "Seed": seed,
        "Size": f"{size[0]}x{size[1]}", "Model": model_name(model.source),
        "Person hash": sha256_file(person), "Garment hash": sha256_file(garment), "Mask hash": sha256_file(mask),
    })


def model_name(source: str) -> str:
    """A built-in name as given; a folder's name (with its parent's for a trainer's `final`)."""
    from atelier.core.facts import source_name

    path = Path(source)
    if path.is_dir() and path.resolve().name == "final":
        return f"{path.resolve().parent.name}/final"
    return source_name(str(source))


def _settings(args, model) -> tuple[int, float]:
    steps = args.steps if args.steps is not None else int(model.defaults["steps"])
    guidance = args.guidance if args.guidance is not None else float(model.defaults["guidance"])
    if steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    if not guidance >= 1 or guidance == float("inf"):
        raise UserError(f"--guidance must be a finite number of at least 1, not {guidance}")
    return steps, guidance


def _one(model, person, garment, mask, out: Path, steps, guidance, seed) -> dict:
    from atelier.core.images import open_image, save_png
    from atelier.tryon.pipeline import try_on

    person_image = open_image(person, name=f"person image {person}")
    image = try_on(model, person_image, open_image(garment, name=f"garment image {garment}"),
                   open_image(mask, name=f"mask {mask}"), steps=steps, guidance=guidance, seed=seed)
    save_png(image, out, parameters(model, steps=steps, guidance=guidance, seed=seed, size=image.size,
                                    person=person, garment=garment, mask=mask))
    return {"out": str(out), "person": str(person), "garment": str(garment), "mask": str(mask),
            "method": model.method, "steps": steps, "guidance": guidance, "seed": seed}


def run(args) -> int:
    from atelier.cli import check_output_file, check_output_folder, print_json
    from atelier.tryon.methods import METHODS

    if args.method is not None and args.method not in METHODS:
        raise UserError(f"unknown try-on method {args.method!r}: choose from {', '.join(METHODS)}")
    batch = args.pairs is not None
    if batch:
        if args.person or args.garment or args.mask or args.out:
            raise UserError("--pairs runs a batch: give --data and --outdir, not PERSON GARMENT --mask --out")
        if not args.data or not args.outdir:
            raise UserError("--pairs needs --data DIR (VITON-HD's layout) and --outdir DIR")
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be at least 1, not {args.limit}")
        from atelier.tryon.data import read_pairs, split_of

        pairs = read_pairs(args.data, args.split or split_of(args.pairs), args.pairs)[: args.limit]
        outdir = check_output_folder(args.outdir)
    else:
        if not args.person or not args.garment:
            raise UserError("give PERSON and GARMENT images (or --pairs FILE --data DIR --outdir DIR)")
        if not args.mask:
            raise UserError("--mask is required: the region of the person image where the garment goes")
        if not args.out:
            raise UserError("--out is required: the result image (.png)")
        if Path(args.out).suffix.lower() != ".png":
            raise UserError(f"--out {args.out}: the result is a PNG (give a .png name)")
        for what, path in (("person image", args.person), ("garment image", args.garment), ("mask", args.mask)):
            if not Path(path).is_file():
                raise UserError(f"{what} not found: {path}")
        out = check_output_file(args.out)
    from atelier.tryon.model import load_tryon_model

    model = load_tryon_model(args.model, method=args.method, device=args.device)
    steps, guidance = _settings(args, model)
    if not batch:
        result = _one(model, args.person, args.garment, args.mask, out, steps, guidance, args.seed)
        print_json(result) if args.json else print(f"wrote {out}")
        return 0
    from atelier.core.io import atomic_open

    results = []
    for n, pair in enumerate(pairs):
        results.append(_one(model, pair.person, pair.garment, pair.mask, outdir / f"{pair.name}.png", steps,
                            guidance, args.seed))
        if not args.json and not args.quiet:
            print(f"[{n + 1}/{len(pairs)}] {results[-1]['out']}", file=sys.stderr)
    with atomic_open(outdir / "results.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in results))
    summary = {"outdir": str(outdir), "results": len(results), "method": model.method, "steps": steps,
               "guidance": guidance, "seed": args.seed, "model": str(args.model)}
    print_json(summary) if args.json else print(f"wrote {len(results)} results to {outdir} (results.jsonl)")
    return 0
