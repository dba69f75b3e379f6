"""The try-on model: a method (CatVTON or OOTDiffusion) over diffusers UNets, a VAE and a scheduler, and
its folder on disk (diffusers layout, safetensors):

    tryon.json               {"format": 1, "method": "catvton", "base_model": ..., "resolution": [H, W],
                              "defaults": {"steps": ..., "guidance": ...}, "trained_with": {...}}
    unet/                    the 9-channel try-on UNet (UNet2DConditionModel.from_pretrained(f, subfolder="unet"))
    garment_unet/            ootd: the garment UNet
    text_embeds.safetensors  ootd: the prompt embedding both UNets read (the base model's empty prompt)
    vae/, scheduler/

A folder may also hold one try-on model per method in `catvton/` and `ootd/` (then `method=` picks one).
Built-in try-on models (`toyworld-tryon`) are folders in the built-in models' folder (atelier.models.BUILTIN_DIR).

    model = build_tryon_model("toyworld", "catvton")     # from a text-to-image or inpainting base
    save_tryon_model(model, "out/tryon")
    model = load_tryon_model("out/tryon", device="cpu")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atelier.errors import UserError
from atelier.tryon.inpaint_unet import inpainting_unet, is_inpainting, latent_unet
from atelier.tryon.methods import METHODS, OOTD, CatVTON

INFO_FILE = "tryon.json"
TEXT_EMBEDS = "text_embeds.safetensors"
BUILTIN_TRYON = {"toyworld-tryon": "toy-world virtual try-on model (CatVTON and OOTDiffusion), shipped with atelier"}
# The papers' sampling settings: CatVTON 50 DDIM steps at guidance 2.5; OOTDiffusion 20 steps, image guidance 2.
DEFAULTS = {"catvton": {"steps": 50, "guidance": 2.5}, "ootd": {"steps": 20, "guidance": 2.0}}


@dataclass
class TryOnModel:
    method: str
    net: torch.nn.Module  # CatVTON or OOTD: the UNet(s) and the math
    vae: torch.nn.Module
    scheduler: object
    resolution: tuple[int, int]  # (height, width) the model works at
    source: str = ""
    info: dict = field(default_factory=dict)
    widened: bool = False  # conv_in was made 9-channel from a text-to-image UNet (it must train)

    @property
    def unet(self):
        return self.net.unet

    @property
    def device(self) -> torch.device:
        return self.net.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.unet.dtype

    @property
    def defaults(self) -> dict:
        return {**DEFAULTS[self.method], **self.info.get("defaults", {})}

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "TryOnModel":
        from atelier.core.vae import needs_upcast

        for module in (self.net, self.vae):
            module.to(device=device)
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        if needs_upcast(self.vae):
            self.vae.to(dtype=torch.float32)
        return self


def _method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown try-on method {method!r}: choose from {', '.join(METHODS)}")
    return method


def try_on_scheduler(config):
    """DDIM (CatVTON's sampler) on the base model's training schedule, trailing spacing (the last step
    starts from pure noise), no clipping."""
    from diffusers import DDIMScheduler

    keep = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                   "trained_betas", "prediction_type", "rescale_betas_zero_snr") if k in config}
    return DDIMScheduler(**keep, clip_sample=False, set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing")


def empty_prompt_embedding(pipe, prompt: str = "") -> torch.Tensor:
    """(1, tokens, width): the text encoder's last hidden state for `prompt`, as SD pipelines encode it."""
    tokens = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0].float().cpu()


