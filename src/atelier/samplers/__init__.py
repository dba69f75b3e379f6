"""Named samplers on diffusers schedulers: A1111 (old and >= 1.9) and ComfyUI names and schedule
types, built on a model's own scheduler config with every option verified.

    from atelier.samplers import make_scheduler
    pipe.scheduler = make_scheduler("DPM++ 2M", pipe.scheduler.config, schedule="karras")
"""

from atelier.samplers.a1111 import a1111_fields, from_a1111_fields
from atelier.samplers.build import make_scheduler
from atelier.samplers.dpmpp_2s_ancestral import DPMSolverPlusPlus2SAncestralScheduler
from atelier.samplers.registry import SAMPLERS, SamplerChoice, SamplerSpec, list_samplers, resolve
from atelier.samplers.schedules import SCHEDULE_OPTIONS

__all__ = [
    "DPMSolverPlusPlus2SAncestralScheduler",
    "SAMPLERS",
    "SCHEDULE_OPTIONS",
    "SamplerChoice",
    "SamplerSpec",
    "a1111_fields",
    "from_a1111_fields",
    "list_samplers",
    "make_scheduler",
    "resolve",
]
