"""DreamBooth with LoRA / DoRA and pivotal tuning (`atelier train lora`), with the option names of diffusers'
advanced training scripts (examples/advanced_diffusion_training/train_dreambooth_lora_sd15_advanced.py and
..._sdxl_advanced.py) and kohya sd-scripts' data conveniences, for SD 1.x, SD 2.x (v-prediction), SDXL and
the Turbo models.

What trains (peft adapters: diffusers' `add_adapter` in the UNet, peft's injection in the text encoders):
  * LoRA (or DoRA, --use_dora) on the UNet's attention projections (to_q, to_k, to_v, to_out.0; other layers
    with --lora_layers), of every attention layer or of the --lora_unet_blocks given (--use_blora: B-LoRA's
    two SDXL blocks);
  * optionally LoRA on the text encoders' attention (--train_text_encoder, for --train_text_encoder_frac
    of the steps), or pivotal tuning (--train_text_encoder_ti): each --token_abstraction of the captions
    becomes new tokens <s0><s1>... in every tokenizer, whose embedding rows alone train (the advanced
    scripts' TokenEmbeddingsHandler: random normal with the embedding std, or --initializer_concept's
    embeddings; every other row restored after each step) for --train_text_encoder_ti_frac of the steps.
The loss is the model's own diffusion loss (epsilon or v-prediction target, atelier.core.prediction) at
uniform timesteps, optionally Min-SNR-γ weighted (--snr_gamma, train/weighting.py: min(SNR, γ)/SNR for
epsilon, min(SNR, γ)/(SNR + 1) for v-prediction), or EDM-style (--do_edm_style_training); with prior
preservation, class images (generated with the base model when too few exist) add prior_loss_weight × their
loss, toward the noise that made their noisy latents (DreamBooth's) or, with --prior_loss_target base_model,
toward the frozen base model's own prediction there (the adapters switched off). SDXL is conditioned on both
text encoders, the pooled embedding and time ids from each image's original size, crop and target size.

The run goes through atelier's TrainLoop (accelerate: mixed precision, gradient accumulation, clipping,
`accelerate launch` multi-GPU; exact resume from `checkpoint-<step>` folders after a kill). Outputs in
--output_dir: pytorch_lora_weights.safetensors (diffusers format, `pipe.load_lora_weights` loads it),
<name>_emb.safetensors (clip_l / clip_g) with pivotal tuning, README.md (the model card: trigger words,
A1111 and ComfyUI use), settings.json, loss.png, validation/ grids.
"""

from __future__ import annotations

import importlib.util
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from atelier.core.io import atomic_open, atomic_write_bytes
from atelier.core.prediction import denoised_from_sigma, model_target
from atelier.errors import UserError
from atelier.models.embeddings import save_embedding_file
from atelier.models.lora_files import save_kohya_copy
from atelier.train import weighting
from atelier.train.dreambooth_data import (DreamBoothData, Item, LatentCache, batch_index, ensure_class_images,
                                           class_items, make_bucket_resolutions, pixels, place, read_instance_folder,
                                           replace_tokens, time_ids)
from atelier.train.loop import EmaState, TrainLoop, lr_schedule, make_accelerator, numbered_checkpoints
from atelier.train.options import LR_SCHEDULERS, PRIOR_TARGETS, check_all, check_same_settings

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the advanced scripts' default
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
BLORA_BLOCKS = ("unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1")  # B-LoRA: content, style

# Defaults that depend on the base model, used where the option is not given. The general ones are the
# advanced scripts' (max_train_steps: theirs runs --num_train_epochs 1 by default; 500 steps is what their
# README's examples train). The toy-world models (64 px, a word tokenizer, a small UNet) learn a concept on
# 2 CPU cores in minutes with a larger rate and more layers (docs/lora.md, measured).
GENERAL_DEFAULTS = dict(rank=4, train_batch_size=4, learning_rate=1e-4, text_encoder_lr=5e-6, lr_warmup_steps=500,
                        max_train_steps=500, num_new_tokens_per_abstraction=2, lora_layers=",".join(UNET_TARGETS))
# The toy UNet draws a shape's detail (a ring's hole) in its attention-free outer blocks: LoRA on attention
# alone barely moves it, so the toy default adapts the ResNet convolutions and feed-forwards too (LoCon-like).
TOY_LAYERS = ("to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
              "conv_shortcut", "time_emb_proj")
TOY_DEFAULTS = dict(rank=4, train_batch_size=4, learning_rate=5e-4, text_encoder_lr=5e-4, lr_warmup_steps=0,
                    max_train_steps=400, num_new_tokens_per_abstraction=2, lora_layers=",".join(TOY_LAYERS),
                    threads=1)  # measured: 2 threads no faster on the toy's small tensors, 5-10x slower on a shared CPU
# Settings that may change when a run resumes (they do not change what is learnt).
RESUME_FREE = {"resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "validation_prompt",
               "num_validation_images", "validation_epochs", "validation_steps", "threads", "logging_dir",
               "compile", "compile_mode", "compile_backend", "channels_last"}


