"""`atelier speed info`, and the speed options every running command shares (`add_speed_options`)."""

from __future__ import annotations

import argparse
import sys

from atelier.errors import UserError

QUANTIZE_CHOICES = ("int8wo", "int8dq", "int4wo", "fp8")  # atelier.speed.quantize.QUANTIZE_MODES (kept light here)
QUANTIZE_ALIASES = {"int8": "int8wo"}  # what `--quantize int8` means in diffusers' quanto and torchao guides
COMPILE_CHOICES = ("off", "regional", "full")
COMPILE_MODE_CHOICES = ("default", "reduce-overhead", "max-autotune")  # atelier.speed.compile.TORCH_COMPILE_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser("speed", help="what speeds up this machine: attention and quantization backends, threads",
                              description="Speed options of this machine (see docs/speed.md).")
    sub = p.add_subparsers(dest="speed_command", metavar="WHAT")
    sub.required = True
    info = sub.add_parser("info", help="device, dtype, attention backends, quantization backends, denormals, threads",
                          description="Show the device and dtype a run would use, the attention backends usable here, "
                                      "the quantization backends installed (and whether this GPU runs fp8), whether "
                                      "denormals are flushed and the torch thread count (after --threads / "
                                      "--keep-denormals, as a run with them would set).")
    info.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    info.add_argument("--dtype", metavar="T", help="fp32, fp16 or bf16 (default: the device's)")
    _add_numerics(info)
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=run_info)


def _add_numerics(p) -> None:
    p.add_argument("--keep-denormals", action="store_true",
                   help="CPU: do not flush denormal floats to zero (flushing is on by default: the UNet runs many "
                        "times faster; results change only below fp32 noise)")
    if not any("--threads" in a.option_strings for a in p._actions):
        p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's, one per physical core)")


def _add_compile(group, *, training: bool) -> None:
    if training:
        group.add_argument("--compile", choices=COMPILE_CHOICES, default="off", nargs="?", const="regional",
                           help="torch.compile the UNet the training loop runs (trained or frozen), in place: regional "
                                "(its repeated transformer blocks, fast to compile; --compile alone) or full; it compiles "
                                "on the first step (checkpoints and exported weights are unchanged)")
    else:
        group.add_argument("--compile", choices=COMPILE_CHOICES, default="off", nargs="?", const="regional",
                           help="torch.compile the UNet: regional (its repeated transformer blocks, fast to compile; "
                                "--compile alone) or full; the first call compiles (a warm-up is run and reported)")
    group.add_argument("--compile-mode", choices=COMPILE_MODE_CHOICES, default="default",
                       help="torch.compile's mode with --compile: reduce-overhead (CUDA graphs) or max-autotune; "
                            "both need a CUDA GPU")
    group.add_argument("--compile-backend", metavar="NAME", help=argparse.SUPPRESS)  # torch.compile backend, for tests


def add_speed_options(p: argparse.ArgumentParser, *, training: bool = False) -> None:
    """The speed flags of a command. training=True: --keep-denormals, --threads (kept if the parser
    has it already), --compile, --compile-mode and --channels-last for the trainer's UNet(s); --quantize
    is refused there with one line."""
    group = p.add_argument_group("speed", "see docs/speed.md and `atelier speed info`")
    _add_numerics(group)
    if training:
        group.add_argument("--quantize", help=argparse.SUPPRESS)
        _add_compile(group, training=True)
        group.add_argument("--channels-last", action="store_true",
                           help="channels-last memory format for the UNet(s) the training loop runs")
        return
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES + tuple(QUANTIZE_ALIASES),
                       help="quantize the UNet's Linear layers: int8wo (or int8) / int4wo (optimum-quanto), int8dq (torchao, "
                            "dynamic int8 activations), fp8 (torchao, CUDA sm89+). Saves memory; faster only with --compile on GPUs")
    group.add_argument("--quantize-skip", metavar="PATTERNS", default="conv_in,conv_out,time_embedding",
                       help="modules left in high precision, comma-separated names or fnmatch patterns "
                            "(default conv_in,conv_out,time_embedding; 'none' for none)")
    group.add_argument("--quantize-text-encoder", action="store_true",
                       help="also quantize the text encoder(s) (all their Linear layers), with the same mode")
    group.add_argument("--quantize-backend", choices=("auto", "quanto", "torchao"), default="auto",
                       help="library for --quantize (auto: quanto for int8wo/int4wo, torchao for int8dq/fp8)")
    _add_compile(group, training=False)
    group.add_argument("--compile-dynamic", action="store_true", default=None,
                       help="compile for varying batch sizes (default on for `serve`, whose stream batches vary)")
    group.add_argument("--attention", metavar="BACKEND",
                       help="attention backend of diffusers' dispatcher, e.g. native (SDPA, default), _native_math, "
                            "flex, flash, sage, xformers; `atelier speed info` lists those usable here")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format for the UNet and VAE")


