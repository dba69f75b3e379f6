"""`atelier generate`, `atelier img2img` and `atelier info`.

Heavy imports (torch, diffusers) happen inside the handlers, so `atelier --help` stays quick.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from atelier.errors import UserError
from atelier.image_prompts import cli as image_prompts_cli
from atelier.speed import cli as speed_cli

DEFAULT_MODEL = "toyworld"
DEFAULT_OUTDIR = "outputs"
HIRES_STRENGTH = 0.7  # A1111's default denoising strength for the hires fix
IMG2IMG_STRENGTH = 0.75
_NUMBERED_PNG = re.compile(r"^(\d{5,})\.png$")


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate images from a prompt (txt2img), with A1111 parameters in every PNG",
        description=(
            "Generate images from a text prompt. Every PNG carries its generation parameters in A1111's "
            "format (see `atelier info`); `--from IMAGE` makes the same image again. Steps, CFG scale and "
            "sampler default to what suits the model. Image k of a run uses seed + k."
        ),
    )
    gen.add_argument("prompt", nargs="?", metavar="PROMPT",
                     help="the prompt (A1111 syntax: (emphasis:1.2), [from:to:when], {a|b} and __wildcards__)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="one prompt per line (blank lines skipped); all written to --outdir in order, "
                          "image i seeded --seed + i")
    _add_generation_options(gen)
    hires = gen.add_argument_group("hires fix", "A1111's hires fix: the image is made at --width/--height, "
                                   "upscaled, then redrawn by img2img at --strength")
    hires.add_argument("--hires-upscale", type=float, metavar="X",
                       help="upscale factor in [1, 4]; turns the hires fix on (default 2 when another hires option is given)")
    hires.add_argument("--hires-upscaler", metavar="NAME",
                       help="Latent (default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                            "Latent (nearest), Latent (nearest-exact), Lanczos, Nearest or None")
    hires.add_argument("--hires-steps", type=int, metavar="N", help="steps of the hires pass (default: --steps)")
    hires.add_argument("--strength", type=float, default=None,
                       help=f"denoising strength of the hires pass in (0, 1] (default {HIRES_STRENGTH})")
    gen.set_defaults(func=run_generate)

    i2i = subparsers.add_parser(
        "img2img",
        help="redraw an image following a prompt (img2img)",
        description=(
            "Redraw IMAGE following PROMPT. --strength sets how much changes: near 0 keeps the image, 1 "
            "ignores it. The output has IMAGE's size unless --width/--height are given (it is resized)."
        ),
    )
    i2i.add_argument("image", metavar="IMAGE", help="the image to start from")
    i2i.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (A1111 syntax)")
    i2i.add_argument("--strength", type=float, default=None,
                     help="denoising strength in (0, 1] (default 0.75, or the --from image's)")
    _add_generation_options(i2i)
    i2i.set_defaults(func=run_img2img)

    info = subparsers.add_parser(
        "info",
        help="print the generation parameters stored in an image",
        description="Print the generation parameters (A1111 infotext) stored in a PNG, JPEG or WebP image.",
    )
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--json", action="store_true", help="print the parsed fields as JSON")
    info.set_defaults(func=run_info)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """--sampler, --schedule, --steps, --cfg (--cfg-scale), --clip-skip, --width, --height: None when not given."""
    p.add_argument("--sampler", metavar="NAME", help="sampler, e.g. 'Euler a', 'DPM++ 2M' (see `atelier samplers`; default: the model's)")
    p.add_argument("--schedule", metavar="TYPE", help="schedule type, e.g. Karras, Exponential")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps (default: the model's)")
    p.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float, metavar="X",
                   help="classifier-free guidance scale, 0 or 1 = off (default: the model's)")
    p.add_argument("--clip-skip", type=int, metavar="N", help="A1111 clip skip: 1 = last layer, 2 = one before")
    p.add_argument("--width", type=int, metavar="W", help="image width (default: the model's)")
    p.add_argument("--height", type=int, metavar="H", help="image height (default: the model's)")


def add_loading_options(p: argparse.ArgumentParser) -> None:
    """What `load_model` reads besides the model: --device, --dtype, --config, --allow-pickle, --no-safety-checker."""
    p.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", metavar="T", help="weights dtype: fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--config", metavar="C",
                   help="for a single-file checkpoint: its base model's diffusers folder, or a bundled config "
                        "(sd1, sd2, sd2-base, sd-turbo, sdxl, sdxl-turbo; see `atelier models`)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--no-safety-checker", action="store_true", help="do not run the model's safety checker")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative", metavar="TEXT", help="negative prompt")
    p.add_argument("--model", metavar="M",
                   help=f"model: built-in name, diffusers folder, .safetensors file or hub id (default {DEFAULT_MODEL})")
    add_sampling_options(p)
    p.add_argument("--guidance-rescale", type=float, metavar="X", help="CFG rescale phi in [0, 1] (0: off)")
    p.add_argument("--pag-scale", type=float, metavar="X", help="perturbed-attention guidance scale (0: off)")
    p.add_argument("--emphasis", metavar="MODE",
                   help="how (word:1.2) weights apply, as A1111: Original, No norm, Ignore or None (default Original)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the first image (default: random)")
    p.add_argument("--n", type=int, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="images per pipeline call (default 1; memory only, results do not change)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", metavar="FILE", help="write the one image to FILE")
    out.add_argument("--outdir", metavar="DIR",
                     help=f"write images to DIR as 00000.png, 00001.png, ... after any already there "
                          f"(default ./{DEFAULT_OUTDIR})")
    p.add_argument("--wildcards", metavar="DIR", help="folder of __wildcard__ files (name.txt, one choice a line)")
    p.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="take every setting from IMAGE's parameters (options given here override them)")
    add_loading_options(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA .safetensors (kohya, diffusers or peft format) at SCALE (default 1) to every "
                        "image; repeatable; an LCM-LoRA switches to the LCM sampler. A file a prompt names as "
                        "<lora:NAME:W> (as --from images' prompts do) is that LoRA, applied at W")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="A1111's LoRA folder: <lora:NAME:WEIGHT> in the prompt applies DIR/NAME.safetensors "
                        "(subfolders searched) to that image; the tag is not part of the encoded text")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="load a textual-inversion embedding (.safetensors; A1111, kohya, diffusers formats) as "
                        "TOKEN (default: the file name, as A1111 does); repeatable")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="A1111's embeddings folder: a file there whose name is a word of the prompt or negative "
                        "prompt is loaded under that name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print results (paths, seeds, parameters) as JSON")
    image_prompts_cli.add_options(p)
    speed_cli.add_speed_options(p)


# --- handlers ---------------------------------------------------------------------------------


def run_generate(args) -> int:
    if args.prompts_file and args.prompt is not None:
        raise UserError("give either PROMPT or --prompts-file, not both")
    if args.prompts_file and args.from_image:
        raise UserError("--from and --prompts-file cannot be combined")
    base = _from_image_settings(args.from_image) if args.from_image else {}
    if base.get("strength") is not None and base.get("hires") is None and args.from_image:
        raise UserError(
            f"{args.from_image} was made by img2img (it has a Denoising strength); "
            f"run `atelier img2img INIT_IMAGE --from {args.from_image}` with its starting image"
        )
    if args.prompts_file:
        prompts = _read_prompts_file(args.prompts_file)
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif "prompt" in base:
        prompts = [base["prompt"]]
    else:
        raise UserError("no prompt: give PROMPT, --prompts-file FILE or --from IMAGE")
    return _run(args, base, prompts, init_image=None)


def run_img2img(args) -> int:
    from atelier.generate.metadata import open_image

    base = _from_image_settings(args.from_image) if args.from_image else {}
    if args.prompt is None and "prompt" not in base:
        raise UserError("no prompt: give PROMPT or --from IMAGE")
    init_image = open_image(args.image)
    prompt = args.prompt if args.prompt is not None else base["prompt"]
    return _run(args, base, [prompt], init_image=init_image)


def run_info(args) -> int:
    from atelier.cli import print_json
    from atelier.generate.metadata import parse_parameters

    text, kind, problems = _read_generation_info(args.image)
    if not text:
        raise UserError(f"{args.image} has no generation parameters")
    if args.json:
        print_json({"path": str(args.image), "format": kind, "parameters": text,
                    "fields": parse_parameters(text), "not_reproducible": problems})
    else:
        print(text)
        for problem in problems:
            print(f"atelier: note: {problem}", file=sys.stderr)
    return 0


# --- the work ---------------------------------------------------------------------------------


def _read_generation_info(path) -> tuple[str | None, str | None, list[str]]:
    """(infotext, "a1111" or "comfyui", what keeps it from being made again) of an image."""
    from atelier.generate.comfyui import comfyui_parameters
    from atelier.generate.metadata import image_parameters, open_image

    image = open_image(path)
    text = image_parameters(image)
    if text:
        return text, "a1111", []
    comfy = comfyui_parameters(image, source=str(path))
    if comfy is not None:
        return comfy.text, "comfyui", comfy.problems
    return None, None, []


def _from_image_settings(path) -> dict:
    from atelier.generate.metadata import parse_parameters
    from atelier.generate.request import request_from_parameters

    text, kind, problems = _read_generation_info(path)
    if not text:
        raise UserError(f"{path} has no generation parameters to regenerate from")
    if problems:
        more = f" (and {len(problems) - 1} more, see `atelier info`)" if len(problems) > 1 else ""
        raise UserError(f"{path} cannot be made again: {problems[0]}{more}")
    return request_from_parameters(parse_parameters(text), source=str(path))


def _read_prompts_file(path) -> list[str]:
    from atelier.core.io import read_text

    text = read_text(path, "prompts file")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file has no prompts: {path}")
    return prompts


def _pick(cli_value, base: dict, key: str, default=None):
    if cli_value is not None:
        return cli_value
    return base.get(key, default)


def _lora_plan(args, prompts: list[str]) -> tuple[list[tuple[str, float]], dict[str, Path]]:
    """The --lora files to apply to every image, and those a prompt names with <lora:NAME> (by file
    name): those are the files of these tags, at the tags' weights, not applied a second time."""
    from atelier.prompts.extra_networks import extract_lora_tags

    named = {tag.name for prompt in prompts for tag in extract_lora_tags(prompt)[1]}
    static, files = [], {}
    for path, scale in _lora_args(getattr(args, "lora", [])):
        stem = Path(path).stem
        if stem in named:
            files[stem] = Path(path)
        else:
            static.append((path, scale))
    return static, files


