"""One optimisation layer for every mode: `SpeedOptions` and `apply_speed(pipe, options)`.

    options = SpeedOptions(quantize="int8wo", compile="regional")
    applied = apply_speed(pipe, options)   # {"flush_denormal": True, "threads": 2, "quantize": {...}, ...}

Order: CPU numerics, channels-last, attention backend, quantization, compilation, warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from atelier.errors import UserError
from atelier.speed.attention import DEFAULT_BACKEND, check_backend, set_attention
from atelier.speed.compile import COMPILE_MODES, check_compile_mode, compile_unet, warm_up
from atelier.speed.numerics import apply_cpu_numerics, check_threads
from atelier.speed.quantize import DEFAULT_SKIP, QUANTIZE_MODES, backend_for, fp8_supported, quantize_module


@dataclass
class SpeedOptions:
    quantize: str | None = None            # int8wo, int8dq, int4wo, fp8 (None: off)
    quantize_skip: tuple[str, ...] = DEFAULT_SKIP
    quantize_backend: str = "auto"         # auto, quanto, torchao
    quantize_text_encoder: bool = False
    compile: str = "off"                   # off, regional, full
    compile_dynamic: bool | None = None    # None: the caller's default (True for the stream)
    compile_backend: str | None = None     # torch.compile backend (None: inductor)
    compile_mode: str = "default"          # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune
    warm_up: bool = True                   # run (and time) one UNet call after compiling
    attention: str | None = None           # a diffusers attention backend (None: SDPA, "native")
    channels_last: bool = False
    flush_denormal: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def check(self, device=None) -> "SpeedOptions":
        """Refuse bad options for a run on `device` (None: the default device) before any model loads."""
        from atelier.models import pick_device_dtype

        device = pick_device_dtype(device)[0]
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UserError(f"unknown --quantize {self.quantize!r}: choose from {', '.join(QUANTIZE_MODES)}")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"unknown --compile {self.compile!r}: choose from {', '.join(COMPILE_MODES)}")
        check_compile_mode(self.compile_mode, device)
        if self.compile_mode != "default" and self.compile == "off":
            raise UserError(f"--compile-mode {self.compile_mode} needs --compile regional or full")
        if self.quantize == "fp8":
            reason = fp8_supported(device)
            if reason:
                raise UserError(reason)
        if self.attention:
            check_backend(self.attention, device)
        if self.threads is not None:
            check_threads(self.threads)
        if self.quantize and backend_for(self.quantize, self.quantize_backend) == "quanto" and self.quantize == "int8dq":
            raise UserError("--quantize int8dq with quanto quantizes activations statically and needs calibration, "
                            "which the commands do not run: use the torchao backend (default), dynamic int8")
        return self

    @property
    def active(self) -> bool:
        return bool(self.quantize or self.compile != "off" or self.attention or self.channels_last)


def _device_of(pipe) -> torch.device:
    """The UNet's device; an exported UNet (atelier.runtime) has no parameters but says its device."""
    param = next(pipe.unet.parameters(), None)
    return param.device if param is not None else torch.device(getattr(pipe.unet, "device", "cpu"))


def _is_exported(pipe) -> bool:
    return next(pipe.unet.parameters(), None) is None


def apply_speed(pipe, options: SpeedOptions, *, dynamic_default: bool = False, warm_up_batch: int = 2,
                inference_mode: bool = True) -> dict:
    """Apply `options` to a loaded pipeline in place; returns what was done (JSON-ready).
    dynamic_default: compile for varying batch sizes unless options say otherwise (the stream).
    warm_up_batch / inference_mode: the warm-up call's batch and grad mode, as the caller runs."""
    options.check(_device_of(pipe))
    device = _device_of(pipe)
    if options.active and _is_exported(pipe):
        raise UserError("--quantize, --compile, --attention and --channels-last change PyTorch modules; this model "
                        "is exported (OpenVINO / ONNX Runtime compile it themselves): drop those options")
    applied: dict = apply_cpu_numerics(device, flush_denormal=options.flush_denormal, threads=options.threads)
    applied["device"] = str(device)
    if options.channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if options.attention:
        applied["attention"] = {"backend": options.attention, "layers": set_attention(pipe.unet, options.attention)}
    else:
        applied["attention"] = {"backend": DEFAULT_BACKEND}
    if options.quantize:
        applied["quantize"] = quantize_module(pipe.unet, options.quantize, skip=options.quantize_skip,
                                              backend=options.quantize_backend, device=device)
        if options.quantize_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                if isinstance(getattr(pipe, name, None), torch.nn.Module):
                    applied[f"quantize_{name}"] = quantize_module(getattr(pipe, name), options.quantize, skip=(),
                                                                  backend=options.quantize_backend, device=device)
    if options.compile != "off":
        dynamic = dynamic_default if options.compile_dynamic is None else options.compile_dynamic
        applied["compile"] = compile_unet(pipe.unet, options.compile, dynamic=dynamic, backend=options.compile_backend,
                                          compile_mode=options.compile_mode)
        if options.warm_up:
            applied["compile"]["warm_up_s"] = round(warm_up(pipe.unet, warm_up_batch, inference_mode=inference_mode), 3)
    return applied


def describe(applied: dict) -> str:
    """One line for stderr: what `apply_speed` did."""
    parts = [f"denormals {'flushed' if applied.get('flush_denormal') else 'kept'}", f"{applied.get('threads')} threads"]
    q = applied.get("quantize")
    if q:
        encoders = [k.removeprefix("quantize_") for k in applied if k.startswith("quantize_text_encoder")]
        parts.append(f"{q['mode']} ({q['backend']}) on {q['layers']} Linear layers, UNet "
                     f"{q['bytes_before'] / 2**20:.1f} -> {q['bytes_after'] / 2**20:.1f} MiB"
                     + (f" (and {', '.join(encoders)})" if encoders else ""))
    c = applied.get("compile")
    if c and c.get("compile") != "off":
        mode = c.get("mode", "default")
        parts.append(f"compile {c['compile']} ({c['blocks']} modules{', dynamic' if c.get('dynamic') else ''}"
                     + (f", {mode}" if mode != "default" else "")
                     + (f", warm-up {c['warm_up_s']:.1f} s" if "warm_up_s" in c else "") + ")")
    attention = applied.get("attention", {}).get("backend")
    if attention and attention != DEFAULT_BACKEND:
        parts.append(f"attention {attention}")
    if applied.get("channels_last"):
        parts.append("channels-last")
    return "atelier: speed: " + ", ".join(parts)