def build_tryon_model(base, method: str, *, resolution=None, prompt: str = "", device="cpu") -> TryOnModel:
    """A try-on model from a base Stable Diffusion 1.x / 2.x model (a folder, single file, hub id or built-in
    name; text-to-image or inpainting): its UNet made 9-channel (inpaint_unet), its VAE, a DDIM scheduler
    on its schedule; ootd also copies the base's 4-channel UNet as the garment UNet (before widening) and
    keeps the embedding of `prompt` (an inpainting base's UNet gives the garment UNet its 4 latent input
    channels)."""
    import copy

    from atelier.models import load_pipeline

    method = _method(method)
    pipe = load_pipeline(base, device=device, dtype=torch.float32)
    unet = pipe.unet
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise UserError(f"{base}: try-on builds on SD 1.x / 2.x UNets (no SDXL added conditioning)")
    # ootd's garment UNet: the base's text-to-image UNet (an inpainting base's, its latent input channels only)
    garment_unet = latent_unet(copy.deepcopy(unet)) if method == "ootd" else None
    unet, widened = inpainting_unet(unet)
    if method == "catvton":
        net = CatVTON(unet)
    else:
        net = OOTD(unet, garment_unet, empty_prompt_embedding(pipe, prompt))
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(unet.config.sample_size) * vae_scale
    resolution = tuple(resolution) if resolution else (native, native)
    source = str(base)
    return TryOnModel(method, net, pipe.vae, try_on_scheduler(pipe.scheduler.config), resolution, source,
                      {"base_model": source, "prompt": prompt}, widened)


def save_tryon_model(model: TryOnModel, folder, extra: dict | None = None) -> Path:
    """Write `model` as a try-on folder (atomically)."""
    from safetensors.torch import save_file

    from atelier.core.io import atomic_dir

    info = {"format": 1, "method": model.method, "base_model": model.info.get("base_model", model.source),
            "resolution": list(model.resolution), "defaults": model.defaults, **(extra or {})}
    with atomic_dir(Path(folder)) as tmp:
        model.net.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        if model.method == "ootd":
            model.net.garment_unet.save_pretrained(tmp / "garment_unet", safe_serialization=True)
            save_file({"text_embeds": model.net.text_embeds.float().cpu().contiguous()}, str(tmp / TEXT_EMBEDS))
        model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        model.scheduler.save_pretrained(tmp / "scheduler")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return Path(folder)


def is_tryon_source(source) -> bool:
    """Whether `source` names a try-on model (a built-in name, or a folder with tryon.json or per-method
    subfolders) rather than a base model."""
    text = os.fspath(source)
    if text in BUILTIN_TRYON:
        return True
    path = Path(os.path.expanduser(text))
    return path.is_dir() and any((folder / INFO_FILE).is_file() for folder in [path, *(path / m for m in METHODS)])


def resolve_tryon_folder(source, method: str | None = None) -> Path:
    """The try-on folder behind `source`: a path, or a built-in name; with per-method subfolders, the
    one `method` names (default: the first that exists)."""
    from atelier.models import BUILTIN_DIR

    text = os.fspath(source)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        if os.sep in text or text.startswith(".") or text not in BUILTIN_TRYON and not (BUILTIN_DIR / text).is_dir():
            raise UserError(f"try-on model not found: {text} (a try-on folder, or one of {', '.join(BUILTIN_TRYON)})")
        path = BUILTIN_DIR / text
        if not path.is_dir():
            raise UserError(f"built-in try-on model '{text}' is not installed ({path} is missing)")
    if not path.is_dir():
        raise UserError(f"try-on model {path} is not a folder")
    if (path / INFO_FILE).is_file():
        return path
    methods = [m for m in METHODS if (path / m / INFO_FILE).is_file()]
    if method is not None and method in methods:
        return path / method
    if method is None and methods:
        return path / methods[0]
    if methods:
        raise UserError(f"{path} holds try-on models for {', '.join(methods)}, not {method}")
    raise UserError(f"{path} is not a try-on model folder (no {INFO_FILE})")


def _read_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / INFO_FILE} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(info, dict) or info.get("method") not in METHODS:
        raise UserError(f"{folder / INFO_FILE}: \"method\" must be one of {', '.join(METHODS)}")
    return info


def _component(cls, folder: Path, sub: str, dtype):
    from atelier.models.loader import dtype_kwargs

    part = folder / sub
    config = "scheduler_config.json" if sub == "scheduler" else "config.json"
    if not (part / config).is_file():
        raise UserError(f"try-on model {folder} is incomplete: {sub}/{config} is missing")
    if sub != "scheduler" and not any(part.glob("*.safetensors")):
        raise UserError(f"try-on model {folder} is incomplete: no .safetensors weights in {sub}/")
    try:
        if sub == "scheduler":
            return cls.from_pretrained(folder, subfolder=sub)
        return cls.from_pretrained(folder, subfolder=sub, use_safetensors=True, **dtype_kwargs(dtype))
    except Exception as exc:  # diffusers raises many kinds for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"try-on model {folder}: cannot load {sub}/ ({first})") from None