def _network_sources(args, base: dict, named_loras: dict):
    from atelier.generate.request import NetworkSources

    return NetworkSources(
        lora_dir=getattr(args, "lora_dir", None),
        lora_files=named_loras,
        embeddings_dir=getattr(args, "embeddings_dir", None),
        allow_pickle=args.allow_pickle,
        lora_hashes=base.get("lora_hashes", {}),
        ti_hashes=base.get("ti_hashes", {}),
        source=str(args.from_image) if args.from_image else "the image",
    )


def _requests(args, base: dict, prompts: list[str], init_image, model_name: str, named_loras: dict | None = None):
    from atelier.generate.request import GenerationRequest, validate_request

    n = args.n if args.n is not None else 1
    seed = _pick(args.seed, base, "seed")
    if seed is None:
        import random

        from atelier.generate.request import MAX_IMAGES, RANDOM_SEED_MAX

        seed = random.randrange(RANDOM_SEED_MAX - min(n, MAX_IMAGES) * len(prompts))
    hires = _hires(args, base)
    if hires is None and init_image is None and getattr(args, "strength", None) is not None:
        raise UserError("--strength of `generate` is the hires pass's; turn the hires fix on with --hires-upscale")
    requests = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=_pick(args.negative, base, "negative_prompt", ""),
            steps=_pick(args.steps, base, "steps"),
            sampler=_pick(args.sampler, base, "sampler"),
            schedule=args.schedule if args.schedule is not None else (None if args.sampler else base.get("schedule")),
            cfg_scale=_pick(args.cfg, base, "cfg_scale"),
            guidance_rescale=_pick(args.guidance_rescale, base, "guidance_rescale", 0.0),
            pag_scale=_pick(args.pag_scale, base, "pag_scale", 0.0),
            clip_skip=_pick(args.clip_skip, base, "clip_skip"),
            emphasis=_pick(args.emphasis, base, "emphasis", "Original"),
            width=_pick(args.width, base, "width"),
            height=_pick(args.height, base, "height"),
            seed=seed + i * n,
            n_images=n,
            batch_size=args.batch_size,
            init_image=init_image,
            strength=_pick(getattr(args, "strength", None), base, "strength",
                           HIRES_STRENGTH if hires is not None else IMG2IMG_STRENGTH),
            hires=hires,
            wildcard_dir=args.wildcards,
            model_name=model_name,
            networks=_network_sources(args, base, named_loras or {}),
        )
        validate_request(request)  # before the model loads
        requests.append(request)
    return requests


