"""`atelier toyworld render|judge|edits|mjhq|concept-data|tryon-data`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from atelier.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("toyworld", help="the toy world: render scenes, judge images, make edit cases",
                              description="The toy world (docs/toyworld.md): render scenes, judge images, make edit cases.")
    sub = p.add_subparsers(dest="toyworld_command", metavar="ACTION")
    sub.required = True

    r = sub.add_parser("render", help="render a caption (or a seeded random scene) to a PNG")
    r.add_argument("caption", nargs="?", help='e.g. "a large red circle at the top left"; omit for a random scene')
    r.add_argument("--seed", type=int, default=0, help="seed of the random scene (and its jitter)")
    r.add_argument("--objects", type=int, choices=(1, 2, 3), help="number of objects of the random scene")
    r.add_argument("--reserved", action="store_true", help="random scenes may use the reserved shapes and colour")
    r.add_argument("--out", required=True, help="output PNG")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=run_render)

    j = sub.add_parser("judge", help="list the objects an image shows; with --caption, the verdict")
    j.add_argument("image")
    j.add_argument("--caption", help="the caption the image should match")
    j.add_argument("--json", action="store_true", help="print the result as JSON")
    j.set_defaults(func=run_judge)

    e = sub.add_parser("edits", help="write seeded edit cases: source images, masks and a cases.jsonl")
    e.add_argument("--n", type=int, default=250, help="number of cases (default 250)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--kinds", help="comma-separated edit types (default: color,shape,size,add,remove; "
                   "with --partial: color,shape,size)")
    e.add_argument("--partial", action="store_true",
                   help="partial-caption cases: attribute edits on 2-3 objects whose captions name only the edited object")
    e.add_argument("--outdir", required=True)
    e.add_argument("--json", action="store_true", help="print the cases as JSON")
    e.set_defaults(func=run_edits)

    m = sub.add_parser("mjhq", help="write a toy MJHQ-30K: meta_data.json of captions in 10 categories and the rendered references",
                       description="A toy MJHQ-30K (docs/bench.md): DIR/meta_data.json in MJHQ's format and the rendered "
                                   "reference images as DIR/mjhq30k_imgs/{category}/{id}.png. The same seed gives the same files.")
    m.add_argument("--out", required=True, metavar="DIR", help="output folder")
    m.add_argument("--per-category", type=int, default=100, metavar="N", help="prompts per category (default 100)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.set_defaults(func=run_mjhq)

    c = sub.add_parser("concept-data", help="write a concept-learning set: instance images with token captions, held-out captions",
                       description="Instance images of a reserved concept (ring, bar, teal) for DreamBooth / LoRA training, "
                                   "each with a caption .txt in which TOKEN stands where the concept's word would, and "
                                   "held-out captions to judge the trained model by (DIR/held_out.jsonl).")
    c.add_argument("--concept", required=True, help="ring, bar or teal")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/instance/*.png + .txt, DIR/held_out.jsonl")
    c.add_argument("--n", type=int, default=8, help="instance images (default 8)")
    c.add_argument("--held-out", type=int, default=50, help="held-out captions (default 50)")
    c.add_argument("--token", default="sks", help="the word that stands for the concept (default sks)")
    c.add_argument("--composites", type=int, default=0, metavar="N",
                   help="also write N composites: each instance's concept object pasted into a free cell of a "
                        "--backgrounds image, captioned with both (default 0)")
    c.add_argument("--backgrounds", metavar="DIR", help="captioned base-world images for --composites (a .txt beside "
                                                         "each), e.g. the base model's prior-preservation class images")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=run_concept_data)

    t = sub.add_parser("tryon-data", help="write a toy try-on set in VITON-HD's layout: persons, garments, masks, pairs files",
                       description="Try-on cases of the toy world (docs/toyworld.md, docs/tryon-toyworld.md) in VITON-HD's "
                                   "layout: DIR/{train,test}/{image,cloth,agnostic-mask}/, DIR/train_pairs.txt, "
                                   "DIR/test_pairs.txt, DIR/test_unpaired_pairs.txt, and for the judge DIR/test/cases.jsonl "
                                   "and DIR/test/ground-truth/<person>__<garment>.png. The same seed gives the same files; "
                                   "a re-run rewrites the set.")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder")
    t.add_argument("--n", type=int, default=1000, metavar="N", help="training pairs (default 1000)")
    t.add_argument("--test-n", type=int, default=100, metavar="M",
                   help="test persons (default 100): M paired and M unpaired test pairs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--json", action="store_true", help="print the counts as JSON")
    t.set_defaults(func=run_tryon_data)


def run_render(args) -> int:
    from atelier.cli import check_output_file
    from atelier.core.images import save_png

    from .render import render_pil
    from .scene import BASE_COLOURS, BASE_SHAPES, COLOURS, SHAPES, parse_caption, sample_scene

    check_output_file(args.out)
    if args.caption:
        scene = parse_caption(args.caption)
        rng = random.Random(args.seed)
        # the caption fixes the objects; the seed gives each its jitter, as sampled scenes have
        scene = type(scene)(tuple(o.__class__(**{**o.__dict__, "dx": rng.randint(-1, 1), "dy": rng.randint(-1, 1)}) for o in scene.objects))
        caption = args.caption
    else:
        rng = random.Random(args.seed)
        shapes, colours = (SHAPES, tuple(COLOURS)) if args.reserved else (BASE_SHAPES, tuple(BASE_COLOURS))
        scene = sample_scene(rng, args.objects, shapes, colours)
        caption = scene.caption(rng)
    out = save_png(render_pil(scene), args.out, caption)
    if args.json:
        from atelier.cli import print_json

        print_json({"out": str(out), "caption": caption, "objects": [o.__dict__ for o in scene.objects]})
    else:
        print(f"{out}: {caption}")
    return 0


def run_judge(args) -> int:
    from atelier.core.images import open_image

    from .judge import detect, judge

    image = np.asarray(open_image(args.image).convert("RGB"))
    if image.shape[:2] != (64, 64):
        raise UserError(f"the judge reads 64x64 toy-world images; {args.image} is {image.shape[1]}x{image.shape[0]}")
    if args.caption:
        verdict = judge(image, args.caption)
        result = verdict.to_dict()
        text = [f"match: {verdict.match}", f"objects right (cells aside): {verdict.objects_right}",
                f"cells right: {verdict.cells_right:.2f}"]
    else:
        found = detect(image)
        result = {"detected": [d.__dict__ for d in found]}
        text = []
    if args.json:
        from atelier.cli import print_json

        print_json(result)
    else:
        for d in result["detected"]:
            d = d if isinstance(d, dict) else d.__dict__
            print(f"{d['size']} {d['colour']} {d['shape']} in cell '{d['cell']}' (area {d['area']:.0f})")
        print("\n".join(text))
    return 0


def run_edits(args) -> int:
    from atelier.cli import check_output_folder
    from atelier.core.images import save_png
    from atelier.core.io import atomic_write_bytes

    from .edits import EDIT_TYPES, PARTIAL_EDIT_TYPES, edit_cases
    from .render import render_pil

    allowed = PARTIAL_EDIT_TYPES if args.partial else EDIT_TYPES
    kinds = tuple(k.strip() for k in (args.kinds or ",".join(allowed)).split(",") if k.strip())
    unknown = [k for k in kinds if k not in allowed]
    if unknown or not kinds:
        cases_of = "partial-caption edit" if args.partial else "edit"
        raise UserError(f"unknown {cases_of} type(s) {unknown}; choose from {', '.join(allowed)}")
    if args.n < 1:
        raise UserError("--n must be at least 1")
    out = check_output_folder(args.outdir)
    cases = edit_cases(args.n, args.seed, kinds, partial=args.partial)
    lines = []
    from PIL import Image

    for i, case in enumerate(cases):
        name = f"{i:05d}"
        save_png(render_pil(case.source), out / "source" / f"{name}.png", case.source_caption)
        save_png(render_pil(case.target), out / "target" / f"{name}.png", case.target_caption)
        save_png(Image.fromarray(case.mask().astype(np.uint8) * 255), out / "mask" / f"{name}.png", "edit mask")
        lines.append({"image": f"source/{name}.png", "source": case.source_caption, "target": case.target_caption,
                      "out": f"{name}.png", "kind": case.kind, "expected": f"target/{name}.png", "mask": f"mask/{name}.png",
                      "scene": case.to_dict()})
    atomic_write_bytes(out / "cases.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8"))
    if args.json:
        from atelier.cli import print_json

        print_json({"outdir": str(out), "cases": len(lines)})
    else:
        print(f"wrote {len(lines)} edit cases to {out / 'cases.jsonl'}")
    return 0


def run_mjhq(args) -> int:
    from atelier.cli import check_output_folder

    from .mjhq import CATEGORIES, write_toy_mjhq

    if args.per_category < 1:
        raise UserError(f"--per-category must be at least 1, not {args.per_category}")
    out = check_output_folder(args.out, "--out")
    meta = write_toy_mjhq(out, args.per_category, args.seed)
    if args.json:
        from atelier.cli import print_json

        print_json({"meta_data": str(meta), "categories": list(CATEGORIES), "prompts": args.per_category * len(CATEGORIES)})
    else:
        print(f"wrote {args.per_category * len(CATEGORIES)} prompts in {len(CATEGORIES)} categories to {meta}")
    return 0


def run_concept_data(args) -> int:
    from atelier.cli import check_output_folder
    from atelier.core.images import save_png
    from atelier.core.io import atomic_write_bytes

    from PIL import Image

    from .concepts import check_concept, composites, held_out_examples, instance_examples
    from .render import render_pil

    check_concept(args.concept)
    if args.n < 1 or args.held_out < 0:
        raise UserError("--n must be at least 1 and --held-out at least 0")
    if not args.token.strip() or len(args.token.split()) != 1:
        raise UserError(f"--token must be one word, not {args.token!r}")
    if args.composites < 0 or (args.composites and not args.backgrounds):
        raise UserError("--composites N needs N >= 0 and --backgrounds DIR (captioned images to paste into)")
    backgrounds = read_backgrounds(Path(args.backgrounds)) if args.composites else []
    out = check_output_folder(args.out)
    instances = instance_examples(args.concept, args.n, args.seed, args.token)
    pictures = [render_pil(ex.scene) for ex in instances]
    for i, (ex, picture) in enumerate(zip(instances, pictures)):
        save_png(picture, out / "instance" / f"{i:03d}.png", ex.caption)
        atomic_write_bytes(out / "instance" / f"{i:03d}.txt", (ex.caption + "\n").encode("utf-8"))
    pasted = composites(instances, pictures, backgrounds, args.composites, args.seed)
    for k, (picture, caption) in enumerate(pasted):
        save_png(Image.fromarray(picture), out / "instance" / f"composite-{k:03d}.png", caption)
        atomic_write_bytes(out / "instance" / f"composite-{k:03d}.txt", (caption + "\n").encode("utf-8"))
    held_out = held_out_examples(args.concept, args.held_out, args.token, instances=instances)
    atomic_write_bytes(out / "held_out.jsonl", "".join(json.dumps(ex.to_dict()) + "\n" for ex in held_out).encode("utf-8"))
    if args.json:
        from atelier.cli import print_json

        print_json({"out": str(out), "instance": len(instances), "composites": len(pasted), "held_out": len(held_out),
                    "token": args.token})
    else:
        more = f" and {len(pasted)} composites" if pasted else ""
        print(f"wrote {len(instances)} instance images{more} to {out / 'instance'} and {len(held_out)} held-out captions "
              f"to {out / 'held_out.jsonl'}")
    return 0


def read_backgrounds(folder: Path) -> list[tuple]:
    """(64 x 64 RGB picture, caption) of every image in `folder` with a caption .txt beside it."""
    from atelier.core.images import list_images, open_image, sidecar_caption

    if not folder.is_dir():
        raise UserError(f"--backgrounds {folder}: not a folder")
    pairs = []
    for path in list_images(folder):
        caption = sidecar_caption(path)
        if caption:
            picture = np.asarray(open_image(path).convert("RGB"))
            if picture.shape[:2] == (64, 64):
                pairs.append((picture, caption))
    if not pairs:
        raise UserError(f"--backgrounds {folder}: no 64 x 64 image with a caption .txt beside it")
    return pairs


def run_tryon_data(args) -> int:
    from atelier.cli import check_output_folder

    from .tryon import write_tryon_data

    if args.n < 1:
        raise UserError(f"--n must be at least 1, not {args.n}")
    if args.test_n < 1:
        raise UserError(f"--test-n must be at least 1, not {args.test_n}")
    out = check_output_folder(args.out, "--out")
    summary = write_tryon_data(out, args.n, args.test_n, args.seed)
    if args.json:
        from atelier.cli import print_json

        print_json(summary)
    else:
        print(f"wrote {summary['train']} training pairs and {summary['test_paired']} paired + {summary['test_unpaired']} "
              f"unpaired test pairs to {out}")
    return 0