def speed_options(args):
    """SpeedOptions from parsed arguments (None for flags the parser does not have)."""
    from atelier.speed.options import SpeedOptions
    from atelier.speed.quantize import parse_skip

    def get(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    quantize = get("quantize")
    return SpeedOptions(
        quantize=QUANTIZE_ALIASES.get(quantize, quantize), quantize_skip=parse_skip(get("quantize_skip")),
        quantize_backend=get("quantize_backend", "auto"),
        quantize_text_encoder=bool(get("quantize_text_encoder", False)), compile=get("compile", "off"),
        compile_dynamic=get("compile_dynamic"), compile_backend=get("compile_backend"),
        compile_mode=get("compile_mode", "default"),
        attention=get("attention"), channels_last=bool(get("channels_last", False)),
        flush_denormal=not get("keep_denormals", False), threads=get("threads"),
    )


def apply_from_args(pipe, args, **kwargs) -> dict:
    """apply_speed with the command's flags; one line on stderr says what was done when a speed
    flag was given (the defaults, denormals flushed on CPU, are reported in --json outputs only)."""
    from atelier.speed.options import apply_speed, describe

    options = speed_options(args)
    applied = apply_speed(pipe, options, **kwargs)
    if options.active or options.threads is not None or not options.flush_denormal:
        print(describe(applied), file=sys.stderr, flush=True)
    return applied


def apply_training_numerics(args, speed=None) -> dict:
    """Training: denormals flushed on CPU unless --keep-denormals (threads are the trainer's own
    option); --quantize refused; --compile / --compile-mode / --channels-last (of `speed`, a trainer
    config, else of `args`) checked for the device training runs on (the trainers apply them to
    their UNets: TrainLoop.speed_up)."""
    import torch

    from atelier.speed.numerics import apply_cpu_numerics

    if getattr(args, "quantize", None):
        raise UserError("--quantize is not supported for training: atelier trains full-precision weights "
                        "(no QLoRA-style frozen quantized base); quantize the trained model when you run it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    training_speed(args if speed is None else speed).check(device)
    return apply_cpu_numerics(device, flush_denormal=not getattr(args, "keep_denormals", False))


def training_speed(source):
    """The SpeedOptions a trainer applies to its UNets, from parsed arguments or a trainer config
    (fields compile, compile_mode, compile_backend, channels_last)."""
    from atelier.speed.options import SpeedOptions

    return SpeedOptions(compile=getattr(source, "compile", None) or "off",
                        compile_mode=getattr(source, "compile_mode", None) or "default",
                        compile_backend=getattr(source, "compile_backend", None),
                        channels_last=bool(getattr(source, "channels_last", False)))


def run_info(args) -> int:
    from atelier.cli import print_json
    from atelier.speed.info import speed_info
    from atelier.speed.numerics import apply_cpu_numerics

    info_device = args.device
    apply_cpu_numerics(info_device, flush_denormal=not args.keep_denormals, threads=args.threads)
    info = speed_info(info_device, args.dtype)
    if args.json:
        print_json(info)
        return 0
    q = info["quantization"]
    print(f"device: {info['device']} ({info['dtype']})" + (f", {info['gpu']['name']} {info['gpu']['capability']}" if info["gpu"] else ""))
    print(f"threads: {info['threads']}; denormals flushed: {'yes' if info['flush_denormal'] else 'no'}")
    print(f"attention backends usable here: {', '.join(info['attention_backends'])}")
    print(f"quantization: optimum-quanto {q['optimum-quanto'] or 'not installed'}, torchao {q['torchao'] or 'not installed'}, "
          f"fp8 {'yes' if q['fp8_capable'] else 'no'}")
    for mode, status in q["modes"].items():
        print(f"  --quantize {mode}: {status}")
    return 0
