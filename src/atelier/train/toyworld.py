"""Training the built-in toy-world models on this CPU: `toyworld` and `toyworld-turbo`.

Four stages, each resumable from its last checkpoint (kill it, run the same command again):
1. vae     AutoencoderKL 64×64×3 → 16×16×4, trained on random crops, then on full scenes.
2. text    CLIPTextModel over atelier's word tokenizer, pretrained with an auxiliary head: the token
           that ends each object phrase must name that object's shape, colour, size and cell. This
           is what makes position words usable by the UNet (trained jointly from scratch, they
           were ignored). Frozen afterwards.
3. unet    UNet2DConditionModel, v-prediction, cross-attention at latent/2 and latent/4, caption
           dropout for classifier-free guidance, min-SNR loss weighting, EMA weights.
4. turbo   the 1–4 step model: the UNet initialised from `unet`, trained with guidance off at use.
           At t = 999 it learns where the guided teacher's 20-step trajectory from that noise ends
           (pairs precomputed once); at the other trailing timesteps (and random ones, for img2img)
           it learns the real x0 and the guided teacher's x0 there.
Then `export` writes both as diffusers folders (fp16 safetensors) with an `atelier.json` of defaults.
Two more stages give the toy world eyes, starting from the exported `toyworld`:
5. clip    `toyworld-clip`, a CLIPModel trained contrastively on scenes and captions (train/toyworld_clip.py).
6. ip      `toyworld-ip`, an IP-Adapter for `toyworld` over toyworld-clip's vision tower
           (train/ip_adapter.py: the IP-Adapter training script's recipe), then `toyworld-turbo-ip`:
           it continued on `toyworld-turbo` at the turbo's sampling timesteps (a distilled model is only
           run there; trained at uniform timesteps it learns the wrong map). Each model names its own
           adapter in its atelier.json, so `--ip-image` needs no other option.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atelier.core.io import atomic_open
from atelier.core.prediction import model_target, x0_and_eps
from atelier.toyworld.render import render
from atelier.toyworld.scene import BASE_COLOURS, BASE_SHAPES, CELLS, SIZES, sample_scene, vocabulary
from atelier.train.checkpoint import load_state, save_state
from atelier.train.loop import EmaState as _EmaHolder
from atelier.train.loop import TrainLoop, lr_at
from atelier.train.options import check_all

MAX_TOKENS = 32

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    mid_block_add_attention=False,
)
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", projection_dim=128,
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
)
# A TAESD-style tiny autoencoder over the same latent space (StreamDiffusion's fast VAE): plain
# conv blocks, no attention, no normalisation; latents are the diffusion model's (scaled) latents.
TAESD_CONFIG = dict(
    encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(32, 32, 32),
    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4, scaling_factor=1.0,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
)
TURBO_TIMESTEPS = (999, 749, 499, 249)
# Settings of how fast the UNets run, not of what they learn: free to change when a run resumes.
SPEED_FIELDS = ("compile", "compile_mode", "compile_backend", "channels_last")


@dataclass
class ToyTrainConfig:
    out_dir: str = "runs/toyworld"
    seed: int = 0
    threads: int = 2
    # vae
    vae_steps: int = 2400
    vae_full_steps: int = 300  # the last steps on full 64×64 scenes instead of 32×32 crops
    vae_batch: int = 32
    vae_lr: float = 1e-3
    # text encoder
    text_steps: int = 1500
    text_batch: int = 128
    text_lr: float = 1e-3
    # unet
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    guidance: float = 3.0  # default CFG of `toyworld`, also the teacher's guidance in distillation
    # turbo
    turbo_steps: int = 2000
    turbo_batch: int = 32
    turbo_lr: float = 1e-4
    turbo_teacher_weight: float = 0.5
    turbo_random_t: float = 0.25  # share of samples at uniform random t (keeps img2img strengths)
    turbo_pairs: int = 4096  # teacher ODE trajectories (noise -> guided 20-step sample) for the 1-step map
    turbo_pair_share: float = 0.5  # share of each batch drawn from those pairs, at t = 999
    # tiny autoencoder (distilled from the VAE)
    taesd_steps: int = 2400
    taesd_batch: int = 32
    taesd_lr: float = 1e-3
    taesd_pool: int = 8192  # the decoder's (latent, VAE image) pairs: encoded scenes and turbo-denoised ones
    # toyworld-clip and toyworld-ip
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    ip_steps: int = 4000
    ip_batch: int = 16
    ip_lr: float = 1e-3
    ip_text_drop: float = 0.8  # toy captions say all the image does: the adapter learns where the text is gone
    ip_image_proj: str = "full"  # every CLIP token through an MLP: where each object is (base: 4 tokens)
    ip_turbo_steps: int = 8000  # toyworld-turbo-ip: toyworld-ip continued on the turbo at TURBO_TIMESTEPS (0: none)
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_images: int = 36  # judged generations per periodic evaluation
    eval_scenes: int = 500  # rendered scenes in the final VAE round-trip check
    n_objects_weights: tuple = (0.34, 0.33, 0.33)
    mixed_precision: str = "no"  # accelerate's: frozen models in fp16 / bf16, trained ones in fp32
    # speed (--compile, --compile-mode, --channels-last): the UNets of the unet, turbo and ip stages
    compile: str = "off"  # off, regional, full
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune (CUDA)
    compile_backend: str | None = None  # torch.compile backend (None: inductor)
    channels_last: bool = False
    extra: dict = field(default_factory=dict)

    def check(self, flag_of=lambda name: name) -> None:
        """UserError naming the first setting that is out of range (nan, inf, 0, negative)."""
        from atelier.errors import UserError

        whole, at_least_1 = dict(integer=True, minimum=0), dict(integer=True, minimum=1)
        share = dict(minimum=0, maximum=1)
        rules = {name: at_least_1 for name in ("vae_steps", "text_steps", "unet_steps", "turbo_steps", "taesd_steps",
                                              "clip_steps", "ip_steps", "clip_batch", "ip_batch",
                                              "vae_batch", "text_batch", "unet_batch", "turbo_batch", "taesd_batch", "taesd_pool",
                                              "checkpoint_every", "eval_every", "eval_images", "eval_scenes", "threads")}
        rules.update({name: dict(above=0) for name in ("vae_lr", "text_lr", "unet_lr", "turbo_lr", "taesd_lr", "clip_lr",
                                                       "ip_lr", "min_snr_gamma")})
        rules.update(seed=whole, vae_full_steps=whole, turbo_pairs=whole, ip_turbo_steps=whole, caption_dropout=share, turbo_random_t=share,
                     ema_decay=dict(minimum=0, below=1), ip_text_drop=share, turbo_pair_share=dict(minimum=0, below=1),
                     guidance=dict(minimum=0), turbo_teacher_weight=dict(minimum=0))
        check_all(flag_of, asdict(self), rules)
        weights = self.n_objects_weights
        if not (isinstance(weights, (list, tuple)) and len(weights) == 3):
            raise UserError(f"{flag_of('n_objects_weights')} must be three weights (1, 2, 3 objects), not {weights!r}")
        for w in weights:
            check_all(lambda _: flag_of("n_objects_weights"), {"w": w}, {"w": dict(minimum=0)})
        if sum(weights) <= 0:
            raise UserError(f"{flag_of('n_objects_weights')} must have a positive weight, not {weights!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"{flag_of('mixed_precision')} must be no, fp16 or bf16, not {self.mixed_precision!r}")


# ---------------------------------------------------------------- data

def scene_batch(seed: int, batch: int, weights=(1 / 3, 1 / 3, 1 / 3)):
    """Seeded scenes of base shapes and colours, their renders in [-1, 1] and captions."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, rng.choices((1, 2, 3), weights)[0], BASE_SHAPES, tuple(BASE_COLOURS)) for _ in range(batch)]
    captions = [s.caption(rng) for s in scenes]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return scenes, captions, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def step_seed(cfg: ToyTrainConfig, stage: str, step: int) -> int:
    return (cfg.seed * 1_000_003 + sum(map(ord, stage)) * 7919 + step) % (2**31)


