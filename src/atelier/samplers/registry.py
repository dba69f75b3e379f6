"""The named samplers: A1111 / k-diffusion and ComfyUI names -> a diffusers scheduler class and options.

The table follows the diffusers docs' A1111 mapping ("Schedulers" overview) with these corrections,
each checked against the installed diffusers source:

* "DPM++ SDE" is k-diffusion's ``sample_dpmpp_sde``; diffusers' port of it is `DPMSolverSDEScheduler`
  (needs ``torchsde``). The docs table's `DPMSolverSinglestepScheduler` is the deterministic
  DPM-Solver++(2S), not an SDE sampler.
* "DPM++ 2S a" has no diffusers scheduler; `DPMSolverPlusPlus2SAncestralScheduler` (this package)
  implements it on top of `KDPM2AncestralDiscreteScheduler`.
* `EulerAncestralDiscreteScheduler` has no Karras / exponential / beta sigmas, so "Euler a Karras"
  is refused rather than silently run without Karras sigmas.
* "UniPC" is A1111's and ComfyUI's UniPC: variant bh1, order 3 (A1111 options ``uni_pc_variant="bh1"``,
  ``uni_pc_order=3``, lower order final; ComfyUI ``uni_pc`` = bh1 with order min(3, steps - 1)).
  Both stop at the smallest trained noise level (A1111 at t = 1/N, ComfyUI at sigma 0.001), and so
  does this entry (``final_sigmas_type="sigma_min"``). That is also required: with diffusers 0.42's
  default final sigma 0, bh1's last step computes ``B_h = h = -inf`` times a zero residual and
  returns NaN. "UniPC bh2" (ComfyUI's ``uni_pc_bh2``) is bh2 with order 3, ending at sigma 0.
* "EDM Euler" / "EDM DPM++ 2M": diffusers' `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` are
  for EDM-parameterised models. They feed the network ``c_noise = 0.25 * log(sigma)`` as its timestep
  and scale inputs and outputs with ``sigma_data = 0.5``, and they have no beta schedule, so an
  SD-style UNet (integer timesteps 0..999, ``x / sqrt(sigma^2 + 1)`` input, epsilon or v output)
  would get wrong timesteps and scalings. For SD-style models the EDM samplers are Euler and
  DPM++ 2M on Karras sigmas (rho = 7) over the model's own sigma range, which is what these two
  entries build.

A1111 >= 1.9 moved the schedule into a separate "Schedule type" field and gave some samplers a
default schedule that "Automatic" selects (DPM++ 2M, DPM++ SDE, DPM++ 2S a: Karras; DPM++ 2M SDE
and its Heun variant: Exponential); `a1111_automatic` records it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from functools import cached_property

import diffusers

from atelier.errors import UserError
from atelier.samplers.dpmpp_2s_ancestral import DPMSolverPlusPlus2SAncestralScheduler
from atelier.samplers.schedules import (
    A1111_LABELS,
    SCHEDULE_OPTIONS,
    SIGMA_FLAGS,
    SIGMA_SCHEDULES,
    SPACING_SCHEDULES,
    is_schedule_name,
    normalize,
    resolve_schedule,
)

LOCAL_SCHEDULERS = {"DPMSolverPlusPlus2SAncestralScheduler": DPMSolverPlusPlus2SAncestralScheduler}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical name (the A1111 label where A1111 has the sampler)
    class_name: str  # diffusers scheduler class (or one in LOCAL_SCHEDULERS)
    options: dict  # scheduler options that define the sampler
    comfyui: str | None = None  # ComfyUI KSampler sampler_name
    a1111: str | None = None  # A1111 "Sampler" label, when A1111 has this sampler
    aliases: tuple[str, ...] = ()  # other accepted names (A1111 k_* aliases, ComfyUI variants)
    a1111_automatic: str | None = None  # the schedule A1111 >= 1.9 picks for "Automatic"
    stochastic: bool = False
    own_schedule: bool = False  # ignores timestep_spacing and sigma options (LCM, TCD)
    fixed_schedule: str | None = None  # the EDM entries are Karras by definition
    notes: str = ""

    @cached_property
    def scheduler_class(self):
        if self.class_name in LOCAL_SCHEDULERS:
            return LOCAL_SCHEDULERS[self.class_name]
        return getattr(diffusers, self.class_name)

    @cached_property
    def init_keys(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.scheduler_class.__init__).parameters) - {"self", "kwargs"}

    @cached_property
    def schedules(self) -> tuple[str, ...]:
        """The schedule names this sampler can really run with (None, the model's own, always works)."""
        if self.fixed_schedule:
            return (self.fixed_schedule,)
        if self.own_schedule:
            return ()
        allowed = [s for s in SIGMA_SCHEDULES if f"use_{s}_sigmas" in self.init_keys]
        allowed += list(SPACING_SCHEDULES)
        return tuple(allowed)

    def legacy_names(self) -> dict[str, str]:
        """A1111 < 1.9 combined names like "DPM++ 2M Karras" -> their schedule."""
        if not self.a1111 or self.fixed_schedule or self.own_schedule:
            return {}
        return {f"{self.a1111} {A1111_LABELS[s]}": s for s in ("karras", "exponential") if s in self.schedules}


def _spec(name, class_name, options=None, **kw) -> SamplerSpec:
    return SamplerSpec(name=name, class_name=class_name, options=options or {}, **kw)


DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}

