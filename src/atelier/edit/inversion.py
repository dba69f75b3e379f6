"""Inversions and the samplers that replay them, one function each, on a `Denoiser`.

Timesteps run high to low: ts[0] > ts[1] > ... > ts[-1]; the step after ts[-1] lands on the clean
latent (t = -1). `eps_fn(x, t)` returns the (possibly guided) noise prediction at x_t.

    ddim_invert          deterministic DDIM inversion (DiffEdit, Null-text): the trajectory x_t
    ddim_step            one deterministic DDIM step
    ddpm_noise_maps      edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024):
                         independent x_t's and the noise maps z_t that make the DDPM sampler pass
                         through them exactly; with few trailing steps it is TurboEdit's inversion
    ddpm_step            one DDPM (eta = 1) step with a given noise map
"""

from __future__ import annotations

import torch


def ddim_step(den, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    a, b = den.coefficients(t)
    a_p, b_p = den.coefficients(t_prev)
    return a_p * (x_t - b * eps) / a + b_p * eps


def ddim_invert(den, x0: torch.Tensor, ts: list[int], eps_fn) -> list[torch.Tensor]:
    """[x at ts[0], ..., x at ts[-1], x0]: DDIM run backwards from the clean latent."""
    xs = [x0]
    x, t_from = x0, -1
    for t in reversed(ts):
        eps = eps_fn(x, t if t_from < 0 else t_from)  # from the clean latent: eps at the first timestep
        x = ddim_step(den, x, eps, t_from, t)
        xs.append(x)
        t_from = t
    return xs[::-1]


def ddpm_mean_sigma(den, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int):
    """Mean and standard deviation of the DDPM posterior step x_t -> x_t_prev (DDIM with eta = 1)."""
    a, b = den.coefficients(t)
    a_p, b_p = den.coefficients(t_prev)
    variance = (b_p**2 / b**2) * (1 - a**2 / a_p**2)
    sigma = variance.clamp(min=0).sqrt()
    mean = a_p * (x_t - b * eps) / a + (b_p**2 - variance).clamp(min=0).sqrt() * eps
    return mean, sigma


def _unit_if_zero(sigma: torch.Tensor) -> torch.Tensor:
    # The last step lands on the clean latent with sigma = 0: its "noise map" is then the plain residual.
    return torch.where(sigma > 0, sigma, torch.ones_like(sigma))


def ddpm_step(den, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, z: torch.Tensor) -> torch.Tensor:
    mean, sigma = ddpm_mean_sigma(den, x_t, eps, t, t_prev)
    return mean + _unit_if_zero(sigma) * z


def ddpm_noise_maps(den, x0: torch.Tensor, ts: list[int], eps_fn, generator: torch.Generator):
    """(xs, zs): xs[i] = x0 noised to ts[i] with its own noise, xs[-1] = x0; zs[i] the noise map with
    which `ddpm_step` from xs[i] (under eps_fn) gives xs[i + 1] exactly."""
    xs = []
    for t in ts:
        a, b = den.coefficients(t)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        xs.append(a * x0 + b * noise)
    xs.append(x0)
    zs = []
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        mean, sigma = ddpm_mean_sigma(den, xs[i], eps_fn(xs[i], t), t, t_prev)
        zs.append((xs[i + 1] - mean) / _unit_if_zero(sigma))
    return xs, zs


def edit_timesteps(pipe, steps: int) -> list[int]:
    """`steps` timesteps, high to low, spaced as the model's scheduler config says (leading for SD,
    trailing for Turbo)."""
    from diffusers import DDIMScheduler

    config = dict(pipe.scheduler.config)
    scheduler = DDIMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]
