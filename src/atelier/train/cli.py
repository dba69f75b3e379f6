"""`atelier train toyworld`: regenerate the built-in toy-world models from a seed; `atelier train
inverter` / `prepare-inverter-data`: SwiftEdit's inversion network for a one-step model (train/inverter.py);
`atelier train ip-adapter` (train/ip_adapter.py); `atelier train lora`: DreamBooth with LoRA / DoRA and
pivotal tuning (train/lora.py); `atelier train tryon`: CatVTON / OOTDiffusion (train/tryon.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from atelier.cli import HelpWithDefaults
from atelier.errors import UserError
from atelier.speed import cli as speed_cli
from atelier.train.options import LR_SCHEDULERS, PRIOR_TARGETS, check_same_settings

STAGES = ("vae", "text", "unet", "turbo", "taesd", "clip", "ip")
# What each stage needs trained (or resumed) first. taesd starts from the exported toyworld-turbo,
# clip and ip from the exported toyworld.
NEEDS = {"vae": (), "text": (), "unet": ("vae", "text"), "turbo": ("vae", "text", "unet"), "taesd": (),
         "clip": (), "ip": ("clip",)}
# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
_RESUME_FREE = {"out_dir", "threads", "checkpoint_every", "eval_every",
                "compile", "compile_mode", "compile_backend", "channels_last"}  # toyworld.SPEED_FIELDS


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train models (the toy-world models, IP-Adapters, inverters, LoRAs, try-on models)",
                              description="Train models on this machine.")
    sub = p.add_subparsers(dest="train_command", metavar="WHAT")
    sub.required = True
    t = sub.add_parser(
        "toyworld", help="train toyworld and toyworld-turbo from a seed (resumable)",
        description=(
            "Train the toy-world VAE, text encoder, UNet and the distilled turbo UNet, then export "
            "`toyworld` and `toyworld-turbo` as diffusers folders; then the tiny autoencoder `toyworld-taesd`, "
            "the toy CLIP `toyworld-clip` and the IP-Adapters `toyworld-ip` and `toyworld-turbo-ip`. Every stage checkpoints to "
            "OUT_DIR/<stage>/checkpoint.safetensors and draws OUT_DIR/<stage>/loss.png; kill it and run "
            "the same command again to resume. About 3.5 hours on 2 CPU cores with the defaults (docs/toyworld-training.md)."
        ),
    )
    t.add_argument("--out-dir", default="runs/toyworld", help="checkpoints, loss curves, logs (default runs/toyworld)")
    t.add_argument("--weights-dir", help="where the two model folders go (default OUT_DIR/weights); pass "
                   "src/atelier/toyworld/weights in a source checkout to replace the built-in models")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    t.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages (default all: vae,text,unet,turbo,taesd,clip,ip); the stages they "
                        "need are trained or resumed too (unet needs vae and text; turbo needs unet; taesd starts from "
                        "the exported toyworld-turbo, clip from the exported toyworld; ip needs clip, and trains "
                        "toyworld-turbo-ip too when toyworld-turbo is exported)")
    for name in ("vae_steps", "text_steps", "unet_steps", "turbo_steps", "taesd_steps", "clip_steps", "ip_steps"):
        t.add_argument("--" + name.replace("_", "-"), type=int, help=f"override {name}")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any training setting, e.g. --set unet_lr=3e-4 (see --show-config)")
    t.add_argument("--show-config", action="store_true", help="print the settings that would be used and exit")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    speed_cli.add_speed_options(t, training=True)
    t.set_defaults(func=run_toyworld)
    register_inverter(sub)
    register_ip_adapter(sub)
    register_lora(sub)
    register_tryon(sub)


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

    cfg = ToyTrainConfig(out_dir=args.out_dir, seed=args.seed, threads=args.threads, compile=args.compile,
                         compile_mode=args.compile_mode, compile_backend=args.compile_backend,
                         channels_last=args.channels_last)
    known = {f.name for f in fields(ToyTrainConfig)}
    for name in ("vae_steps", "text_steps", "unet_steps", "turbo_steps", "taesd_steps", "clip_steps", "ip_steps"):
        if getattr(args, name) is not None:
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
    cfg.check(lambda name: _flag(args, name))
    return cfg


def _flag(args, name: str) -> str:
    """How the user set a toyworld training setting: its own option, or --set NAME."""
    own = {"seed": "--seed", "threads": "--threads"}
    if name.endswith("_steps") and name[:-6] in STAGES and getattr(args, name, None) is not None:
        return "--" + name.replace("_", "-")
    if name in own:
        return own[name]
    return f"--set {name}"


def run_toyworld(args) -> int:
    from atelier.cli import print_json

    cfg = build_config(args)
    speed_cli.apply_training_numerics(args, speed=cfg)  # denormals flushed on CPU; --quantize refused; speed checked
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STAGES)}")
    if args.show_config:
        print_json(asdict(cfg))
        return 0
    check_same_settings(Path(cfg.out_dir) / "config.json", json.loads(json.dumps(asdict(cfg), default=str)),
                        _RESUME_FREE, out_flag="--out-dir")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} exists and is not a folder")
    weights_dir = Path(args.weights_dir) if args.weights_dir else out / "weights"

    from atelier.train.toyworld import train_all

    # Train (or resume) the requested stages and what they need.
    wanted = tuple(s for s in STAGES if s in stages or any(s in NEEDS[r] for r in stages))
    summary = train_all(cfg, stages=wanted, weights_dir=weights_dir)
    if args.json:
        print_json(summary)
    else:
        print(f"trained in {summary['wall_time_s'] / 60:.1f} min; stage times (s): {summary.get('stage_times_s', {})}")
        for name, path in summary["exported"].items():
            if name.endswith("-taesd"):
                print(f"{name}: {path}   (a tiny autoencoder: StreamEngine(pipe, vae=\"{path}\"))")
                continue
            if name.endswith("-clip"):
                print(f"{name}: {path}   (a transformers CLIPModel; its vision tower is toyworld-ip's image encoder)")
                continue
            if name.endswith("-ip"):
                print(f"{name}: {path}   (atelier generate \"\" --model {name[:-3]} --ip-image REF.png)")
                continue
            print(f"{name}: {path}   (atelier generate --model {path} \"a large red circle in the center\")")
    return 0


# ---------------------------------------------------------------- the inverter (SwiftEdit)

def register_inverter(sub) -> None:
    """`atelier train inverter` (option names as SwiftEdit's training script) and
    `atelier train prepare-inverter-data`."""
    i = sub.add_parser(
        "inverter", help="train a SwiftEdit inversion network for a one-step model (resumable)",
        description=(
            "Train the inverter F of SwiftEdit (CVPR 2025) so that the one-step generator G re-creates an image "
            "from F's noise: G(F(x0, c), c) ~ x0; `atelier edit --method one-step` then edits with one generator "
            "call. --stage 1 learns on images G makes itself (noise and latent known); --stage 2 on real images "
            "(--train_data_manifest, else rendered toy scenes) with a perceptual loss and the teacher's noise "
            "regulariser; stage 2 starts from OUTPUT_DIR/stage1/final. Checkpoints: OUTPUT_DIR/stage{1,2}/"
            "checkpoint.safetensors; run the same command again to resume. Works under `accelerate launch`."
        ),
        formatter_class=HelpWithDefaults,
    )
    i.add_argument("--pretrained_model_name_or_path", default="toyworld-turbo",
                   help="model whose VAE, text encoder, tokenizer and scheduler are used")
    i.add_argument("--pretrained_teacher_denoise", default="toyworld", help="multi-step teacher (stage 2 regulariser)")
    i.add_argument("--pretrained_sb_generator", default="toyworld-turbo", help="the frozen one-step generator G")
    i.add_argument("--pretrained_inverter", help="start from this inverter folder (stage 2 default: OUTPUT_DIR/stage1/final)")
    i.add_argument("--image_encoder_path", metavar="DIR",
                   help="image branch (SwiftEdit's IP-Adapter): the CLIP vision folder of the adapter (default: found "
                        "beside it)")
    i.add_argument("--ip_adapter_weight_name", metavar="FILE",
                   help="image branch: the adapter file G runs with, the source image as its image prompt (a path, or "
                        "a file name inside --ip_adapter / the model's own adapter / h94/IP-Adapter in the HF cache)")
    i.add_argument("--ip_adapter", metavar="SOURCE",
                   help="image branch: an adapter folder (ip-adapter.safetensors + image_encoder/), file, h94/IP-Adapter "
                        "layout or cached hub id")
    i.add_argument("--train_ip_adapter", action="store_true",
                   help="train the image branch (image projection, to_k_ip, to_v_ip) with the inverter: from scratch "
                        "(needs --image_encoder_path), or from the adapter given; written beside the inverter")
    i.add_argument("--ip_image_proj", default="base", choices=("base", "plus", "full"),
                   help="with --train_ip_adapter from scratch: base (4 tokens), plus (the Resampler's 16 tokens) or "
                        "full (every image-encoder token)")
    i.add_argument("--output_dir", default="runs/inverter")
    i.add_argument("--logging_dir", default="logs", help="accelerate's logging folder, inside OUTPUT_DIR")
    i.add_argument("--stage", type=int, default=1, choices=(1, 2))
    i.add_argument("--learning_rate", type=float, default=1e-4)
    i.add_argument("--train_batch_size", type=int, default=16)
    i.add_argument("--gradient_accumulation_steps", type=int, default=1)
    i.add_argument("--max_train_steps", type=int, default=1000)
    i.add_argument("--checkpointing_steps", type=int, default=100)
    i.add_argument("--validation_steps", type=int, default=200, help="inversion PSNR on held-out images every N steps")
    i.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    i.add_argument("--train_data_manifest", help="JSONL of {\"image\": PATH, \"caption\": TEXT} (see prepare-inverter-data)")
    i.add_argument("--resolution", type=int, help="image size (default: the generator's)")
    i.add_argument("--lpips_weights", nargs="+", default=[], metavar="FILE",
                   help="LPIPS VGG weights for stage 2's perceptual loss (else latent MSE + pixel L1 + MSE)")
    i.add_argument("--regularizer_weight", type=float, default=1.0, help="stage 2: weight of the teacher regulariser")
    i.add_argument("--partial_captions", type=float, default=0.0, metavar="P",
                   help="stage 2: share of captions cut to a random subset of their phrases (how users word edits: "
                        "'a red circle' of a three-object scene)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--threads", type=int, help="torch CPU threads")
    i.add_argument("--export_dir", help="also write the final inverter here as an fp16 safetensors UNet folder")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    speed_cli.add_speed_options(i, training=True)
    i.set_defaults(func=run_inverter)

    d = sub.add_parser(
        "prepare-inverter-data", help="write a JSONL manifest of a folder of images for `train inverter`",
        description="List every image under --images (recursively) in a JSONL manifest; with --captions, the "
                    "text of a same-name .txt file is each image's caption.",
    )
    d.add_argument("--images", required=True, metavar="DIR")
    d.add_argument("--captions", action="store_true", help="read same-name .txt captions")
    d.add_argument("--out", default="manifest.jsonl", metavar="FILE.jsonl")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=run_prepare_inverter_data)


def inverter_config(args):
    from atelier.train.inverter import InverterConfig

    keys = {f.name for f in fields(InverterConfig)}
    cfg = InverterConfig(**{k: v for k, v in vars(args).items() if k in keys and v is not None})
    cfg.check()
    return cfg


def run_inverter(args) -> int:
    from atelier.cli import print_json

    speed_cli.apply_training_numerics(args)
    cfg = inverter_config(args)
    from atelier.train.inverter import export_inverter, train_inverter

    summary = train_inverter(cfg)
    if args.export_dir:
        summary["exported"] = export_inverter(summary["final"], args.export_dir)
    if args.json:
        print_json(summary)
    else:
        print(f"stage {cfg.stage}: inverter in {summary['final']}; inversion PSNR {summary.get('inversion_psnr')} dB; "
              f"{summary.get('wall_time_s', 0) / 60:.1f} min")
        if summary.get("ip_adapter"):
            print(f"image branch: {summary['ip_adapter']}")
        if summary.get("exported"):
            print(f"exported: {summary['exported']}   (atelier edit --method one-step --inverter {summary['exported']} ...)")
    return 0


def run_prepare_inverter_data(args) -> int:
    from atelier.cli import print_json
    from atelier.train.inverter import prepare_manifest

    summary = prepare_manifest(args.images, args.out, captions=args.captions)
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['manifest']}: {summary['images']} images, {summary['captioned']} with captions")
    return 0


# ---------------------------------------------------------------- IP-Adapter

def add_timestep_options(parser) -> None:
    """--train_timesteps (a list, parsed by the trainer's config check) and --train_timesteps_share."""
    from atelier.train.weighting import TIMESTEPS_HELP

    parser.add_argument("--train_timesteps", metavar="T,T,...", help=TIMESTEPS_HELP)
    parser.add_argument("--train_timesteps_share", type=float, default=1.0,
                        help="with --train_timesteps: the share of samples drawn from the list, the rest uniform")


def register_ip_adapter(sub) -> None:
    """`atelier train ip-adapter`, with the option names of the IP-Adapter training script."""
    a = sub.add_parser(
        "ip-adapter", help="train an IP-Adapter (image prompt) for a base model (resumable)",
        description=(
            "Train an IP-Adapter (base: 4 image tokens; --image_proj plus or full) for any SD 1.x / 2.x / SDXL / toy-world model, with the recipe "
            "of the IP-Adapter training script: only the image projection and the new to_k_ip / to_v_ip layers train "
            "(initialised from to_k / to_v); image, text and both are dropped 5%% of the time each (--image_drop_rate, --text_drop_rate, --both_drop_rate). Data: "
            "--data_json_file (a JSON list of {\"image_file\": ..., \"text\": ...}), or rendered toy scenes for the "
            "toy-world models. Checkpoints every --checkpointing_steps into OUTPUT_DIR (run the same command again "
            "to resume), OUTPUT_DIR/loss.png, validation grids in OUTPUT_DIR/validation/; the adapter is written to "
            "OUTPUT_DIR/final (ip-adapter.safetensors in the h94 layout + image_encoder/): pass it with --ip-adapter. "
            "Works under `accelerate launch -m atelier.cli train ip-adapter ...`."
        ),
        formatter_class=HelpWithDefaults,
    )
    a.add_argument("--pretrained_model_name_or_path", default="toyworld", help="the base model (frozen)")
    a.add_argument("--image_encoder_path", help="CLIP vision model folder (default for the toy-world models: toyworld-clip)")
    a.add_argument("--pretrained_ip_adapter_path", help="continue from this adapter (file or folder)")
    a.add_argument("--data_json_file", help="JSON list of {\"image_file\": PATH, \"text\": CAPTION} (JSON Lines read too)")
    a.add_argument("--data_root_path", default="", help="folder the image_file paths are relative to (default: the JSON's)")
    a.add_argument("--output_dir", default="runs/ip-adapter")
    a.add_argument("--logging_dir", default="logs", help="accelerate's logging folder, inside OUTPUT_DIR")
    a.add_argument("--resolution", type=int, help="training size (default: the model's)")
    a.add_argument("--learning_rate", type=float, default=1e-4)
    a.add_argument("--weight_decay", type=float, default=1e-2)
    a.add_argument("--train_batch_size", type=int, default=16)
    a.add_argument("--gradient_accumulation_steps", type=int, default=1)
    a.add_argument("--max_train_steps", type=int, default=2000)
    a.add_argument("--checkpointing_steps", type=int, default=100)
    a.add_argument("--validation_steps", type=int, default=500, help="a validation grid (and the toy judge's score) every N steps")
    a.add_argument("--num_validation_images", type=int, default=8)
    a.add_argument("--image_proj", default="base", choices=("base", "plus", "full"),
                   help="base: 4 tokens from the image embedding (ip-adapter_sd15); plus: the Resampler, "
                        "--num_tokens learnt queries over the encoder's penultimate hidden states "
                        "(ip-adapter-plus_sd15, tutorial_train_plus.py); full: every token of those hidden states "
                        "through an MLP (h94's full-face architecture)")
    a.add_argument("--num_tokens", type=int, default=16, help="plus: the image tokens (the Resampler's queries)")
    add_timestep_options(a)
    a.add_argument("--image_drop_rate", type=float, default=0.05, help="probability of dropping the image alone")
    a.add_argument("--text_drop_rate", type=float, default=0.05,
                   help="probability of dropping the text alone (raise it when captions describe the images fully)")
    a.add_argument("--both_drop_rate", type=float, default=0.05, help="probability of dropping both")
    a.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, help="torch CPU threads")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    speed_cli.add_speed_options(a, training=True)
    a.set_defaults(func=run_ip_adapter)


def run_ip_adapter(args) -> int:
    from atelier.cli import print_json
    from atelier.train.ip_adapter import IPAdapterConfig

    speed_cli.apply_training_numerics(args)
    keys = {f.name for f in fields(IPAdapterConfig)}
    cfg = IPAdapterConfig(**{k: v for k, v in vars(args).items() if k in keys and v is not None})
    cfg.check()
    from atelier.train.ip_adapter import train_ip_adapter

    summary = train_ip_adapter(cfg)
    if args.json:
        print_json(summary)
    else:
        print(f"IP-Adapter: {summary['final']}   (atelier generate --ip-adapter {summary['final']} --ip-image REF.png ...); "
              f"{summary.get('wall_time_s', 0) / 60:.1f} min")
    return 0


# ---------------------------------------------------------------- LoRA (DreamBooth, pivotal tuning)

def register_lora(sub) -> None:
    """`atelier train lora`, with the option names of diffusers' advanced DreamBooth LoRA scripts and
    kohya's caption / bucket options. Every boolean is a real flag (never `type=bool`)."""
    a = sub.add_parser(
        "lora", help="DreamBooth a LoRA / DoRA (with pivotal tuning) into SD 1.x / 2.x / XL / Turbo (resumable)",
        description=(
            "Teach a model a concept from a folder of images (a caption .txt beside each, else --instance_prompt), "
            "with the options of diffusers' advanced DreamBooth LoRA scripts: LoRA or DoRA on the UNet's attention "
            "(--lora_unet_blocks, --use_blora), LoRA on the text encoders (--train_text_encoder) or pivotal tuning "
            "(--train_text_encoder_ti: --token_abstraction becomes new tokens <s0><s1>...), prior preservation "
            "(class images generated with the base model when missing), Min-SNR (--snr_gamma), EDM-style training, "
            "AdamW or Prodigy; and kohya's --shuffle_caption / --keep_tokens / buckets. Checkpoints: "
            "OUTPUT_DIR/checkpoint-<step>/ (run the same command again to resume, also after kill -9); the LoRA: "
            "OUTPUT_DIR/pytorch_lora_weights.safetensors (diffusers' load_lora_weights, atelier --lora), the "
            "embeddings OUTPUT_DIR/<name>_emb.safetensors, a model card README.md, loss.png, validation/. Defaults "
            "marked (model) come from the base model (the toy-world models: docs/lora.md). Works under "
            "`accelerate launch -m atelier.cli train lora ...`."
        ),
        formatter_class=HelpWithDefaults,
    )
    model = a.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default="toyworld",
                       help="the base model: a diffusers folder, a single file, a (cached) hub id or a built-in name")
    model.add_argument("--pretrained_vae_model_name_or_path", help="another VAE (e.g. an fp16-safe SDXL VAE)")
    data = a.add_argument_group("data")
    data.add_argument("--instance_data_dir", help="the images of the concept (required)")
    data.add_argument("--instance_prompt", help="the caption of images without a caption file")
    data.add_argument("--caption_extension", default=".txt", help="the caption file beside each image")
    data.add_argument("--repeats", type=int, default=1, help="times each image is seen per epoch")
    data.add_argument("--with_prior_preservation", action="store_true", help="add the class images' loss")
    data.add_argument("--class_data_dir", help="class images (generated into it with the base model when fewer than "
                                               "--num_class_images are there)")
    data.add_argument("--class_prompt", help="the caption of the class images (and the prompt that generates them)")
    data.add_argument("--prior_loss_weight", type=float, default=1.0)
    data.add_argument("--prior_loss_target", default="images", metavar="{" + ",".join(PRIOR_TARGETS) + "}",
                      help="what the class images' loss pulls toward: images (DreamBooth: the noise added to them) or "
                           "base_model (the frozen base model's own prediction on the same noisy latents, adapters off)")
    data.add_argument("--num_class_images", type=int, default=100)
    data.add_argument("--resolution", type=int, help="training size (default (model): its native size)")
    data.add_argument("--center_crop", action="store_true", help="crop centred (default: at a seeded random place)")
    data.add_argument("--random_flip", action="store_true", help="flip half the samples horizontally")
    data.add_argument("--shuffle_caption", action="store_true", help="shuffle the comma-separated parts of captions")
    data.add_argument("--keep_tokens", type=int, default=0, help="with --shuffle_caption: parts kept in front")
    data.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets (kohya)")
    data.add_argument("--min_bucket_reso", type=int, help="smallest bucket side (default resolution / 2)")
    data.add_argument("--max_bucket_reso", type=int, help="largest bucket side (default resolution × 2)")
    data.add_argument("--bucket_reso_steps", type=int, help="bucket side step (default: the UNet's, 64 for SD)")
    data.add_argument("--cache_latents", action="store_true", help="encode each image (and flip) once")
    data.add_argument("--decoder_inversion_steps", type=int, metavar="N",
                      help="refine each image's latents by N steps until the VAE decoder gives the image back "
                           "(decoder inversion; for colours or shapes the VAE's encoder never learnt: the toy "
                           "models' encoder turns teal into blue); implies --cache_latents (default 0)")
    adapter = a.add_argument_group("adapter")
    adapter.add_argument("--rank", type=int, help="LoRA rank (default (model): 4)")
    adapter.add_argument("--lora_alpha", type=float, help="LoRA alpha (default: the rank)")
    adapter.add_argument("--lora_dropout", type=float, default=0.0)
    adapter.add_argument("--use_dora", action="store_true", help="DoRA (weight-decomposed LoRA)")
    adapter.add_argument("--lora_unet_blocks", help="comma-separated UNet blocks to train, e.g. "
                                                    "unet.up_blocks.0.attentions.0 (default: every attention layer)")
    adapter.add_argument("--lora_layers", help="comma-separated layer names that get LoRA (peft target_modules, as "
                                               "the SD3 / Flux scripts' option), e.g. to_k,to_q,to_v,to_out.0,conv1,conv2 "
                                               "(default (model): to_k,to_q,to_v,to_out.0; toy-world: attention, "
                                               "feed-forward and ResNet convolutions)")
    adapter.add_argument("--use_blora", action="store_true", help="B-LoRA: SDXL's up_blocks.0.attentions.0 and .1")
    adapter.add_argument("--train_text_encoder", action="store_true", help="LoRA on the text encoder(s) too")
    adapter.add_argument("--train_text_encoder_frac", type=float, default=1.0, help="share of the steps it trains")
    adapter.add_argument("--train_text_encoder_ti", action="store_true", help="pivotal tuning (new tokens)")
    adapter.add_argument("--train_text_encoder_ti_frac", type=float, default=0.5, help="share of the steps they train")
    adapter.add_argument("--ti_warmup_steps", type=int, default=0, metavar="N",
                         help="the first N steps train only the new tokens' embeddings, the LoRA after them "
                              "(Break-A-Scene's first phase; counted in --max_train_steps)")
    adapter.add_argument("--token_abstraction", default="TOK",
                         help="the identifier(s) in the captions, comma-separated, replaced by new tokens")
    adapter.add_argument("--num_new_tokens_per_abstraction", type=int, help="new tokens per identifier (default 2)")
    adapter.add_argument("--initializer_concept", help="start the new tokens from this text's embeddings "
                                                       "(one token per token of it) instead of random ones")
    train = a.add_argument_group("training")
    train.add_argument("--output_dir", default="lora-dreambooth-model")
    train.add_argument("--logging_dir", default="logs", help="accelerate's logging folder, inside OUTPUT_DIR")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, help="default (model): 4")
    train.add_argument("--num_train_epochs", type=int, help="train this many epochs (when --max_train_steps is not given)")
    train.add_argument("--max_train_steps", type=int, help="default (model): 500; toy-world 400")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, help="keep at most this many checkpoints")
    train.add_argument("--resume_from_checkpoint", help="latest (the default when OUTPUT_DIR holds checkpoints) or "
                                                        "a checkpoint-<step> folder")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    train.add_argument("--learning_rate", type=float, help="default (model): 1e-4; toy-world 5e-4; Prodigy: use 1.0")
    train.add_argument("--text_encoder_lr", type=float, help="default (model): 5e-6; toy-world 5e-4")
    train.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    train.add_argument("--lr_warmup_steps", type=int, help="default (model): 500; toy-world 0")
    train.add_argument("--lr_num_cycles", type=int, default=1)
    train.add_argument("--lr_power", type=float, default=1.0)
    train.add_argument("--snr_gamma", type=float, help="Min-SNR-γ weighting (5.0 is usual): min(SNR,γ)/SNR for "
                                                       "epsilon, min(SNR,γ)/(SNR+1) for v-prediction")
    train.add_argument("--do_edm_style_training", action="store_true", help="the EDM formulation (Karras et al. 2022)")
    add_timestep_options(train)
    train.add_argument("--noise_offset", type=float, default=0.0)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--use_ema", action="store_true", help="export an exponential moving average of the LoRA")
    train.add_argument("--ema_decay", type=float, default=0.9999)
    opt = a.add_argument_group("optimizer")
    opt.add_argument("--optimizer", default="adamw", type=str.lower, choices=("adamw", "prodigy"))
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--adam_weight_decay", type=float, default=1e-4)
    opt.add_argument("--adam_weight_decay_text_encoder", type=float)
    opt.add_argument("--adam_epsilon", type=float, default=1e-8)
    opt.add_argument("--prodigy_beta3", type=float)
    opt.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True)
    opt.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True)
    opt.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True)
    val = a.add_argument_group("validation")
    val.add_argument("--validation_prompt", help="a prompt (with the identifiers) drawn every --validation_epochs")
    val.add_argument("--num_validation_images", type=int, default=4)
    val.add_argument("--validation_epochs", type=int, default=50)
    val.add_argument("--validation_steps", type=int, help="every N steps instead of epochs")
    a.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; toy-world 1)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    speed_cli.add_speed_options(a, training=True)
    a.set_defaults(func=run_lora)


