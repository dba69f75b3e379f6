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

Image branch (SwiftEdit's IP-Adapter): with --ip_adapter / --ip_adapter_weight_name (and
--image_encoder_path) G runs with the source image as its image prompt (x0 itself in stage 1, where x0
is made text-only; the real image in stage 2), and so does the teacher when the adapter fits it. The
adapter is frozen, or with --train_ip_adapter trained with F (its image projection and to_k_ip /
to_v_ip; from scratch as the IP-Adapter training script initialises one, unless an adapter is given
to start from) and written beside the inverter as ip-adapter.safetensors. atelier.json records it, so
`atelier edit --method one-step --inverter FOLDER` runs G with the same adapter.

G, the teacher, the VAE and the text encoder stay frozen; only F (and a trained image branch) train. Runs under accelerate's
Accelerator (mixed precision, `accelerate launch`); checkpoints are safetensors (atelier.train.
checkpoint), the loss curve is OUTPUT_DIR/stage{1,2}/loss.png, the trained UNet OUTPUT_DIR/stage{N}/final.
"""

from __future__ import annotations

import json
import random
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atelier.edit.one_step import ADAPTER_FILE, generate, invert, recordable_path, recorded_adapter, with_unet
from atelier.core import vae as vae_calls
from atelier.core.images import IMAGE_SUFFIXES
from atelier.core.io import atomic_open
from atelier.errors import UserError
from atelier.speed.cli import training_speed
from atelier.train.loop import TrainLoop, lr_at, make_accelerator
from atelier.train.options import check_all, check_number



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
    partial_captions: float = 0.0  # stage 2: share of captions cut to a random subset of their phrases
    image_encoder_path: str | None = None  # image branch: the CLIP vision folder of the adapter
    ip_adapter_weight_name: str | None = None  # image branch: an adapter file, or its name inside --ip_adapter
    ip_adapter: str | None = None  # image branch: an adapter folder, file, h94 layout or cached hub id
    train_ip_adapter: bool = False  # image branch trained with the inverter (from scratch without an adapter)
    ip_image_proj: str = "base"  # a branch trained from scratch: "base" (4 tokens), "plus" or "full" (every encoder token)
    # speed: applied to the UNets the loop runs (the inverter, the generator, the stage-2 teacher)
    compile: str = "off"  # --compile off, regional, full
    compile_mode: str = "default"  # --compile-mode default, reduce-overhead, max-autotune (CUDA)
    compile_backend: str | None = None  # torch.compile backend (None: inductor)
    channels_last: bool = False

    @property
    def image_branch(self) -> bool:
        return bool(self.ip_adapter or self.ip_adapter_weight_name or self.train_ip_adapter)

    def check(self) -> None:
        """UserError naming the first option out of range (nan, inf, 0, negative), before any work."""
        at_least_1 = dict(integer=True, minimum=1)
        weight = dict(minimum=0)
        rules = {name: at_least_1 for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                                              "checkpointing_steps", "validation_steps", "validation_images", "threads")}
        rules.update(learning_rate=dict(above=0), seed=dict(integer=True, minimum=0), max_grad_norm=weight,
                     resolution=dict(integer=True, minimum=8), noise_weight=weight, latent_weight=weight,
                     perceptual_weight=weight, regularizer_weight=weight,
                     partial_captions=dict(minimum=0, maximum=1))
        check_all(lambda name: f"--{name}", asdict(self), rules)
        if self.resolution is not None and self.resolution % 8:
            raise UserError("--resolution must be a multiple of 8")
        lo_hi = self.regularizer_t
        if not (isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2):
            raise UserError(f"regularizer_t must be two timesteps (low, high), not {lo_hi!r}")
        for t in lo_hi:
            check_number("regularizer_t", t, integer=True, minimum=0, maximum=999)
        if lo_hi[0] > lo_hi[1]:
            raise UserError(f"regularizer_t must be (low, high) with low <= high, not {tuple(lo_hi)}")
        from atelier.image_prompts.adapters import NEW_KINDS

        if self.ip_image_proj not in NEW_KINDS:
            raise UserError(f"--ip_image_proj must be base, plus or full, not {self.ip_image_proj!r}")
        if self.stage not in (1, 2):
            raise UserError(f"--stage must be 1 or 2, not {self.stage!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        self.check_image_branch()

    def check_image_branch(self) -> None:
        encoder = self.image_encoder_path
        if encoder is not None and not (Path(encoder).expanduser() / "config.json").is_file():
            raise UserError(f"--image_encoder_path {encoder}: not a CLIP vision model folder (no config.json)")
        if encoder is not None and not self.image_branch:
            raise UserError("--image_encoder_path needs an adapter: --ip_adapter_weight_name FILE, --ip_adapter SOURCE, "
                            "or --train_ip_adapter to train one from scratch")
        if self.train_ip_adapter and encoder is None and not (self.ip_adapter or self.ip_adapter_weight_name):
            raise UserError("--train_ip_adapter needs --image_encoder_path DIR: the CLIP vision model whose image "
                            "embeddings the new adapter reads")


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

    from atelier.core.images import open_image, pixels_from_image

    im = ImageOps.fit(open_image(path).convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return pixels_from_image(im)


def caption_phrases(caption: str) -> list[str]:
    """The phrases of a list-like caption ("a, b and c" -> [a, b, c]): toy-world scene captions, tag lists."""
    parts = [p.strip() for chunk in caption.split(",") for p in chunk.split(" and ")]
    return [p for p in parts if p]


def partial_caption(caption: str, rng: random.Random) -> str:
    """A random non-empty subset of the caption's phrases, in random order: a caption as users write
    one for an edit ("make the red circle blue" names one object of the scene)."""
    phrases = caption_phrases(caption)
    if len(phrases) < 2:
        return caption
    keep = rng.sample(phrases, rng.randint(1, len(phrases) - 1))
    return keep[0] if len(keep) == 1 else ", ".join(keep[:-1]) + " and " + keep[-1]


class Data:
    """Captions and images in [-1, 1]: from a manifest, or rendered toy scenes (seeded). With
    `partial` > 0, that share of the captions is cut to a random subset of its phrases."""

    def __init__(self, manifest, size: int, partial: float = 0.0):
        self.items = read_manifest(manifest) if manifest else None
        self.size = size
        self.partial = partial
        if self.items is None and size != 64:
            raise UserError(f"the toy-scene stand-in data is 64x64, but the model works at {size}: "
                            "give --train_data_manifest (see `atelier train prepare-inverter-data`)")

    def batch(self, seed: int, n: int, images: bool = True):
        if self.items is None:
            from atelier.train.toyworld import scene_batch

            _, captions, x = scene_batch(seed, n)
        else:
            rng = random.Random(seed)
            picks = [self.items[rng.randrange(len(self.items))] for _ in range(n)]
            x = torch.stack([_load_image(p["image"], self.size) for p in picks]) if images else None
            captions = [p["caption"] for p in picks]
        if self.partial > 0:
            rng = random.Random(seed * 31 + 7)
            captions = [partial_caption(c, rng) if rng.random() < self.partial else c for c in captions]
        return captions, x


# ---------------------------------------------------------------- models

def _pipeline(name):
    from atelier.models import load_pipeline

    return load_pipeline(name, device="cpu", dtype=torch.float32)


def _freeze_pipeline(pipe, loop: TrainLoop) -> None:
    """Every model of `pipe` frozen on the loop's device, in the weight dtype (the VAE per force_upcast)."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            loop.frozen(module)


