"""`atelier train tryon`: CatVTON or OOTDiffusion (atelier.tryon.methods) on VITON-HD-layout data.

The try-on UNet starts from the base model: a text-to-image UNet is widened to 9 input channels
(atelier.tryon.inpaint_unet, new channels zero; the new conv_in then trains too, even under
--trainable attention, or the mask could never reach the model), an inpainting UNet is used as it is.
When --base names a try-on model (a previous run's final/, any try-on folder, the built-in
toyworld-tryon), training fine-tunes it instead: its UNets and text embedding are the start, its method
must be --method, and the result's tryon.json records it under "fine_tuned_from".
ootd's garment UNet is a copy of the base UNet, trained or frozen (--freeze_garment_unet, Magic
Clothing's choice). What trains: --trainable attention (the self-attention layers: CatVTON's
attention-only recipe, its default) or all (OOTDiffusion's default).

Each sample is a paired VITON-HD pair (the person wears the garment; the person image is the target);
the garment is dropped (zero latents) with probability --condition_dropout, so classifier-free guidance
on the garment works. The loss is the model's own diffusion loss (epsilon or v-prediction) at uniform
timesteps; catvton's over the whole [person | garment] canvas, as the canvas is denoised together.

The run goes through atelier's TrainLoop (accelerate: mixed precision, gradient accumulation, clipping;
`checkpoint-<step>` folders resumed exactly after a kill). Outputs in --output_dir: final/ (the try-on
model folder, atelier.tryon.model), settings.json, loss.png, validation/step_*.png (rows of
person | garment | result), done.json.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.io import atomic_open
from atelier.core.prediction import model_target
from atelier.errors import UserError
from atelier.train.dreambooth_data import batch_index
from atelier.train.loop import TrainLoop, lr_schedule, make_accelerator, numbered_checkpoints
from atelier.train.options import LR_SCHEDULERS, check_all, check_same_settings

# Settings that may change when a run resumes (they do not change what is learnt).
RESUME_FREE = {"resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
               "num_validation_images", "validation_inference_steps", "threads", "output_dir"}
# The papers' rates (CatVTON 1e-5, OOTDiffusion 5e-5, batch sizes 128 / 64); the toy models learn at a
# larger one.
LEARNING_RATES = {"catvton": 1e-5, "ootd": 5e-5}
TOY_LEARNING_RATE = 3e-4


@dataclass
class TryOnTrainConfig:
    method: str = "catvton"
    data: str | None = None  # VITON-HD-layout folder (train_pairs.txt, train/image, train/cloth, train/agnostic-mask)
    output_dir: str = "runs/tryon"
    base: str = "toyworld"  # text-to-image or inpainting SD 1.x / 2.x model, or a try-on model to fine-tune
    max_train_steps: int = 1000
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # default: the method's (LEARNING_RATES), toy models TOY_LEARNING_RATE
    lr_scheduler: str = "constant"  # diffusers' get_scheduler names
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    trainable: str | None = None  # attention | all; default catvton attention, ootd all
    freeze_garment_unet: bool = False
    prompt: str = ""  # ootd: the text both UNets read (its embedding is stored in the model folder)
    condition_dropout: float = 0.1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    resolution: tuple[int, int] | None = None  # (height, width); default the base's native square size
    seed: int = 0
    validation_steps: int | None = 500
    num_validation_images: int = 4
    validation_inference_steps: int = 20
    validation_guidance: float | None = None  # default: the method's
    threads: int | None = None

    def check(self) -> None:
        from atelier.tryon.methods import METHODS

        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not self.data:
            raise UserError("--data is required: a folder in VITON-HD's layout (train_pairs.txt, train/image, ...)")
        at_least_1 = dict(integer=True, minimum=1)
        rules = {k: at_least_1 for k in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                                         "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                                         "num_validation_images", "validation_inference_steps", "threads")}
        rules["lr_warmup_steps"] = dict(integer=True, minimum=0)
        rules.update(learning_rate=dict(above=0), adam_weight_decay=dict(minimum=0), max_grad_norm=dict(above=0),
                     condition_dropout=dict(minimum=0, maximum=1), seed=dict(integer=True, minimum=0),
                     validation_guidance=dict(minimum=1))
        check_all(lambda name: f"--{name}", asdict(self), rules)
        if self.trainable not in (None, "attention", "all"):
            raise UserError(f"--trainable must be attention or all, not {self.trainable!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.prompt and self.method != "ootd":
            raise UserError("--prompt applies to --method ootd (catvton has no text)")
        if self.freeze_garment_unet and self.method != "ootd":
            raise UserError("--freeze_garment_unet applies to --method ootd (catvton has no garment UNet)")
        if self.resolution is not None:
            if len(self.resolution) != 2:
                raise UserError("--resolution takes two numbers: HEIGHT WIDTH")
            for side in self.resolution:
                check_all(lambda name: "--resolution", {"side": side}, {"side": dict(integer=True, minimum=8)})


class TryOnTrainee(torch.nn.Module):
    """The method's modules; forward is one training prediction (what a distributed wrapper must see);
    the state dict holds the trained parameters only."""

    def __init__(self, net, params: list):
        super().__init__()
        self.net = net
        ids = {id(p) for p in params}
        self.trained = [name for name, p in net.named_parameters() if id(p) in ids]
        net.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

    def forward(self, x_t, t, mask, masked, garment, drop):
        return self.net(x_t, t, mask, masked, self.net.condition(garment, drop))

    def parameters_trained(self) -> list:
        named = dict(self.net.named_parameters())
        return [named[name] for name in self.trained]

    def state_dict(self, *args, **kwargs):
        named = dict(self.net.named_parameters())
        return {name: named[name].detach().clone() for name in self.trained}

    def load_state_dict(self, state, strict=True):
        named = dict(self.net.named_parameters())
        missing = [name for name in self.trained if name not in state]
        if strict and missing:
            raise KeyError(f"try-on checkpoint lacks {missing[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                named[name].copy_(value)
        return torch.nn.modules.module._IncompatibleKeys([], [])


def adamw_8bit():
    """bitsandbytes' AdamW8bit, proven to step here, or one UserError."""
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device="cuda" if torch.cuda.is_available() else "cpu"))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        return bnb.optim.AdamW8bit
    except Exception as exc:  # not installed, or no build for this device
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--use_8bit_adam needs a working bitsandbytes (pip install bitsandbytes; "
                        f"a GPU it supports): {first}") from None