# ---------------------------------------------------------------- components

def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from atelier.models.tokenizers import write_word_tokenizer

    write_word_tokenizer(vocabulary(), folder, model_max_length=MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(str(folder))


def make_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------- shared loop pieces

def stage_loop(cfg: ToyTrainConfig, name: str, total: int) -> TrainLoop:
    from atelier.speed.cli import training_speed

    return TrainLoop(Path(cfg.out_dir) / name, total, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                     title=f"toyworld {name}", mixed_precision=cfg.mixed_precision, speed=training_speed(cfg))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] on any device -> (N, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------- stage 1: VAE

def train_vae(cfg: ToyTrainConfig):
    from diffusers import AutoencoderKL

    loop = stage_loop(cfg, "vae", cfg.vae_steps)
    final = loop.dir / "final"
    if loop.done:
        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    loop.prepare({"vae": vae}, torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0))
    vae.train()

    def step(i, micro):
        seed = step_seed(cfg, "vae", i)
        _, _, x = scene_batch(seed, cfg.vae_batch, cfg.n_objects_weights)
        if i < cfg.vae_steps - cfg.vae_full_steps:
            g = torch.Generator().manual_seed(seed)
            r, c = (int(v) * 4 for v in torch.randint(0, 9, (2,), generator=g))
            x = x[:, :, r : r + 32, c : c + 32]
        x = x.to(loop.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(seed))
        recon = vae.decode(z).sample
        # L1 for sharp edges, MSE for colour precision, a whisper of KL to keep latents tame.
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    loop.run(step, lr=lambda i: lr_at(i, cfg.vae_steps, cfg.vae_lr), clip=1.0, window=20,
             evaluate=lambda parts: {"round_trip_judged_right": vae_round_trip_accuracy(vae, n=min(96, cfg.eval_scenes), seed=10_000)})
    vae = loop.unwrap(vae)
    vae.eval()
    # Scale latents to unit variance, as SD's scaling_factor does.
    with torch.no_grad():
        _, _, x = scene_batch(123_456, 256)
        std = float(vae.encode(x.to(loop.device)).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(final)
    acc = vae_round_trip_accuracy(vae, n=cfg.eval_scenes, seed=20_000)
    loop.finish({"latent_std": std, "round_trip_judged_right": acc})
    return vae


@torch.no_grad()
def vae_round_trip_accuracy(vae, n: int, seed: int) -> float:
    from atelier.toyworld.judge import judge

    was_training = vae.training
    vae.eval()
    right = 0
    for start in range(0, n, 32):
        scenes, _, x = scene_batch(seed + start, min(32, n - start))
        imgs = to_uint8(vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()).sample)
        right += sum(judge(img, s).match for img, s in zip(imgs, scenes))
    vae.train(was_training)
    return right / n