SAMPLERS: tuple[SamplerSpec, ...] = (
    _spec("Euler", "EulerDiscreteScheduler", comfyui="euler", a1111="Euler", aliases=("k_euler",)),
    _spec("Euler a", "EulerAncestralDiscreteScheduler", comfyui="euler_ancestral", a1111="Euler a",
          aliases=("k_euler_a", "k_euler_ancestral", "Euler Ancestral"), stochastic=True,
          notes="diffusers' EulerAncestralDiscreteScheduler has no Karras/exponential/beta sigmas"),
    _spec("Heun", "HeunDiscreteScheduler", comfyui="heun", a1111="Heun", aliases=("k_heun",)),
    _spec("LMS", "LMSDiscreteScheduler", comfyui="lms", a1111="LMS", aliases=("k_lms",)),
    _spec("DPM2", "KDPM2DiscreteScheduler", comfyui="dpm_2", a1111="DPM2", aliases=("k_dpm_2",),
          notes="A1111 drops the next-to-last sigma for DPM2; diffusers does not"),
    _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler", comfyui="dpm_2_ancestral", a1111="DPM2 a",
          aliases=("k_dpm_2_a",), stochastic=True,
          notes="A1111 drops the next-to-last sigma for DPM2 a; diffusers does not"),
    _spec("DPM++ 2S a", "DPMSolverPlusPlus2SAncestralScheduler", comfyui="dpmpp_2s_ancestral",
          a1111="DPM++ 2S a", aliases=("k_dpmpp_2s_a",), a1111_automatic="karras", stochastic=True,
          notes="atelier's port of k-diffusion sample_dpmpp_2s_ancestral (eta 1)"),
    _spec("DPM++ 2M", "DPMSolverMultistepScheduler", DPM_2M, comfyui="dpmpp_2m", a1111="DPM++ 2M",
          aliases=("k_dpmpp_2m",), a1111_automatic="karras"),
    _spec("DPM++ SDE", "DPMSolverSDEScheduler", comfyui="dpmpp_sde", a1111="DPM++ SDE",
          aliases=("k_dpmpp_sde", "dpmpp_sde_gpu"), a1111_automatic="karras", stochastic=True,
          notes="Brownian-tree noise (torchsde); pass noise_sampler_seed=... for reproducible runs"),
    _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {**DPM_2M, "algorithm_type": "sde-dpmsolver++"},
          comfyui="dpmpp_2m_sde", a1111="DPM++ 2M SDE", aliases=("dpmpp_2m_sde_gpu",),
          a1111_automatic="exponential", stochastic=True,
          notes="diffusers draws Gaussian noise per step where k-diffusion uses a Brownian tree"),
    _spec("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
          {**DPM_2M, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
          a1111="DPM++ 2M SDE Heun", a1111_automatic="exponential", stochastic=True),
    _spec("DDIM", "DDIMScheduler", comfyui="ddim", a1111="DDIM", notes="eta 0 unless the pipeline passes eta"),
    _spec("DDPM", "DDPMScheduler", comfyui="ddpm", stochastic=True),
    _spec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, a1111="PLMS"),
    _spec("UniPC", "UniPCMultistepScheduler",
          {"solver_type": "bh1", "solver_order": 3, "predict_x0": True, "final_sigmas_type": "sigma_min"},
          comfyui="uni_pc", a1111="UniPC", aliases=("UniPC bh1",),
          notes="ends at the model's sigma_min like A1111's and ComfyUI's UniPC; diffusers' bh1 "
                "returns NaN on its last step when asked to end at sigma 0"),
    _spec("UniPC bh2", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3, "predict_x0": True},
          comfyui="uni_pc_bh2"),
    _spec("DEIS", "DEISMultistepScheduler", {"algorithm_type": "deis", "solver_type": "logrho", "solver_order": 3},
          comfyui="deis", notes="order 3 as ComfyUI's deis; pass solver_order=2 for strong guidance"),
    _spec("LCM", "LCMScheduler", comfyui="lcm", a1111="LCM", stochastic=True, own_schedule=True,
          notes="for LCM-distilled models (LCM-LoRA); uses its own original_inference_steps grid"),
    _spec("TCD", "TCDScheduler", stochastic=True, own_schedule=True,
          notes="for TCD-distilled models; gamma is the pipeline's eta"),
    _spec("EDM Euler", "EulerDiscreteScheduler", fixed_schedule="karras",
          notes="Euler on Karras sigmas (rho 7); EDMEulerScheduler does not fit SD-style models"),
    _spec("EDM DPM++ 2M", "DPMSolverMultistepScheduler", DPM_2M, fixed_schedule="karras",
          notes="DPM++ 2M on Karras sigmas (rho 7); EDMDPMSolverMultistepScheduler does not fit SD-style models"),
)

