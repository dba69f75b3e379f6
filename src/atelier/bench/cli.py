"""`atelier bench generate`: a prompt set's images, sharded over the processes `accelerate launch`
starts (or made by one process), resumable after a kill. See docs/bench.md."""

from __future__ import annotations

import os

from atelier.errors import UserError
from atelier.generate import cli as generate_cli


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
    generate_cli.add_sampling_options(g)
    g.add_argument("--limit", type=int, metavar="N", help="only the first N prompts of the set")
    g.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="images per pipeline call, of any prompts (default 4; speed and memory only, "
                        "results do not change)")
    g.add_argument("--overwrite", action="store_true",
                   help="start the run again: delete OUTDIR's images, even when its settings differ")
    generate_cli.add_loading_options(g)  # --device defaults to each accelerate process's own GPU
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary (written, skipped, failed, seconds) as JSON")
    g.set_defaults(func=run_bench_generate)


_LAUNCHER_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _partial_state(device):
    """accelerate's PartialState when a launcher started several processes, else None (one process,
    and accelerate's process-wide state is left alone). Without a GPU (or with a --device other than
    cuda) it is told to use the CPU, so that the processes join one gloo group."""
    if max(int(os.environ.get(name, "1") or 1) for name in _LAUNCHER_WORLD) <= 1:
        return None
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

    state = _partial_state(args.device)
    if state is not None and args.device is None and state.device is not None and state.device.type == "cuda":
        args.device = str(state.device)  # each process its own GPU
    try:
        pipe = generate_cli.load_model(args, args.model)
        summary = run_generation(
            items, outdir, pipe, model=args.model,
            prompt_source={"path": str(source), "format": prompt_format(source), "limit": args.limit},
            images_per_prompt=args.images_per_prompt, seed=args.seed, negative_prompt=args.negative,
            steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler, schedule=args.schedule,
            width=args.width, height=args.height, clip_skip=args.clip_skip, batch_size=args.batch_size,
            state=state, overwrite=args.overwrite, progress=not args.quiet,
        )
    finally:
        if state is not None:
            state.destroy_process_group()
    if state is None or state.process_index == 0:
        result = {"outdir": str(outdir), **summary.to_dict()}
        if args.json:
            from atelier.cli import print_json

            print_json(result)
        else:
            print(f"{outdir}: {summary.written} written, {summary.skipped} already there, {summary.failed} failed "
                  f"in {summary.seconds:.1f} s ({summary.processes} process(es))")
    return 1 if summary.failed else 0
