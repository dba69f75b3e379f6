"""DPM++ 2S a (k-diffusion ``sample_dpmpp_2s_ancestral``, eta = 1) as a diffusers scheduler.

diffusers has no DPM-Solver++(2S) ancestral scheduler (its docs list A1111's "DPM++ 2S a" as
N/A, "very similar to DPMSolverSinglestepScheduler", which is deterministic). It does have
`KDPM2AncestralDiscreteScheduler`, whose machinery is exactly what DPM++ 2S a needs: per step
the ancestral split of sigma -> sigma_next into (sigma_down, sigma_up), a midpoint
sigma_mid = sqrt(sigma * sigma_down) evaluated by a second model call, and fresh noise
* sigma_up after the step. Only the update rule differs, so this subclass keeps all of its
timesteps (spacing, Karras / exponential / beta sigmas, scale_model_input, add_noise) and
replaces `step`, written by hand after k-diffusion:

    first call  (at sigma):      x_mid = (sigma_mid / sigma) x + (1 - sigma_mid / sigma) D(x, sigma)
    second call (at sigma_mid):  x' = (sigma_down / sigma) x + (1 - sigma_down / sigma) D(x_mid, sigma_mid)
                                 x' += sigma_up * noise

(DPM2 a takes the same first stage but an Euler second stage with the slope at sigma_mid.)
At the last step sigma_down = 0 and the first call already lands on D(x, sigma), as
k-diffusion's Euler fallback does.
"""

from __future__ import annotations

import torch
from diffusers import KDPM2AncestralDiscreteScheduler
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from atelier.core.prediction import denoised_from_sigma


class DPMSolverPlusPlus2SAncestralScheduler(KDPM2AncestralDiscreteScheduler):
    """DPM-Solver++(2S) ancestral sampling; same config and timesteps as KDPM2AncestralDiscreteScheduler."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        if self.step_index is None:
            self._init_step_index(timestep)

        first_stage = self.state_in_first_order
        # Interleaved layout of the parent: index 2k is the first call of step k, 2k+1 its second.
        i = self.step_index if first_stage else self.step_index - 1
        sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i]
        denoised = denoised_from_sigma(
            model_output, sample, sigma if first_stage else sigma_mid, self.config.prediction_type
        )

        if first_stage:
            self.sample = sample
            prev_sample = (sigma_mid / sigma) * sample + (1 - sigma_mid / sigma) * denoised
        else:
            sigma_down, sigma_up = self.sigmas_down[i], self.sigmas_up[i]
            x = self.sample
            self.sample = None
            prev_sample = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            prev_sample = prev_sample + noise * sigma_up

        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
