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
    """AutoencoderTiny (TAESD), or a module standing in for one (atelier.runtime's ExportedTinyVAE
    says so with `is_tiny_autoencoder`): its encode gives `.latents`, not a distribution."""
    from diffusers import AutoencoderTiny

    return isinstance(vae, AutoencoderTiny) or getattr(type(vae), "is_tiny_autoencoder", False) is True


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


def invert_decoder(vae, images: torch.Tensor, latents: torch.Tensor, steps: int, lr: float = 0.05,
                   proximity: float = 0.005) -> torch.Tensor:
    """Scaled latents that the decoder turns back into `images` (pixels in [-1, 1]): `latents` (the
    encoder's) refined by `steps` Adam steps on the pixel MSE of their decoding, plus `proximity` times
    their mean squared distance from `latents`, which keeps them near what the diffusion model was trained
    on (without it they drift to half the latents' own size). Decoder inversion, as in Hong et al. 2023
    ("On Exact Inversion of DPM-Solvers"): for images the encoder maps badly, e.g. colours and shapes it
    never saw in training, whose encoder latents decode to something else."""
    vae = upcast_if_needed(vae)
    target = images.to(vae.device, torch.float32)
    start = latents.detach().to(vae.device, vae.dtype)
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    frozen = [p for p in vae.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = torch.nn.functional.mse_loss(decode(vae, z).float(), target)
                loss = loss + proximity * (z - start).float().pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return z.detach().to(latents.dtype)
