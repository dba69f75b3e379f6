"""Tiny, seeded Stable Diffusion pipelines for tests and benchmarks.

Built from small configs the way diffusers' own tests build theirs (`get_dummy_components` in
tests/pipelines/stable_diffusion*/): the real classes, real schedulers with the real models' scheduler
configs, and a word tokenizer written on the spot (nothing is downloaded). A 2-step 16x16 generation
takes a few tens of milliseconds on one core.

Families:
  "sd1"         SD 1.5-like: OpenAI-CLIP text encoder, epsilon, PNDM (SD 1.5's scheduler config)
  "sd2"         SD 2.1-like: OpenCLIP text encoder, v-prediction, DDIM (SD 2.1's scheduler config)
  "sdxl"        SDXL-like: CLIP + OpenCLIP-with-projection, pooled embeddings and time ids,
                EulerDiscrete with leading spacing
  "turbo"       SD-Turbo-like: the sd2 architecture, epsilon, EulerDiscrete with trailing spacing
  "sdxl-turbo"  SDXL-Turbo-like: the sdxl architecture, EulerAncestral with trailing spacing
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from atelier.models.save import save_model_folder
from atelier.models.singlefile import save_single_file as _save_single_file
from atelier.models.tokenizers import write_word_tokenizer

TINY_FAMILIES = ("sd1", "sd2", "sdxl", "turbo", "sdxl-turbo")

# Toy-world caption words plus a few everyday ones, so prompts in tests tokenize into single tokens.
# (The word tokenizer cannot hold every word set: e.g. "mountain", "house", "landscape" would break
# "diamond" — write_word_tokenizer checks this.)
TINY_WORDS = (
    "a an the and of in on at top bottom left right center small large "
    "red green blue yellow purple orange teal white circle square triangle diamond ring bar "
    "with photo picture painting drawing image middle big tiny black gray shape object "
    "cat dog tree car flower sky sea man woman portrait style detailed blurry ugly beautiful "
    "sharp bright dark"
).split()

_COMMON_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# The scheduler configs of the real models (SD 1.5, SD 2.1, SDXL base, SD-Turbo, SDXL-Turbo).
SCHEDULERS = {
    "sd1": ("PNDMScheduler", {**_COMMON_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True,
                              "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
                              "timestep_spacing": "leading"}),
    "sd2": ("DDIMScheduler", {**_COMMON_BETAS, "clip_sample": False, "set_alpha_to_one": False,
                              "steps_offset": 1, "prediction_type": "v_prediction",
                              "timestep_spacing": "leading"}),
    "sdxl": ("EulerDiscreteScheduler", {**_COMMON_BETAS, "interpolation_type": "linear",
                                        "prediction_type": "epsilon", "steps_offset": 1,
                                        "timestep_spacing": "leading", "use_karras_sigmas": False}),
    "turbo": ("EulerDiscreteScheduler", {**_COMMON_BETAS, "interpolation_type": "linear",
                                         "prediction_type": "epsilon", "steps_offset": 1,
                                         "timestep_spacing": "trailing", "use_karras_sigmas": False}),
    "sdxl-turbo": ("EulerAncestralDiscreteScheduler", {**_COMMON_BETAS, "prediction_type": "epsilon",
                                                       "steps_offset": 1, "timestep_spacing": "trailing"}),
}

_ARCH = {"sd1": "sd1", "sd2": "sd2", "turbo": "sd2", "sdxl": "sdxl", "sdxl-turbo": "sdxl"}

# SDXL's two text encoders must differ in width (768 and 1280 in the real model): diffusers'
# single-file loader tells them apart by the width of their position embeddings.
TEXT_WIDTH = 32
TEXT2_WIDTH = 64
TEXT2_PROJECTION = 32
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim (256 in the real model)


def _check_family(family: str) -> str:
    if family not in _ARCH:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    return _ARCH[family]


@lru_cache(maxsize=None)
def _tokenizer_dir(pad_token: str) -> str:
    """Tokenizer files over TINY_WORDS, written once per process (removed at exit)."""
    tmp = tempfile.mkdtemp(prefix="atelier-tiny-tok-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    write_word_tokenizer(TINY_WORDS, tmp, pad_token=pad_token)
    return tmp


def _tokenizer(pad_token: str):
    """A fresh CLIPTokenizer (tests may add tokens to it); SD 2 and SDXL's second one pad with "!"."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir(pad_token))


