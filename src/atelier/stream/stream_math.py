"""The arithmetic of stream denoising (StreamDiffusion, Kodaira et al. 2023), one function each.

Every stage of a stream predicts the clean latent x0 from x_t and re-noises it to the next stage's
timestep with that stage's fixed noise: a consistency-model multistep sampler, which is what
Turbo, LCM and StreamDiffusion do. Shapes: `alpha`, `beta` broadcast against latents (B, 1, 1, 1).
"""

from __future__ import annotations

import torch

from atelier.core.prediction import guided_eps, renoise, x0_and_eps, x0_from_eps  # noqa: F401  (stream's vocabulary)


def strength_to_t_indices(strength: float, num_inference_steps: int, stages: int) -> list[int]:
    """`stages` indices into a `num_inference_steps` schedule, covering the last `strength` of it,
    as diffusers img2img starts at `timesteps[N - int(N * strength):]`."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = num_inference_steps
    start = min(n - 1, n - max(1, int(n * strength)))
    span = n - start
    indices = sorted({start + (j * span) // stages for j in range(stages)})
    return indices


def stage_coefficients(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for each stage's timestep, shaped (stages,)."""
    abar = alphas_cumprod[torch.as_tensor([int(round(float(t))) for t in timesteps])].double()
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def next_residual_noise(residual: torch.Tensor, eps: torch.Tensor, next_noise: torch.Tensor, alpha: torch.Tensor,
                        beta: torch.Tensor, alpha_next: torch.Tensor, beta_next: torch.Tensor) -> torch.Tensor:
    """Residual CFG's "virtual negative" for the next stage.

    If x_t = alpha X + beta r (X the input frame's latent, r the residual noise), the stage's
    prediction x0 = X + (beta / alpha)(r - eps), so the next stage's x_t' = alpha' X + beta' r' with
    r' = n' + (alpha' / beta')(beta / alpha)(r - eps). Self-negative RCFG uses r' as the unconditional
    noise there: the noise that leads back to the input. (StreamDiffusion computes the same update but
    keeps it at the batch slot of the stage it came from, one frame out of step.)
    """
    return next_noise + (alpha_next / beta_next) * (beta / alpha) * (residual - eps)