# ---------------------------------------------------------------- stage 2: text encoder

def phrase_targets(tokenizer, caption: str, scene_objects) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(token position, (shape, colour, size, cell) class ids) of each object phrase's last token."""
    ids = tokenizer(caption, add_special_tokens=True).input_ids
    phrases = [p for p in caption.replace(" and ", ", ").split(", ")]
    by_phrase = {o.phrase(): o for o in scene_objects}
    pos, out = 1, []
    for p in phrases:
        n = len(tokenizer(p, add_special_tokens=False).input_ids)
        pos += n
        o = by_phrase[p]
        out.append((pos - 1, (BASE_SHAPES.index(o.shape), list(BASE_COLOURS).index(o.colour), list(SIZES).index(o.size), list(CELLS).index(o.cell))))
        pos += 1  # the "," or "and" that follows
    assert pos - 1 <= len(ids)
    return out


class PhraseProbe(torch.nn.Module):
    """Linear heads reading an object's attributes off the token that ends its phrase."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear(hidden, n) for n in (len(BASE_SHAPES), len(BASE_COLOURS), len(SIZES), len(CELLS))
        )

    def forward(self, h):
        return [head(h) for head in self.heads]


def train_text_encoder(cfg: ToyTrainConfig, tokenizer):
    from transformers import CLIPTextModel

    loop = stage_loop(cfg, "text", cfg.text_steps)
    final = loop.dir / "final"
    if loop.done:
        return CLIPTextModel.from_pretrained(final)
    te = make_text_encoder(tokenizer, cfg.seed)
    probe = PhraseProbe(te.config.hidden_size)
    opt = torch.optim.AdamW(list(te.parameters()) + list(probe.parameters()), lr=cfg.text_lr, weight_decay=0.01)
    (te_model, probe_model), _ = loop.prepare({"text_encoder": te, "probe": probe}, opt)
    te.train()

    def step(i, micro):
        rng = random.Random(step_seed(cfg, "text", i))
        scenes = [sample_scene(rng, rng.randint(1, 3), BASE_SHAPES, tuple(BASE_COLOURS)) for _ in range(cfg.text_batch)]
        captions = [s.caption(rng) for s in scenes]
        h = te_model(tokenize(tokenizer, captions).to(loop.device)).last_hidden_state
        rows, cols, labels = [], [], []
        for b, (cap, s) in enumerate(zip(captions, scenes)):
            for pos, lab in phrase_targets(tokenizer, cap, s.objects):
                rows.append(b)
                cols.append(pos)
                labels.append(lab)
        logits = probe_model(h[torch.tensor(rows, device=loop.device), torch.tensor(cols, device=loop.device)])
        labels = torch.tensor(labels, device=loop.device)
        return sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))

    loop.run(step, lr=lambda i: lr_at(i, cfg.text_steps, cfg.text_lr), window=20)
    te = loop.unwrap(te)
    te.eval()
    te.save_pretrained(final)
    loop.finish({"final_loss": float(np.mean(loop.losses[-50:]))})
    return te


# ---------------------------------------------------------------- stage 3: UNet

def _alpha_beta(scheduler, t):
    ab = scheduler.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def v_target(scheduler, x0, noise, t):
    return model_target(x0, noise, *_alpha_beta(scheduler, t), "v_prediction")


def x0_from_v(scheduler, xt, v, t):
    return x0_and_eps(v, xt, *_alpha_beta(scheduler, t), "v_prediction")[0]


class LatentSource:
    """Encodes seeded scene batches with the frozen VAE (scaled latents) and captions with the frozen
    text encoder, dropping captions for classifier-free guidance; fp32 on the models' device."""

    def __init__(self, cfg, vae, te, tokenizer):
        self.cfg, self.vae, self.te, self.tok = cfg, vae, te, tokenizer
        self.empty = self.encode_ids(tokenize(tokenizer, [""]))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.te(ids.to(self.te.device)).last_hidden_state.float()

    @torch.no_grad()
    def batch(self, seed: int, size: int, dropout: float):
        scenes, captions, x = scene_batch(seed, size, self.cfg.n_objects_weights)
        rng = random.Random(seed + 1)
        captions = ["" if rng.random() < dropout else c for c in captions]
        z = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mode() * self.vae.config.scaling_factor
        return z.float(), self.encode_ids(tokenize(self.tok, captions)), captions


