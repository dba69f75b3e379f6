"""`atelier export MODEL --out DIR --format openvino|onnx`: the CPU fast path (see docs/cpu-fast-path.md)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to OpenVINO or ONNX for fast CPU generation",
        description=(
            "Export MODEL's UNet, VAE (encoder and decoder) and text encoder(s) to OpenVINO IR or ONNX and "
            "write the rest as the diffusers folder it was. The folder then loads like any model "
            "(--model DIR): generate, img2img and the stream run on the runtime, on the CPU. A tiny autoencoder "
            "(toyworld-taesd, or a TAESD folder or cached hub id) exports on its own: config.json, encoder and "
            "decoder; give the folder as the stream's tiny autoencoder (serve --tiny-vae DIR)."
        ),
    )
    p.add_argument("model", help="a model: built-in name, diffusers folder, .safetensors file or cached hub id; "
                        "or a tiny autoencoder (toyworld-taesd, a TAESD folder or cached hub id)")
    p.add_argument("--out", required=True, metavar="DIR", help="the exported model folder to write")
    p.add_argument("--format", required=True, metavar="F", help="openvino or onnx")
    p.add_argument("--static-shape", metavar="HxW",
                   help="fix the image size (pixels, e.g. 512x512) the UNet and VAE are compiled for (default: any size)")
    p.add_argument("--batch", type=int, metavar="N",
                   help="fix the UNet's and VAE's batch (with CFG the UNet sees 2 per image; larger batches run in pieces)")
    p.add_argument("--precision", default="fp32", metavar="P",
                   help="OpenVINO compute precision: fp32 (default, exact) or auto (bf16 on CPUs that have it)")
    p.add_argument("--quantize", metavar="Q",
                   help="int8 (OpenVINO): the VAE decoder's up blocks in 8 bit with NNCF, calibrated on the model's "
                        "own latents; export.json records the worst PSNR against the unquantized decoder")
    p.add_argument("--calibration", metavar="SOURCE",
                   help="for --quantize: a folder of images like those the model will decode (frames to stream), or "
                        "a text file of prompts, one a line (default: toy-world captions for the toy models, "
                        "varied generic prompts for others)")
    p.add_argument("--calibration-size", type=int, default=32, metavar="N",
                   help="calibration latents for --quantize (default: 32)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--config", metavar="C", help="for a single-file checkpoint: a diffusers folder or bundled config")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--json", action="store_true", help="print the export record as JSON")
    p.add_argument("--quiet", action="store_true", help="no library warnings")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from atelier.cli import print_json
    from atelier.errors import UserError
    from atelier.models import is_tiny_autoencoder_source
    from atelier.runtime.export import parse_static_shape
    from atelier.runtime.modules import PRECISIONS, import_runtime, read_export_info

    import_runtime(args.format)  # unknown format or missing package: say so before loading anything
    if args.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {args.precision!r}: use {' or '.join(PRECISIONS)}")
    shape = parse_static_shape(args.static_shape)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists: pass --overwrite to replace it")
    options = dict(static_shape=shape, batch=args.batch, precision=args.precision, overwrite=args.overwrite)
    if args.calibration is not None and args.quantize is None:
        raise UserError("--calibration is for --quantize int8")
    if is_tiny_autoencoder_source(args.model):
        if args.quantize is not None:
            raise UserError("--quantize applies to a model's VAE decoder, not to a tiny autoencoder")
        _export_tiny(args, out, options)
    else:
        if args.quantize is not None:
            options.update(_quantize_options(args))
        _export_model(args, out, options)
    info = read_export_info(out)
    if args.json:
        print_json({"out": str(out), **info})
    else:
        print(f"exported {args.model} to {out} ({args.format}: {', '.join(info['components'])})")
    return 0


def _check_not_source(out, source) -> None:
    from atelier.errors import UserError

    if out.exists() and out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the model being exported: choose another folder")


def _export_model(args, out, options: dict) -> None:
    from atelier.models import load_pipeline, resolve_model_path
    from atelier.runtime.export import export_pipeline

    source = resolve_model_path(args.model)
    _check_not_source(out, source)
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32", allow_pickle=args.allow_pickle, config=args.config)
    export_pipeline(pipe, out, args.format, source_folder=source if source.is_dir() else None, **options)


def _export_tiny(args, out, options: dict) -> None:
    from atelier.errors import UserError
    from atelier.models import load_tiny_autoencoder, resolve_tiny_autoencoder
    from atelier.runtime.export import export_tiny_autoencoder

    if args.config is not None:
        raise UserError("--config applies to single-file checkpoints, not to a tiny autoencoder")
    _check_not_source(out, resolve_tiny_autoencoder(args.model, download=False))
    tiny = load_tiny_autoencoder(args.model, device="cpu", dtype="fp32", download=False)
    export_tiny_autoencoder(tiny, out, args.format, **options)


def _quantize_options(args) -> dict:
    """export_pipeline's quantization options, checked before the model loads."""
    from atelier.errors import UserError
    from atelier.runtime.quantize import check_quantize, read_calibration

    check_quantize(args.quantize, args.format)
    if args.calibration_size < 1:
        raise UserError(f"the calibration size must be a whole number >= 1, got {args.calibration_size}")
    options = dict(quantize=args.quantize, calibration_size=args.calibration_size)
    if args.calibration is not None:
        kind, items = read_calibration(args.calibration)
        options["calibration_images" if kind == "images" else "calibration_prompts"] = items
    elif _is_toy_model(args.model):
        options["calibration_prompts"] = toy_calibration_prompts(args.calibration_size)
    return options


def _is_toy_model(model: str) -> bool:
    from atelier.models import resolve_model_path
    from atelier.models.families import read_defaults_file

    path = resolve_model_path(model)
    return path.is_dir() and read_defaults_file(path).get("family") == "toyworld"


def toy_calibration_prompts(n: int) -> list[str]:
    """Captions of random toy scenes of 1-3 objects (fixed seed), as the toy models are prompted."""
    import random

    from atelier.toyworld import sample_scene

    rng = random.Random(0)
    return [sample_scene(rng, n_objects=1 + k % 3).caption(rng) for k in range(n)]