@dataclass
class LoraTrainConfig:
    """Every option of `atelier train lora` (the field names are the option names); None: the default
    of the base model (see GENERAL_DEFAULTS / TOY_DEFAULTS)."""

    pretrained_model_name_or_path: str = "toyworld"
    pretrained_vae_model_name_or_path: str | None = None
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    caption_extension: str = ".txt"
    repeats: int = 1
    class_data_dir: str | None = None
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    prior_loss_target: str = "images"  # or "base_model": the frozen base model's prediction on the class latents
    num_class_images: int = 100
    output_dir: str = "lora-dreambooth-model"
    logging_dir: str = "logs"
    seed: int = 0
    resolution: int | None = None  # default: the model's native size
    center_crop: bool = False
    random_flip: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    enable_bucket: bool = False
    min_bucket_reso: int | None = None  # default resolution / 2 (kohya's 256 at 512)
    max_bucket_reso: int | None = None  # default resolution × 2 (kohya's 1024 at 512)
    bucket_reso_steps: int | None = None  # default: the size the UNet divides by (64 for SD)
    cache_latents: bool = False
    decoder_inversion_steps: int = 0  # latents refined until the VAE decoder gives the image back (caches)
    train_text_encoder: bool = False
    train_text_encoder_frac: float = 1.0
    train_text_encoder_ti: bool = False
    train_text_encoder_ti_frac: float = 0.5
    ti_warmup_steps: int = 0  # the first steps train the new tokens alone (Break-A-Scene's first phase)
    token_abstraction: str = "TOK"
    num_new_tokens_per_abstraction: int | None = None
    initializer_concept: str | None = None
    rank: int | None = None
    lora_alpha: float | None = None  # default: rank
    lora_dropout: float = 0.0
    use_dora: bool = False
    lora_unet_blocks: str | None = None
    lora_layers: str | None = None  # default (model): the attention projections
    use_blora: bool = False
    train_batch_size: int | None = None
    num_train_epochs: int | None = None
    max_train_steps: int | None = None
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # default: the latest checkpoint in output_dir, if any
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | None = None
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    snr_gamma: float | None = None
    do_edm_style_training: bool = False
    train_timesteps: tuple[int, ...] | None = None  # a few-step distilled base's own timesteps (None: uniform)
    train_timesteps_share: float = 1.0  # the share of samples drawn from train_timesteps, the rest uniform
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_weight_decay_text_encoder: float | None = None
    adam_epsilon: float = 1e-8
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    use_ema: bool = False
    ema_decay: float = 0.9999
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    validation_steps: int | None = None  # overrides validation_epochs
    mixed_precision: str = "no"
    threads: int | None = None
    compile: str = "off"
    compile_mode: str = "default"
    compile_backend: str | None = None
    channels_last: bool = False

    def check(self) -> None:
        """One UserError naming the first option that is out of range, before any work."""
        whole, at_least_1 = dict(integer=True, minimum=0), dict(integer=True, minimum=1)
        share = dict(minimum=0, maximum=1)
        rules = {name: at_least_1 for name in (
            "repeats", "num_class_images", "rank", "train_batch_size", "num_train_epochs", "max_train_steps",
            "checkpointing_steps", "checkpoints_total_limit", "gradient_accumulation_steps", "lr_num_cycles",
            "num_new_tokens_per_abstraction", "validation_epochs", "validation_steps", "threads",
            "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")}
        rules.update(seed=whole, keep_tokens=whole, decoder_inversion_steps=whole, ti_warmup_steps=whole, lr_warmup_steps=whole, num_validation_images=whole,
                     resolution=dict(integer=True, minimum=8), prior_loss_weight=dict(minimum=0),
                     train_text_encoder_frac=share, train_text_encoder_ti_frac=share, lora_dropout=dict(minimum=0, below=1),
                     lora_alpha=dict(above=0), learning_rate=dict(above=0), text_encoder_lr=dict(above=0),
                     lr_power=dict(above=0), snr_gamma=dict(above=0), adam_beta1=dict(minimum=0, below=1),
                     adam_beta2=dict(minimum=0, below=1), prodigy_beta3=dict(minimum=0, below=1),
                     adam_weight_decay=dict(minimum=0), adam_weight_decay_text_encoder=dict(minimum=0),
                     adam_epsilon=dict(minimum=0), max_grad_norm=dict(above=0), noise_offset=dict(minimum=0),
                     ema_decay=dict(minimum=0, below=1), train_timesteps_share=share)
        check_all(lambda name: f"--{name}", asdict(self), rules)
        if self.train_timesteps is not None:
            self.train_timesteps = weighting.parse_timesteps(self.train_timesteps)
        if not self.instance_data_dir:
            raise UserError("--instance_data_dir is required (a folder of images, a caption .txt beside each)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if self.optimizer.lower() not in ("adamw", "prodigy"):
            raise UserError(f"--optimizer must be adamw or prodigy, not {self.optimizer!r}")
        if self.optimizer.lower() == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
            raise UserError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}")
        if self.train_text_encoder and self.train_text_encoder_ti:
            raise UserError("give one of --train_text_encoder (LoRA on the text encoders) and --train_text_encoder_ti "
                            "(pivotal tuning), not both")
        if self.ti_warmup_steps and not self.train_text_encoder_ti:
            raise UserError("--ti_warmup_steps trains the new tokens alone first: it needs --train_text_encoder_ti")
        if self.do_edm_style_training and self.train_timesteps:
            raise UserError("--train_timesteps does not apply to --do_edm_style_training (it draws noise levels, not timesteps)")
        if self.do_edm_style_training and self.snr_gamma is not None:
            raise UserError("--snr_gamma does not apply to --do_edm_style_training (its loss has its own weighting)")
        if self.prior_loss_target not in PRIOR_TARGETS:
            raise UserError(f"--prior_loss_target must be {' or '.join(PRIOR_TARGETS)}, not {self.prior_loss_target!r}")
        if self.with_prior_preservation and not self.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (and --class_prompt unless every class "
                            "image there has a caption file)")
        if self.train_text_encoder_ti and not [t for t in self.token_abstraction.split(",") if t.strip()]:
            raise UserError("--token_abstraction must name at least one identifier (e.g. TOK)")
        if not self.caption_extension.startswith("."):
            raise UserError(f"--caption_extension must start with a dot, like .txt, not {self.caption_extension!r}")
        if (self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso):
            raise UserError("--min_bucket_reso must not exceed --max_bucket_reso")