def _hires(args, base: dict):
    """The hires fix: the --from image's, with any --hires-* option given here applied."""
    from dataclasses import replace

    from atelier.generate.hires import HiresFix

    changes = {
        name: value for name, value in (("scale", getattr(args, "hires_upscale", None)),
                                        ("upscaler", getattr(args, "hires_upscaler", None)),
                                        ("steps", getattr(args, "hires_steps", None)))
        if value is not None
    }
    hires = base.get("hires")
    if not changes:
        return hires
    if "scale" in changes and hires is not None:
        hires = replace(hires, resize_x=0, resize_y=0)  # a factor given here replaces a stored resize
    return replace(hires or HiresFix(), **changes)


def _model_name(source: str) -> str:
    """The name recorded as `Model:`: a file's stem or a folder's name, else the name given."""
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return source


def _outputs(args, total: int) -> list[Path]:
    """The files this run writes, checked writable before any work."""
    from atelier.cli import check_output_file, check_output_folder

    if args.out:
        if total != 1:
            raise UserError(f"--out names one file but this run makes {total} images; use --outdir")
        out = Path(args.out)
        if out.is_dir():
            raise UserError(f"--out is a folder: {out}; use --outdir")
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must be a .png file: {out}")
        return [check_output_file(out)]
    outdir = check_output_folder(args.outdir or DEFAULT_OUTDIR)
    start = 0
    if outdir.is_dir():
        taken = [int(m.group(1)) for f in outdir.iterdir() if (m := _NUMBERED_PNG.match(f.name))]
        start = max(taken) + 1 if taken else 0
    return [outdir / f"{start + i:05d}.png" for i in range(total)]


