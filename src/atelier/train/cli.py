"""`atelier train toyworld`: regenerate the built-in toy-world models from a seed."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from atelier.errors import UserError

STAGES = ("vae", "text", "unet", "turbo")
# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
_RESUME_FREE = {"out_dir", "threads", "checkpoint_every", "eval_every"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train models (the toy-world models)",
                              description="Train models on this machine.")
    sub = p.add_subparsers(dest="train_command", metavar="WHAT")
    sub.required = True
    t = sub.add_parser(
        "toyworld", help="train toyworld and toyworld-turbo from a seed (resumable)",
        description=(
            "Train the toy-world VAE, text encoder, UNet and the distilled turbo UNet, then export "
            "`toyworld` and `toyworld-turbo` as diffusers folders. Every stage checkpoints to "
            "OUT_DIR/<stage>/checkpoint.safetensors and draws OUT_DIR/<stage>/loss.png; kill it and run "
            "the same command again to resume. About 80 minutes on 2 CPU cores with the defaults."
        ),
    )
    t.add_argument("--out-dir", default="runs/toyworld", help="checkpoints, loss curves, logs (default runs/toyworld)")
    t.add_argument("--weights-dir", help="where the two model folders go (default OUT_DIR/weights); pass "
                   "src/atelier/toyworld/weights in a source checkout to replace the built-in models")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run up to (default vae,text,unet,turbo); "
                        "earlier stages a later one needs are trained or resumed anyway")
    for name in ("vae_steps", "text_steps", "unet_steps", "turbo_steps"):
        t.add_argument("--" + name.replace("_", "-"), type=int, help=f"override {name}")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any training setting, e.g. --set unet_lr=3e-4 (see --show-config)")
    t.add_argument("--show-config", action="store_true", help="print the settings that would be used and exit")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=run_toyworld)


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list, dict)):
        value = json.loads(text)
        return tuple(value) if isinstance(current, tuple) else value
    return text


def build_config(args):
    from atelier.train.toyworld import ToyTrainConfig

    cfg = ToyTrainConfig(out_dir=args.out_dir, seed=args.seed, threads=args.threads)
    known = {f.name for f in fields(ToyTrainConfig)}
    for name in ("vae_steps", "text_steps", "unet_steps", "turbo_steps"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
            setattr(cfg, name, getattr(args, name))
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            close = ", ".join(sorted(k for k in known if key and (key in k or k in key))[:5])
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of the training settings"
                            + (f" (did you mean {close}?)" if close else " (see --show-config)"))
        try:
            setattr(cfg, key, _parse_value(value, getattr(cfg, key)))
        except ValueError:
            raise UserError(f"--set {item!r}: {value!r} is not a valid {type(getattr(cfg, key)).__name__}") from None
    return cfg


def check_resumable(cfg) -> None:
    """Refuse to resume a run directory that was started with other training settings."""
    path = Path(cfg.out_dir) / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON: remove it or use another --out-dir") from None
    new = json.loads(json.dumps(asdict(cfg), default=str))
    changed = [k for k in new if k not in _RESUME_FREE and k in old and old[k] != new[k]]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]} -> {new[k]}" for k in changed[:4])
        raise UserError(f"{cfg.out_dir} holds a run with other settings ({diffs}); resume with the same options "
                        "or use another --out-dir")


def run_toyworld(args) -> int:
    from atelier.cli import print_json

    cfg = build_config(args)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STAGES)}")
    if args.show_config:
        print_json(asdict(cfg))
        return 0
    check_resumable(cfg)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} exists and is not a folder")
    weights_dir = Path(args.weights_dir) if args.weights_dir else out / "weights"

    from atelier.train.toyworld import train_all

    # A stage needs every earlier one: train (or resume) up to the last requested.
    wanted = STAGES[: max(STAGES.index(s) for s in stages) + 1]
    summary = train_all(cfg, stages=wanted, weights_dir=weights_dir)
    if args.json:
        print_json(summary)
    else:
        print(f"trained in {summary['wall_time_s'] / 60:.1f} min; stage times (s): {summary.get('stage_times_s', {})}")
        for name, path in summary["exported"].items():
            print(f"{name}: {path}   (atelier generate --model {path} \"a large red circle in the center\")")
    return 0
