"""The 9-channel inpainting UNet from a 4-channel text-to-image UNet, made the way SD-inpainting was made
from SD 1.2: `conv_in` gets 5 more input channels (the mask and the masked image's latents), initialised
to zero, so the new UNet starts out computing exactly what the old one did. The channel order is
diffusers' inpainting pipelines': [noisy latents (4) | mask (1) | masked-image latents (4)].

The change goes through the config (`register_to_config(in_channels=9)`), so `save_pretrained` /
`from_pretrained` round-trip it in plain diffusers. A UNet that already has 9 input channels (SD
1.5-inpainting) is used as it is."""

from __future__ import annotations

import torch

from atelier.errors import UserError

LATENT_CHANNELS = 4
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1  # noisy latents, mask, masked-image latents


def is_inpainting(unet) -> bool:
    return int(unet.config.in_channels) == INPAINT_CHANNELS


def inpainting_unet(unet):
    """`(unet, widened)`: `unet` itself when it has 9 input channels, else `unet` with a widened `conv_in`
    (in place; the extra input channels' weights zero). `widened` says whether `conv_in` is new."""
    channels = int(unet.config.in_channels)
    if channels == INPAINT_CHANNELS:
        return unet, False
    if channels != LATENT_CHANNELS:
        raise UserError(f"a try-on UNet starts from a 4-channel text-to-image or a 9-channel inpainting UNet, "
                        f"not one with {channels} input channels")
    old = unet.conv_in
    new = torch.nn.Conv2d(INPAINT_CHANNELS, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :LATENT_CHANNELS] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=INPAINT_CHANNELS)
    return unet, True


def latent_unet(unet):
    """A 4-channel UNet from a 9-channel one (in place): `conv_in` keeps the noisy latents' input channels
    only (ootd's garment UNet from an inpainting base, whose input is the garment's clean latents)."""
    if int(unet.config.in_channels) == LATENT_CHANNELS:
        return unet
    old = unet.conv_in
    new = torch.nn.Conv2d(LATENT_CHANNELS, old.out_channels, old.kernel_size, old.stride, old.padding,
                          device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:, :LATENT_CHANNELS])
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=LATENT_CHANNELS)
    return unet


def unet_input(noisy: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The inpainting UNet's input: diffusers' order (StableDiffusionInpaintPipeline)."""
    return torch.cat([noisy, mask.to(noisy.dtype), masked.to(noisy.dtype)], dim=1)