class Models:
    """The frozen parts as Denoisers over the base model's text encoder and VAE, and the inverter
    (fp32, trained); the frozen ones on the loop's device in its weight dtype."""

    def __init__(self, cfg: InverterConfig, need_teacher: bool, loop: TrainLoop):
        import copy

        from atelier.core.denoiser import Denoiser
        from atelier.edit.one_step import load_inverter

        base = _pipeline(cfg.pretrained_model_name_or_path)
        gen_pipe = base if cfg.pretrained_sb_generator == cfg.pretrained_model_name_or_path else _pipeline(cfg.pretrained_sb_generator)
        gen_unet = gen_pipe.unet
        if cfg.pretrained_inverter:
            inverter = load_inverter(cfg.pretrained_inverter)
        else:
            inverter = copy.deepcopy(gen_unet)  # before the generator goes to the weight dtype
        self.inverter = inverter.float().train().requires_grad_(True)
        self.branch = ImageBranch(cfg, gen_pipe, loop) if cfg.image_branch else None
        _freeze_pipeline(base, loop)
        _freeze_pipeline(gen_pipe, loop)
        self.den = Denoiser(base, cache_size=4096)
        self.den.device = loop.device
        self.vae = base.vae
        self.gen = with_unet(self.den, gen_unet, gen_pipe.scheduler.config.get("prediction_type", "epsilon"))
        if self.branch is not None and self.branch.trained:
            self.branch.make_trainable()
        self.teacher, self.teacher_sees_image = None, False
        if need_teacher:
            t_pipe = _pipeline(cfg.pretrained_teacher_denoise)
            self.teacher_sees_image = self.branch is not None and self.branch.add_to(t_pipe.unet)
            self.teacher = with_unet(self.den, loop.frozen(t_pipe.unet),
                                     t_pipe.scheduler.config.get("prediction_type", "epsilon"))
            if self.teacher_sees_image and self.branch.trained:
                self.branch.share_with(t_pipe.unet)
        self.size = gen_unet.config.sample_size * base.vae_scale_factor
        self.device = loop.device

    def image_embeds(self, pixels: torch.Tensor):
        """G's image_embeds with `pixels` ([-1, 1]) as the image prompts; None without an image branch."""
        return None if self.branch is None else self.branch.embeds(pixels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.den.encode_image(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Differentiable decode to [-1, 1] pixels (clamped)."""
        return vae_calls.decode(self.vae, z).float().clamp(-1, 1)


class ImageBranch:
    """SwiftEdit's image branch on the generator: an IP-Adapter loaded through diffusers (a pretrained
    one, or a fresh one the IP-Adapter training script's way), the source images as image prompts."""

    def __init__(self, cfg: InverterConfig, gen_pipe, loop: TrainLoop):
        from atelier.image_prompts.adapters import load_ip_adapter

        self.trained = cfg.train_ip_adapter
        if self.trained and loop.accelerator.num_processes > 1:
            raise UserError("--train_ip_adapter trains on one process; run it without a multi-process `accelerate launch`")
        source, weight_name = cfg.ip_adapter, cfg.ip_adapter_weight_name
        if weight_name and source is None and Path(weight_name).expanduser().is_file():
            source, weight_name = weight_name, None
        if self.trained and source is None and weight_name is None:
            source = fresh_adapter_file(gen_pipe.unet, cfg.image_encoder_path, Path(cfg.output_dir), cfg.seed,
                                        kind=cfg.ip_image_proj)
        try:
            self.adapters = load_ip_adapter(gen_pipe, source, weight_name=weight_name, image_encoder=cfg.image_encoder_path)
        except UserError as exc:
            raise UserError(str(exc).replace("CLI --ip-image-encoder", "--image_encoder_path DIR")) from None
        self.unet = gen_pipe.unet
        self.files = self.adapters.adapters[0].files

    def embeds(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.adapters.batch_embeds(to_pil(pixels))

    def parameters_module(self) -> torch.nn.Module:
        """The trainable image branch: G's image projection and every to_k_ip / to_v_ip."""
        from atelier.image_prompts.adapters import ip_attention_processors

        return torch.nn.ModuleDict({"image_proj": self.unet.encoder_hid_proj,
                                    "layers": torch.nn.ModuleList(ip_attention_processors(self.unet))})

    def make_trainable(self) -> None:
        self.module = self.parameters_module().float().train().requires_grad_(True)

    def add_to(self, unet) -> bool:
        """Load the same adapter into another UNet (the teacher) if it fits it; whether it did."""
        from atelier.image_prompts.adapters import check_fits_unet, read_adapter

        state = read_adapter(self.files.weights)
        try:
            check_fits_unet(state, unet, self.files.name)
        except UserError as exc:
            print(f"[inverter] the teacher runs without the image branch: {exc}", file=sys.stderr)
            return False
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
        return True

    def share_with(self, unet) -> None:
        """Make `unet`'s adapter layers the generator's own modules (a trained branch: one set of weights)."""
        from atelier.image_prompts.adapters import ip_attention_processors

        unet.encoder_hid_proj = self.unet.encoder_hid_proj
        for theirs, ours in zip(ip_attention_processors(unet), ip_attention_processors(self.unet)):
            theirs.to_k_ip, theirs.to_v_ip = ours.to_k_ip, ours.to_v_ip

    @contextmanager
    def left_out(self):
        """G without its image prompt (every adapter at scale 0: diffusers then skips it, the text-only output)."""
        from atelier.image_prompts.adapters import ip_attention_processors

        processors = ip_attention_processors(self.unet)
        saved = [list(p.scale) for p in processors]
        for p in processors:
            p.scale = [0.0] * len(p.scale)
        try:
            yield
        finally:
            for p, scale in zip(processors, saved):
                p.scale = scale

    def idle_embeds(self, batch: int) -> list[torch.Tensor]:
        return self.adapters.zero_embeds(batch)

    def record(self) -> dict:
        """What the inverter's atelier.json says about the adapter (see one_step.recorded_adapter)."""
        encoder = recordable_path(self.files.image_encoder)
        if self.trained:
            return {"weights": ADAPTER_FILE, "image_encoder": encoder, "name": Path(ADAPTER_FILE).stem, "trained": True}
        return {"weights": recordable_path(self.files.weights), "image_encoder": encoder, "name": self.files.name,
                "trained": False}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from atelier.image_prompts.adapters import adapter_state_dict

        state = {k: v.detach().float().contiguous().cpu() for k, v in adapter_state_dict(self.unet).items()}
        save_file(state, Path(folder) / ADAPTER_FILE)


def fresh_adapter_file(unet, image_encoder, out: Path, seed: int, kind: str = "base") -> Path:
    """A new adapter of `kind` for `unet` (image projection fresh, to_k_ip / to_v_ip copied from to_k /
    to_v), written as an h94 file so that it loads like any other; the same for the same seed."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    from atelier.image_prompts.adapters import new_adapter_state

    config = CLIPVisionConfig.from_pretrained(str(Path(image_encoder).expanduser()))
    state = new_adapter_state(unet, config.projection_dim if kind == "base" else config.hidden_size, kind=kind, seed=seed)
    flat = {f"{group}.{k}": v.contiguous() for group, part in state.items() for k, v in part.items()}
    path = out / "ip-adapter-init.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file(flat, path)
    return path


def to_pil(pixels: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as the image prompts of a batch."""
    from PIL import Image

    arrays = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


# ---------------------------------------------------------------- losses

def stage1_loss(m: Models, cfg: InverterConfig, captions, seed: int) -> tuple[torch.Tensor, dict]:
    hidden, pooled = m.den.conditioning(captions)
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((len(captions), m.gen.unet.config.in_channels, m.size // m.den.pipe.vae_scale_factor,
                       m.size // m.den.pipe.vae_scale_factor), generator=g).to(m.device)
    with torch.no_grad():
        x0 = generate_text_only(m, eps, hidden, pooled)
        embeds = m.image_embeds(m.decode(x0)) if m.branch is not None else None
    eps_hat = invert(m.inv, x0, hidden, pooled)
    x_hat = generate(m.gen, eps_hat, hidden, pooled, embeds)
    noise = F.mse_loss(eps_hat, eps)
    latent = F.mse_loss(x_hat, x0)
    return cfg.noise_weight * noise + cfg.latent_weight * latent, {"noise": noise.item(), "latent": latent.item()}


def generate_text_only(m: Models, eps, hidden, pooled):
    """G(eps, c) without an image prompt (stage 1's samples)."""
    if m.branch is None:
        return generate(m.gen, eps, hidden, pooled)
    with m.branch.left_out():
        return generate(m.gen, eps, hidden, pooled, m.branch.idle_embeds(len(eps)))


def stage2_loss(m: Models, cfg: InverterConfig, captions, x: torch.Tensor, seed: int, lpips=None):
    hidden, pooled = m.den.conditioning(captions)
    x = x.to(m.device)
    z = m.encode(x)
    embeds = m.image_embeds(x)
    eps_hat = invert(m.inv, z, hidden, pooled)
    z_hat = generate(m.gen, eps_hat, hidden, pooled, embeds)
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
    t = torch.randint(lo, hi + 1, (len(captions),), generator=g).to(m.device)
    with torch.no_grad():
        a, b = m.teacher.coefficients(t)
        x_t = a * z + b * eps_hat.detach()
        _, eps_teacher = m.teacher.x0_eps(x_t, t, hidden, pooled, embeds if m.teacher_sees_image else None)
    parts["regulariser"] = F.mse_loss(eps_hat, eps_teacher)
    loss = cfg.perceptual_weight * perceptual + cfg.regularizer_weight * parts["regulariser"]
    return loss, {k: v.item() for k, v in parts.items()}


@torch.no_grad()
def inversion_psnr(m: Models, captions, x: torch.Tensor) -> float:
    """Mean PSNR (dB) of decode(G(F(x0, c), c)) against the source images."""
    hidden, pooled = m.den.conditioning(captions)
    x = x.to(m.device)
    z = m.encode(x)
    out = m.decode(generate(m.gen, invert(m.inv, z, hidden, pooled), hidden, pooled, m.image_embeds(x)))
    err = ((out - x) / 2).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / err)).mean())


# ---------------------------------------------------------------- the loop

def continue_from_stage1(cfg: InverterConfig) -> None:
    """Stage 2 starts from OUTPUT_DIR/stage1/final unless told otherwise, and a trained image branch
    (--train_ip_adapter) goes on from the adapter stage 1 trained."""
    stage1 = Path(cfg.output_dir) / "stage1" / "final"
    if cfg.stage != 2 or cfg.pretrained_inverter or not (stage1 / "config.json").is_file():
        return
    cfg.pretrained_inverter = str(stage1)
    adapter = recorded_adapter(stage1)
    if cfg.train_ip_adapter and adapter and not (cfg.ip_adapter or cfg.ip_adapter_weight_name):
        cfg.ip_adapter = adapter["weights"]
        cfg.image_encoder_path = cfg.image_encoder_path or adapter["image_encoder"]


def train_inverter(cfg: InverterConfig) -> dict:
    """Run (or resume) one stage; returns a summary with the final UNet folder."""
    continue_from_stage1(cfg)
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    name = f"stage{cfg.stage}"
    if cfg.train_data_manifest:
        read_manifest(cfg.train_data_manifest)  # a bad manifest fails before the models load
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, project_dir=out,
                                   logging_dir=cfg.logging_dir, flag="--mixed_precision")
    loop = TrainLoop(out / name, cfg.max_train_steps, checkpoint_every=cfg.checkpointing_steps,
                     eval_every=cfg.validation_steps, title=f"inverter {name}", accelerator=accelerator,
                     speed=training_speed(cfg))
    final = loop.dir / "final"
    if loop.done:
        summary = json.loads((loop.dir / "done.json").read_text())
        return {**summary, "final": str(final), "resumed_done": True}
    with atomic_open(out / f"{name}.config.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(asdict(cfg), indent=2, default=str))
    m = Models(cfg, need_teacher=cfg.stage == 2, loop=loop)
    data = Data(cfg.train_data_manifest, cfg.resolution or m.size, cfg.partial_captions if cfg.stage == 2 else 0.0)
    if data.size != m.size:
        raise UserError(f"--resolution {data.size}: this generator works at {m.size}")
    lpips = None
    if cfg.stage == 2 and cfg.lpips_weights:
        from atelier.evaluate.metrics import load_lpips_vgg

        lpips = loop.frozen(load_lpips_vgg(cfg.lpips_weights))
    trained_branch = {"ip_adapter": m.branch.module} if m.branch is not None and m.branch.trained else {}
    params = [p for module in (m.inverter, *trained_branch.values()) for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    (inverter,), opt = loop.prepare({"inverter": m.inverter}, opt, extra=trained_branch)
    loop.speed_up(m.inverter, m.gen.unet, None if m.teacher is None else m.teacher.unet)
    m.inv = with_unet(m.den, inverter)
    m.inv.dtype = torch.float32
    val_captions, val_x = Data(None, 64).batch(987_654, cfg.validation_images) if data.items is None else \
        data.batch(987_654, cfg.validation_images)
    if not loop.log:
        with loop.autocast():
            loop.log.append({"step": loop.step, "inversion_psnr": round(inversion_psnr(m, val_captions, val_x), 2)})

    def step(i, micro):
        seed = (cfg.seed * 1_000_003 + cfg.stage * 7919 + i * 64 + micro) % 2**31
        captions, x = data.batch(seed, cfg.train_batch_size, images=cfg.stage == 2)
        if cfg.stage == 1:
            return stage1_loss(m, cfg, captions, seed)
        return stage2_loss(m, cfg, captions, x, seed, lpips)

    def evaluate(parts):
        psnr = inversion_psnr(m, val_captions, val_x)
        return {"inversion_psnr": round(psnr, 2), **{k: round(v, 5) for k, v in parts.items()}}

    loop.run(step, lr=lambda i: lr_at(i, cfg.max_train_steps, cfg.learning_rate, warmup=min(100, cfg.max_train_steps // 10)),
             clip=cfg.max_grad_norm or None, evaluate=evaluate, window=20)
    unet = loop.unwrap(inverter).eval()
    unet.save_pretrained(final, safe_serialization=True)
    if trained_branch:
        m.branch.save(final)
    write_info(final, cfg, None if m.branch is None else m.branch.record())
    with loop.autocast():
        psnr = inversion_psnr(m, val_captions, val_x)
    loop.finish({"inversion_psnr": round(psnr, 2), "final_loss": float(np.mean(loop.losses[-20:])), "log": loop.log})
    summary = {"stage": cfg.stage, "steps": loop.step, "wall_time_s": round(loop.seconds, 1),
               "inversion_psnr": round(psnr, 2), "final": str(final), "loss_plot": str(loop.dir / "loss.png")}
    if m.branch is not None:
        summary["ip_adapter"] = recorded_adapter(final)["weights"]
    return summary


def _portable_path(value):
    """An absolute path as its last two parts: the record says what was used, not where this machine kept it."""
    if isinstance(value, str) and Path(value).is_absolute():
        return "/".join(Path(value).parts[-2:])
    return value


def write_info(folder: Path, cfg: InverterConfig, ip_adapter: dict | None = None) -> None:
    trained_with = {k: _portable_path(v) for k, v in asdict(cfg).items() if k != "output_dir"}
    info = {"kind": "inverter", "method": "SwiftEdit inversion network", "generator": cfg.pretrained_sb_generator,
            "timestep": 999, "stage": cfg.stage, "trained_with": trained_with}
    if ip_adapter is not None:
        info["ip_adapter"] = ip_adapter  # the image branch G ran with: `atelier edit --method one-step` loads it
    (Path(folder) / "atelier.json").write_text(json.dumps(info, indent=2, default=str))


def export_inverter(folder, out) -> str:
    """Copy a trained inverter as an fp16 safetensors UNet folder (atomically replacing `out`)."""
    from diffusers import UNet2DConditionModel

    from atelier.models import save_model_folder

    folder, out = Path(folder), Path(out)
    unet = UNet2DConditionModel.from_pretrained(folder)
    files = {name: (folder / name).read_bytes() for name in ("atelier.json", ADAPTER_FILE) if (folder / name).is_file()}
    return str(save_model_folder(unet, out, files=files or None))

