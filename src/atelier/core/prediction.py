"""What a diffusion model's output means, for every prediction type: the one place where epsilon,
v and x0 ("sample") predictions are converted into each other.

Two parametrisations of the same forward process are used across diffusers:
  variance preserving  x_t = alpha x0 + beta eps, alpha = sqrt(abar_t), beta = sqrt(1 - abar_t)
  k-diffusion          x   = x0 + sigma eps,      sigma = beta / alpha, x = x_t / alpha
`alpha`, `beta`, `sigma` broadcast against the latents (e.g. shaped (B, 1, 1, 1)).
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unknown(prediction_type: str) -> ValueError:
    return ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")


def x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, alpha, beta, prediction_type: str):
    """The clean latent and the noise that the model's output implies at x_t = alpha x0 + beta eps."""
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - beta * eps) / alpha, eps
    if prediction_type == "v_prediction":
        return alpha * x_t - beta * model_output, alpha * model_output + beta * x_t
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - alpha * x0) / beta
    raise _unknown(prediction_type)


def model_target(x0: torch.Tensor, eps: torch.Tensor, alpha, beta, prediction_type: str) -> torch.Tensor:
    """What a model of `prediction_type` should output at x_t = alpha x0 + beta eps (the training target)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - beta * x0
    if prediction_type == "sample":
        return x0
    raise _unknown(prediction_type)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha, beta) -> torch.Tensor:
    return (x_t - beta * eps) / alpha


def renoise(x0: torch.Tensor, noise: torch.Tensor, alpha, beta) -> torch.Tensor:
    """The forward process: x_t from a clean latent and a noise."""
    return alpha * x0 + beta * noise


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def denoised_from_sigma(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str):
    """The model's x0 estimate for a sample in k-diffusion scaling x = x0 + sigma eps."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise _unknown(prediction_type)