def train_unet(cfg: ToyTrainConfig, vae, te, tokenizer):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    loop = stage_loop(cfg, "unet", cfg.unet_steps)
    final = loop.dir / "final"
    if loop.done:
        return UNet2DConditionModel.from_pretrained(final)
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(loop.device)  # the EMA's shadow weights live beside it
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    vae, te = loop.frozen(vae, keep_original=True), loop.frozen(te, keep_original=True)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    source = LatentSource(cfg, vae, te, tokenizer)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    (model,), _ = loop.prepare({"unet": unet}, opt, extra={"ema": _EmaHolder(ema)})
    loop.speed_up(unet)
    snr = (scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)).to(loop.device)
    unet.train()

    def step(i, micro):
        seed = step_seed(cfg, "unet", i)
        z, cond, _ = source.batch(seed, cfg.unet_batch, cfg.caption_dropout)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(z.shape, generator=g).to(loop.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=g).to(loop.device)
        xt = scheduler.add_noise(z, noise, t)
        pred = model(xt, t, cond).sample
        # min-SNR-γ weighting for v-prediction (Hang et al. 2023): min(snr, γ) / (snr + 1)
        w = (torch.clamp(snr[t], max=cfg.min_snr_gamma) / (snr[t] + 1)).view(-1, 1, 1, 1)
        return (w * (pred - v_target(scheduler, z, noise, t)) ** 2).mean()

    def evaluate(parts):
        return quick_eval(_ema_copy(unet, ema), vae, te, tokenizer, steps=20, guidance=cfg.guidance, turbo=False, n=cfg.eval_images)

    loop.run(step, lr=lambda i: lr_at(i, cfg.unet_steps, cfg.unet_lr, warmup=200), clip=1.0,
             after_step=lambda: ema.step(unet.parameters()), evaluate=evaluate)
    unet = _ema_copy(loop.unwrap(unet), ema)
    unet.save_pretrained(final)
    loop.finish({"final_loss": float(np.mean(loop.losses[-100:])), "log": loop.log})
    return unet


def _ema_copy(unet, ema):
    from atelier.speed.compile import plain_copy

    model = plain_copy(unet)  # eager: a compiled module's copy would run the original's weights
    ema.copy_to(model.parameters())
    model.eval()
    return model


# ---------------------------------------------------------------- quick evaluation

EVAL_CAPTIONS_SEED = 777


@torch.no_grad()
def quick_eval(unet, vae, te, tokenizer, *, steps: int, guidance: float, turbo: bool, n: int = 36, seed: int = 0) -> dict:
    """Judge `n` images of held-out captions (one third each with 1, 2, 3 objects)."""
    from atelier.toyworld.judge import judge

    images, scenes = sample_images(unet, vae, te, tokenizer, n=n, steps=steps, guidance=guidance, turbo=turbo, seed=seed)
    verdicts = [judge(img, s) for img, s in zip(images, scenes)]
    return {
        "objects_right": round(float(np.mean([v.objects_right for v in verdicts])), 3),
        "match": round(float(np.mean([v.match for v in verdicts])), 3),
        "cells_right": round(float(np.mean([p["cell"] for v in verdicts for p in v.per_object])), 3),
    }


def held_out_scenes(n: int, seed: int = EVAL_CAPTIONS_SEED):
    rng = random.Random(seed)
    scenes = [sample_scene(rng, 1 + (i * 3) // n, BASE_SHAPES, tuple(BASE_COLOURS)) for i in range(n)]
    return scenes, [s.caption(rng) for s in scenes]


@torch.no_grad()
def sample_images(unet, vae, te, tokenizer, *, n, steps, guidance, turbo, seed=0):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    scenes, captions = held_out_scenes(n)
    if turbo:
        sched = EulerDiscreteScheduler(**{**SCHEDULER_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0})
    else:
        sched = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    cond = te(tokenize(tokenizer, captions).to(te.device)).last_hidden_state.to(unet.dtype)
    uncond = te(tokenize(tokenizer, [""] * n).to(te.device)).last_hidden_state.to(unet.dtype)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 4, 16, 16), generator=g).to(unet.device, unet.dtype)
    lat = sample_latents(unet, sched, noise, cond, uncond, steps=steps, guidance=guidance)
    x = vae.decode((lat / vae.config.scaling_factor).to(vae.dtype)).sample
    return list(to_uint8(x)), scenes


@torch.no_grad()
def sample_latents(unet, sched, noise, cond, uncond, *, steps: int, guidance: float):
    """Run `sched` for `steps` from unit `noise` with classifier-free guidance (off when ≤ 1)."""
    sched.set_timesteps(steps)
    lat = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(lat, t)
        if guidance > 1:
            out = unet(torch.cat([inp, inp]), t, torch.cat([uncond.expand_as(cond), cond])).sample
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        else:
            out = unet(inp, t, cond).sample
        lat = sched.step(out, t, lat).prev_sample
    return lat


# ---------------------------------------------------------------- stage 4: turbo

PAIR_CHUNK = 64


