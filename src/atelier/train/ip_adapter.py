"""Training an IP-Adapter (Ye et al. 2023) for any base model, with the recipe of the reference training
script (tencent-ailab/IP-Adapter `tutorial_train.py`):

  * the base model, its text encoder, VAE and the CLIP image encoder are frozen; only the image
    projection (Linear to 4 tokens + LayerNorm) and the new `to_k_ip` / `to_v_ip` of every
    cross-attention layer train, the latter initialised from that layer's `to_k` / `to_v`;
  * each sample drops the image with probability 0.05 (the zero embedding for a base adapter; the
    hidden states of a zero image for one that reads hidden states, as diffusers' pipelines make the
    unconditional image prompt), the text ("") with 0.05, both
    with 0.05, so image-only, text-only and unconditional guidance all work. Where captions describe
    the image completely (the toy world's do) the image adds nothing while the text is there, so the
    adapter only learns from the text-dropped samples: raise --text_drop_rate there (the toy stage: 0.5);
  * the loss is the model's own diffusion loss (epsilon or v-prediction) at uniform timesteps, or, for a
    few-step distilled base, at the timesteps it samples at (--train_timesteps; SD-Turbo's 1-4 steps: 999,
    749, 499, 249), where alone its predictions are what the adapter will see.

The adapter lives in the UNet through diffusers' `IPAdapterAttnProcessor2_0` and image projection (loaded
with `_load_ip_adapter_weights`, as `load_ip_adapter` does), so what trains is exactly what inference
runs. Checkpoints hold the adapter in the h94 layout; the result is a folder that `atelier ... --ip-adapter
OUT/final` and diffusers' `load_ip_adapter(OUT/final, subfolder="", weight_name="ip-adapter.safetensors")`
load: `ip-adapter.safetensors` + `image_encoder/`.

Data: the script's JSON (a list of {"image_file": ..., "text": ...} under --data_root_path), or, for the
toy-world models when none is given, rendered toy scenes and their captions.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.io import atomic_open
from atelier.core.prediction import model_target
from atelier.errors import UserError
from atelier.speed.cli import training_speed
from atelier.train.loop import TrainLoop, lr_at, make_accelerator
from atelier.train.options import check_all
from atelier.train.weighting import check_timesteps, parse_timesteps, training_timesteps

WEIGHT_NAME = "ip-adapter.safetensors"
DROP = 0.05  # the script's rate for dropping the image, the text, and both


@dataclass
class IPAdapterConfig:
    pretrained_model_name_or_path: str = "toyworld"
    image_encoder_path: str | None = None  # default for the toy-world models: toyworld-clip
    pretrained_ip_adapter_path: str | None = None  # continue from an adapter (file or folder)
    data_json_file: str | None = None
    data_root_path: str = ""
    output_dir: str = "runs/ip-adapter"
    logging_dir: str = "logs"
    resolution: int | None = None  # default: the model's native size
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 2000
    checkpointing_steps: int = 100
    validation_steps: int = 500
    num_validation_images: int = 8
    image_proj: str = "base"  # "base" (4 tokens from the image embedding), "plus" (the Resampler) or "full"
    num_tokens: int = 16  # "plus": the Resampler's queries, the image tokens the UNet sees
    # A few-step distilled base (Turbo, LCM) is only ever run at its sampling timesteps: train there too.
    train_timesteps: tuple[int, ...] | None = None  # None: uniform over all, as the script does
    train_timesteps_share: float = 1.0  # the share of samples drawn from train_timesteps, the rest uniform
    image_drop_rate: float = DROP
    text_drop_rate: float = DROP
    both_drop_rate: float = DROP
    mixed_precision: str = "no"
    seed: int = 0
    threads: int | None = None
    # speed: applied to the base model's UNet (frozen, holding the adapter), the module the loop runs
    compile: str = "off"  # --compile off, regional, full
    compile_mode: str = "default"  # --compile-mode default, reduce-overhead, max-autotune (CUDA)
    compile_backend: str | None = None  # torch.compile backend (None: inductor)
    channels_last: bool = False

    def check(self) -> None:
        at_least_1 = dict(integer=True, minimum=1)
        rules = {name: at_least_1 for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                                              "checkpointing_steps", "validation_steps", "num_validation_images",
                                              "threads", "num_tokens")}
        rules.update(learning_rate=dict(above=0), weight_decay=dict(minimum=0), seed=dict(integer=True, minimum=0),
                     resolution=dict(integer=True, minimum=8),
                     **{k: dict(minimum=0, maximum=1)
                        for k in ("image_drop_rate", "text_drop_rate", "both_drop_rate", "train_timesteps_share")})
        check_all(lambda name: f"--{name}", asdict(self), rules)
        if self.image_drop_rate + self.text_drop_rate + self.both_drop_rate > 1:
            raise UserError("--image_drop_rate + --text_drop_rate + --both_drop_rate must be at most 1")
        if self.train_timesteps is not None:
            self.train_timesteps = parse_timesteps(self.train_timesteps)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        from atelier.image_prompts.adapters import NEW_KINDS

        if self.image_proj not in NEW_KINDS:
            raise UserError(f"--image_proj must be base, plus or full, not {self.image_proj!r}")


# ---------------------------------------------------------------- data

def read_data_json(path, root: str = "") -> list[dict]:
    """The training script's data file: a JSON list of {"image_file": ..., "text": ...} (paths relative
    to `root`, else to the file's folder); JSON Lines of the same objects are read too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data_json_file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: neither a JSON list nor JSON Lines ({exc.msg})") from None
    base = Path(root) if root else path.parent
    out = []
    for number, item in enumerate(items if isinstance(items, list) else [], 1):
        image = item.get("image_file") or item.get("image") if isinstance(item, dict) else None
        if not isinstance(image, str):
            raise UserError(f"{path}: item {number} has no \"image_file\"")
        out.append({"image": str(Path(image) if Path(image).is_absolute() else base / image),
                    "caption": str(item.get("text") or item.get("caption") or "")})
    if not out:
        raise UserError(f"{path} lists no images")
    return out