def load_tryon_model(source="toyworld-tryon", *, method: str | None = None, device=None, dtype=None) -> TryOnModel:
    """A try-on model from its folder (or a built-in name), on `device` in `dtype` (default: atelier's
    pick, CUDA fp16 / CPU fp32; a VAE asking for force_upcast stays fp32 in half precision). `method`
    checks the folder's method (or picks it in a folder holding both)."""
    import diffusers
    from safetensors.torch import load_file

    from atelier.models import pick_device_dtype

    if method is not None:
        _method(method)
    folder = resolve_tryon_folder(source, method)
    info = _read_info(folder)
    if method is not None and info["method"] != method:
        article = "an" if info["method"][0] in "aeiou" else "a"
        raise UserError(f"{folder} is {article} {info['method']} try-on model, not {method}")
    device, dtype = pick_device_dtype(device, dtype)
    unet = _component(diffusers.UNet2DConditionModel, folder, "unet", dtype)
    if not is_inpainting(unet):
        raise UserError(f"try-on model {folder}: unet/ has {unet.config.in_channels} input channels, not 9")
    if info["method"] == "catvton":
        net = CatVTON(unet)
    else:
        garment = _component(diffusers.UNet2DConditionModel, folder, "garment_unet", dtype)
        try:
            embeds = load_file(str(folder / TEXT_EMBEDS))["text_embeds"]
        except Exception as exc:
            raise UserError(f"try-on model {folder}: cannot read {TEXT_EMBEDS} ({str(exc).splitlines()[0] if str(exc) else exc})") from None
        net = OOTD(unet, garment, embeds)
    vae = _component(diffusers.AutoencoderKL, folder, "vae", dtype)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")) \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    scheduler_cls = getattr(diffusers, str(config.get("_class_name", "DDIMScheduler")), diffusers.DDIMScheduler)
    scheduler = _component(scheduler_cls, folder, "scheduler", dtype)
    height, width = (info.get("resolution") or [0, 0])[:2]
    if not height:
        height = width = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    model = TryOnModel(info["method"], net.eval(), vae.eval(), scheduler, (int(height), int(width)), str(source), info)
    return model.to(device, dtype)


def portable_record(record: dict) -> dict:
    """A training record (and those of the runs it was fine-tuned from) with the data, output, checkpoint
    and starting-model paths cut to their last names."""
    record = dict(record)
    trained = dict(record.get("trained_with") or {})
    for key in ("data", "output_dir", "resume_from_checkpoint"):
        if isinstance(trained.get(key), str):
            trained[key] = Path(trained[key]).name
    if _is_path(trained.get("base")):  # a folder; a built-in or hub name stays as it is
        trained["base"] = Path(trained["base"]).name
    record["trained_with"] = trained
    if isinstance(record.get("fine_tuned_from"), dict):
        earlier = portable_record(record["fine_tuned_from"])
        if _is_path(earlier.get("model")):
            earlier["model"] = Path(earlier["model"]).name
        record["fine_tuned_from"] = earlier
    return record


def _is_path(value) -> bool:
    return isinstance(value, str) and (os.sep in value or "/" in value)


def export_tryon_model(source, folder, *, weights_dtype=torch.float16) -> Path:
    """`source` rewritten for shipping (the built-in toyworld-tryon is made this way): weights stored in
    `weights_dtype` (they load in any dtype), configs without the folder they were loaded from, and the
    training record without this machine's paths (the data and output folders keep only their names)."""
    from atelier.models.save import make_portable

    model = load_tryon_model(source, device="cpu", dtype=torch.float32)
    record = portable_record({k: v for k, v in model.info.items()
                              if k not in ("format", "method", "base_model", "resolution", "defaults")})
    if _is_path(model.info.get("base_model")):
        model.info["base_model"] = Path(model.info["base_model"]).name
    save_tryon_model(model.to("cpu", weights_dtype), folder, record)
    make_portable(folder)
    return Path(folder)