@torch.no_grad()
def teacher_pairs(cfg: ToyTrainConfig, teacher, source: "LatentSource", path: Path) -> dict:
    """(noise, caption ids, teacher sample) triples: where the guided teacher's 20-step DPM++ 2M
    trajectory from that noise ends. Regressing the 1-step map onto them (Luhman & Luhman 2021,
    "knowledge distillation" of the sampler) gives a sharp sample at t = 999; regressing onto real
    data or onto the teacher's one-step guided x0 there gives the mean colour, or an over-saturated
    one. Generated in chunks and saved as they go, so a killed run resumes here too."""
    from diffusers import DPMSolverMultistepScheduler

    state = load_state(path) or {"noise": [], "ids": [], "z": []}
    done = sum(len(x) for x in state["noise"])
    bar = tqdm(total=cfg.turbo_pairs, initial=done, desc="turbo pairs", dynamic_ncols=True)
    sched = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    while done < cfg.turbo_pairs:
        k = done // PAIR_CHUNK
        seed = step_seed(cfg, "pairs", k)
        _, captions, _ = scene_batch(seed, PAIR_CHUNK, cfg.n_objects_weights)
        rng = random.Random(seed + 1)
        captions = ["" if rng.random() < 0.05 else c for c in captions]
        ids = tokenize(source.tok, captions)
        noise = torch.randn((PAIR_CHUNK, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        cond = source.encode_ids(ids)
        z = sample_latents(teacher, sched, noise.to(source.empty.device), cond, source.empty, steps=20, guidance=cfg.guidance)
        state["noise"].append(noise)
        state["ids"].append(ids)
        state["z"].append(z.float().cpu())
        done += PAIR_CHUNK
        bar.update(PAIR_CHUNK)
        if (k + 1) % 8 == 0 or done >= cfg.turbo_pairs:
            save_state(path, state)
    bar.close()
    return {key: torch.cat(list(value))[: cfg.turbo_pairs] for key, value in state.items()}


def train_turbo(cfg: ToyTrainConfig, vae, te, tokenizer, teacher):
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel

    loop = stage_loop(cfg, "turbo", cfg.turbo_steps)
    final = loop.dir / "final"
    if loop.done:
        return UNet2DConditionModel.from_pretrained(final)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher = loop.frozen(teacher, keep_original=True)
    vae, te = loop.frozen(vae, keep_original=True), loop.frozen(te, keep_original=True)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    source = LatentSource(cfg, vae, te, tokenizer)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.turbo_lr, weight_decay=0.0)
    (model,), _ = loop.prepare({"unet": student}, opt)
    loop.speed_up(student, teacher)
    pairs = None
    if cfg.turbo_pairs:
        with loop.autocast():
            pairs = teacher_pairs(cfg, teacher, source, loop.dir / "pairs.safetensors")
    n_pairs = int(round(cfg.turbo_batch * cfg.turbo_pair_share)) if pairs is not None else 0
    fixed = torch.tensor(TURBO_TIMESTEPS[1:] if n_pairs else TURBO_TIMESTEPS)  # t = 999 belongs to the pairs
    dev = loop.device

    def step(i, micro):
        seed = step_seed(cfg, "turbo", i)
        g = torch.Generator().manual_seed(seed)
        # Real data at t < 999 (what img2img and the later steps of 2-4 step sampling see): the data
        # itself plus the guided teacher's x0 at the same point.
        z, cond, captions = source.batch(seed, cfg.turbo_batch - n_pairs, 0.05)
        noise = torch.randn(z.shape, generator=g).to(dev)
        b = z.shape[0]
        t = fixed[torch.randint(0, len(fixed), (b,), generator=g)]
        rand = torch.rand(b, generator=g) < cfg.turbo_random_t
        t = torch.where(rand, torch.randint(0, 1000, (b,), generator=g), t).to(dev)
        xt = scheduler.add_noise(z, noise, t)
        with torch.no_grad():
            out = teacher(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([source.empty.expand(b, -1, -1), cond])).sample.float()
            u, c = out.chunk(2)
            has_caption = torch.tensor([bool(cap) for cap in captions], device=dev).view(-1, 1, 1, 1)
            v_teacher = torch.where(has_caption, u + cfg.guidance * (c - u), c)
            x0_teacher = x0_from_v(scheduler, xt, v_teacher, t)
        x0_student = x0_from_v(scheduler, xt, model(xt, t, cond).sample, t)
        loss = F.mse_loss(x0_student, z) + cfg.turbo_teacher_weight * F.mse_loss(x0_student, x0_teacher)
        if n_pairs:
            # The 1-step map: from pure noise at t = 999 to where the teacher's trajectory ends.
            pick = torch.randint(0, len(pairs["z"]), (n_pairs,), generator=g)
            t_max = torch.full((n_pairs,), TURBO_TIMESTEPS[0], device=dev)
            pair_cond = source.encode_ids(pairs["ids"][pick])
            pair_noise = pairs["noise"][pick].to(dev)
            x0_pair = x0_from_v(scheduler, pair_noise, model(pair_noise, t_max, pair_cond).sample, t_max)
            loss = (b * loss + n_pairs * (1 + cfg.turbo_teacher_weight) * F.mse_loss(x0_pair, pairs["z"][pick].to(dev))) / cfg.turbo_batch
        return loss

    def evaluate(parts):
        student.eval()
        res = {f"{k}@{s}": v for s in (1, 4) for k, v in quick_eval(student, vae, te, tokenizer, steps=s, guidance=1.0, turbo=True, n=cfg.eval_images).items()}
        student.train()
        return res

    loop.run(step, lr=lambda i: lr_at(i, cfg.turbo_steps, cfg.turbo_lr, warmup=50), clip=1.0, evaluate=evaluate)
    student = loop.unwrap(student)
    student.eval()
    student.save_pretrained(final)
    loop.finish({"final_loss": float(np.mean(loop.losses[-100:])), "log": loop.log})
    return student


# ---------------------------------------------------------------- tiny autoencoder

TAESD_CHUNK = 64


@torch.no_grad()
def decoder_pool(cfg: ToyTrainConfig, teacher, path: Path, size: int, seed_name: str = "taesd-pool") -> dict:
    """What the tiny autoencoder learns from: renders `x` with the VAE's scaled latent means `z_enc`
    (the encoder's regression target), and latents `z_dec` with the VAE decoder's image of them
    `target` (the decoder's). Half of each chunk decodes the encoded scenes; the other half decodes
    what the stream decodes: the turbo model's one-step denoised latents of those scenes at a random t,
    for the scene's own caption or another scene's (an edit). A decoder taught on encoded scenes alone
    fails on those, off the encoder's manifold (remnants of the input, wrong colours). Generated in
    chunks and saved as they go, so a killed run resumes here too."""
    from diffusers import DDPMScheduler

    vae, unet = teacher.vae, teacher.unet
    source = LatentSource(cfg, vae, teacher.text_encoder, teacher.tokenizer)
    dev = unet.device
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    scale = vae.config.scaling_factor
    keys = ("x", "z_enc", "z_dec", "target")
    state = load_state(path) or {key: [] for key in keys}
    done = sum(len(x) for x in state["x"])
    bar = tqdm(total=size, initial=done, desc=seed_name, dynamic_ncols=True)
    half = TAESD_CHUNK // 2
    while done < size:
        k = done // TAESD_CHUNK
        seed = step_seed(cfg, seed_name, k)
        _, captions, x = scene_batch(seed, TAESD_CHUNK, cfg.n_objects_weights)
        rng, g = random.Random(seed + 1), torch.Generator().manual_seed(seed)
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float() * scale
        prompts = [c if rng.random() < 0.5 else rng.choice(captions) for c in captions[half:]]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (half,), generator=g).to(dev)
        xt = scheduler.add_noise(z[half:].to(dev), torch.randn(z[half:].shape, generator=g).to(dev), t)
        v = unet(xt.to(unet.dtype), t, source.encode_ids(tokenize(source.tok, prompts)).to(dev, unet.dtype)).sample.float()
        z_dec = torch.cat([z[:half].to(dev), x0_from_v(scheduler, xt, v, t)])
        target = vae.decode((z_dec / scale).to(vae.dtype)).sample.float().clamp(-1, 1)
        for key, value in zip(keys, (((x + 1) * 127.5).round().to(torch.uint8), z, z_dec, target.half())):
            state[key].append(value.cpu())
        done += TAESD_CHUNK
        bar.update(TAESD_CHUNK)
        if (k + 1) % 16 == 0 or done >= size:
            save_state(path, state)
    bar.close()
    return {key: torch.cat(list(value))[:size] for key, value in state.items()}