# Names people will type that no diffusers scheduler can run, with the reason.
UNAVAILABLE_SAMPLERS: dict[str, str] = {
    "DPM++ 3M SDE": "diffusers' DPMSolverMultistepScheduler runs SDE variants only up to order 2",
    "dpmpp_3m_sde": "diffusers' DPMSolverMultistepScheduler runs SDE variants only up to order 2",
    "DPM fast": "k-diffusion's fixed-order DPM-Solver has no diffusers scheduler",
    "DPM adaptive": "k-diffusion's adaptive-step DPM-Solver has no diffusers scheduler",
    "Restart": "the Restart sampler has no diffusers scheduler",
    "DDIM CFG++": "CFG++ changes the guidance, not the scheduler; diffusers has no CFG++ scheduler",
}


@dataclasses.dataclass(frozen=True)
class SamplerChoice:
    """A resolved request: which sampler, on which schedule (None = the model's own)."""

    spec: SamplerSpec
    schedule: str | None

    @property
    def name(self) -> str:
        return self.spec.name


def _names_of(spec: SamplerSpec) -> list[str]:
    return [spec.name, *(n for n in (spec.comfyui, spec.a1111) if n), *spec.aliases]


_BY_NAME: dict[str, SamplerSpec] = {}
for _s in SAMPLERS:
    for _n in _names_of(_s):
        _BY_NAME.setdefault(normalize(_n), _s)
_LEGACY: dict[str, tuple[SamplerSpec, str]] = {
    normalize(combined): (s, sched) for s in SAMPLERS for combined, sched in s.legacy_names().items()
}
_UNAVAILABLE = {normalize(k): (k, v) for k, v in UNAVAILABLE_SAMPLERS.items()}


def all_names() -> list[str]:
    names = [n for s in SAMPLERS for n in _names_of(s)]
    names += [c for s in SAMPLERS for c in s.legacy_names()]
    return list(dict.fromkeys(names))


