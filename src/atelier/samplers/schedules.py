"""Schedule types ("Schedule type" in A1111 >= 1.9, "scheduler" in ComfyUI) and the diffusers
scheduler options that realise each one.

A schedule decides *which noise levels* a sampler visits; the sampler decides *how* it steps
between them. diffusers expresses the schedule with two kinds of config option:

* a timestep spacing (``timestep_spacing`` = linspace / leading / trailing, plus ``steps_offset``)
  that picks discrete training timesteps, and
* a sigma transform (``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas``) that
  replaces those noise levels by a formula between the model's sigma_min and sigma_max.

What each name really is, read from ComfyUI ``comfy/samplers.py`` and A1111 ``modules/sd_schedulers.py``
(``ts`` = training timestep index 0..999, ``sigmas[ts]`` the model's training noise levels):

``normal``  (ComfyUI "normal", A1111 "Normal" and "Uniform")
    ``t = linspace(999, 0, n)``, then ``sigma(t)`` interpolated: diffusers ``timestep_spacing="linspace"``.
    (ComfyUI and A1111 interpolate log-sigma between integer timesteps, diffusers' Euler
    interpolates sigma; they agree at integer timesteps.)
``simple``  (ComfyUI "simple", A1111 "Simple")
    ``sigmas[999 - int(k * 1000 / n)]``: diffusers ``timestep_spacing="trailing"`` (identical when
    1000/n is an integer, otherwise one timestep apart, ComfyUI floors where diffusers rounds).
``sgm_uniform``  (ComfyUI "sgm_uniform", A1111 "SGM Uniform")
    ``t = linspace(999, 0, n + 1)[:-1]``, the SGM/SDXL-Turbo discretisation: diffusers ``"trailing"``
    (trailing gives 999 - k*1000/n, sgm_uniform 999 - k*999/n, so the two differ by under one timestep).
    The diffusers docs map both simple and sgm_uniform to "trailing".
``ddim_uniform``  (ComfyUI "ddim_uniform", A1111 "DDIM")
    timesteps ``1, 1 + 1000//n, 1 + 2*(1000//n), ...``: diffusers ``"leading"`` with ``steps_offset=1``.
``karras``  (both "Karras")
    Karras et al. 2022 eq. 5 with rho = 7 between the model's sigma_min = sigma(t=0) and
    sigma_max = sigma(t=999): diffusers ``use_karras_sigmas=True``.
``exponential``  (both "Exponential")
    log-linear from sigma_max to sigma_min: diffusers ``use_exponential_sigmas=True``.
``beta``  (A1111 "Beta")
    ``sigma_min + ppf_Beta(0.6, 0.6)(1 - linspace(0, 1, n)) * (sigma_max - sigma_min)``:
    diffusers ``use_beta_sigmas=True``, identical to A1111's formula. **ComfyUI's "beta" is a
    different schedule**: it puts the Beta(0.6, 0.6) quantiles on the *timestep index* and looks the
    sigmas up (at 10 steps on SD 1.5: ComfyUI 14.6, 11.5, 7.4, 4.4, 2.6, ... 0.20 versus
    diffusers/A1111 14.6, 13.9, 12.5, 10.6, 8.4, ... 0.03). diffusers has no option for ComfyUI's
    version, so "beta" here always means the A1111 / diffusers one.

diffusers takes the karras / exponential / beta range from the first and last *spaced* timestep,
so with "leading" (SDXL) or "trailing" (Turbo) spacing the range would be cut short (sigma(951)
instead of sigma(999) at 20 leading steps). These three schedules therefore also set
``timestep_spacing="linspace"``, which makes the range exactly the model's trained one, as
k-diffusion, A1111 and ComfyUI use (and as the diffusers docs prescribe for exponential and beta).

``None`` means "the model's own schedule": no sigma transform and the base config's spacing
(so SD-Turbo / SDXL-Turbo configs keep "trailing").

Schedules A1111 or ComfyUI offer that no diffusers option expresses (polyexponential,
kl_optimal, align_your_steps, linear_quadratic, karras_exponential) raise a UserError.
"""

from __future__ import annotations

import difflib

from atelier.errors import UserError

# The diffusers options that realise each schedule.
SCHEDULE_OPTIONS: dict[str, dict] = {
    "karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "beta": {"use_beta_sigmas": True, "timestep_spacing": "linspace"},
    "normal": {"timestep_spacing": "linspace"},
    "simple": {"timestep_spacing": "trailing"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "ddim_uniform": {"timestep_spacing": "leading", "steps_offset": 1},
}

SIGMA_SCHEDULES = ("karras", "exponential", "beta")  # need a use_*_sigmas option on the class
SPACING_SCHEDULES = ("normal", "simple", "sgm_uniform", "ddim_uniform")
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# A1111 "Schedule type" labels (modules/sd_schedulers.py) for our schedule names.
A1111_LABELS: dict[str, str] = {
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "ddim_uniform": "DDIM",
}

# Every accepted spelling (compared after `normalize`) -> schedule name.
_ALIASES: dict[str, str] = {
    **{name: name for name in SCHEDULE_OPTIONS},
    **{label: name for name, label in A1111_LABELS.items()},
    "Uniform": "normal",  # A1111's k-diffusion discrete default, same timesteps as Normal
    "SGMUniform": "sgm_uniform",
    "linspace": "normal",
    "trailing": "simple",
    "ddim": "ddim_uniform",
}

UNAVAILABLE: dict[str, str] = {
    "polyexponential": "A1111's Polyexponential has no diffusers option",
    "kl_optimal": "the KL Optimal schedule has no diffusers option",
    "align_your_steps": "Align Your Steps uses fixed per-model sigma tables that diffusers takes only "
    "as custom timesteps at generation time, not as a scheduler option",
    "linear_quadratic": "ComfyUI's linear_quadratic schedule has no diffusers option",
    "karras_exponential": "the Karras Exponential blend has no diffusers option",
}


def normalize(text: str) -> str:
    """Case-, space-, underscore- and hyphen-insensitive key for name lookups."""
    return "".join(ch for ch in text.casefold() if ch not in " _-")


_LOOKUP = {normalize(k): v for k, v in _ALIASES.items()}
_UNAVAILABLE_LOOKUP = {normalize(k): (k, why) for k, why in UNAVAILABLE.items()}


def is_schedule_name(text: str) -> bool:
    return normalize(text) in _LOOKUP or normalize(text) in _UNAVAILABLE_LOOKUP


def resolve_schedule(text: str | None) -> str | None:
    """Canonical schedule name for any accepted spelling; None / "" / "Automatic" -> None."""
    if text is None or normalize(text) in ("", "automatic", "default"):
        return None
    key = normalize(text)
    if key in _LOOKUP:
        return _LOOKUP[key]
    if key in _UNAVAILABLE_LOOKUP:
        name, why = _UNAVAILABLE_LOOKUP[key]
        raise UserError(f"schedule {text!r} is not available: {why}. Available: {', '.join(SCHEDULE_OPTIONS)}")
    close = difflib.get_close_matches(text, list(_ALIASES) + ["Automatic"], n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UserError(f"unknown schedule {text!r}.{hint} Available: {', '.join(SCHEDULE_OPTIONS)} (or none)")
