"""How much each sample of a diffusion training batch counts: Min-SNR-γ loss weights for every prediction
type, EDM-style (Karras et al. 2022) input scaling and loss weight, the offset noise of
Lin / crosslabs, and which timesteps are drawn (uniform, or a few-step distilled model's own).
Small pure functions on tensors; the trainers (train/lora.py, train/ip_adapter.py) put them together.

Notation (atelier.core.prediction): x_t = alpha x0 + beta eps, alpha = sqrt(abar_t), beta = sqrt(1 - abar_t);
SNR(t) = alpha² / beta² = abar_t / (1 - abar_t) (diffusers' `compute_snr`); in k-diffusion scaling
x = x0 + sigma eps with sigma = beta / alpha = SNR^-1/2.

Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", sec. 3.4 and
4.2). The paper's weight on the x0 loss is min(SNR, γ). A model trained on another target has its loss
in other units: ||eps_hat - eps||² = SNR ||x0_hat - x0||² and ||v_hat - v||² = (SNR + 1) ||x0_hat - x0||²,
so the same weighting reads
    epsilon        min(SNR, γ) / SNR
    v_prediction   min(SNR, γ) / (SNR + 1)
    sample (x0)    min(SNR, γ)
This is what atelier uses (and how the toy models were trained, train/toyworld.py). The diffusers
training scripts use min(SNR, γ) / SNR + 1 for v-prediction (a weight that never falls below 1), which
is not the paper's weighting; --snr_gamma here means the paper's.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEPS_HELP = ("draw the training timesteps from this list instead of uniformly: a few-step distilled base's "
                  "sampling timesteps (SD-Turbo / toyworld-turbo: 999,749,499,249), the only ones it is run at")


def training_timesteps(n: int, total: int, generator: torch.Generator, only=None, share: float = 1.0) -> torch.Tensor:
    """n training timesteps: uniform over [0, total), or, with `only` (a few-step distilled model's
    sampling timesteps), drawn from that list for a `share` of the samples. A distilled model's output
    at the timesteps it was not distilled for is not the map it runs, so an adapter or LoRA trained
    there learns to steer the wrong thing (docs/image-prompts.md, toyworld-turbo-ip)."""
    t = torch.randint(0, total, (n,), generator=generator)
    if only:
        only = torch.as_tensor(only, dtype=torch.long)
        pick = only[torch.randint(0, len(only), (n,), generator=generator)]
        t = torch.where(torch.rand(n, generator=generator) < share, pick, t)
    return t


def check_timesteps(only, total: int, flag: str = "--train_timesteps") -> None:
    """A UserError when a listed timestep is outside the model's schedule of `total` steps."""
    from atelier.errors import UserError

    if only and max(only) >= total:
        raise UserError(f"{flag}: the model trains over {total} timesteps, not {max(only) + 1}")


def parse_timesteps(value, flag: str = "--train_timesteps") -> tuple[int, ...]:
    """"999,749,499,249" (or a sequence of ints) -> (999, 749, 499, 249); a UserError naming `flag` otherwise."""
    from atelier.errors import UserError

    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag}: not a comma-separated list of timesteps: {text!r}") from None
    if not values or any(not 0 <= v < 1000 for v in values):
        raise UserError(f"{flag} must list training timesteps between 0 and 999, e.g. 999,749,499,249")
    return values


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The per-sample loss weight of Min-SNR-γ for a model of `prediction_type` (see the module docstring).
    At SNR = 0 (a zero-terminal-SNR schedule's last step) the epsilon weight is its limit, 1."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type {prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}")


def snr_of(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) at integer timesteps `t` (float32, on t's device)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def sigma_of(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The k-diffusion noise level sigma = sqrt((1 - abar_t) / abar_t) of integer timesteps `t`: the sigmas
    of diffusers' EulerDiscreteScheduler over the training timesteps."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return ((1 - abar) / abar).sqrt()


def edm_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c_in of a variance-preserving model in EDM form: x = x0 + sigma eps enters the UNet as
    x / sqrt(sigma² + 1), which is the model's own x_t."""
    return 1 / (sigma**2 + 1).sqrt()


def edm_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """The weight of the denoised (x0) error in the advanced scripts' EDM-style training of a
    variance-preserving model: sigma⁻². (For an epsilon model this makes the loss the plain epsilon MSE.)"""
    return sigma.float() ** -2


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise with a per-sample, per-channel constant added (crosslabs' "offset noise"; the scripts'
    --noise_offset): noise + offset · N(0, 1) of shape (B, C, 1, 1). Lets the model move an image's mean."""
    if not offset:
        return noise
    shift = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=noise.dtype)
    return noise + offset * shift.to(noise.device)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each sample's mean squared error, times its weight (float32)."""
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight.float().flatten()
    return per_sample.mean()