def _text_config(tokenizer, *, width, open_clip, projection_dim=None):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu" if open_clip else "quick_gelu",  # OpenCLIP (SD2, SDXL-G) vs OpenAI CLIP
        projection_dim=projection_dim or width,
        bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_scheduler(family: str):
    import diffusers

    name, config = SCHEDULERS[family]
    return getattr(diffusers, name).from_config(config)


def tiny_components(family: str, seed: int = 0) -> dict:
    """The components of a tiny pipeline (keyword arguments for the pipeline class)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "sdxl":
            unet = UNet2DConditionModel(
                sample_size=8,
                block_out_channels=(16, 32),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                norm_num_groups=8,
                cross_attention_dim=TEXT_WIDTH + TEXT2_WIDTH,
                addition_embed_type="text_time",
                addition_time_embed_dim=TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=TEXT2_PROJECTION + 6 * TIME_EMBED_DIM,
            )
        else:
            unet = UNet2DConditionModel(
                sample_size=8,
                block_out_channels=(16, 32),
                layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4) if arch == "sd2" else 2,
                use_linear_projection=arch == "sd2",
                norm_num_groups=8,
                cross_attention_dim=TEXT_WIDTH,
            )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            sample_size=16,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
            force_upcast=arch == "sdxl",
        )
        tokenizer = _tokenizer("!" if arch == "sd2" else "<|endoftext|>")
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer, width=TEXT_WIDTH, open_clip=arch == "sd2")).eval()
        components = {
            "unet": unet.eval(),
            "vae": vae.eval(),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "scheduler": tiny_scheduler(family),
        }
        if arch == "sdxl":
            tokenizer_2 = _tokenizer("!")
            torch.manual_seed(seed + 3)
            config_2 = _text_config(tokenizer_2, width=TEXT2_WIDTH, open_clip=True, projection_dim=TEXT2_PROJECTION)
            components["text_encoder_2"] = CLIPTextModelWithProjection(config_2).eval()
            components["tokenizer_2"] = tokenizer_2
    return components


def tiny_safety_checker(seed: int = 0):
    """A tiny (StableDiffusionSafetyChecker, CLIPImageProcessor) pair, as SD 1.5 ships them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 100,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def tiny_pipeline(family: str, seed: int = 0, *, safety_checker: bool = False):
    """A tiny StableDiffusionPipeline ("sd1", "sd2", "turbo") or StableDiffusionXLPipeline
    ("sdxl", "sdxl-turbo") in float32 on the CPU. `safety_checker=True` (SD 1/2 only) adds a tiny
    checker and feature extractor, as SD 1.5 ships them."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = tiny_components(family, seed)
    if _ARCH[family] == "sdxl":
        if safety_checker:
            raise ValueError("SDXL pipelines have no safety checker")
        pipe = StableDiffusionXLPipeline(**components)
    else:
        checker, processor = tiny_safety_checker(seed) if safety_checker else (None, None)
        pipe = StableDiffusionPipeline(
            **components,
            safety_checker=checker,
            feature_extractor=processor,
            requires_safety_checker=safety_checker,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(pipe, folder) -> Path:
    """Save as a portable diffusers folder (`atelier.models.save_model_folder`, weights kept in float32)."""
    return save_model_folder(pipe, folder, dtype=None)


def save_single_file(pipe, path, **kwargs) -> Path:
    """Save as one A1111/ComfyUI-style .safetensors file (original LDM/SGM keys); see
    `atelier.models.singlefile` for the key conversion."""
    return _save_single_file(pipe, path, **kwargs)
