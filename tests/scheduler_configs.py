"""Scheduler configs of real checkpoints, as their scheduler/scheduler_config.json files on the hub
(written out here; nothing is downloaded), and helpers shared by the sampler tests and benchmark."""

from __future__ import annotations

import diffusers

SD15 = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD21 = {  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SD_TURBO = {  # stabilityai/sd-turbo
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SDXL_TURBO = {**SD_TURBO, "_diffusers_version": "0.24.0.dev0"}  # stabilityai/sdxl-turbo

RAW = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "sd-turbo": SD_TURBO, "sdxl-turbo": SDXL_TURBO}


def loaded(raw: dict):
    """The config as `pipe.scheduler.config` holds it after from_pretrained (FrozenDict with
    defaults filled in and `_use_default_values` listing them)."""
    return getattr(diffusers, raw["_class_name"]).from_config(raw).config


CONFIGS = {**{f"{k}-json": v for k, v in RAW.items()}, **{f"{k}-loaded": loaded(v) for k, v in RAW.items()}}
