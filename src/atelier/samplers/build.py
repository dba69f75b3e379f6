"""`make_scheduler`: a named sampler built on a model's own scheduler config, with every requested
option really applied.

Why not just ``Cls.from_config(pipe.scheduler.config, **options)``:

* ``from_config`` drops every key listed in the config's ``_use_default_values`` (diffusers #7626),
  even when the caller changed that key's value in a copied config, so a changed model setting
  can silently revert to the class default.
* Sampler options in the base config leak into the new scheduler: switching a pipeline that runs
  "DPM++ 2M Karras" to plain "DPM++ 2M" keeps ``use_karras_sigmas=True`` unless it is reset.
* Options the target class does not take are dropped without an error (``use_karras_sigmas`` on
  `EulerAncestralDiscreteScheduler`, ``rescale_betas_zero_snr`` on `HeunDiscreteScheduler`), and
  some ``__init__`` methods rewrite options (UniPC turns an unknown ``solver_type`` into "bh2").

So the config is split in two. *Model keys* (betas, prediction type, spacing, offsets, zero-SNR
rescaling, clipping, ...) describe how the network was trained and come from the base config.
A ``_use_default_values`` entry is honoured only while its value still equals the source class's
default, i.e. while it really was a default. Clipping and thresholding, which some classes default
to on, stay off unless the model's config asks for them (`OFF_UNLESS_ASKED`). Everything else is a *sampler option*: it gets the
target class's default unless the sampler, the schedule or the caller sets it. The scheduler is
then constructed directly, model keys the class does not take are carried along as hidden config
(as ``from_config`` does, so switching back keeps them), and every requested option is read back
from the new scheduler's config: a missing or rewritten option raises.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping

import diffusers

from atelier.errors import UserError
from atelier.samplers.registry import LOCAL_SCHEDULERS, SamplerChoice, resolve, schedule_options

MODEL_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "clip_sample",
        "clip_sample_range",
        "set_alpha_to_one",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "interpolation_type",
        "timestep_type",
        "sigma_min",
        "sigma_max",
        "original_inference_steps",
        "timestep_scaling",
        "lambda_min_clipped",
        "variance_type",
    }
)

# Model keys that change the noise schedule or the network's parameterisation when set away from
# these values; a target class that cannot take them would sample the wrong model.
CRITICAL_DEFAULTS = {
    "rescale_betas_zero_snr": False,
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
    "thresholding": False,
}
LEARNED_VARIANCE = ("learned", "learned_range")

# Model keys that add a step to sampling (clipping or thresholding the predicted x0). diffusers'
# DDIMScheduler and DDPMScheduler default clip_sample to True, so a model whose config never mentions
# it (SDXL's, SD-Turbo's and SDXL-Turbo's EulerDiscrete configs) would sample clipped, unlike A1111's
# and ComfyUI's DDIM. They stay off unless the model's config or the caller turns them on.
OFF_UNLESS_ASKED = {"clip_sample": False, "thresholding": False}


def _class_defaults(class_name) -> dict:
    if not isinstance(class_name, str):
        return {}
    cls = LOCAL_SCHEDULERS.get(class_name) or getattr(diffusers, class_name, None)
    if cls is None:
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def model_settings(base_config) -> dict:
    """The model keys of a scheduler config (dict, FrozenDict or scheduler), minus true defaults."""
    if hasattr(base_config, "config") and not isinstance(base_config, Mapping):
        base_config = base_config.config
    if not isinstance(base_config, Mapping):
        raise UserError(f"base_config must be a scheduler config mapping, got {type(base_config).__name__}")
    config = dict(base_config)
    class_name = config.get("_class_name")
    if isinstance(class_name, str) and class_name.startswith("FlowMatch") or config.get("use_flow_sigmas"):
        raise UserError(
            f"{class_name or 'this config'} is a flow-matching schedule (SD3, Flux, ...); these samplers "
            "are for DDPM-trained models (SD 1.x, SD 2.x, SDXL and their Turbo/LCM variants)"
        )
    source_defaults = _class_defaults(class_name)
    defaulted = set(config.get("_use_default_values") or ())
    settings = {}
    for key in MODEL_KEYS & config.keys():
        value = config[key]
        if key in defaulted and key in source_defaults and _same(value, source_defaults[key]):
            continue  # really the source class's default: let the target class use its own
        settings[key] = value
    return settings


def _same(a, b) -> bool:
    if hasattr(a, "tolist"):
        a = a.tolist()
    if hasattr(b, "tolist"):
        b = b.tolist()
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    return a == b


def _check_model_fits(choice: SamplerChoice, settings: dict) -> None:
    spec = choice.spec
    for key, harmless in CRITICAL_DEFAULTS.items():
        if key in settings and not _same(settings[key], harmless) and key not in spec.init_keys:
            raise UserError(
                f"this model's scheduler config sets {key}={settings[key]!r}, which {spec.class_name} "
                f"(sampler {spec.name!r}) does not support, so it would sample a different noise "
                "schedule than the model was trained on; choose another sampler"
            )
    if settings.get("variance_type") in LEARNED_VARIANCE and "variance_type" not in spec.init_keys:
        raise UserError(
            f"this model predicts its variance (variance_type={settings['variance_type']!r}), which "
            f"{spec.class_name} (sampler {spec.name!r}) cannot use; choose another sampler"
        )


def make_scheduler(name: str, base_config, *, schedule: str | None = None, **overrides):
    """Build the diffusers scheduler for sampler `name` on a model's scheduler config.

    `base_config` is ``pipe.scheduler.config`` (FrozenDict), a plain dict (e.g. a hub
    scheduler_config.json) or a scheduler. `name` is any accepted sampler name: canonical
    ("DPM++ 2M"), A1111 old combined ("DPM++ 2M Karras") or ComfyUI ("dpmpp_2m"). `schedule` is a
    schedule type ("karras", "Karras", "sgm_uniform", ...; None, "" or "Automatic" = the model's own;
    for A1111's meaning of "Automatic" go through `from_a1111_fields`). `overrides` are
    further scheduler options (e.g. ``solver_order=2``, ``noise_sampler_seed=0``).

    The result keeps the model's betas, prediction type, spacing (unless the schedule sets it),
    steps offset, zero-SNR rescaling and clipping settings, and has exactly the requested options.
    """
    choice = resolve(name, schedule)
    return build_scheduler(choice, base_config, **overrides)


@dataclasses.dataclass(frozen=True)
class SchedulerPlan:
    """Everything that determines the scheduler, before diffusers builds it."""

    scheduler_class: type
    init_kwargs: dict  # model keys the class takes + the requested options
    requested: dict  # the sampler's, schedule's and caller's options, verified after construction
    carried: dict  # model keys the class does not take, kept as hidden config


def plan_scheduler(choice: SamplerChoice, base_config, **overrides) -> SchedulerPlan:
    """Check a request against the model config and work out the exact constructor arguments."""
    spec = choice.spec
    settings = model_settings(base_config)
    _check_model_fits(choice, settings)

    requested = schedule_options(spec, choice.schedule)
    unknown = sorted(set(overrides) - spec.init_keys)
    if unknown:
        raise UserError(
            f"{spec.class_name} (sampler {spec.name!r}) has no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(spec.init_keys))}"
        )
    for key, value in overrides.items():
        if key in requested and not _same(requested[key], value) and key not in spec.options:
            raise UserError(
                f"option {key}={value!r} conflicts with sampler {spec.name!r} on schedule "
                f"{choice.schedule or 'model default'!r}, which sets {key}={requested[key]!r}; "
                "choose the schedule with schedule=... instead"
            )
    requested.update(overrides)
    missing = sorted(set(requested) - spec.init_keys)
    if missing:  # a registry entry asking for something the class lacks is a bug, not user input
        raise RuntimeError(f"{spec.class_name} lacks options {missing} required by sampler {spec.name!r}")

    init_kwargs = {k: v for k, v in settings.items() if k in spec.init_keys}
    init_kwargs.update({k: v for k, v in OFF_UNLESS_ASKED.items() if k in spec.init_keys and k not in settings})
    init_kwargs.update(requested)
    carried = {k: v for k, v in settings.items() if k not in spec.init_keys}
    return SchedulerPlan(spec.scheduler_class, init_kwargs, requested, carried)


def build_scheduler(choice: SamplerChoice, base_config, **overrides):
    plan = plan_scheduler(choice, base_config, **overrides)
    spec = choice.spec
    if spec.class_name == "DPMSolverSDEScheduler":
        _require_torchsde()
    try:
        scheduler = plan.scheduler_class(**plan.init_kwargs)
    except (ValueError, NotImplementedError) as exc:
        raise UserError(f"diffusers refused sampler {spec.name!r} with {plan.init_kwargs}: {exc}") from exc
    if plan.carried:
        scheduler.register_to_config(**plan.carried)

    for key, value in plan.requested.items():
        got = scheduler.config.get(key, "<missing>")
        if not _same(got, value):
            raise UserError(
                f"{spec.class_name} changed option {key} from {value!r} to {got!r}; "
                f"sampler {spec.name!r} cannot run as requested"
            )
    return scheduler


def _require_torchsde() -> None:
    try:
        import torchsde  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "sampler 'DPM++ SDE' needs the torchsde package (diffusers' DPMSolverSDEScheduler draws "
            "Brownian-tree noise with it): pip install torchsde"
        ) from exc