class Data:
    """Captions and images in [-1, 1] for a step's seed: from the data file, or rendered toy scenes."""

    def __init__(self, items, size: int):
        self.items, self.size = items, size
        if items is None and size != 64:
            raise UserError(f"rendered toy scenes are 64x64, but the model works at {size}: give --data_json_file")

    def batch(self, seed: int, n: int):
        if self.items is None:
            from atelier.train.toyworld import scene_batch

            _, captions, x = scene_batch(seed, n)
            return captions, x
        from atelier.train.inverter import _load_image

        rng = random.Random(seed)
        picks = [self.items[rng.randrange(len(self.items))] for _ in range(n)]
        return [p["caption"] for p in picks], torch.stack([_load_image(p["image"], self.size) for p in picks])


# ---------------------------------------------------------------- models

def default_image_encoder(model: str) -> str | None:
    """The built-in image encoder for a built-in model (its toyworld-clip), else None."""
    from atelier.models.loader import BUILTIN_DIR, classify_source

    try:
        kind, _ = classify_source(model)
    except UserError:
        return None
    folder = BUILTIN_DIR / "toyworld-clip"
    return str(folder) if kind == "builtin" and (folder / "config.json").is_file() else None


class ImageEncoder(torch.nn.Module):
    """A frozen CLIPVisionModelWithProjection taking images in [-1, 1]: resized (bicubic, antialiased)
    to its size and normalised with its processor's statistics, as CLIPImageProcessor does for square
    images."""

    def __init__(self, folder, hidden_states: bool = False):
        super().__init__()
        from atelier.image_prompts.adapters import load_image_encoder

        self.hidden_states = hidden_states  # the penultimate hidden states (full / Plus), else the image embedding
        self.model, processor = load_image_encoder(Path(folder), device="cpu", dtype=torch.float32)
        self.size = self.model.config.image_size
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        return self.embed(((x - self.mean) / self.std).to(self.model.dtype))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.hidden_states:
            return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.model(pixel_values=pixel_values).image_embeds

    @torch.no_grad()
    def null(self, like: torch.Tensor) -> torch.Tensor:
        """The "no image" embedding, as diffusers' `encode_image` makes the unconditional one: zeros for
        the pooled embedding, the hidden states of all-zero pixel values otherwise (the training scripts
        zero the image for Plus adapters, the embedding for base ones)."""
        if not self.hidden_states:
            return torch.zeros_like(like)
        zeros = torch.zeros(1, 3, self.size, self.size, device=self.mean.device, dtype=self.model.dtype)
        return self.embed(zeros).to(like.dtype).expand_as(like)