def make_optimizer(cfg: TryOnTrainConfig, params: list, lr: float):
    optimizer = adamw_8bit() if cfg.use_8bit_adam else torch.optim.AdamW
    return optimizer(params, lr=lr, weight_decay=cfg.adam_weight_decay)


def _is_toy(base: str) -> bool:
    from atelier.models.loader import classify_source
    from atelier.tryon.model import BUILTIN_TRYON

    if base in BUILTIN_TRYON:
        return True
    try:
        return classify_source(base)[0] == "builtin"
    except UserError:
        return False


def resolved(cfg: TryOnTrainConfig) -> TryOnTrainConfig:
    """Method and model defaults filled in (what settings.json records)."""
    from dataclasses import replace

    lr = cfg.learning_rate or (TOY_LEARNING_RATE if _is_toy(cfg.base) else LEARNING_RATES[cfg.method])
    trainable = cfg.trainable or ("attention" if cfg.method == "catvton" else "all")
    return replace(cfg, learning_rate=lr, trainable=trainable,
                   resolution=tuple(cfg.resolution) if cfg.resolution else None)


def write_grid(path: Path, rows: list[list[np.ndarray]]) -> None:
    """Rows of images (each row: person | garment | result) as one PNG."""
    from PIL import Image

    with atomic_open(path, "wb") as f:
        Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)).save(f, format="PNG")


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def start_model(cfg: TryOnTrainConfig):
    """The model training starts from: built from a base model, or a try-on model loaded to fine-tune (in
    fp32 on the CPU; the loop places it)."""
    from atelier.tryon.model import build_tryon_model, is_tryon_source, load_tryon_model

    if not is_tryon_source(cfg.base):
        return build_tryon_model(cfg.base, cfg.method, resolution=cfg.resolution, prompt=cfg.prompt)
    if cfg.prompt:
        raise UserError(f"--prompt: {cfg.base} is a try-on model; it keeps the text it was trained with")
    model = load_tryon_model(cfg.base, method=cfg.method, device="cpu", dtype=torch.float32)
    if cfg.resolution and tuple(cfg.resolution) != tuple(model.resolution):
        model.resolution = tuple(cfg.resolution)
    return model