def run_lora(args) -> int:
    from atelier.cli import print_json
    from atelier.train.lora import config_from_args, train_lora

    speed_cli.apply_training_numerics(args)
    cfg = config_from_args(args)
    cfg.check()
    summary = train_lora(cfg)
    if args.json:
        print_json(summary)
    else:
        extra = f" + {summary['embeddings_file']}" if summary.get("embeddings_file") else ""
        print(f"LoRA: {summary['lora']}{extra}; {summary.get('steps')} steps in {summary.get('wall_time_s', 0) / 60:.1f} min "
              f"(model card: {Path(summary['lora']).parent / 'README.md'})")
    return 0


# ---------------------------------------------------------------- virtual try-on

def register_tryon(sub) -> None:
    """`atelier train tryon` (train/tryon.py): CatVTON or OOTDiffusion on VITON-HD-layout data."""
    t = sub.add_parser(
        "tryon", help="train a virtual try-on model (CatVTON or OOTDiffusion; resumable)",
        description=(
            "Train a try-on model on paired VITON-HD-layout data (DIR/train_pairs.txt, DIR/train/image, "
            "DIR/train/cloth, DIR/train/agnostic-mask): catvton (person and garment side by side, attention-only "
            "by default) or ootd (a garment UNet whose self-attention states the try-on UNet attends to). A "
            "text-to-image base gets a 9-channel inpainting UNet (new channels zero); an inpainting base is used "
            "as is. Writes OUTPUT_DIR/final (the model folder `atelier tryon --model` reads), checkpoint-<step> "
            "folders (run the same command again to resume), loss.png and validation/ grids. See docs/tryon.md."
        ),
        formatter_class=HelpWithDefaults,
    )
    t.add_argument("--method", default="catvton", help="catvton or ootd")
    t.add_argument("--data", help="the data folder, VITON-HD's layout (required)")
    t.add_argument("--output_dir", default="runs/tryon")
    t.add_argument("--base", default="toyworld", help="SD 1.x / 2.x text-to-image or inpainting model: a diffusers "
                                                      "folder, single file, cached hub id or built-in name; or a "
                                                      "try-on model folder (or toyworld-tryon) to fine-tune")
    t.add_argument("--max_train_steps", type=int, default=1000)
    t.add_argument("--train_batch_size", type=int, default=4)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, help="default: catvton 1e-5, ootd 5e-5 (the papers'); toy-world 3e-4")
    t.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="diffusers' get_scheduler")
    t.add_argument("--lr_warmup_steps", type=int, default=0)
    t.add_argument("--adam_weight_decay", type=float, default=1e-2)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--trainable", help="attention (self-attention only: CatVTON's recipe) or all "
                                       "(default: catvton attention, ootd all)")
    t.add_argument("--freeze_garment_unet", action="store_true", help="ootd: keep the garment UNet as the base's")
    t.add_argument("--prompt", default="", help="ootd: the text both UNets read (default: the empty prompt)")
    t.add_argument("--condition_dropout", type=float, default=0.1, help="probability of dropping the garment "
                                                                        "(for guidance)")
    t.add_argument("--mixed_precision", default="no", help="no, fp16 or bf16")
    t.add_argument("--gradient_checkpointing", action="store_true")
    t.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit")
    t.add_argument("--checkpointing_steps", type=int, default=500)
    t.add_argument("--checkpoints_total_limit", type=int, help="keep at most this many checkpoints")
    t.add_argument("--resume_from_checkpoint", help="latest (the default when OUTPUT_DIR holds checkpoints) or "
                                                    "a checkpoint-<step> folder")
    t.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"),
                   help="training size (default: the base's native square size; VITON-HD: 512 384 or 1024 768)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--validation_steps", type=int, default=500, help="validation grid every N steps")
    t.add_argument("--num_validation_images", type=int, default=4, help="test pairs in the grid")
    t.add_argument("--validation_inference_steps", type=int, default=20)
    t.add_argument("--validation_guidance", type=float, help="default: the method's")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=run_tryon)


def run_tryon(args) -> int:
    from atelier.cli import print_json
    from atelier.train.tryon import config_from_args, train_tryon

    summary = train_tryon(config_from_args(args))
    if args.json:
        print_json(summary)
    else:
        print(f"try-on model: {summary['model']}; {summary.get('steps')} steps in "
              f"{summary.get('wall_time_s', 0) / 60:.1f} min (atelier tryon PERSON GARMENT --mask MASK "
              f"--model {summary['model']} --out result.png)")
    return 0
