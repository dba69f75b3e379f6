"""Training SwiftEdit's inversion network (Nguyen et al., CVPR 2025) for a one-step generator.

The inverter F is a copy of the one-step generator G's UNet (as SwiftEdit starts from SwiftBrush),
called on the clean latent x0 at timestep 999 with the prompt, its output read as noise: G(F(x0, c), c)
should re-create x0. Two stages, each a resumable loop (kill it, run the same command again):

  stage 1  synthetic data, targets known: G makes x0 = G(eps, c) from random noise and captions, and
           loss = noise_weight ||F(x0, c) - eps||^2 + latent_weight ||G(F(x0, c), c) - x0||^2
  stage 2  real images (the manifest's, or rendered toy scenes): a perceptual reconstruction loss on
           x_hat = G(F(x0, c), c) plus SwiftEdit's regulariser: at a random timestep t the real latent
           noised with the inverter's own noise, x_t = a_t x0 + s_t eps_hat, must be explained by the
           multi-step teacher with that noise: ||eps_hat - sg(eps_teacher(x_t, t, c))||^2. That keeps
           eps_hat a plausible noise (editable), not an arbitrary code that only G can decode.
           Perceptual loss: LPIPS (VGG) on decoded images when --lpips_weights are given; without
           them (the default: no downloads) latent MSE + pixel L1 + pixel MSE on decoded images.

G, the teacher, the VAE and the text encoder stay frozen; only F trains. Runs under accelerate's
Accelerator (mixed precision, `accelerate launch`); checkpoints are safetensors (atelier.train.
checkpoint), the loss curve is OUTPUT_DIR/stage{1,2}/loss.png, the trained UNet OUTPUT_DIR/stage{N}/final.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atelier.edit.one_step import generate, invert, with_unet
from atelier.core import vae as vae_calls
from atelier.core.io import atomic_open
from atelier.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class InverterConfig:
    pretrained_model_name_or_path: str = "toyworld-turbo"  # VAE, text encoder, tokenizer, scheduler
    pretrained_teacher_denoise: str = "toyworld"  # multi-step teacher UNet (stage 2 regulariser)
    pretrained_sb_generator: str = "toyworld-turbo"  # the frozen one-step generator
    pretrained_inverter: str | None = None  # start from this inverter (stage 2 default: stage 1's)
    output_dir: str = "runs/inverter"
    logging_dir: str = "logs"
    stage: int = 1
    learning_rate: float = 1e-4
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    checkpointing_steps: int = 100
    validation_steps: int = 200
    mixed_precision: str = "no"
    train_data_manifest: str | None = None
    resolution: int | None = None  # default: the generator's native size
    noise_weight: float = 1.0
    latent_weight: float = 1.0
    perceptual_weight: float = 1.0
    regularizer_weight: float = 1.0
    regularizer_t: tuple = (200, 980)  # range of the teacher's timesteps
    lpips_weights: list = field(default_factory=list)
    validation_images: int = 16
    seed: int = 0
    threads: int | None = None
    max_grad_norm: float = 1.0


# ---------------------------------------------------------------- data

def read_manifest(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--train_data_manifest not found: {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise UserError(f"{path}:{number}: each line must be an object with an \"image\" path")
        image = Path(item["image"])
        items.append({"image": str(image if image.is_absolute() else path.parent / image),
                      "caption": str(item.get("caption") or "")})
    if not items:
        raise UserError(f"{path} lists no images")
    return items


def prepare_manifest(images_dir, out, captions: bool = True) -> dict:
    """A JSONL manifest of every image under `images_dir` (recursively), each with the text of a
    same-name .txt file as its caption when `captions` (else, or when missing, an empty caption)."""
    images_dir, out = Path(images_dir), Path(out)
    if not images_dir.is_dir():
        raise UserError(f"--images: not a folder: {images_dir}")
    files = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images_dir}")
    lines, captioned = [], 0
    for p in files:
        text = ""
        if captions and p.with_suffix(".txt").is_file():
            text = p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
            captioned += bool(text)
        lines.append(json.dumps({"image": str(p.resolve()), "caption": text}))
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"manifest": str(out), "images": len(files), "captioned": captioned}


def _load_image(path: str, size: int) -> torch.Tensor:
    from PIL import Image, ImageOps

    from atelier.core.images import open_image

    im = ImageOps.fit(open_image(path).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


class Data:
    """Captions and images in [-1, 1]: from a manifest, or rendered toy scenes (seeded)."""

    def __init__(self, manifest, size: int):
        self.items = read_manifest(manifest) if manifest else None
        self.size = size
        if self.items is None and size != 64:
            raise UserError(f"the toy-scene stand-in data is 64x64, but the model works at {size}: "
                            "give --train_data_manifest (see `atelier train prepare-inverter-data`)")

    def batch(self, seed: int, n: int, images: bool = True):
        if self.items is None:
            from atelier.train.toyworld import scene_batch

            _, captions, x = scene_batch(seed, n)
            return captions, x
        rng = random.Random(seed)
        picks = [self.items[rng.randrange(len(self.items))] for _ in range(n)]
        x = torch.stack([_load_image(p["image"], self.size) for p in picks]) if images else None
        return [p["caption"] for p in picks], x


# ---------------------------------------------------------------- models

def _pipeline(name):
    from atelier.models import load_pipeline

    return load_pipeline(name, device="cpu", dtype=torch.float32)


class Models:
    """The frozen parts as Denoisers over the base model's text encoder and VAE, and the inverter."""

    def __init__(self, cfg: InverterConfig, need_teacher: bool):
        from atelier.core.denoiser import Denoiser
        from atelier.edit.one_step import load_inverter

        base = _pipeline(cfg.pretrained_model_name_or_path)
        gen_pipe = base if cfg.pretrained_sb_generator == cfg.pretrained_model_name_or_path else _pipeline(cfg.pretrained_sb_generator)
        self.den = Denoiser(base, cache_size=4096)
        self.vae = base.vae.requires_grad_(False).eval()
        base.text_encoder.requires_grad_(False)
        gen_unet = gen_pipe.unet.requires_grad_(False).eval()
        self.gen = with_unet(self.den, gen_unet, gen_pipe.scheduler.config.get("prediction_type", "epsilon"))
        self.teacher = None
        if need_teacher:
            t_pipe = _pipeline(cfg.pretrained_teacher_denoise)
            self.teacher = with_unet(self.den, t_pipe.unet.requires_grad_(False).eval(),
                                     t_pipe.scheduler.config.get("prediction_type", "epsilon"))
        if cfg.pretrained_inverter:
            inverter = load_inverter(cfg.pretrained_inverter)
        else:
            import copy

            inverter = copy.deepcopy(gen_unet)
        self.inverter = inverter.float().train().requires_grad_(True)
        self.size = gen_unet.config.sample_size * base.vae_scale_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.den.encode_image(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode to [-1, 1] pixels (clamped)."""
        return vae_calls.decode(self.vae, z).float().clamp(-1, 1)


# ---------------------------------------------------------------- losses

def stage1_loss(m: Models, cfg: InverterConfig, captions, seed: int) -> tuple[torch.Tensor, dict]:
    hidden, pooled = m.den.conditioning(captions)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((len(captions), m.gen.unet.config.in_channels, m.size // m.den.pipe.vae_scale_factor,
                       m.size // m.den.pipe.vae_scale_factor), generator=g)
    with torch.no_grad():
        x0 = generate(m.gen, eps, hidden, pooled)
    eps_hat = invert(m.inv, x0, hidden, pooled)
    x_hat = generate(m.gen, eps_hat, hidden, pooled)
    noise = F.mse_loss(eps_hat, eps)
    latent = F.mse_loss(x_hat, x0)
    return cfg.noise_weight * noise + cfg.latent_weight * latent, {"noise": noise.item(), "latent": latent.item()}


def stage2_loss(m: Models, cfg: InverterConfig, captions, x: torch.Tensor, seed: int, lpips=None):
    hidden, pooled = m.den.conditioning(captions)
    z = m.encode(x)
    eps_hat = invert(m.inv, z, hidden, pooled)
    z_hat = generate(m.gen, eps_hat, hidden, pooled)
    pixels = m.decode(z_hat)
    parts = {"latent": F.mse_loss(z_hat, z)}
    if lpips is not None:
        parts["lpips"] = lpips(pixels, x).mean()
        perceptual = parts["lpips"]
    else:
        parts["l1"] = F.l1_loss(pixels, x)
        parts["mse"] = F.mse_loss(pixels, x)
        perceptual = parts["latent"] + parts["l1"] + parts["mse"]
    # SwiftEdit's regulariser: the teacher, shown x0 noised with eps_hat, should recover eps_hat.
    g = torch.Generator().manual_seed(seed)
    lo, hi = cfg.regularizer_t
    t = torch.randint(lo, hi + 1, (len(captions),), generator=g)
    with torch.no_grad():
        a, b = m.teacher.coefficients(t)
        x_t = a * z + b * eps_hat.detach()
        _, eps_teacher = m.teacher.x0_eps(x_t, t, hidden, pooled)
    parts["regulariser"] = F.mse_loss(eps_hat, eps_teacher)
    loss = cfg.perceptual_weight * perceptual + cfg.regularizer_weight * parts["regulariser"]
    return loss, {k: v.item() for k, v in parts.items()}


@torch.no_grad()
def inversion_psnr(m: Models, captions, x: torch.Tensor) -> float:
    """Mean PSNR (dB) of decode(G(F(x0, c), c)) against the source images."""
    hidden, pooled = m.den.conditioning(captions)
    z = m.encode(x)
    out = m.decode(generate(m.gen, invert(m.inv, z, hidden, pooled), hidden, pooled))
    err = ((out - x) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / err)).mean())


# ---------------------------------------------------------------- the loop

def _accelerator(cfg: InverterConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    try:
        return Accelerator(mixed_precision=cfg.mixed_precision,
                           project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)))
    except ValueError as exc:
        raise UserError(f"--mixed_precision {cfg.mixed_precision}: {exc} (on CPU use no or bf16)") from None


def train_inverter(cfg: InverterConfig) -> dict:
    """Run (or resume) one stage; returns a summary with the final UNet folder."""
    from atelier.train.toyworld import Stage, lr_at

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"stage{cfg.stage}"
    if cfg.stage == 2 and not cfg.pretrained_inverter and (out / "stage1" / "final" / "config.json").is_file():
        cfg.pretrained_inverter = str(out / "stage1" / "final")
    (out / f"{name}.config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    stage = Stage(SimpleNamespace(out_dir=str(out), checkpoint_every=cfg.checkpointing_steps,
                                  eval_every=cfg.validation_steps), name, cfg.max_train_steps)
    final = stage.dir / "final"
    if stage.done:
        summary = json.loads((stage.dir / "done.json").read_text())
        return {**summary, "final": str(final), "resumed_done": True}
    if cfg.train_data_manifest:
        read_manifest(cfg.train_data_manifest)  # a bad manifest fails before the models load
    accelerator = _accelerator(cfg)
    m = Models(cfg, need_teacher=cfg.stage == 2)
    data = Data(cfg.train_data_manifest, cfg.resolution or m.size)
    if data.size != m.size:
        raise UserError(f"--resolution {data.size}: this generator works at {m.size}")
    lpips = None
    if cfg.stage == 2 and cfg.lpips_weights:
        from atelier.evaluate.metrics import load_lpips_vgg

        lpips = load_lpips_vgg(cfg.lpips_weights).requires_grad_(False).eval()
    opt = torch.optim.AdamW(m.inverter.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    stage.resume({"inverter": m.inverter}, opt)
    inverter, opt = accelerator.prepare(m.inverter, opt)
    m.inv = with_unet(m.den, inverter)
    m.inv.dtype = torch.float32
    val_captions, val_x = Data(None, 64).batch(987_654, cfg.validation_images) if data.items is None else \
        data.batch(987_654, cfg.validation_images)
    if not stage.log:
        stage.log.append({"step": stage.step, "inversion_psnr": round(inversion_psnr(m, val_captions, val_x), 2)})
    bar = tqdm(total=cfg.max_train_steps, initial=stage.step, desc=f"inverter {name}", dynamic_ncols=True)
    while stage.step < cfg.max_train_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(stage.step, cfg.max_train_steps, cfg.learning_rate, warmup=min(100, cfg.max_train_steps // 10))
        total = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            seed = (cfg.seed * 1_000_003 + cfg.stage * 7919 + stage.step * 64 + micro) % 2**31
            captions, x = data.batch(seed, cfg.train_batch_size, images=cfg.stage == 2)
            with accelerator.autocast():
                if cfg.stage == 1:
                    loss, parts = stage1_loss(m, cfg, captions, seed)
                else:
                    loss, parts = stage2_loss(m, cfg, captions, x, seed, lpips)
            accelerator.backward(loss / cfg.gradient_accumulation_steps)
            total += loss.item() / cfg.gradient_accumulation_steps
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(inverter.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        modules = {"inverter": accelerator.unwrap_model(inverter)}
        if stage.advance(total, modules, opt, bar, window=20):
            psnr = inversion_psnr(m, val_captions, val_x)
            stage.log.append({"step": stage.step, "inversion_psnr": round(psnr, 2), **{k: round(v, 5) for k, v in parts.items()}})
            tqdm.write(f"[inverter {name}] step {stage.step}: inversion PSNR {psnr:.2f} dB, {parts}", file=sys.stderr)
    bar.close()
    unet = accelerator.unwrap_model(inverter).eval()
    unet.save_pretrained(final, safe_serialization=True)
    write_info(final, cfg)
    psnr = inversion_psnr(m, val_captions, val_x)
    stage.finish({"inversion_psnr": round(psnr, 2), "final_loss": float(np.mean(stage.losses[-20:])), "log": stage.log})
    return {"stage": cfg.stage, "steps": stage.step, "wall_time_s": round(stage.seconds, 1),
            "inversion_psnr": round(psnr, 2), "final": str(final), "loss_plot": str(stage.dir / "loss.png")}


def write_info(folder: Path, cfg: InverterConfig) -> None:
    info = {"kind": "inverter", "method": "SwiftEdit inversion network", "generator": cfg.pretrained_sb_generator,
            "timestep": 999, "stage": cfg.stage, "trained_with": {k: v for k, v in asdict(cfg).items() if k != "output_dir"}}
    (Path(folder) / "atelier.json").write_text(json.dumps(info, indent=2, default=str))


def export_inverter(folder, out) -> str:
    """Copy a trained inverter as an fp16 safetensors UNet folder (atomically replacing `out`)."""
    from diffusers import UNet2DConditionModel

    from atelier.models import save_model_folder

    folder, out = Path(folder), Path(out)
    unet = UNet2DConditionModel.from_pretrained(folder)
    info = folder / "atelier.json"
    files = {"atelier.json": info.read_text(encoding="utf-8")} if info.is_file() else None
    return str(save_model_folder(unet, out, files=files))