def train_tryon(cfg: TryOnTrainConfig) -> dict:
    """Train (or resume) a try-on model; returns a summary with the model folder (`model`)."""
    from atelier.core import vae as vae_calls
    from atelier.tryon.data import load_pair, read_pairs, to_tensor
    from atelier.tryon.methods import latent_mask
    from atelier.tryon.model import TryOnModel, is_tryon_source, save_tryon_model
    from atelier.tryon.pipeline import try_on

    cfg.check()
    if cfg.use_8bit_adam:
        adamw_8bit()  # before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pairs = read_pairs(cfg.data, "train")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    cfg = resolved(cfg)
    # distributed: some trained parameters get no gradient (catvton's skipped cross-attention under
    # --trainable all; the garment UNet's layers after its last self-attention)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, project_dir=out,
                                   flag="--mixed_precision", find_unused_parameters=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    loop = TrainLoop(out, cfg.max_train_steps, checkpoint_every=cfg.checkpointing_steps,
                     eval_every=cfg.validation_steps, name="tryon", title=f"try-on ({cfg.method}) {out.name}",
                     accelerator=accelerator, numbered=True, keep=cfg.checkpoints_total_limit,
                     resume_from=cfg.resume_from_checkpoint)
    final = out / "final"
    if loop.done:
        return {**json.loads((out / "done.json").read_text()), "model": str(final), "resumed_done": True}
    model = start_model(cfg)
    cfg.resolution = tuple(model.resolution)
    height, width = model.resolution
    step = model.vae_scale * 2 ** (len(model.unet.config.down_block_types) - 1)  # the UNet halves the latents
    if height % step or width % step:
        raise UserError(f"--resolution {height} {width}: both sides must be multiples of {step} for this model")
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    if numbered_checkpoints(out):
        check_same_settings(out / "settings.json", settings, RESUME_FREE, flag_of=lambda k: f"--{k}")
    if accelerator.is_main_process:
        with atomic_open(out / "settings.json", "w", encoding="utf-8") as f:
            f.write(json.dumps({"options": settings, "train_pairs": len(pairs), "widened_conv_in": model.widened}, indent=2))

    # frozen: the VAE (and a frozen garment UNet) on the device in the weight dtype; the rest trains in fp32
    net = model.net
    vae = loop.frozen(model.vae, keep_original=True)
    frozen_garment = cfg.method == "ootd" and cfg.freeze_garment_unet
    extra = [net.unet.conv_in.weight, net.unet.conv_in.bias] if model.widened else []
    if cfg.method == "ootd":
        params = net.trainable(cfg.trainable, extra, freeze_garment_unet=frozen_garment)
    else:
        params = net.trainable(cfg.trainable, extra)
    trainee = TryOnTrainee(net, params)
    if cfg.gradient_checkpointing:
        net.unet.enable_gradient_checkpointing()
        if cfg.method == "ootd" and not frozen_garment:
            net.garment_unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(cfg, params, cfg.learning_rate)
    (trained,), optimizer = loop.prepare({"tryon": trainee}, optimizer)
    if frozen_garment:
        net.garment_unet.to(loop.device, loop.weight_dtype)
    abar = torch.as_tensor(model.scheduler.alphas_cumprod, dtype=torch.float32).to(loop.device)
    steps_t = int(model.scheduler.config.num_train_timesteps)
    prediction = model.scheduler.config.prediction_type
    size = (height, width)

    def step(i, micro):
        k = batch_index(i, micro, cfg.gradient_accumulation_steps, rank, world)
        seed = (cfg.seed * 1_000_003 + k * 7919) % 2**31
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(cfg.train_batch_size)]
        person, garment, mask = (torch.stack(x).to(loop.device) for x in zip(*(load_pair(p, size) for p in chosen)))
        with torch.no_grad():  # one VAE call: person (the target), garment, masked person
            z_person, z_garment, z_masked = vae_calls.encode(
                vae, torch.cat([person, garment, person * (mask < 0.5)]), torch.float32).chunk(3)
        m = latent_mask(mask, z_person.shape[-2:])
        drop = (torch.rand(len(chosen), generator=g) < cfg.condition_dropout).to(loop.device)
        clean = net.clean(z_person, z_garment)
        noise = torch.randn(clean.shape, generator=g).to(clean)
        t = torch.randint(0, steps_t, (len(clean),), generator=g).to(loop.device)
        a, b = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        pred = trained(a * clean + b * noise, t, m, z_masked, z_garment, drop)
        return F.mse_loss(pred.float(), model_target(clean, noise, a, b, prediction))

    try:
        val_pairs = read_pairs(cfg.data, "test")
    except UserError:
        val_pairs = pairs
    val_pairs = val_pairs[: cfg.num_validation_images]
    guidance = cfg.validation_guidance or model.defaults["guidance"]
    val_dir = out / "validation"

    def evaluate(parts):
        if not accelerator.is_main_process:
            return {}
        view = TryOnModel(cfg.method, net, vae, model.scheduler, model.resolution, cfg.base, model.info)
        net.eval()
        rows = []
        for n, pair in enumerate(val_pairs):
            person, garment, _ = load_pair(pair, size)
            result = try_on(view, pair.person, pair.garment, pair.mask, steps=cfg.validation_inference_steps,
                            guidance=guidance, seed=cfg.seed + n)
            rows.append([_uint8(person), _uint8(garment), _uint8(to_tensor(result, size))])
        net.train()
        val_dir.mkdir(exist_ok=True)
        write_grid(val_dir / f"step_{loop.step:06d}.png", rows)
        return {"validation": f"validation/step_{loop.step:06d}.png"}

    factor = lr_schedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps)
    net.train()
    loop.run(step, lr=lambda i: cfg.learning_rate * factor(i), clip=cfg.max_grad_norm, evaluate=evaluate, window=20)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net.eval()
        if frozen_garment:
            net.garment_unet.float()
        record = {"steps": loop.step, "trained_with": settings}
        if is_tryon_source(cfg.base):
            record["fine_tuned_from"] = {"model": cfg.base, "steps": model.info.get("steps"),
                                         "trained_with": model.info.get("trained_with")}
        save_tryon_model(model, final, extra=record)
    done = loop.finish({"final_loss": float(np.mean(loop.losses[-20:])), "log": loop.log,
                        "seconds_per_step": round(loop.seconds / max(1, loop.step), 3), "model": str(final)})
    return {**done, "model": str(final), "loss_plot": str(out / "loss.png")}


def config_from_args(args) -> TryOnTrainConfig:
    keys = {f.name for f in fields(TryOnTrainConfig)}
    return TryOnTrainConfig(**{k: v for k, v in vars(args).items() if k in keys and v is not None})
