"""A1111 "parameters" metadata for a sampler choice: the ``Sampler:`` and ``Schedule type:`` fields.

A1111 >= 1.9 writes ``Sampler: DPM++ 2M, Schedule type: Karras``; earlier versions wrote one
combined name (``Sampler: DPM++ 2M Karras``) and no schedule field. Reading follows A1111's own
rules with one deliberate exception for old files:

* ``Schedule type`` absent (a pre-1.9 image): the sampler name alone decides, so "DPM++ 2M" is the
  uniform schedule it meant then. (A1111 >= 1.9 reads such a file as "Automatic", which for
  DPM++ 2M is Karras and does not reproduce the image.)
* ``Automatic``: the sampler's A1111 default schedule (Karras for DPM++ 2M, DPM++ SDE, DPM++ 2S a;
  Exponential for DPM++ 2M SDE), otherwise the model's own schedule.
* a combined name's suffix wins over the field, as in A1111's ``get_sampler_and_scheduler``.

Writing picks labels that read back to the same scheduler: "Automatic" only where A1111's Automatic
means "no sigma schedule"; for the DPM++ samplers whose Automatic is Karras/Exponential, the
model's own schedule is written as the A1111 label of its spacing ("Uniform" for linspace, "SGM
Uniform" for trailing, "DDIM" for leading; "Uniform" if no base config is given).
"""

from __future__ import annotations

import inspect

from atelier.samplers.build import model_settings
from atelier.samplers.registry import SamplerSpec, resolve
from atelier.samplers.schedules import A1111_LABELS

# Entries A1111 has under another sampler name plus an explicit schedule.
_A1111_EQUIVALENT = {"EDM Euler": "Euler", "EDM DPM++ 2M": "DPM++ 2M"}
_SPACING_LABELS = {"linspace": "Uniform", "trailing": "SGM Uniform", "leading": "DDIM"}


def a1111_fields(name: str, schedule: str | None = None, *, base_config=None) -> tuple[str, str]:
    """("Sampler", "Schedule type") values for A1111-style PNG metadata.

    >>> a1111_fields("dpmpp_2m", "karras")
    ('DPM++ 2M', 'Karras')
    >>> a1111_fields("DPM++ 2M Karras")
    ('DPM++ 2M', 'Karras')
    >>> a1111_fields("Euler a")
    ('Euler a', 'Automatic')

    Samplers A1111 does not have (DEIS, TCD, DDPM, UniPC bh2) are written under their atelier
    names, which `from_a1111_fields` reads back (A1111 itself falls back to its default sampler).
    """
    choice = resolve(name, schedule)
    spec = choice.spec
    sampler = _A1111_EQUIVALENT.get(spec.name) or spec.a1111 or spec.name
    if choice.schedule is not None:
        return sampler, A1111_LABELS[choice.schedule]
    if spec.a1111_automatic is None:
        return sampler, "Automatic"
    return sampler, _SPACING_LABELS.get(_model_spacing(spec, base_config), "Uniform")


def _model_spacing(spec: SamplerSpec, base_config) -> str | None:
    if base_config is None:
        return None
    settings = model_settings(base_config)
    if "timestep_spacing" in settings:
        return settings["timestep_spacing"]
    return inspect.signature(spec.scheduler_class.__init__).parameters["timestep_spacing"].default


def from_a1111_fields(sampler: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(sampler name, schedule) for `make_scheduler`, from A1111's "Sampler" and "Schedule type".

    >>> from_a1111_fields("DPM++ 2M", "Karras")
    ('DPM++ 2M', 'karras')
    >>> from_a1111_fields("DPM++ 2M Karras")
    ('DPM++ 2M', 'karras')
    >>> from_a1111_fields("DPM++ 2M", "Automatic")
    ('DPM++ 2M', 'karras')
    >>> from_a1111_fields("DPM++ 2M")
    ('DPM++ 2M', None)

    Raises UserError for samplers or schedules diffusers cannot run (e.g. "Euler a" + "Karras").
    """
    by_name = resolve(sampler)
    if by_name.schedule is not None:  # a combined name ("LMS Karras") or a fixed-schedule entry
        return by_name.name, by_name.schedule
    if schedule_type is None or not schedule_type.strip():
        return by_name.name, None
    if schedule_type.strip().casefold() == "automatic":
        return by_name.name, by_name.spec.a1111_automatic
    choice = resolve(sampler, schedule_type)
    return choice.name, choice.schedule
