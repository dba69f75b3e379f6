"""VAE and tiny-autoencoder (TAESD) calls between pixels in [-1, 1] and scaled latents.

A VAE whose config sets `force_upcast` (the SDXL VAE overflows to NaN in float16) runs in float32
whatever the pipeline's dtype, as diffusers' pipelines do with `upcast_vae`; latents come back in
the caller's dtype.
"""

from __future__ import annotations

import torch


def needs_upcast(vae) -> bool:
    return vae.dtype in (torch.float16, torch.bfloat16) and bool(getattr(vae.config, "force_upcast", False))


def upcast_if_needed(vae):
    """The VAE in float32 when its config asks for it and it is in half precision (in place, once)."""
    if needs_upcast(vae):
        vae.to(dtype=torch.float32)
    return vae


def is_tiny(vae) -> bool:
    return type(vae).__name__ == "AutoencoderTiny"


def encode(vae, images: torch.Tensor, dtype: torch.dtype | None = None, sample_generator=None) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> scaled latents in `dtype` (default: the VAE's own).

    The posterior's mode is used unless `sample_generator` is given (then a sample is drawn)."""
    vae = upcast_if_needed(vae)
    out = vae.encode(images.to(vae.device, vae.dtype))
    if is_tiny(vae):
        latents = out.latents
    elif sample_generator is not None:
        latents = out.latent_dist.sample(sample_generator)
    else:
        latents = out.latent_dist.mode()
    return (latents * vae.config.scaling_factor).to(dtype or latents.dtype)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels (N, 3, H, W), roughly in [-1, 1], in the VAE's compute dtype."""
    vae = upcast_if_needed(vae)
    return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