def load_teacher(folder: Path):
    """The exported toyworld-turbo pipeline (VAE, turbo UNet, text encoder, tokenizer) in fp32."""
    from atelier.errors import UserError
    from atelier.models import load_pipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"the taesd stage distils from the exported toyworld-turbo, and {folder} has none: "
                        "train the turbo stage first (or pass --weights-dir with the built-in models)")
    return load_pipeline(str(folder), device="cpu", dtype="fp32")


def train_taesd(cfg: ToyTrainConfig, teacher):
    """Distil an AutoencoderTiny from the toy VAE, as TAESD is distilled from SD's: the encoder
    regresses the VAE's scaled latent means; the decoder regresses the VAE decoder's images, on the
    latents of `decoder_pool` (the distillation target is the teacher's decoding, not the render, so
    the stream's frames look as they do with the VAE). `teacher`: toyworld-turbo's vae, unet,
    text_encoder and tokenizer (a pipeline or a namespace), or the exported toyworld-turbo's folder,
    loaded only when the stage has steps left."""
    from types import SimpleNamespace

    from diffusers import AutoencoderTiny

    loop = stage_loop(cfg, "taesd", cfg.taesd_steps)
    final = loop.dir / "final"
    if loop.done:
        return AutoencoderTiny.from_pretrained(final)
    if isinstance(teacher, (str, Path)):
        teacher = load_teacher(Path(teacher))
    teacher = SimpleNamespace(tokenizer=teacher.tokenizer, **{name: loop.frozen(getattr(teacher, name), keep_original=True)
                                                              for name in ("vae", "unet", "text_encoder")})
    pool = decoder_pool(cfg, teacher, loop.dir / "pool.safetensors", cfg.taesd_pool)
    held_out = decoder_pool(cfg, teacher, loop.dir / "held_out.safetensors", cfg.eval_scenes, "taesd-held-out")
    torch.manual_seed(cfg.seed + 5)
    tiny = AutoencoderTiny(**TAESD_CONFIG)
    loop.prepare({"taesd": tiny}, torch.optim.AdamW(tiny.parameters(), lr=cfg.taesd_lr, weight_decay=0.0))
    tiny.train()
    dev = loop.device

    def step(i, micro):
        pick = torch.randint(0, len(pool["x"]), (cfg.taesd_batch,), generator=torch.Generator().manual_seed(step_seed(cfg, "taesd", i)))
        x = pool["x"][pick].to(dev).float() / 127.5 - 1
        target = pool["target"][pick].to(dev).float()
        recon = tiny.decode(pool["z_dec"][pick].to(dev)).sample
        return F.mse_loss(tiny.encode(x).latents, pool["z_enc"][pick].to(dev)) + F.l1_loss(recon, target) + F.mse_loss(recon, target)

    def evaluate(parts):
        return {**tiny_round_trip_accuracy(tiny, teacher.vae, n=min(96, cfg.eval_scenes), seed=10_000),
                **decoder_agreement(tiny, held_out)}

    loop.run(step, lr=lambda i: lr_at(i, cfg.taesd_steps, cfg.taesd_lr), clip=1.0, window=20, evaluate=evaluate)
    tiny = loop.unwrap(tiny)
    tiny.eval()
    tiny.save_pretrained(final)
    loop.finish({**tiny_round_trip_accuracy(tiny, teacher.vae, n=cfg.eval_scenes, seed=20_000),
                 **decoder_agreement(tiny, held_out)})
    return tiny