class AdapterTrainee(torch.nn.Module):
    """The UNet holding the adapter. Its forward is the UNet call (what a distributed wrapper must see);
    its state dict is the adapter alone, in the h94 layout."""

    def __init__(self, den):
        super().__init__()
        self.unet = den.unet
        self._den = [den]  # a plain reference, not a submodule
        self.unet.requires_grad_(False)
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    def adapter_parameters(self) -> list:
        from atelier.image_prompts.adapters import ip_attention_processors

        params = list(self.unet.encoder_hid_proj.parameters())
        for processor in ip_attention_processors(self.unet):
            params += list(processor.parameters())
        return params

    def forward(self, x_t, t, hidden, pooled, image_embeds):
        """`image_embeds` (B, D) or (B, tokens, D): one reference per sample (diffusers wants a references axis)."""
        return self._den[0].output(x_t, t, hidden, pooled, image_embeds=[image_embeds[:, None]])

    def state_dict(self, *args, **kwargs):
        from atelier.image_prompts.adapters import adapter_state_dict

        return {k: v.detach().clone() for k, v in adapter_state_dict(self.unet).items()}

    def load_state_dict(self, state, strict=True):
        from atelier.image_prompts.adapters import adapter_state_dict

        own = adapter_state_dict(self.unet)
        missing = set(own) - set(state)
        if strict and missing:
            raise KeyError(f"adapter checkpoint lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        return torch.nn.modules.module._IncompatibleKeys([], [])


def install_adapter(unet, state: dict) -> None:
    """Put an adapter ({"image_proj", "ip_adapter"} groups) into `unet` through diffusers, in fp32."""
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    unet.encoder_hid_proj.float()
    from atelier.image_prompts.adapters import ip_attention_processors

    for processor in ip_attention_processors(unet):
        processor.float()


def starting_adapter(cfg: IPAdapterConfig, unet, embed_dim: int) -> dict:
    from atelier.image_prompts.adapters import adapter_kind, new_adapter_state, read_adapter

    if not cfg.pretrained_ip_adapter_path:
        return new_adapter_state(unet, embed_dim, kind=cfg.image_proj, seed=cfg.seed, tokens=cfg.num_tokens)
    path = Path(cfg.pretrained_ip_adapter_path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    state = read_adapter(path)
    if adapter_kind(state, path.name)[0] != cfg.image_proj:
        raise UserError(f"{path.name} is a {adapter_kind(state, path.name)[0]} IP-Adapter: pass --image_proj "
                        f"{adapter_kind(state, path.name)[0]}")
    return state


# ---------------------------------------------------------------- validation

@torch.no_grad()
def variations(pipe, encoder: ImageEncoder, references: torch.Tensor, *, steps: int, guidance: float,
               seed: int) -> np.ndarray:
    """(N, H, W, 3) uint8: one image per reference from the reference alone (empty prompt), guided
    against the "no image" embedding as diffusers' pipelines guide (ImageEncoder.null)."""
    pipe.set_ip_adapter_scale(1.0)
    images = []
    for k, reference in enumerate(references):
        embeds = encoder(reference[None].to(encoder.mean.device)).to(pipe.unet.dtype)
        if guidance > 1:
            embeds = torch.cat([encoder.null(embeds), embeds])
        result = pipe(prompt="", num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      ip_adapter_image_embeds=[embeds[:, None]], generator=torch.Generator().manual_seed(seed + k))
        images.append((result.images[0] * 255).round().astype(np.uint8))
    return np.stack(images)


def write_grid(path: Path, references: np.ndarray, samples: np.ndarray) -> None:
    """References on the top row, their variations below, as one PNG."""
    from PIL import Image

    top, bottom = np.concatenate(list(references), axis=1), np.concatenate(list(samples), axis=1)
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.concatenate([top, bottom], axis=0)).save(f, format="PNG")


def toy_variation_accuracy(references_scenes, samples: np.ndarray) -> dict:
    """The contract's image-variation score: the judge finds the reference's multiset of (shape,
    colour, size) in the generated image (cells too, reported apart)."""
    from atelier.toyworld.judge import detect

    right = cells = 0
    for scene, image in zip(references_scenes, samples):
        found = detect(image)
        want = sorted((o.shape, o.colour, o.size) for o in scene.objects)
        right += sorted((o.shape, o.colour, o.size) for o in found) == want
        cells += sorted(o.key() for o in found) == sorted(o.key() for o in scene.objects)
    n = max(1, len(samples))
    return {"variation_objects": round(right / n, 4), "variation_cells": round(cells / n, 4)}


# ---------------------------------------------------------------- the loop

def _model_defaults(model: str) -> dict:
    from atelier.models.loader import resolve_model_path

    info = Path(resolve_model_path(model)) / "atelier.json"
    return json.loads(info.read_text(encoding="utf-8")).get("defaults", {}) if info.is_file() else {}


def train_ip_adapter(cfg: IPAdapterConfig) -> dict:
    """Train (or resume) an adapter; returns a summary with the final folder."""
    from atelier.core.denoiser import Denoiser
    from atelier.models import load_pipeline

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    items = read_data_json(cfg.data_json_file, cfg.data_root_path) if cfg.data_json_file else None
    encoder_path = cfg.image_encoder_path or default_image_encoder(cfg.pretrained_model_name_or_path)
    if encoder_path is None:
        raise UserError("--image_encoder_path is required (the CLIP vision model folder the adapter reads, e.g. "
                        "h94/IP-Adapter's models/image_encoder)")
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, project_dir=out,
                                   logging_dir=cfg.logging_dir, flag="--mixed_precision")
    loop = TrainLoop(out, cfg.max_train_steps, checkpoint_every=cfg.checkpointing_steps,
                     eval_every=cfg.validation_steps, name="ip-adapter", title="IP-Adapter", accelerator=accelerator,
                     speed=training_speed(cfg))
    final = out / "final"
    if loop.done:
        return {**json.loads((out / "done.json").read_text()), "final": str(final), "resumed_done": True}
    with atomic_open(out / "config.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(asdict(cfg), indent=2, default=str))

    pipe = load_pipeline(cfg.pretrained_model_name_or_path, device="cpu", dtype=torch.float32)
    encoder = loop.frozen(ImageEncoder(encoder_path, hidden_states=cfg.image_proj != "base"))
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name != "unet":
            loop.frozen(module)
    pipe.unet.requires_grad_(False).to(loop.device, loop.weight_dtype)
    width = encoder.model.config.projection_dim if cfg.image_proj == "base" else encoder.model.config.hidden_size
    install_adapter(pipe.unet, starting_adapter(cfg, pipe.unet, width))
    den = Denoiser(pipe, cache_size=4096)
    den.device, den.dtype = loop.device, loop.weight_dtype
    trainee = AdapterTrainee(den)
    size = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = Data(items, size)
    opt = torch.optim.AdamW(trainee.adapter_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    (model,), opt = loop.prepare({"adapter": trainee}, opt)
    loop.speed_up(pipe.unet)
    scheduler_t = pipe.scheduler.config.num_train_timesteps
    toy = items is None
    defaults = _model_defaults(cfg.pretrained_model_name_or_path)
    check_timesteps(cfg.train_timesteps, scheduler_t)

    def step(i, micro):
        seed = (cfg.seed * 1_000_003 + i * 64 + micro) % 2**31
        captions, x = data.batch(seed, cfg.train_batch_size)
        g = torch.Generator().manual_seed(seed)
        r = torch.rand(len(captions), generator=g)
        image_only, text_only = cfg.image_drop_rate, cfg.image_drop_rate + cfg.text_drop_rate
        both = text_only + cfg.both_drop_rate
        drop_image = (r < image_only) | ((r >= text_only) & (r < both))
        drop_text = (r >= image_only) & (r < both)
        captions = ["" if d else c for c, d in zip(captions, drop_text.tolist())]
        x = x.to(loop.device)
        with torch.no_grad():
            z = den.encode_image(x)
            image_embeds = encoder(x)
            dropped = drop_image.to(loop.device).view(-1, *[1] * (image_embeds.ndim - 1))
            image_embeds = torch.where(dropped, encoder.null(image_embeds), image_embeds)
            hidden, pooled = den.conditioning(captions)
        noise = torch.randn(z.shape, generator=g).to(z)
        t = training_timesteps(len(z), scheduler_t, g, cfg.train_timesteps, cfg.train_timesteps_share).to(loop.device)
        alpha, beta = den.coefficients(t)
        x_t = alpha * z + beta * noise
        pred = model(x_t, t, hidden, pooled, image_embeds.to(den.dtype))
        target = model_target(z.float(), noise.float(), alpha.float(), beta.float(), den.prediction_type)
        return F.mse_loss(pred.float(), target)

    val_scenes, val_refs = _validation_references(data, cfg.num_validation_images)

    def evaluate(parts):
        samples = variations(pipe, encoder, val_refs, steps=int(defaults.get("steps", 20)),
                             guidance=float(defaults.get("guidance_scale", 5.0)), seed=cfg.seed)
        refs_uint8 = ((val_refs.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        (out / "validation").mkdir(exist_ok=True)
        write_grid(out / "validation" / f"step_{loop.step:06d}.png", refs_uint8, samples)
        return toy_variation_accuracy(val_scenes, samples) if toy and val_scenes else {}

    loop.run(step, lr=lambda i: lr_at(i, cfg.max_train_steps, cfg.learning_rate, warmup=min(100, cfg.max_train_steps // 10)),
             clip=1.0, evaluate=evaluate, window=20)
    folder = export_adapter(loop.unwrap(model), encoder_path, final, cfg)
    summary = loop.finish({"final_loss": float(np.mean(loop.losses[-50:])), "log": loop.log})
    return {**summary, "final": str(folder), "loss_plot": str(out / "loss.png")}


def _validation_references(data: Data, n: int):
    """Held-out references: rendered toy scenes (with their scenes, for the judge), else the data's."""
    if data.items is None:
        from atelier.train.toyworld import scene_batch

        scenes, _, x = scene_batch(987_654_321, n)
        return scenes, x
    return None, data.batch(987_654_321, n)[1]


def export_adapter(trainee: AdapterTrainee, encoder_path, folder: Path, cfg: IPAdapterConfig | None = None,
                   dtype=torch.float16) -> Path:
    """`folder/ip-adapter.safetensors` (h94 flat keys) and `folder/image_encoder/` (a copy of the encoder
    folder), written atomically: a folder `--ip-adapter` and diffusers' load_ip_adapter read."""
    from safetensors.torch import save_file

    from atelier.core.io import atomic_dir
    from atelier.models.save import make_portable
    from atelier.train.inverter import _portable_path

    state = {k: v.to(dtype).contiguous() for k, v in trainee.state_dict().items()}
    with atomic_dir(Path(folder)) as tmp:
        save_file(state, str(tmp / WEIGHT_NAME), metadata={"format": "pt"})
        write_image_encoder(Path(encoder_path), tmp / "image_encoder")
        if cfg is not None:
            trained_with = {k: _portable_path(v) for k, v in asdict(cfg).items() if k != "output_dir"}
            record = {"kind": "ip-adapter", "base_model": _portable_path(cfg.pretrained_model_name_or_path),
                      "image_proj": cfg.image_proj, "trained_with": trained_with}
            started_from = _record_of(cfg.pretrained_ip_adapter_path)
            if started_from is not None:
                record["fine_tuned_from"] = started_from  # the adapter this run continued, with its own history
            (tmp / "atelier.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        make_portable(tmp / "image_encoder")
    return Path(folder)


def write_image_encoder(source: Path, folder: Path) -> None:
    """The adapter's `image_encoder/`: a vision-model folder (h94's) copied as it is; of a whole CLIP
    (a text tower too, e.g. toyworld-clip) the vision tower and its projection alone, as IP-Adapter
    folders hold it, so that loading it reads every weight and nothing else."""
    try:
        whole_clip = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        whole_clip = False
    if not whole_clip:
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt",
                                                                      "special_tokens_map.json"))
        return
    from atelier.image_prompts.adapters import load_image_encoder

    vision, processor = load_image_encoder(source, device="cpu", dtype=None)
    vision.save_pretrained(folder)
    processor.save_pretrained(folder)


def _record_of(adapter) -> dict | None:
    """The atelier.json of an adapter folder (or of the folder holding an adapter file), if it has one."""
    if not adapter:
        return None
    path = Path(adapter)
    info = (path if path.is_dir() else path.parent) / "atelier.json"
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