def _run(args, base: dict, prompts: list[str], init_image) -> int:
    if args.wildcards and not Path(args.wildcards).is_dir():
        raise UserError(f"wildcard folder not found: {args.wildcards}")
    model_source = args.model or base.get("model_name") or DEFAULT_MODEL
    model_name = _model_name(args.model) if args.model else (base.get("model_name") or DEFAULT_MODEL)
    if args.sampler:
        from atelier.samplers import resolve

        resolve(args.sampler, args.schedule)  # an unknown name fails before the model loads
    static_loras, named_loras = _lora_plan(args, prompts)
    requests = _requests(args, base, prompts, init_image, model_name, named_loras)
    paths = _outputs(args, sum(r.n_images for r in requests))
    image_prompts = image_prompts_cli.plan(args, model_source, from_image=args.from_image)
    speed_cli.speed_options(args).check(args.device)  # fp8 on a GPU without it, unknown attention: before loading

    from atelier.generate.metadata import save_png
    from atelier.generate.run import generate

    pipe = load_model(args, model_source, from_image=bool(base) and not args.model, loras=static_loras)
    image_prompts.apply(pipe, requests)
    speed = speed_cli.apply_from_args(pipe, args, inference_mode=True)  # generation runs under inference_mode
    if Path(model_source).is_file():  # a single-file checkpoint: record A1111's Model hash
        from atelier.generate.metadata import model_hash

        digest = model_hash(model_source)
        for request in requests:
            request.model_hash = digest
    results = []
    index = 0
    for request in requests:
        for image in generate(pipe, request, progress=not args.quiet):
            path = save_png(image.image, paths[index], image.parameters)
            index += 1
            results.append(
                {
                    "path": str(path),
                    "seed": image.seed,
                    "prompt": image.prompt,
                    "negative_prompt": image.negative_prompt,
                    "nsfw": image.nsfw,
                    "parameters": image.parameters,
                    "fields": image.fields,
                }
            )
    if args.json:
        from atelier.cli import print_json

        print_json({"model": model_source, "images": results, "speed": speed})
    else:
        for r in results:
            print(r["path"])
        if any(r["nsfw"] for r in results):
            print("atelier: note: the safety checker blacked out some images", file=sys.stderr)
    return 0


def _lora_args(values: list[str]) -> list[tuple[str, float]]:
    out = []
    for value in values:
        path, sep, scale = value.rpartition(":")
        try:
            out.append((path, float(scale)) if sep and path else (value, 1.0))
        except ValueError:
            out.append((value, 1.0))  # a colon that is part of the path
    return out


def _embedding_args(values: list[str]) -> list[tuple[str, str | None]]:
    out = []
    for value in values:
        path, sep, token = value.rpartition(":")
        if not sep or not path or Path(value).exists() or "/" in token or "\\" in token:
            out.append((value, None))  # no token, or a colon that is part of the path
        else:
            out.append((path, token))
    return out


def load_model(args, source: str, *, from_image: bool = False, loras=None):
    """The pipeline of `source` with the options of `add_loading_options`, and --lora (or `loras`,
    [(file, scale)]) and --embedding if the parser has them."""
    from atelier.models import apply_embedding, load_pipeline

    try:
        pipe = load_pipeline(
            source,
            device=args.device,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            safety_checker=not args.no_safety_checker,
            config=getattr(args, "config", None),
            lora=(_lora_args(getattr(args, "lora", [])) if loras is None else loras) or None,
        )
    except UserError as exc:
        if from_image:
            raise UserError(f"{exc} (the model named in {args.from_image}; pass --model to choose one)") from None
        raise
    for path, token in _embedding_args(getattr(args, "embedding", [])):
        apply_embedding(pipe, path, token, allow_pickle=args.allow_pickle)
    return pipe