@torch.no_grad()
def decoder_agreement(tiny, held_out: dict) -> dict:
    """How often the judge sees the same objects in the tiny decoder's image as in the VAE's, on
    held-out latents: encoded scenes, and the turbo model's denoised ones (`decoder_pool`'s halves)."""
    from atelier.toyworld.judge import detect

    was_training = tiny.training
    tiny.eval()
    same = []
    for start in range(0, len(held_out["z_dec"]), 32):
        z = held_out["z_dec"][start:start + 32].to(tiny.device, tiny.dtype)
        ours, theirs = to_uint8(tiny.decode(z).sample), to_uint8(held_out["target"][start:start + 32])
        same += [sorted(d.key() for d in detect(a)) == sorted(d.key() for d in detect(b)) for a, b in zip(ours, theirs)]
    tiny.train(was_training)
    rows = torch.arange(len(same)) % TAESD_CHUNK < TAESD_CHUNK // 2
    same = torch.tensor(same, dtype=torch.float32)
    return {"same_as_vae_encoded": round(float(same[rows].mean()), 4), "same_as_vae_denoised": round(float(same[~rows].mean()), 4)}


@torch.no_grad()
def tiny_round_trip_accuracy(tiny, vae, n: int, seed: int) -> dict:
    """Judge accuracy of rendered scenes through the tiny autoencoder, and through VAE encode +
    tiny decode (the stream's path when only the decoder is swapped)."""
    from atelier.toyworld.judge import judge

    was_training = tiny.training
    tiny.eval()
    right = {"tiny_round_trip": 0, "vae_encode_tiny_decode": 0}
    for start in range(0, n, 32):
        scenes, _, x = scene_batch(seed + start, min(32, n - start))
        x = x.to(tiny.device, tiny.dtype)
        z_vae = (vae.encode(x.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor).to(tiny.dtype)
        for key, z in (("tiny_round_trip", tiny.encode(x).latents), ("vae_encode_tiny_decode", z_vae)):
            imgs = to_uint8(tiny.decode(z).sample)
            right[key] += sum(judge(img, scene).match for img, scene in zip(imgs, scenes))
    tiny.train(was_training)
    return {k: round(v / n, 4) for k, v in right.items()}


def export_taesd(tiny, weights_dir: Path) -> str:
    from atelier.models import save_model_folder

    return str(save_model_folder(tiny, Path(weights_dir) / "toyworld-taesd"))


# ---------------------------------------------------------------- export

def export_pipelines(cfg: ToyTrainConfig, vae, te, tokenizer, unet, turbo, weights_dir: Path) -> dict:
    """Write `toyworld` and `toyworld-turbo` as diffusers folders, weights in fp16 safetensors."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from atelier.models import save_model_folder

    paths = {}
    specs = {
        "toyworld": (unet, DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
                     {"sampler": "DPM++ 2M", "schedule": "Automatic", "steps": 20, "guidance_scale": cfg.guidance}),
        "toyworld-turbo": (turbo, EulerDiscreteScheduler(**{**SCHEDULER_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0}),
                           {"sampler": "Euler", "schedule": "Automatic", "steps": 1, "guidance_scale": 0.0, "turbo": True}),
    }
    for name, (model, sched, defaults) in specs.items():
        if model is None:
            continue
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tokenizer, unet=model, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        trained_with = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}
        meta = {"name": name, "family": "toyworld", "defaults": defaults, "trained_with": trained_with,
                "resolution": 64, "description": "atelier's toy-world model (docs/toyworld.md), trained on CPU"}
        adapter = own_adapter(name, weights_dir)
        if adapter:
            meta["ip_adapter"] = adapter
        out = save_model_folder(pipe, Path(weights_dir) / name, files={"atelier.json": json.dumps(meta, indent=2, default=str)})
        paths[name] = str(out)
    return paths


def default_weights_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "toyworld" / "weights"


def train_all(cfg: ToyTrainConfig, stages=("vae", "text", "unet", "turbo", "taesd", "clip", "ip"),
              weights_dir: Path | None = None) -> dict:
    cfg.check()
    torch.set_num_threads(cfg.threads)
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_dir = Path(weights_dir or default_weights_dir())
    with atomic_open(out / "config.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(asdict(cfg), indent=2, default=str))
    paths = {}
    if any(s in stages for s in ("vae", "text", "unet", "turbo")):
        tokenizer = make_tokenizer(out / "tokenizer")
        vae = train_vae(cfg).eval().requires_grad_(False)
        te = train_text_encoder(cfg, tokenizer).eval().requires_grad_(False) if "text" in stages or "unet" in stages else None
        unet = train_unet(cfg, vae, te, tokenizer).eval().requires_grad_(False) if "unet" in stages else None
        turbo = train_turbo(cfg, vae, te, tokenizer, unet) if "turbo" in stages else None
        paths = export_pipelines(cfg, vae, te, tokenizer, unet, turbo, weights_dir) if unet is not None else {}
    if "taesd" in stages:
        paths["toyworld-taesd"] = export_taesd(train_taesd(cfg, weights_dir / "toyworld-turbo"), weights_dir)
    if "clip" in stages or "ip" in stages:
        paths.update(train_eyes(cfg, stages, weights_dir))
    stage_times = {}
    for name in ("vae", "text", "unet", "turbo", "taesd", "clip", "ip"):
        done = out / name / "done.json"
        if done.is_file():
            stage_times[name] = json.loads(done.read_text()).get("wall_time_s")
    summary = {"wall_time_s": round(time.time() - started, 1), "stage_times_s": stage_times, "exported": paths}
    with atomic_open(out / "summary.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------- stages 5 and 6: clip, ip

def train_eyes(cfg: ToyTrainConfig, stages, weights_dir: Path) -> dict:
    """toyworld-clip, then toyworld-ip for the exported `toyworld` and toyworld-turbo-ip for `toyworld-turbo`."""
    from atelier.errors import UserError
    from atelier.train.ip_adapter import IPAdapterConfig, train_ip_adapter
    from atelier.train.toyworld_clip import ClipTrainConfig, export_clip, export_vision_tower, train_clip

    base = weights_dir / "toyworld"
    if not (base / "model_index.json").is_file():
        raise UserError(f"the clip and ip stages start from the exported toyworld model, and {base} has none: "
                        "train the unet stage first (or pass --weights-dir with the built-in models)")
    out = Path(cfg.out_dir)
    paths = {}
    clip, tokenizer = train_clip(ClipTrainConfig(out_dir=str(out / "clip"), base_model=str(base), seed=cfg.seed,
                                                 steps=cfg.clip_steps, batch=cfg.clip_batch, lr=cfg.clip_lr,
                                                 checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                                                 mixed_precision=cfg.mixed_precision))
    paths["toyworld-clip"] = str(export_clip(clip, tokenizer, weights_dir / "toyworld-clip"))
    if "ip" not in stages:
        return paths
    vision = export_vision_tower(clip, out / "clip" / "vision")
    recipe = dict(image_encoder_path=str(vision), train_batch_size=cfg.ip_batch, learning_rate=cfg.ip_lr,
                  text_drop_rate=cfg.ip_text_drop, image_proj=cfg.ip_image_proj,
                  checkpointing_steps=cfg.checkpoint_every, validation_steps=cfg.eval_every,
                  num_validation_images=cfg.eval_images, mixed_precision=cfg.mixed_precision, seed=cfg.seed,
                  **{name: getattr(cfg, name) for name in SPEED_FIELDS})
    summary = train_ip_adapter(IPAdapterConfig(pretrained_model_name_or_path=str(base), output_dir=str(out / "ip"),
                                               max_train_steps=cfg.ip_steps, **recipe))
    paths["toyworld-ip"] = str(ship_adapter(Path(summary["final"]), weights_dir))
    turbo = weights_dir / "toyworld-turbo"
    if cfg.ip_turbo_steps and (turbo / "model_index.json").is_file():
        summary = train_ip_adapter(IPAdapterConfig(
            pretrained_model_name_or_path=str(turbo), output_dir=str(out / "ip-turbo"),
            pretrained_ip_adapter_path=paths["toyworld-ip"], max_train_steps=cfg.ip_turbo_steps,
            train_timesteps=TURBO_TIMESTEPS, **recipe))
        paths["toyworld-turbo-ip"] = str(ship_adapter(Path(summary["final"]), weights_dir, "toyworld-turbo-ip"))
    return paths


def own_adapter(model: str, weights_dir) -> str | None:
    """The adapter folder beside `model` that is its own: `<model>-ip`, else toyworld's `toyworld-ip`."""
    for name in (f"{model}-ip", "toyworld-ip"):
        if (Path(weights_dir) / name).is_dir():
            return name
    return None


def ship_adapter(final: Path, weights_dir: Path, name: str = "toyworld-ip") -> Path:
    """Copy a trained adapter folder to weights_dir/NAME and make the toy models name their own
    adapter (`own_adapter`): toyworld-ip for `toyworld`, toyworld-turbo-ip (once there) for the turbo."""
    import shutil

    from atelier.core.io import atomic_dir

    with atomic_dir(weights_dir / name) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
    for model in ("toyworld", "toyworld-turbo"):
        info = weights_dir / model / "atelier.json"
        if info.is_file():
            meta = json.loads(info.read_text(encoding="utf-8"))
            meta["ip_adapter"] = own_adapter(model, weights_dir)
            with atomic_open(info, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2))
    return weights_dir / name
