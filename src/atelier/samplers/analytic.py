"""An exact diffusion "model" for checking samplers: data from a Gaussian mixture, whose optimal
denoiser E[x0 | x_t] is known in closed form, plus the exact probability-flow ODE solution to
compare a sampler against.

A sampler run on this model is a pure test of the sampler: there is no network error, so its
distance from the ODE solution is its discretisation error, and it must shrink as steps grow.

Conventions follow diffusers' discrete DDPM schedulers: the model gets the VP input
``x_t = alpha_t x0 + s_t eps`` (what ``scheduler.scale_model_input`` returns) and a timestep in
[0, num_train_timesteps - 1], possibly fractional (Karras sigmas), which it maps to a noise level
exactly as the schedulers do (log-sigma linear between integer timesteps). It answers in the
scheduler's parameterisation (epsilon or v).
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import torch
from scipy.integrate import solve_ivp

from atelier.core.prediction import model_target

# Schedulers whose `sample` is the VP x_t; the others (Euler, Heun, LMS, KDPM2, DPM++ SDE, ...)
# carry k-diffusion's x = x_t / alpha_t = x0 + sigma * eps.
VP_SAMPLE_CLASSES = {
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
}


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian components: weights (K,), means (K, D), stds (K,)."""

    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def sample(self, n: int, generator: np.random.Generator) -> np.ndarray:
        k = generator.choice(len(self.weights), size=n, p=np.asarray(self.weights))
        means, stds = np.asarray(self.means), np.asarray(self.stds)
        return means[k] + stds[k, None] * generator.standard_normal((n, self.dim))

    def mean(self) -> np.ndarray:
        return np.asarray(self.weights) @ np.asarray(self.means)

    def covariance(self) -> np.ndarray:
        w, mu, s = np.asarray(self.weights), np.asarray(self.means), np.asarray(self.stds)
        m = self.mean()
        centred = mu - m
        return (w[:, None, None] * (np.einsum("ki,kj->kij", centred, centred) + (s**2)[:, None, None] * np.eye(self.dim))).sum(0)

    def responsibilities(self, x: np.ndarray, a: np.ndarray | float = 1.0, b: np.ndarray | float = 0.0) -> np.ndarray:
        """p(component | x_t = a x0 + b eps), shape (N, K)."""
        w, mu, s = np.asarray(self.weights), np.asarray(self.means), np.asarray(self.stds)
        a = np.reshape(a, (-1, 1))
        b = np.reshape(b, (-1, 1))
        var = a**2 * s[None] ** 2 + b**2  # (N, K)
        dist2 = ((x[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)
        logits = np.log(w)[None] - 0.5 * self.dim * np.log(var) - dist2 / (2 * var)
        logits -= logits.max(1, keepdims=True)
        r = np.exp(logits)
        return r / r.sum(1, keepdims=True)

    def denoise(self, x: np.ndarray, a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
        """E[x0 | x_t = x] for x_t = a x0 + b eps, all rows of x (N, D); a, b scalars or (N,)."""
        mu, s = np.asarray(self.means), np.asarray(self.stds)
        a_col = np.reshape(a, (-1, 1))
        b_col = np.reshape(b, (-1, 1))
        var = a_col**2 * s[None] ** 2 + b_col**2  # (N, K)
        gain = a_col * s[None] ** 2 / var  # (N, K)
        per_component = mu[None] + gain[..., None] * (x[:, None, :] - a_col[:, :, None] * mu[None])
        r = self.responsibilities(x, a, b)
        return (r[..., None] * per_component).sum(1)

    def denoise_sigma(self, x: np.ndarray, sigma: float) -> np.ndarray:
        """E[x0 | x] for k-diffusion's x = x0 + sigma * eps."""
        return self.denoise(x, 1.0, sigma)


def training_sigmas(scheduler) -> np.ndarray:
    ac = scheduler.alphas_cumprod.double().numpy()
    return np.sqrt((1 - ac) / ac)


class MixtureModel:
    """The exact denoiser wrapped as a diffusers UNet stand-in: model(x_t, t) -> epsilon or v."""

    def __init__(self, mixture: GaussianMixture, scheduler, prediction_type: str | None = None):
        self.mixture = mixture
        self.log_sigmas = np.log(training_sigmas(scheduler))
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        self.calls = 0

    def sigma_at(self, t: float) -> float:
        return float(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        sigma = self.sigma_at(float(t))
        a, b = 1 / np.sqrt(1 + sigma**2), sigma / np.sqrt(1 + sigma**2)
        x = x_t.double().numpy()
        x0 = self.mixture.denoise(x, a, b)
        eps = (x - a * x0) / b
        return torch.from_numpy(model_target(x0, eps, a, b, self.prediction_type)).to(x_t.dtype)


class SchedulerSigmaModel(MixtureModel):
    """The exact denoiser at the noise level a multistep VP scheduler (DPM-Solver, UniPC, DEIS) steps
    with, ``scheduler.sigmas[step_index]``, instead of the level of the timestep it is called with.
    Those schedulers round (Karras) or truncate (exponential) the timesteps they hand to the model to
    integers while they step with the exact sigmas, so a real UNet sees a slightly wrong noise level;
    this model shows what the solver would do without that discrepancy."""

    def __init__(self, mixture: GaussianMixture, scheduler, prediction_type: str | None = None):
        super().__init__(mixture, scheduler, prediction_type)
        self.scheduler = scheduler

    def sigma_at(self, t: float) -> float:
        return float(self.scheduler.sigmas[self.scheduler.step_index or 0])


@dataclasses.dataclass
class Run:
    sample: torch.Tensor  # the scheduler's final sample
    start_sigma: float  # noise level the run started from
    start_x: np.ndarray  # its initial state in k-diffusion scaling (x0 + sigma * eps)
    end_sigma: float  # noise level of the final sample (0 unless the scheduler stops early)
    end_x: np.ndarray  # final sample in k-diffusion scaling
    model_calls: int


def _step_kwargs(scheduler, generator):
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params else {}


def run_sampler(scheduler, model, noise: torch.Tensor, steps: int, *, generator: torch.Generator | None = None) -> Run:
    """Sample like a diffusers pipeline does: x = noise * init_noise_sigma, then scale/call/step."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    is_vp = type(scheduler).__name__ in VP_SAMPLE_CLASSES
    start_sigma = _first_sigma(scheduler, model)
    start_x = x.double().numpy() * (np.sqrt(1 + start_sigma**2) if is_vp else 1.0)
    calls_before = model.calls
    kwargs = _step_kwargs(scheduler, generator)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t), t, x, **kwargs).prev_sample
    end_sigma = _final_sigma(scheduler)
    end_x = x.double().numpy() * (np.sqrt(1 + end_sigma**2) if is_vp else 1.0)
    return Run(x, start_sigma, start_x, end_sigma, end_x, model.calls - calls_before)


def _first_sigma(scheduler, model: MixtureModel) -> float:
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas):
        return float(sigmas[0])
    return model.sigma_at(float(scheduler.timesteps[0]))


def _final_sigma(scheduler) -> float:
    """The noise level of the final sample: the last entry of `sigmas` (0, or sigma_min with
    final_sigmas_type="sigma_min"); DDIM and PLMS stop at final_alpha_cumprod (alpha_0 unless
    set_alpha_to_one); DDPM at 0."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas):
        return float(sigmas[-1])
    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is None:
        return 0.0
    final = float(final)
    return float(np.sqrt((1 - final) / final))


def probability_flow(mixture: GaussianMixture, x_start: np.ndarray, sigma_start: float, sigma_end: float) -> np.ndarray:
    """Exact solution of dx/dsigma = (x - D(x, sigma)) / sigma from sigma_start down to sigma_end,
    integrated in log sigma (dx/dlog sigma = x - D) by an 8th-order Runge-Kutta at tight tolerance."""
    shape = x_start.shape
    log_end = np.log(max(sigma_end, 1e-7))  # sigma -> 0 limit; the state changes by O(sigma^2) below 1e-7

    def rhs(log_sigma, flat):
        x = flat.reshape(shape)
        return (x - mixture.denoise_sigma(x, float(np.exp(log_sigma)))).ravel()

    sol = solve_ivp(rhs, (np.log(sigma_start), log_end), x_start.ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
    if not sol.success:
        raise RuntimeError(sol.message)
    return sol.y[:, -1].reshape(shape)


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


def ode_error(mixture: GaussianMixture, run: Run) -> float:
    """RMS distance of a deterministic run's result from the exact ODE solution from the same start."""
    return rms(run.end_x, probability_flow(mixture, run.start_x, run.start_sigma, run.end_sigma))


def final_step_error(mixture: GaussianMixture, x_start: np.ndarray, sigma_start: float, sigma_min: float) -> float:
    """The error a first-order last step from sigma_min to 0 adds however fine the rest of the run: RMS
    distance between D(x, sigma_min) (what Euler, DDIM and every solver's order-1 step return there)
    and the exact ODE solution at 0, both from the exact state at sigma_min."""
    x_min = probability_flow(mixture, x_start, sigma_start, sigma_min)
    return rms(mixture.denoise_sigma(x_min, sigma_min), probability_flow(mixture, x_min, sigma_min, 0.0))


def observed_order(steps, errors) -> float:
    """Convergence order: minus the least-squares slope of log(error) against log(steps)."""
    return float(-np.polyfit(np.log(np.asarray(steps, float)), np.log(np.asarray(errors, float)), 1)[0])


# The mixture the tests and the benchmark use: three well-separated 2-D blobs of different sizes,
# overall scale about 1 like SD latents.
DEFAULT_MIXTURE = GaussianMixture(
    weights=(0.5, 0.3, 0.2),
    means=((-1.5, 0.0), (1.0, 1.0), (1.0, -1.2)),
    stds=(0.3, 0.2, 0.4),
)
