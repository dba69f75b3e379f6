"""`atelier bench generate`: a prompt set's images, sharded over the processes `accelerate launch`
starts (or made by one process), resumable after a kill. See docs/bench.md."""

from __future__ import annotations

import os
import sys

from atelier.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark generation runs over prompt sets (MJHQ-30K, PartiPrompts)",
                              description="Benchmark generation runs (docs/bench.md).")
    sub = p.add_subparsers(dest="bench_command", metavar="ACTION")
    sub.required = True
    g = sub.add_parser(
        "generate",
        help="generate images for every prompt of a set; resumable, shards over `accelerate launch` processes",
        description=(
            "Make --images-per-prompt images of every prompt (image k from --seed + k) as "
            "OUTDIR/images/{id}_{seed}.png, with OUTDIR/manifest.json. Run it again to resume: finished "
            "images are kept, broken ones made again. Under `accelerate launch --num_processes N -m "
            "atelier.cli bench generate ...` each process makes its own share."
        ),
    )
    g.add_argument("--prompts", required=True, metavar="FILE",
                   help="MJHQ meta_data.json (or its folder), a PartiPrompts-style .tsv, or one prompt per line")
    g.add_argument("--outdir", required=True, metavar="DIR", help="the run folder (created; resumed when it exists)")
    g.add_argument("--model", default="toyworld", metavar="M",
                   help="model: built-in name, diffusers folder, .safetensors file or hub id (default toyworld)")
    g.add_argument("--images-per-prompt", type=int, default=1, metavar="K", help="images per prompt (default 1)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="seed of each prompt's first image (default 0)")
    g.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    g.add_argument("--steps", type=int, metavar="N", help="sampling steps (default: the model's)")
    g.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float, metavar="X",
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--sampler", metavar="NAME", help="sampler, e.g. 'Euler a' (see `atelier samplers`; default: the model's)")
    g.add_argument("--schedule", metavar="TYPE", help="schedule type, e.g. Karras")
    g.add_argument("--clip-skip", type=int, metavar="N", help="A1111 clip skip: 1 = last layer, 2 = one before")
    g.add_argument("--width", type=int, metavar="W", help="image width (default: the model's)")
    g.add_argument("--height", type=int, metavar="H", help="image height (default: the model's)")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of the set")
    g.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="images of one prompt per pipeline call (default 4; memory only, results do not change)")
    g.add_argument("--overwrite", action="store_true",
                   help="start the run again: delete OUTDIR's images, even when its settings differ")
    g.add_argument("--device", metavar="D",
                   help="torch device (default: each accelerate process's GPU, else cuda if available, else cpu)")
    g.add_argument("--dtype", metavar="T", help="weights dtype: fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on CPU)")
    g.add_argument("--config", metavar="C", help="for a single-file checkpoint: its base model's folder or a bundled config")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    g.add_argument("--no-safety-checker", action="store_true", help="do not run the model's safety checker")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary (written, skipped, failed, seconds) as JSON")
    g.set_defaults(func=run_bench_generate)


def _partial_state(device):
    """accelerate's PartialState for this process. Without a GPU (or with --device cpu) it is told to
    use the CPU, so that processes started by `accelerate launch` join one gloo group."""
    import torch
    from accelerate import PartialState

    cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or (device is not None and str(device).split(":")[0] != "cuda")
        or (device is None and not torch.cuda.is_available())
    )
    return PartialState(cpu=cpu)


def run_bench_generate(args) -> int:
    from atelier.bench.prompts import prompt_format, prompts_path, read_prompts
    from atelier.cli import check_output_folder

    for name in ("images_per_prompt", "limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    source = prompts_path(args.prompts)
    items = read_prompts(source)[: args.limit]
    outdir = check_output_folder(args.outdir)
    if args.sampler:
        from atelier.samplers import resolve

        resolve(args.sampler, args.schedule)  # an unknown name fails before the model loads

    from atelier.bench.run import run_generation
    from atelier.generate.cli import _load

    state = _partial_state(args.device)
    if args.device is None and state.device is not None and state.device.type == "cuda":
        args.device = str(state.device)  # each process its own GPU
    try:
        pipe = _load(args, args.model, from_image=False)
        summary = run_generation(
            items, outdir, pipe, model=args.model,
            prompt_source={"path": str(source), "format": prompt_format(source), "limit": args.limit},
            images_per_prompt=args.images_per_prompt, seed=args.seed, negative_prompt=args.negative,
            steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, schedule=args.schedule,
            width=args.width, height=args.height, clip_skip=args.clip_skip, batch_size=args.batch_size,
            state=state, overwrite=args.overwrite, progress=not args.quiet,
        )
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()
    if state.process_index == 0:
        result = {"outdir": str(outdir), **summary.to_dict()}
        if args.json:
            from atelier.cli import print_json

            print_json(result)
        else:
            print(f"{outdir}: {summary.written} written, {summary.skipped} already there, {summary.failed} failed "
                  f"in {summary.seconds:.1f} s ({summary.processes} process(es))")
    return 1 if summary.failed else 0
