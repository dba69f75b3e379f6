"""Named samplers on diffusers schedulers: A1111 (old and >= 1.9) and ComfyUI names and schedule
types, built on a model's own scheduler config with every option verified.

    from atelier.samplers import make_scheduler
    pipe.scheduler = make_scheduler("DPM++ 2M", pipe.scheduler.config, schedule="karras")

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "DPMSolverPlusPlus2SAncestralScheduler": "atelier.samplers.dpmpp_2s_ancestral",
    "SAMPLERS": "atelier.samplers.registry",
    "SCHEDULE_OPTIONS": "atelier.samplers.schedules",
    "SamplerChoice": "atelier.samplers.registry",
    "SamplerSpec": "atelier.samplers.registry",
    "a1111_fields": "atelier.samplers.a1111",
    "from_a1111_fields": "atelier.samplers.a1111",
    "list_samplers": "atelier.samplers.registry",
    "make_scheduler": "atelier.samplers.build",
    "resolve": "atelier.samplers.registry",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
