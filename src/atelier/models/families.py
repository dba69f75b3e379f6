"""Which kind of Stable Diffusion model a pipeline is, told from its configs (never from its name),
and the generation defaults that suit it.

Rules (each decision is also written into `ModelFamily.reason`):

* family — "sdxl" when the UNet takes SDXL's extra conditioning (`addition_embed_type == "text_time"`)
  or the pipeline has a second text encoder; otherwise "sd2" when the text encoder is OpenCLIP
  (`hidden_act == "gelu"`), "sd1" when it is OpenAI CLIP (`"quick_gelu"`); without a text-encoder
  config the UNet decides (`use_linear_projection` is SD2's).
* prediction_type — the scheduler's `prediction_type` ("epsilon", "v_prediction").
* is_lcm — the scheduler is an `LCMScheduler`, or the UNet is LCM-distilled (`time_cond_proj_dim`),
  or an LCM-LoRA was applied by `atelier.models.apply_lora` (recorded on the pipeline).
* is_turbo — an `atelier.json` `"turbo"` flag decides when present. Otherwise a model counts as
  adversarially distilled (SD-Turbo, SDXL-Turbo, and Lightning-style models, which want the same
  handling) when its scheduler uses `timestep_spacing == "trailing"` *and* carries no other reason
  for trailing spacing: not zero-terminal-SNR rescaled (`rescale_betas_zero_snr`) and not LCM.
  No SD 1.x/2.x/XL base release ships trailing spacing; Stability's Turbo releases do, and they are
  meant to run with guidance off. Free text (a model card, a name) never decides: a base model's
  README that mentions its Turbo sibling is still a base model.
* defaults — by kind (LCM > turbo > family), then overridden by any `sampler`, `steps`,
  `guidance_scale` in the model folder's `atelier.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atelier.errors import UserError

FAMILIES = ("sd1", "sd2", "sdxl")
DEFAULTS_FILE = "atelier.json"

# (steps, guidance_scale, sampler, steps_range, guidance_range)
_FAMILY_DEFAULTS = {
    "sd1": (25, 7.0, "DPM++ 2M Karras", (20, 40), (5.0, 9.0)),
    "sd2": (25, 7.0, "DPM++ 2M Karras", (20, 40), (5.0, 9.0)),
    "sdxl": (30, 5.0, "DPM++ 2M Karras", (25, 50), (4.0, 8.0)),
}
_TURBO_DEFAULTS = (1, 0.0, "Euler a", (1, 4), (0.0, 0.0))
_LCM_DEFAULTS = (4, 1.5, "LCM", (4, 8), (1.0, 2.0))


@dataclass(frozen=True)
class ModelFamily:
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    is_turbo: bool
    is_lcm: bool
    steps: int
    guidance_scale: float  # 0.0 means classifier-free guidance off
    sampler: str  # A1111-style sampler name
    steps_range: tuple[int, int]
    guidance_range: tuple[float, float]
    resolution: int | None  # native image side in pixels, when the configs tell it
    reason: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def read_defaults_file(folder) -> dict:
    """The `atelier.json` of a model folder ({} when there is none)."""
    if folder is None:
        return {}
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    nested = data.get("defaults")
    if isinstance(nested, dict):  # atelier's own exports nest them: {"defaults": {"steps": ..., ...}}
        data = {**data, **nested}
    return data


def family_from_configs(
    *,
    unet: dict,
    scheduler: dict,
    text_encoder: dict | None = None,
    has_second_text_encoder: bool = False,
    vae: dict | None = None,
    defaults: dict | None = None,
    lcm_lora: bool = False,
) -> ModelFamily:
    """The decision itself, on plain config dicts (see the module docstring for the rules)."""
    defaults = defaults or {}
    why = []
    if unet.get("addition_embed_type") == "text_time" or has_second_text_encoder:
        family = "sdxl"
        why.append("SDXL conditioning (text_time / two text encoders)")
    elif text_encoder is not None and text_encoder.get("hidden_act") in ("gelu", "quick_gelu"):
        family = "sd2" if text_encoder["hidden_act"] == "gelu" else "sd1"
        why.append(f"text encoder is {'OpenCLIP' if family == 'sd2' else 'OpenAI CLIP'}")
    elif "cross_attention_dim" in unet:
        family = "sd2" if unet.get("use_linear_projection") else "sd1"
        why.append("UNet attention projection layout")
    else:
        raise UserError("not a Stable Diffusion UNet: atelier supports SD 1.x, SD 2.x and SDXL models")

    prediction_type = scheduler.get("prediction_type") or "epsilon"
    scheduler_class = scheduler.get("_class_name", "")

    is_lcm = scheduler_class == "LCMScheduler" or unet.get("time_cond_proj_dim") is not None or lcm_lora
    if is_lcm:
        why.append("LCM (" + ("LCM-LoRA" if lcm_lora else scheduler_class if scheduler_class == "LCMScheduler" else "time_cond_proj_dim") + ")")

    if "turbo" in defaults:
        is_turbo = bool(defaults["turbo"])
        why.append(f"{DEFAULTS_FILE} turbo={is_turbo}")
    else:
        trailing = scheduler.get("timestep_spacing") == "trailing"
        zero_snr = bool(scheduler.get("rescale_betas_zero_snr"))
        is_turbo = trailing and not zero_snr and not is_lcm
        if is_turbo:
            why.append("trailing timestep spacing without zero-SNR rescaling (distilled, guidance off)")

    if is_lcm:
        base = _LCM_DEFAULTS
    elif is_turbo:
        base = _TURBO_DEFAULTS
        if scheduler_class == "EulerDiscreteScheduler":
            base = (base[0], base[1], "Euler", *base[3:])
    else:
        base = _FAMILY_DEFAULTS[family]
    steps, guidance, sampler, steps_range, guidance_range = base
    if defaults:
        steps = int(defaults.get("steps", steps))
        guidance = float(defaults.get("guidance_scale", defaults.get("guidance", guidance)))
        sampler = str(defaults.get("sampler", sampler))
        if any(k in defaults for k in ("steps", "guidance_scale", "guidance", "sampler")):
            why.append(f"defaults from {DEFAULTS_FILE}")

    resolution = None
    if unet.get("sample_size") and vae and vae.get("block_out_channels"):
        resolution = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)

    return ModelFamily(
        family=family,
        prediction_type=prediction_type,
        is_turbo=is_turbo,
        is_lcm=is_lcm,
        steps=steps,
        guidance_scale=guidance,
        sampler=sampler,
        steps_range=steps_range,
        guidance_range=guidance_range,
        resolution=resolution,
        reason="; ".join(why),
    )


def detect_family(pipe) -> ModelFamily:
    """Family and defaults of a loaded diffusers pipeline.

    `atelier.models.load_pipeline` records the model folder's `atelier.json` on the pipeline
    (`pipe.atelier_defaults`); pipelines built in memory have none.
    """
    text_encoder = getattr(pipe, "text_encoder", None)
    vae = getattr(pipe, "vae", None)
    return family_from_configs(
        unet=dict(pipe.unet.config),
        scheduler=dict(pipe.scheduler.config) | {"_class_name": type(pipe.scheduler).__name__},
        text_encoder=text_encoder.config.to_dict() if text_encoder is not None else None,
        has_second_text_encoder=getattr(pipe, "text_encoder_2", None) is not None,
        vae=dict(vae.config) if vae is not None else None,
        defaults=getattr(pipe, "atelier_defaults", None),
        lcm_lora=bool(getattr(pipe, "atelier_lcm_lora", False)),
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def detect_family_from_folder(folder) -> ModelFamily:
    """Family and defaults of a diffusers folder, from its JSON configs only (no weights loaded)."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    if index is None:
        raise UserError(f"{folder} is not a diffusers model folder (no model_index.json)")
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    if unet is None or scheduler is None:
        raise UserError(f"{folder}: a Stable Diffusion folder needs unet/config.json and scheduler/scheduler_config.json")
    return family_from_configs(
        unet=unet,
        scheduler=scheduler,
        text_encoder=_read_json(folder / "text_encoder" / "config.json"),
        has_second_text_encoder=isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None,
        vae=_read_json(folder / "vae" / "config.json"),
        defaults=read_defaults_file(folder),
    )