def _unknown(name: str) -> UserError:
    key = normalize(name)
    if key in _UNAVAILABLE:
        label, why = _UNAVAILABLE[key]
        return UserError(f"sampler {name!r} is not available: {why}. Run `atelier samplers` for the list.")
    close = difflib.get_close_matches(name, all_names(), n=4, cutoff=0.5)
    if not close:  # difflib is case-sensitive; retry on normalized spellings
        by_key = {normalize(n): n for n in all_names()}
        close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=4, cutoff=0.5)]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UserError(f"unknown sampler {name!r}.{hint} Run `atelier samplers` for the list.")


def _split_combined(name: str) -> tuple[SamplerSpec, str] | None:
    """A1111-style "<sampler> <Schedule type>" names, e.g. "LMS Karras" or "Euler a Exponential"."""
    words = name.split()
    for cut in range(len(words) - 1, 0, -1):
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        if normalize(head) in _BY_NAME and is_schedule_name(tail):
            return _BY_NAME[normalize(head)], tail
    return None


def resolve(name: str, schedule: str | None = None) -> SamplerChoice:
    """Resolve a sampler name (canonical, A1111 old or new, ComfyUI) plus an optional schedule.

    Raises UserError for unknown names (with the closest names), for schedules the sampler's
    diffusers class cannot run, and for a combined name whose schedule contradicts `schedule`.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError("a sampler name is required; run `atelier samplers` for the list")
    name = name.strip()
    key = normalize(name)
    requested = resolve_schedule(schedule)
    implied = None
    if key in _BY_NAME:
        spec = _BY_NAME[key]
    elif key in _LEGACY:
        spec, implied = _LEGACY[key]
    elif (split := _split_combined(name)) is not None:
        spec, tail = split
        implied = resolve_schedule(tail)
    else:
        raise _unknown(name)

    if implied and requested and implied != requested:
        raise UserError(
            f"{name!r} already names the {implied!r} schedule but schedule {schedule!r} was also given; "
            f"use {spec.name!r} with the schedule you want"
        )
    chosen = implied or requested or spec.fixed_schedule
    check_schedule(spec, chosen, asked_as=schedule or name)
    return SamplerChoice(spec, chosen)


def check_schedule(spec: SamplerSpec, schedule: str | None, *, asked_as: str | None = None) -> None:
    if schedule is None or schedule in spec.schedules:
        return
    cls = spec.class_name
    if spec.own_schedule:
        why = f"{cls} uses its own timestep schedule and has no schedule options; leave the schedule out"
    elif spec.fixed_schedule:
        why = f"{spec.name} is defined on the {spec.fixed_schedule!r} schedule"
    elif schedule in SIGMA_SCHEDULES:
        why = f"diffusers' {cls} has no use_{schedule}_sigmas option"
    else:
        why = f"{cls} cannot run it"
    allowed = ", ".join(spec.schedules) or "none"
    raise UserError(
        f"sampler {spec.name!r} cannot use the {schedule!r} schedule"
        f"{f' (from {asked_as!r})' if asked_as and asked_as != schedule else ''}: {why}. "
        f"Schedules for {spec.name!r}: {allowed}."
    )


def schedule_options(spec: SamplerSpec, schedule: str | None) -> dict:
    """The exact options a (sampler, schedule) pair sets, the sigma flags spelled out as False."""
    options = {flag: False for flag in SIGMA_FLAGS if flag in spec.init_keys}
    options.update(spec.options)
    if schedule is not None:
        options.update(SCHEDULE_OPTIONS[schedule])
    return options


def list_samplers() -> list[dict]:
    """Every sampler with its names, diffusers class, options and allowed schedules."""
    out = []
    for s in SAMPLERS:
        out.append(
            {
                "name": s.name,
                "aliases": [n for n in _names_of(s)[1:] if n != s.name],
                "a1111": s.a1111,
                "a1111_legacy_names": list(s.legacy_names()),
                "a1111_automatic_schedule": s.a1111_automatic,
                "comfyui": s.comfyui,
                "diffusers_class": s.class_name,
                "options": dict(s.options),
                "schedules": list(s.schedules),
                "default_schedule": s.fixed_schedule or "model",
                "stochastic": s.stochastic,
                "notes": s.notes,
            }
        )
    return out