# ---------------------------------------------------------------- defaults from the base model

def is_toy(pipe) -> bool:
    return (getattr(pipe, "atelier_defaults", None) or {}).get("family") == "toyworld"


def resolve(cfg: LoraTrainConfig, pipe) -> LoraTrainConfig:
    """`cfg` with every model-dependent default filled in (what the run uses, and writes to settings.json)."""
    from atelier.models import detect_family

    base = TOY_DEFAULTS if is_toy(pipe) else GENERAL_DEFAULTS
    values = {k: (base[k] if getattr(cfg, k) is None and k in base else getattr(cfg, k)) for k in base}
    if (cfg.use_blora or cfg.lora_unet_blocks) and cfg.lora_layers is None:
        values["lora_layers"] = ",".join(UNET_TARGETS)  # chosen blocks: their attention projections, as the scripts
    if cfg.max_train_steps is None and cfg.num_train_epochs is not None:
        values["max_train_steps"] = None  # counted from the epochs once the data is known
    resolution = cfg.resolution or detect_family(pipe).resolution or 512
    unet_step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    steps = cfg.bucket_reso_steps or unet_step
    out = replace(cfg, **values, resolution=resolution, bucket_reso_steps=steps,
                  min_bucket_reso=cfg.min_bucket_reso or max(steps, resolution // 2 // steps * steps),
                  max_bucket_reso=cfg.max_bucket_reso or resolution * 2)
    if out.lora_alpha is None:
        out.lora_alpha = float(out.rank)
    if out.decoder_inversion_steps:
        out.cache_latents = True  # inverted once per image and flip
    if out.optimizer.lower() == "prodigy":
        out.optimizer, out.text_encoder_lr = "prodigy", out.learning_rate  # Prodigy: one rate (the scripts' rule)
    else:
        out.optimizer = "adamw"
    out.check()
    return out


# ---------------------------------------------------------------- pivotal tuning

def token_map(cfg: LoraTrainConfig, per_abstraction: int) -> dict[str, str]:
    """--token_abstraction "TOK,TOK2" -> {"TOK": "<s0><s1>", "TOK2": "<s2><s3>"} (the advanced scripts' naming)."""
    names = [t.strip() for t in cfg.token_abstraction.split(",") if t.strip()]
    return {name: "".join(f"<s{i * per_abstraction + j}>" for j in range(per_abstraction)) for i, name in enumerate(names)}


class NewTokens:
    """The new tokens of pivotal tuning in every (tokenizer, text encoder) pair: added, their embedding
    rows initialised (random normal with the embedding matrix's std, or the embeddings of
    --initializer_concept's tokens, cycled), trained; `retract()` after each optimizer step puts every other
    row back and rescales the new rows towards the original std (replicate/cog-sdxl's TokenEmbeddingsHandler,
    which the advanced scripts use)."""

    def __init__(self, tokenizers, text_encoders, tokens: list[str], *, initializer: str | None, seed: int):
        self.tokens, self.ids, self.original, self.std = tokens, [], [], []
        generator = torch.Generator().manual_seed(seed)
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            init_ids = tokenizer(initializer, add_special_tokens=False).input_ids if initializer else None
            if initializer and not init_ids:
                raise UserError(f"--initializer_concept {initializer!r} has no tokens")
            tokenizer.add_special_tokens({"additional_special_tokens": tokens})
            old = encoder.get_input_embeddings().weight.shape[0]
            encoder.resize_token_embeddings(len(tokenizer))
            weight = encoder.get_input_embeddings().weight
            ids = tokenizer.convert_tokens_to_ids(tokens)
            std = weight.data[:old].float().std()
            with torch.no_grad():
                if init_ids:
                    rows = weight.data[[init_ids[i % len(init_ids)] for i in range(len(ids))]].clone()
                else:
                    rows = torch.randn(len(ids), weight.shape[1], generator=generator) * std
                weight.data[ids] = rows.to(weight)
            self.ids.append(ids)
            self.std.append(std)
            self.original.append(weight.data.detach().clone())
        self.encoders = list(text_encoders)

    def parameters(self) -> list:
        return [e.get_input_embeddings().weight for e in self.encoders]

    @torch.no_grad()
    def retract(self) -> None:
        for encoder, ids, original, std in zip(self.encoders, self.ids, self.original, self.std):
            weight = encoder.get_input_embeddings().weight
            new = weight.data[ids].clone()
            weight.data.copy_(original.to(weight))
            weight.data[ids] = new * (std / new.float().std()) ** 0.1

    def rows(self) -> list[torch.Tensor]:
        """The learned embeddings, one (tokens, width) tensor per text encoder."""
        return [e.get_input_embeddings().weight.detach()[ids].float().clone() for e, ids in zip(self.encoders, self.ids)]

    def load_rows(self, rows) -> None:
        with torch.no_grad():
            for encoder, ids, r in zip(self.encoders, self.ids, rows):
                weight = encoder.get_input_embeddings().weight
                weight.data[ids] = r.to(weight)


# ---------------------------------------------------------------- the trained modules

def unet_targets(unet, cfg: LoraTrainConfig) -> list[str]:
    """The UNet modules that get LoRA layers: those named by --lora_layers (default: the attention
    projections to_q, to_k, to_v, to_out.0), inside the blocks of --lora_unet_blocks (or B-LoRA's) if given."""
    layers = [x.strip() for x in (cfg.lora_layers or ",".join(UNET_TARGETS)).split(",") if x.strip()]
    blocks = BLORA_BLOCKS if cfg.use_blora else [b.strip() for b in (cfg.lora_unet_blocks or "").split(",") if b.strip()]
    if not blocks:
        names = [n for n, m in unet.named_modules() if n.endswith(tuple("." + x for x in layers))
                 and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        if not names:
            raise UserError(f"--lora_layers {cfg.lora_layers}: no Linear or Conv2d layer of this UNet is named so")
        return layers
    prefixes = tuple(b.removeprefix("unet.").rstrip(".") + "." for b in blocks)
    names = [n for n, m in unet.named_modules() if n.startswith(prefixes) and n.endswith(tuple("." + x for x in layers))
             and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not names:
        what = "--use_blora (B-LoRA's SDXL blocks " + ", ".join(BLORA_BLOCKS) + ")" if cfg.use_blora else \
            f"--lora_unet_blocks {cfg.lora_unet_blocks}"
        blocks_here = sorted({"unet." + n.split(".transformer_blocks")[0] for n in unet.attn_processors})
        raise UserError(f"{what} matched no layer of this UNet (its attention blocks are e.g. "
                        f"{', '.join(blocks_here[:4])})")
    return names


def lora_config(cfg: LoraTrainConfig, targets):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_dora=cfg.use_dora,
                      init_lora_weights="gaussian", target_modules=list(targets))


def add_text_encoder_lora(encoder, config) -> None:
    """LoRA layers in a transformers text encoder through peft itself, recording the config where
    transformers' `add_adapter` does (`peft_config`); that method refuses peft releases older than the
    one transformers was built against, for no difference in what is injected."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, encoder, adapter_name="default")
    encoder.peft_config = {"default": config}


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as the diffusers pipelines make them: padded to the tokenizer's length, truncated."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_ids(text_encoders, ids: list[torch.Tensor], sdxl: bool):
    """(hidden states, pooled) as the diffusers pipelines' `encode_prompt` computes them without clip skip:
    SD 1/2 the last hidden state; SDXL both encoders' penultimate hidden states side by side and the second
    encoder's projected pooled output. Written out because those run under no_grad and here the text
    encoders may train (and may be wrapped for distributed training)."""
    if not sdxl:
        encoder = text_encoders[0]
        return encoder(ids[0].to(next(encoder.parameters()).device))[0], None
    hidden, pooled = [], None
    for encoder, i in zip(text_encoders, ids):
        out = encoder(i.to(next(encoder.parameters()).device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


class LoraTrainee(torch.nn.Module):
    """The UNet and text encoders with their adapters. forward = caption encoding + the UNet call (what a
    distributed wrapper must see); state_dict = what trains alone (LoRA weights, new token rows)."""

    def __init__(self, unet, text_encoders, *, sdxl: bool, te_lora: bool, tokens: NewTokens | None):
        super().__init__()
        self.unet, self.text_encoders = unet, torch.nn.ModuleList(text_encoders)
        self.sdxl, self.te_lora, self._tokens = sdxl, te_lora, [tokens]
        self.te_trains = te_lora or tokens is not None  # set per step: False after the pivot

    @property
    def tokens(self) -> NewTokens | None:
        return self._tokens[0]

    def forward(self, x_t, t, ids, add_time_ids=None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.te_trains):
            hidden, pooled = encode_ids(list(self.text_encoders), ids, self.sdxl)
        added = {"text_embeds": pooled.to(x_t.dtype), "time_ids": add_time_ids} if self.sdxl else None
        return self.unet(x_t, t, encoder_hidden_states=hidden.to(x_t.dtype), added_cond_kwargs=added,
                         return_dict=False)[0]

    def lora_parameters(self) -> list:
        """The LoRA (DoRA) parameters: the UNet's, then the text encoders' (averaged by --use_ema)."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if self.te_lora:
            params += [p for e in self.text_encoders for p in e.parameters() if p.requires_grad]
        return params

    def state_dict(self, *args, **kwargs):
        from peft import get_peft_model_state_dict

        state = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(self.unet).items()}
        if self.te_lora:
            for i, encoder in enumerate(self.text_encoders):
                state.update({f"text_encoder_{i}.{k}": v.detach().clone()
                              for k, v in get_peft_model_state_dict(encoder).items()})
        if self.tokens is not None:
            state.update({f"tokens.{i}": rows for i, rows in enumerate(self.tokens.rows())})
        return state

    def load_state_dict(self, state, strict=True):
        from peft import set_peft_model_state_dict

        def part(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        set_peft_model_state_dict(self.unet, part("unet."))
        if self.te_lora:
            for i, encoder in enumerate(self.text_encoders):
                set_peft_model_state_dict(encoder, part(f"text_encoder_{i}."))
        if self.tokens is not None:
            self.tokens.load_rows([state[f"tokens.{i}"] for i in range(len(self.tokens.ids))])
        return torch.nn.modules.module._IncompatibleKeys([], [])


def make_optimizer(cfg: LoraTrainConfig, groups: list[dict]):
    """AdamW, or Prodigy (prodigyopt) with the scripts' options."""
    if cfg.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise UserError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        with contextlib.redirect_stdout(sys.stderr):  # Prodigy prints its settings; stdout is for --json
            return prodigyopt.Prodigy(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      beta3=cfg.prodigy_beta3, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                      decouple=cfg.prodigy_decouple, use_bias_correction=cfg.prodigy_use_bias_correction,
                                      safeguard_warmup=cfg.prodigy_safeguard_warmup)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def lr_factor(cfg: LoraTrainConfig, total: int):
    """The multiplier of the learning rate at each step (diffusers' `get_scheduler`)."""
    return lr_schedule(cfg.lr_scheduler, cfg.lr_warmup_steps, total, cfg.lr_num_cycles, cfg.lr_power)


# ---------------------------------------------------------------- outputs

def save_lora(pipe, trainee: LoraTrainee, folder: Path) -> Path:
    """pytorch_lora_weights.safetensors in `folder` through the pipeline class's `save_lora_weights`, with
    the adapters' LoraConfig (rank, alpha, DoRA) in its metadata; written atomically."""
    from peft import get_peft_model_state_dict

    def layers(module):  # peft's key names (lora_A / lora_B / lora_magnitude_vector), which diffusers reads
        # as they are; convert_state_dict_to_diffusers would rename only the attention layers to the old
        # lora.down / lora.up and leave a mixed file whose renamed layers diffusers then does not load
        return {k: v.float() for k, v in get_peft_model_state_dict(module).items()}

    kwargs = {"unet_lora_layers": layers(trainee.unet),
              "unet_lora_adapter_metadata": trainee.unet.peft_config["default"].to_dict()}
    if trainee.te_lora:
        names = ("text_encoder", "text_encoder_2")
        for name, encoder in zip(names, trainee.text_encoders):
            kwargs[f"{name}_lora_layers"] = layers(encoder)
            kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".lora-", suffix=".tmp"))
    try:
        type(pipe).save_lora_weights(str(tmp), safe_serialization=True, **kwargs)
        os.replace(tmp / WEIGHT_NAME, folder / WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / WEIGHT_NAME


def model_card(cfg: LoraTrainConfig, *, name: str, family, mapping: dict[str, str], example: str,
               embeddings: Path | None, kohya_file: Path | None, steps: int) -> str:
    """README.md of the output folder: what the LoRA is, its trigger words, and how to prompt it in atelier,
    diffusers, A1111 and ComfyUI. `example` is a caption as written (with the token abstractions)."""
    base, kind = cfg.pretrained_model_name_or_path, "DoRA" if cfg.use_dora else "LoRA"
    emb = embeddings.stem if embeddings else None
    with_tokens = replace_tokens(example, mapping)  # diffusers: the new tokens themselves
    webui = replace_tokens(example, {token: emb for token in mapping}) if emb else example  # A1111: the embedding's name
    lora_file = kohya_file.name if kohya_file else f"{name}.safetensors"
    out = Path(cfg.output_dir)
    lines = [f"# {name}", "",
             f"A {kind} (rank {cfg.rank}, alpha {cfg.lora_alpha:g}) for `{base}` ({family.family}, "
             f"{family.prediction_type}), trained by `atelier train lora` for {steps} steps: DreamBooth"
             f"{' with pivotal tuning' if emb else ''}{' and prior preservation' if cfg.with_prior_preservation else ''}. "
             "Settings: `settings.json`; loss curve: `loss.png`"
             + ("; validation images: `validation/`." if cfg.validation_prompt else "."), "",
             "## Trigger words", ""]
    if mapping:
        lines += [f"- `{token}` of the captions was learnt as the new tokens `{new}` (embedding file `{embeddings.name}`: "
                  f"`clip_l`{' and `clip_g`' if family.family == 'sdxl' else ''}). In A1111 and ComfyUI write the "
                  f"embedding's name, `{emb}`, where `{token}` stood; with diffusers, `{new}`." for token, new in mapping.items()]
        lines.append("- The LoRA and the embedding were trained together: use both.")
    else:
        lines.append(f"- Prompt the way the captions were written, e.g. `{example}`.")
    lines += ["", "## atelier", "", "```sh",
              f"atelier generate --model {base} --lora {out / lora_file}"
              + (f" --embedding {out / embeddings.name}" if emb else "") + f' "{webui}"', "```", "",
              "## diffusers", "", "```py",
              f'pipe.load_lora_weights("{out}", weight_name="{WEIGHT_NAME}")']
    if emb:
        tokens = [t for new in mapping.values() for t in new.replace("><", "> <").split()]
        lines += ["from safetensors.torch import load_file", f'state = load_file("{out / embeddings.name}")',
                  f'pipe.load_textual_inversion(state["clip_l"], token={tokens}, text_encoder=pipe.text_encoder, '
                  "tokenizer=pipe.tokenizer)"]
        if family.family == "sdxl":
            lines.append(f'pipe.load_textual_inversion(state["clip_g"], token={tokens}, text_encoder=pipe.text_encoder_2, '
                         "tokenizer=pipe.tokenizer_2)")
    lines += [f'image = pipe("{with_tokens}").images[0]', "```", "", "## AUTOMATIC1111 / Forge", "",
              f"Put `{lora_file}` (the kohya-format copy) in `models/Lora` and add `<lora:{name}:1>` to the prompt"
              + (f"; put `{embeddings.name}` in `embeddings`" if emb else "") + f": `{webui} <lora:{name}:1>`.", "",
              "## ComfyUI", "", f"Load `{lora_file}` with a LoraLoader node (strength 1)"
              + (f"; put `{embeddings.name}` in `models/embeddings` and write "
                 f"`{replace_tokens(example, {token: 'embedding:' + emb for token in mapping})}`" if emb else "") + "."]
    return "\n".join(lines) + "\n"


def write_grid(path: Path, images: np.ndarray) -> None:
    """(N, H, W, 3) uint8 images side by side in one PNG."""
    from PIL import Image

    with atomic_open(path, "wb") as f:
        Image.fromarray(np.concatenate(list(images), axis=1)).save(f, format="PNG")


# ---------------------------------------------------------------- the run

def _load_vae(source: str):
    from diffusers import AutoencoderKL

    from atelier.models.loader import resolve_model_path

    try:
        folder = Path(resolve_model_path(source))
    except UserError:
        folder = Path(source)
    for sub in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(str(folder), subfolder=sub)
        except (OSError, ValueError, EnvironmentError):
            continue
    raise UserError(f"--pretrained_vae_model_name_or_path {source}: not a diffusers AutoencoderKL folder (or a cached hub id)")


def _edm_scheduler(pipe):
    """The model's EDM scheduler when it has one (EDMEulerScheduler, as Playground v2.5 ships), else None."""
    if "EDM" not in type(pipe.scheduler).__name__:
        return None
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler.from_config(pipe.scheduler.config)


def train_lora(cfg: LoraTrainConfig) -> dict:
    """Train (or resume) a LoRA; returns a summary with the files written."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, cast_training_params

    from atelier.core import vae as vae_calls
    from atelier.models import detect_family, load_pipeline
    from atelier.prompts.conditioning import is_sdxl_pipeline
    from atelier.speed.cli import training_speed

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    items = read_instance_folder(cfg.instance_data_dir, cfg.instance_prompt, cfg.caption_extension)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file")
    trains_te = cfg.train_text_encoder or cfg.train_text_encoder_ti
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, project_dir=out,
                                   logging_dir=cfg.logging_dir, flag="--mixed_precision",
                                   find_unused_parameters=trains_te)
    rank, world = accelerator.process_index, accelerator.num_processes
    pipe = load_pipeline(cfg.pretrained_model_name_or_path, device="cpu", dtype=torch.float32)
    if cfg.pretrained_vae_model_name_or_path:
        pipe.vae = _load_vae(cfg.pretrained_vae_model_name_or_path)
    family = detect_family(pipe)
    cfg = resolve(cfg, pipe)
    if _edm_scheduler(pipe) is not None and cfg.snr_gamma is not None:
        raise UserError("--snr_gamma does not apply to this EDM model (its loss has its own weighting)")
    if _edm_scheduler(pipe) is not None and cfg.train_timesteps:
        raise UserError("--train_timesteps does not apply to this EDM model (it draws noise levels, not timesteps)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sdxl = is_sdxl_pipeline(pipe)
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    mapping = token_map(cfg, cfg.num_new_tokens_per_abstraction) if cfg.train_text_encoder_ti else {}
    if cfg.train_text_encoder_ti and cfg.initializer_concept:  # the scripts: one new token per concept token
        count = len(tokenizers[0](cfg.initializer_concept, add_special_tokens=False).input_ids)
        mapping = token_map(cfg, max(1, count))

    # data: each image's bucket and crop, the batches
    buckets = make_bucket_resolutions((cfg.resolution, cfg.resolution), cfg.min_bucket_reso, cfg.max_bucket_reso,
                                      cfg.bucket_reso_steps) if cfg.enable_bucket else None
    place(items, buckets, cfg.resolution, cfg.center_crop, cfg.seed)
    data = DreamBoothData(items, batch_size=cfg.train_batch_size, seed=cfg.seed, repeats=cfg.repeats,
                          random_flip=cfg.random_flip, shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                          token_map=mapping, class_prompt=cfg.class_prompt or "")
    per_step = cfg.gradient_accumulation_steps * world
    steps_per_epoch = max(1, math.ceil(data.batches_per_epoch / per_step))
    if cfg.max_train_steps is None:
        cfg.max_train_steps = cfg.num_train_epochs * steps_per_epoch
    total = cfg.max_train_steps
    eval_every = None
    if cfg.validation_prompt and cfg.num_validation_images:
        eval_every = cfg.validation_steps or max(1, cfg.validation_epochs * steps_per_epoch)

    speed = training_speed(cfg)
    loop = TrainLoop(out, total, checkpoint_every=cfg.checkpointing_steps, eval_every=eval_every, name="lora",
                     title=f"LoRA {out.name}", accelerator=accelerator, speed=speed, numbered=True,
                     keep=cfg.checkpoints_total_limit, resume_from=cfg.resume_from_checkpoint)
    if loop.done:
        return {**json.loads((out / "done.json").read_text()), "lora": str(out / WEIGHT_NAME), "resumed_done": True}
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    if numbered_checkpoints(out):
        check_same_settings(out / "settings.json", settings, RESUME_FREE, flag_of=lambda k: f"--{k}")
    if accelerator.is_main_process:
        with atomic_open(out / "settings.json", "w", encoding="utf-8") as f:
            f.write(json.dumps({"options": settings, "family": family.family, "prediction_type": family.prediction_type,
                                "tokens": mapping, "instance_images": len(items), "steps_per_epoch": steps_per_epoch},
                               indent=2))

    # frozen models on the device in the weight dtype (the VAE as force_upcast asks); class images from them
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            loop.frozen(module)
    if cfg.with_prior_preservation:
        class_paths = ensure_class_images(pipe, cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images,
                                          resolution=cfg.resolution, seed=cfg.seed, rank=rank, world=world,
                                          wait=accelerator.wait_for_everyone)
        data.classes = class_items(class_paths, data.class_prompt, cfg.caption_extension)
        place(data.classes, None, cfg.resolution, True, cfg.seed)

    # what trains: new tokens, LoRA layers (fp32 under mixed precision), the optimizer's groups
    torch.manual_seed(cfg.seed)
    tokens = None
    if mapping:
        new = [t for value in mapping.values() for t in value.replace("><", "> <").split()]
        tokens = NewTokens(tokenizers, encoders, new, initializer=cfg.initializer_concept, seed=cfg.seed)
        for encoder in encoders:  # the embedding matrix trains in fp32; the rest of the encoder reads its dtype
            embedding, dtype = encoder.get_input_embeddings(), encoder.dtype
            embedding.weight.data = embedding.weight.data.float()
            embedding.weight.requires_grad_(True)
            if dtype != torch.float32:
                embedding.register_forward_hook(lambda module, args, output, dtype=dtype: output.to(dtype))
    pipe.unet.add_adapter(lora_config(cfg, unet_targets(pipe.unet, cfg)))
    if cfg.train_text_encoder:
        for encoder in encoders:
            add_text_encoder_lora(encoder, lora_config(cfg, TEXT_TARGETS))
    trainee = LoraTrainee(pipe.unet, encoders, sdxl=sdxl, te_lora=cfg.train_text_encoder, tokens=tokens)
    if accelerator.mixed_precision != "no":
        cast_training_params(trainee, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if trains_te:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokens is not None:
        te_params = tokens.parameters()
    elif cfg.train_text_encoder:
        te_params = [p for e in encoders for p in e.parameters() if p.requires_grad]
    else:
        te_params = []
    te_decay = cfg.adam_weight_decay if cfg.adam_weight_decay_text_encoder is None else cfg.adam_weight_decay_text_encoder
    groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr_scale": 1.0}]
    if te_params:
        groups.append({"params": te_params, "weight_decay": te_decay, "lr_scale": cfg.text_encoder_lr / cfg.learning_rate})
    optimizer = make_optimizer(cfg, groups)
    ema = EMAModel(trainee.lora_parameters(), decay=cfg.ema_decay) if cfg.use_ema else None
    (model,), optimizer = loop.prepare({"lora": trainee}, optimizer, extra={"ema": EmaState(ema)} if ema else None)

    def lora_at_checkpoint(folder: Path) -> None:  # each checkpoint holds the LoRA as it is then, ready to use
        with _averaged(ema, trainee):
            save_lora(pipe, trainee, folder)
        if trainee.tokens is not None:  # and the pivotal-tuning embeddings that go with it, named as the final's
            save_embedding_file(folder / f"{out.resolve().name}_emb.safetensors",
                                dict(zip(("clip_l", "clip_g"), trainee.tokens.rows())))

    loop.on_checkpoint = lora_at_checkpoint
    loop.speed_up(pipe.unet)

    # the loss
    prediction = family.prediction_type
    edm = _edm_scheduler(pipe)
    edm_style = cfg.do_edm_style_training or edm is not None
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    abar = noise_schedule.alphas_cumprod.to(loop.device)
    steps_t = noise_schedule.config.num_train_timesteps
    weighting.check_timesteps(cfg.train_timesteps, steps_t)
    pivot = int((cfg.train_text_encoder_ti_frac if tokens else cfg.train_text_encoder_frac) * total) if trains_te else 0
    if cfg.ti_warmup_steps > pivot:
        raise UserError(f"--ti_warmup_steps {cfg.ti_warmup_steps} is more than the new tokens' share of the steps "
                        f"({pivot} of {total}, --train_text_encoder_ti_frac): the steps after it would train nothing")

    def encode(x):
        z = vae_calls.encode(pipe.vae, x.to(loop.device), loop.weight_dtype)
        if cfg.decoder_inversion_steps:
            z = vae_calls.invert_decoder(pipe.vae, x, z, cfg.decoder_inversion_steps)
        return z

    cache = LatentCache(encode) if cfg.cache_latents else None

    def latents(chosen, flips, bucket):
        if cache is not None:
            return torch.stack([cache(item, bucket, flip) for item, flip in zip(chosen, flips)])
        return encode(torch.stack([pixels(item, bucket, flip) for item, flip in zip(chosen, flips)]))

    def step(i, micro):
        k = batch_index(i, micro, cfg.gradient_accumulation_steps, rank, world)
        seed = (cfg.seed * 1_000_003 + k * 7919) % 2**31
        torch.manual_seed(seed)  # LoRA dropout
        g = torch.Generator().manual_seed(seed)
        batch = data.batch(k)
        with torch.no_grad():
            z = latents(batch.items, batch.flips, batch.bucket)
            if batch.classes:
                z = torch.cat([z, latents(batch.classes, batch.class_flips, batch.bucket)])
        captions = batch.captions + [item.caption for item in batch.classes]
        ids = [tokenize(t, captions) for t in tokenizers]
        add_time_ids = None
        if sdxl:
            rows = [time_ids(it, batch.bucket, f) for it, f in zip(batch.items + batch.classes, batch.flips + batch.class_flips)]
            add_time_ids = torch.tensor(rows, device=loop.device, dtype=loop.weight_dtype)
        noise = weighting.offset_noise(torch.randn(z.shape, generator=g), cfg.noise_offset, g).to(z)
        trainee.te_trains = trains_te and i < pivot
        n = len(batch.items)
        if edm_style:
            index = torch.randint(0, steps_t, (len(z),), generator=g)
            if edm is not None:  # an EDM model: its scheduler's preconditioning
                sigma = edm.sigmas[index].to(loop.device).view(-1, 1, 1, 1)
                x = z.float() + sigma * noise.float()
                inputs = (edm.precondition_inputs(x, sigma).to(z.dtype), edm.timesteps[index].to(loop.device))
                weight = None

                def output(raw, s):  # the denoised x0
                    return edm.precondition_outputs(x[s], raw.float(), sigma[s])
            else:  # a variance-preserving model in EDM form (the advanced scripts' --do_edm_style_training)
                t = index.to(loop.device)
                sigma = weighting.sigma_of(abar, t).view(-1, 1, 1, 1)
                x = z.float() + sigma * noise.float()
                inputs = ((x * weighting.edm_input_scale(sigma)).to(z.dtype), t)
                weight = weighting.edm_loss_weight(sigma)

                def output(raw, s):  # the denoised x0
                    return denoised_from_sigma(raw.float(), x[s], sigma[s], prediction)
            target = z.float()
        else:
            t = weighting.training_timesteps(len(z), steps_t, g, cfg.train_timesteps, cfg.train_timesteps_share).to(loop.device)
            a = abar[t].float().sqrt().view(-1, 1, 1, 1)
            b = (1 - abar[t].float()).sqrt().view(-1, 1, 1, 1)
            inputs = ((a * z.float() + b * noise.float()).to(z.dtype), t)
            target = model_target(z.float(), noise.float(), a, b, prediction)
            weight = weighting.min_snr_weight(weighting.snr_of(abar, t), cfg.snr_gamma, prediction) if cfg.snr_gamma else None

            def output(raw, s):
                return raw

        def predict(m, s=slice(None)):
            return output(m(inputs[0][s], inputs[1][s], [row[s] for row in ids],
                            None if add_time_ids is None else add_time_ids[s]), s)

        pred = predict(model)
        if batch.classes and cfg.prior_loss_target == "base_model":
            with torch.no_grad(), accelerator.autocast(), adapters_off(trainee):  # the class rows' target: the base model's
                target = torch.cat([target[:n], predict(trainee, slice(n, None)).float()])
        w = (lambda s: None if weight is None else weight[s])
        instance = weighting.weighted_mse(pred[:n], target[:n], w(slice(0, n)))
        if not batch.classes:
            return instance
        prior = weighting.weighted_mse(pred[n:], target[n:], w(slice(n, None)))
        return instance + cfg.prior_loss_weight * prior, {"instance": instance.item(), "prior": prior.item()}

    factor = lr_factor(cfg, total)

    def rates(i):
        rate = cfg.learning_rate * factor(i)
        return [0.0 if i < cfg.ti_warmup_steps else rate] + ([rate if i < pivot else 0.0] if te_params else [])

    def after_step():
        if tokens is not None and loop.step < pivot:  # (loop.step is the step just taken)
            tokens.retract()
        if ema is not None:
            ema.step(trainee.lora_parameters())

    val_dir = out / "validation"

    def evaluate(parts):
        if not accelerator.is_main_process:
            return {}
        prompt = replace_tokens(cfg.validation_prompt, mapping)
        with _averaged(ema, trainee):
            trainee.eval()
            result = pipe(prompt=[prompt] * cfg.num_validation_images, num_inference_steps=family.steps,
                          guidance_scale=family.guidance_scale, height=cfg.resolution, width=cfg.resolution,
                          generator=[torch.Generator().manual_seed(cfg.seed + j) for j in range(cfg.num_validation_images)],
                          output_type="np")
            trainee.train()
        images = (np.clip(result.images, 0, 1) * 255).round().astype(np.uint8)
        val_dir.mkdir(exist_ok=True)
        write_grid(val_dir / f"step_{loop.step:06d}.png", images)
        return {"validation": f"validation/step_{loop.step:06d}.png"}

    trainee.train()
    loop.run(step, lr=rates, clip=cfg.max_grad_norm, after_step=after_step, evaluate=evaluate, window=20)
    accelerator.wait_for_everyone()
    summary = {"final_loss": float(np.mean(loop.losses[-20:])), "log": loop.log,
               "seconds_per_step": round(loop.seconds / max(1, loop.step), 3)}
    files = {}
    if accelerator.is_main_process:
        files = export(pipe, trainee, ema, cfg, family=family, mapping=mapping, steps=loop.step,
                       example=cfg.validation_prompt or items[0].caption)
    done = loop.finish({**summary, **files})
    return {**done, "lora": str(out / WEIGHT_NAME)}


@contextlib.contextmanager
def adapters_off(trainee: LoraTrainee):
    """Within: the base model alone. Every peft adapter layer of the UNet and text encoders is switched off,
    and the new token rows are unused by captions without them; which parameters train is restored after
    (peft's enable_adapters changes requires_grad)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in trainee.modules() if isinstance(m, BaseTunerLayer)]
    trains = [(p, p.requires_grad) for p in trainee.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in trains:
            p.requires_grad_(flag)


class _averaged:
    """Within: the EMA weights in the trained modules (when --use_ema), the live ones put back after."""

    def __init__(self, ema, trainee):
        self.ema, self.params = ema, trainee.lora_parameters() if ema is not None else []

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


def export(pipe, trainee: LoraTrainee, ema, cfg: LoraTrainConfig, *, family, mapping, steps: int, example: str) -> dict:
    """The output folder's files: the LoRA (diffusers format), the embeddings, the model card."""
    out = Path(cfg.output_dir)
    name = out.resolve().name
    with _averaged(ema, trainee):
        lora_file = save_lora(pipe, trainee, out)
    embeddings = None
    if trainee.tokens is not None:
        rows = trainee.tokens.rows()
        embeddings = save_embedding_file(out / f"{name}_emb.safetensors", dict(zip(("clip_l", "clip_g"), rows)))
    kohya_file = save_kohya_copy(lora_file, out / f"{name}.safetensors", family.family)  # the A1111 / ComfyUI copy
    card = model_card(cfg, name=name, family=family, mapping=mapping, example=example, embeddings=embeddings,
                      kohya_file=kohya_file, steps=steps)
    with atomic_open(out / "README.md", "w", encoding="utf-8") as f:
        f.write(card)
    files = {"lora_file": str(lora_file), "kohya_file": str(kohya_file), "model_card": str(out / "README.md")}
    if embeddings is not None:
        files["embeddings_file"] = str(embeddings)
    return files


def config_from_args(args) -> LoraTrainConfig:
    keys = {f.name for f in fields(LoraTrainConfig)}
    return LoraTrainConfig(**{k: v for k, v in vars(args).items() if k in keys and v is not None})


__all__ = ["LoraTrainConfig", "train_lora", "NewTokens", "LoraTrainee", "unet_targets", "token_map", "resolve",
           "model_card", "save_lora", "WEIGHT_NAME"]
