"""8-bit VAE decoder for the OpenVINO fast path: NNCF's post-training quantization (OpenVINO's own
compression library; nothing here re-implements it), calibrated on latents of the model itself.

What is quantized, and why only that (benchmarks/speed.py, toyworld-turbo's stream on one CPU thread):
- the decoder's up blocks run in 8 bit: they hold most of its work, at the upsampled resolutions;
  the decoder call goes from 9.3 to 6.7 ms (OpenVINO bf16 -> int8 + bf16);
- its input stage (post_quant_conv, conv_in and the mid block) stays in the export's precision:
  quantized too, it gains nothing more (6.8 ms) and the stream's judged edits drop 10 points, as
  every later layer amplifies its 8-bit error;
- the UNet stays as exported: in 8 bit the toy UNet ran no faster (9.6 against 9.8 ms).

Calibration latents are what the decoder will see: the VAE's latents of given images (frames of a
video to stream), or latents the model generates from prompts at its own defaults."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from atelier.core.images import IMAGE_SUFFIXES, list_images
from atelier.errors import UserError

QUANTIZE_CHOICES = ("int8",)
# The decoder's input stage, kept in the export's precision (module paths as the exporter names them).
KEPT_IN_PRECISION = r".*(post_quant_conv|decoder\.conv_in|decoder\.mid_block)[./].*"
# Default calibration prompts for models outside the toy world: varied subjects and styles.
GENERIC_PROMPTS = (
    "a photo of a cat sitting on a windowsill", "a portrait of a woman with glasses, studio light",
    "a red sports car on a mountain road", "a bowl of fruit on a wooden table, still life",
    "a city street at night with neon signs", "a watercolor painting of a lighthouse",
    "a dog running on a beach at sunset", "an astronaut riding a horse, digital art",
    "a snowy forest with a small cabin", "a plate of sushi, food photography",
    "an old man reading a newspaper in a cafe", "a field of sunflowers under a blue sky",
    "a medieval castle on a hill, oil painting", "a close-up of a green parrot",
    "a modern living room with large windows", "a cartoon robot waving",
)


def import_nncf():
    try:
        import nncf
    except ImportError:
        raise UserError("--quantize int8 needs NNCF (OpenVINO's quantization library): pip install nncf") from None
    nncf.set_log_level(logging.WARNING)  # not a line per layer it keeps
    return nncf


def check_quantize(quantize: str | None, fmt: str) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"unknown --quantize {quantize!r} for an export: use {' or '.join(QUANTIZE_CHOICES)}")
    if fmt != "openvino":
        raise UserError("--quantize int8 quantizes an OpenVINO export (NNCF): use --format openvino")
    import_nncf()


def read_calibration(source) -> tuple[str, list]:
    """("prompts", [str]) from a text file (one prompt a line) or ("images", [Path]) from a folder."""
    path = Path(source)
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise UserError(f"--calibration {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return "images", images
    if path.is_file():
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"--calibration {path}: give a text file of prompts (one a line) or a folder of images") from None
        if not prompts:
            raise UserError(f"--calibration {path}: the file holds no prompts")
        return "prompts", prompts
    raise UserError(f"--calibration {path}: no such file or folder")


def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def latents_of_images(pipe, images: list, size: int, height: int, width: int) -> list[torch.Tensor]:
    """The VAE's latents (decoder input scale) of `size` images, each resized to height x width."""
    from atelier.core.images import open_image, pixels_from_image

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for image in _cycle(images, size):
            picture = open_image(image).convert("RGB").resize((width, height))
            pixels = pixels_from_image(picture)[None]
            out.append(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float())
    return out


def latents_of_prompts(pipe, prompts: list[str], size: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    """Latents the model generates (decoder input scale) for `size` prompts, cycling through `prompts`,
    at the model's own default steps and guidance (its atelier.json)."""
    defaults = getattr(pipe, "atelier_defaults", None) or {}
    steps = int(defaults.get("steps") or 20)
    guidance = float(defaults.get("guidance_scale", 5.0))
    out = []
    bars = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        for k, prompt in enumerate(_cycle(prompts, size)):
            generator = torch.Generator("cpu").manual_seed(seed + k)
            latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                           generator=generator, output_type="latent").images
            out.append(latents.float() / pipe.vae.config.scaling_factor)
    finally:
        pipe._progress_bar_config = bars
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of decoded images in [-1, 1]."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def quantize_decoder(path: Path, latents: list[torch.Tensor]) -> dict:
    """Quantize the OpenVINO decoder graph at `path` in place (its up blocks in 8 bit) on `latents`;
    returns what export.json records, with the PSNR of its images against the unquantized decoder's."""
    nncf = import_nncf()
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    name = model.inputs[0].get_any_name()
    arrays = [x.numpy().astype(np.float32) for x in latents]
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars: stdout stays for --json
        quantized = nncf.quantize(
            model, nncf.Dataset([{name: a} for a in arrays]), subset_size=len(arrays),
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(patterns=[KEPT_IN_PRECISION], validate=False),
        )
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
    before, after = (core.compile_model(m, "CPU", config) for m in (model, quantized))
    psnr = min(_psnr(before([a])[0], after([a])[0]) for a in arrays)
    # Beside it, then over it: the graph being replaced is memory-mapped from its .bin file.
    staged = path.with_name(path.stem + ".int8" + path.suffix)
    ov.save_model(quantized, str(staged), compress_to_fp16=False)
    del before, after, model, quantized
    for suffix in (".bin", path.suffix):
        os.replace(staged.with_suffix(suffix), path.with_suffix(suffix))
    return {"vae_decoder": "int8", "method": "NNCF post-training quantization", "kept": KEPT_IN_PRECISION,
            "calibration_latents": len(arrays), "worst_psnr_db": round(psnr, 2)}
