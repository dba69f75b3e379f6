"""Sampling a try-on: `try_on(model, person, garment, mask) -> PIL.Image`.

Images of any size work: person, garment and mask are resized to the model's resolution (the mask with
nearest neighbours), the result is resized back to the person image's size, and the person's own pixels
are pasted back outside the mask, so they are kept exactly. The mask must have the person image's size.

Classifier-free guidance on the garment (guidance > 1): one batch of [no garment | garment] per step,
the garment's latents replaced by zeros in the unconditional half (CatVTON's and OOTDiffusion's
unconditional input); guidance 1 runs the UNet once per step."""

from __future__ import annotations

import numpy as np
import torch

from atelier.core import vae as vae_calls
from atelier.core.prediction import guided_eps
from atelier.errors import UserError
from atelier.tryon.data import check_mask, to_tensor
from atelier.tryon.methods import latent_mask


def _image(source, what: str):
    from PIL import Image

    from atelier.core.images import open_image

    if isinstance(source, Image.Image):
        return source
    if source is None:
        raise UserError(f"no {what} given")
    return open_image(source, name=f"{what} {source}")


def _check(steps, guidance) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"steps must be a whole number of at least 1, not {steps!r}")
    if not np.isfinite(guidance) or guidance < 1:
        raise UserError(f"guidance must be a finite number of at least 1, not {guidance!r}")


@torch.no_grad()
def sample_latents(model, masked, mask, garment, *, steps: int, guidance: float, generator) -> torch.Tensor:
    """The person's latents drawn by `model` (latents in: masked person, pixel-free latent mask, garment)."""
    net, scheduler = model.net, model.scheduler
    shape = net.noise_shape(tuple(masked.shape))
    guided = guidance > 1
    if guided:
        drop = torch.tensor([True] * len(garment) + [False] * len(garment), device=garment.device)
        masked, mask, garment = torch.cat([masked] * 2), torch.cat([mask] * 2), torch.cat([garment] * 2)
        condition = net.condition(garment, drop)
    else:
        condition = net.condition(garment)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device, model.dtype)
    scheduler.set_timesteps(steps, device=model.device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        inp = torch.cat([inp] * 2) if guided else inp
        out = net(inp, t.expand(len(inp)).to(model.device), mask, masked, condition)
        if guided:
            uncond, cond = out.chunk(2)
            out = guided_eps(cond.float(), uncond.float(), guidance).to(out.dtype)
        x = scheduler.step(out, t, x).prev_sample
    return net.person(x)


@torch.no_grad()
def try_on(model, person_image, garment_image, mask, steps: int | None = None, guidance: float | None = None,
           seed: int = 0, *, generator=None):
    """The person wearing the garment, as a PIL image of the person image's size. `person_image`,
    `garment_image`, `mask` are PIL images or paths; the mask is white where the garment goes.
    `steps` / `guidance` default to the model's (tryon.json "defaults"); `seed` seeds the noise."""
    from PIL import Image

    steps = int(model.defaults["steps"]) if steps is None else steps
    guidance = float(model.defaults["guidance"]) if guidance is None else float(guidance)
    _check(steps, guidance)
    person, garment, mask_image = _image(person_image, "person image"), _image(garment_image, "garment image"), _image(mask, "mask")
    check_mask(person, mask_image, getattr(mask_image, "filename", "") or "(given)")
    size = model.resolution
    device, dtype = model.device, model.dtype
    x_person = to_tensor(person, size)[None].to(device)
    x_garment = to_tensor(garment, size)[None].to(device)
    m = to_tensor(mask_image, size, mask=True)[None].to(device)
    masked = x_person * (m < 0.5)
    z_masked = vae_calls.encode(model.vae, masked, dtype)
    z_garment = vae_calls.encode(model.vae, x_garment, dtype)
    m_latent = latent_mask(m, z_masked.shape[-2:]).to(dtype)
    generator = generator or torch.Generator().manual_seed(int(seed))
    z = sample_latents(model, z_masked, m_latent, z_garment, steps=steps, guidance=guidance, generator=generator)
    pixels = vae_calls.decode(model.vae, z).float().clamp(-1, 1)
    result = ((pixels[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    drawn = Image.fromarray(result)
    if drawn.size != person.size:
        drawn = drawn.resize(person.size, Image.BICUBIC)
    keep = np.asarray(mask_image.convert("L")) <= 127
    out = np.asarray(drawn.convert("RGB")).copy()
    out[keep] = np.asarray(person.convert("RGB"))[keep]
    return Image.fromarray(out)
