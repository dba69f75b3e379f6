"""Export a loaded SD-family pipeline's UNet, VAE (encoder and decoder) and CLIP text encoder(s) to
OpenVINO IR or ONNX, with the runtimes' own converters (`openvino.convert_model` on the torch
module, `torch.onnx.export`), and write everything else as the diffusers folder it was (scheduler,
tokenizers, model_index.json, atelier.json) so that the folder loads like any model.

    folder/
      export.json                    format, precision, static shapes, which component is what
      model_index.json, atelier.json
      scheduler/, tokenizer/ (tokenizer_2/)
      unet/config.json + model.xml/.bin (OpenVINO) or model.onnx (ONNX)
      vae/config.json + encoder.* + decoder.*
      text_encoder/ (text_encoder_2/) config.json + model.* + final_layer_norm.safetensors

A tiny autoencoder (AutoencoderTiny, TAESD) exports on its own, as the stream's fast VAE beside an
exported model: its folder holds config.json, encoder.* + decoder.* and export.json.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from atelier.core.io import atomic_dir
from atelier.core.vae import is_tiny
from atelier.errors import UserError
from atelier.runtime.modules import (
    EXPORT_FILE,
    FORMATS,
    PRECISIONS,
    TINY_VAE,
    ExportedModule,
    graph_path,
    import_runtime,
)
from atelier.runtime.quantize import (
    GENERIC_PROMPTS,
    check_quantize,
    latents_of_images,
    latents_of_prompts,
    quantize_decoder,
)

NOT_EXPORTED = ("safety_checker", "feature_extractor", "image_encoder")  # dropped: the export has none
ONNX_OPSET = 17


# ---------------------------------------------------------------------------------- the graphs


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet, extra: list[str]):
        super().__init__()
        self.unet, self.extra = unet, extra

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        given = dict(zip(self.extra, extra))
        added = {k: given[k] for k in ("text_embeds", "time_ids") if k in given}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         timestep_cond=given.get("timestep_cond"),
                         added_cond_kwargs=added or None, return_dict=False)[0]


class _VAEEncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        return self.vae.encode(images).latent_dist.parameters  # mean and log-variance, stacked


class _TinyEncoderGraph(torch.nn.Module):
    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, images):
        return self.tiny.encode(images).latents


class _VAEDecoderGraph(torch.nn.Module):  # AutoencoderKL's and AutoencoderTiny's alike
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


class _TextGraph(torch.nn.Module):
    def __init__(self, encoder, projection: bool):
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, input_ids):
        out = self.encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if self.projection else out.pooler_output
        return out.last_hidden_state, pooled, torch.stack(out.hidden_states)


def _export_graph(module, example: dict, outputs: list[str], dynamic: dict[str, set[int]], path: Path, fmt: str) -> None:
    """Convert `module` called on `example` (input name -> tensor) with the runtime's converter;
    the axes in `dynamic` stay free, every other axis is fixed at the example's size."""
    args = tuple(example.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python conditions on shapes
        if fmt == "onnx":
            torch.onnx.export(
                module, args, str(path), input_names=list(example), output_names=outputs,
                dynamic_axes={name: {a: f"{name}_{a}" for a in sorted(axes)} for name, axes in dynamic.items() if axes},
                opset_version=ONNX_OPSET, dynamo=False,
            )
            return
        import openvino as ov

        model = ov.convert_model(module, example_input=args)
        for port, name in zip(model.inputs, example):
            port.get_tensor().set_names({name})
        for port, name in zip(model.outputs, outputs):
            port.get_tensor().set_names({name})
        model.reshape({
            port: ov.PartialShape([-1 if axis in dynamic.get(name, ()) else size for axis, size in enumerate(example[name].shape)])
            for port, name in zip(model.inputs, example)
        })
        ov.save_model(model, str(path), compress_to_fp16=False)


def _write_autoencoder(vae, folder: Path, fmt: str, images: torch.Tensor, latents: torch.Tensor, dynamic: set[int]) -> None:
    """`vae`'s (AutoencoderKL or AutoencoderTiny) encoder.* and decoder.* graphs and config.json in
    `folder`; `images` and `latents` are the examples, `dynamic` their free axes."""
    encoder, output = (_TinyEncoderGraph(vae), "latents") if is_tiny(vae) else (_VAEEncoderGraph(vae), "moments")
    _export_graph(encoder, {"images": images}, [output], {"images": dynamic}, graph_path(folder, "encoder", fmt), fmt)
    _export_graph(_VAEDecoderGraph(vae), {"latents": latents}, ["images"], {"latents": dynamic},
                  graph_path(folder, "decoder", fmt), fmt)
    vae.save_config(folder)


def _check_options(fmt: str, precision: str, batch, out, overwrite: bool):
    """The runtime module of `fmt`, once the options and the output folder are fine."""
    runtime = import_runtime(fmt)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise UserError(f"--batch must be a whole number >= 1, got {batch!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    return runtime


def _check_cpu_float32(modules) -> None:
    for module in modules:
        if module.device.type != "cpu" or module.dtype != torch.float32:
            raise UserError("export a model loaded on the CPU in float32 (load_pipeline(source, device='cpu', dtype='fp32'))")


def _write_record(folder: Path, fmt: str, runtime, *, precision: str, static_shape, batch, components: dict,
                  source: str, quantized: dict | None = None) -> None:
    record = {
        "format": fmt,
        "runtime": f"{FORMATS[fmt]} {getattr(runtime, '__version__', '?')}",
        "precision": precision,
        "static_shape": list(static_shape) if static_shape else None,
        "batch": batch,
        "components": components,
        "exported_from": str(source or ""),
        "torch": torch.__version__,
    }
    if quantized is not None:
        record["quantized"] = quantized
    (folder / EXPORT_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------- a pipeline


def _check_exportable(pipe) -> None:
    if any(isinstance(m, ExportedModule) for m in getattr(pipe, "components", {}).values()):
        raise UserError("this model is already exported: export the original model instead")
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or getattr(pipe, "text_encoder", None) is None:
        raise UserError(f"{type(pipe).__name__} is not a Stable Diffusion text-to-image pipeline (UNet and text encoder)")
    if type(unet).__name__ != "UNet2DConditionModel" or type(vae).__name__ != "AutoencoderKL":
        raise UserError(f"atelier exports UNet2DConditionModel + AutoencoderKL models, not {type(unet).__name__} + {type(vae).__name__}")
    _check_cpu_float32(getattr(pipe, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                       if getattr(pipe, name, None) is not None)


def _unet_example(pipe, height: int, width: int, batch: int) -> dict:
    unet = pipe.unet
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    example = {
        "sample": torch.randn(batch, unet.config.in_channels, height // scale, width // scale),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, _tokens(pipe), unet.config.cross_attention_dim),
    }
    if unet.config.addition_embed_type == "text_time":
        example["text_embeds"] = torch.randn(batch, pipe.text_encoder_2.config.projection_dim)
        example["time_ids"] = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
    if unet.config.time_cond_proj_dim is not None:
        example["timestep_cond"] = torch.randn(batch, unet.config.time_cond_proj_dim)
    return example


def _tokens(pipe) -> int:
    """Tokens per prompt chunk: the tokenizer's length, at most the text encoder's positions."""
    return min(int(pipe.tokenizer.model_max_length), int(pipe.text_encoder.config.max_position_embeddings))


def _write_text_encoder(encoder, folder: Path, fmt: str, batch: int, tokens: int) -> str:
    from safetensors.torch import save_file

    projection = "WithProjection" in type(encoder).__name__
    example = {"input_ids": torch.randint(0, encoder.config.vocab_size, (batch, tokens))}
    _export_graph(_TextGraph(encoder, projection), example, ["last_hidden_state", "pooled", "hidden_states"],
                  {"input_ids": {0, 1}}, graph_path(folder, "model", fmt), fmt)
    encoder.config.save_pretrained(folder)
    norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    save_file({k: v.detach().contiguous() for k, v in norm.state_dict().items()}, str(folder / "final_layer_norm.safetensors"))
    return "text_projection" if projection else "text"


def parse_static_shape(text: str | None) -> tuple[int, int] | None:
    """"512x768" -> (512, 768) as (height, width); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--static-shape must be HEIGHTxWIDTH in pixels, like 512x512, got {text!r}") from None
    return height, width


def export_pipeline(pipe, out, fmt: str, *, static_shape: tuple[int, int] | None = None, batch: int | None = None,
                    precision: str = "fp32", source_folder=None, overwrite: bool = False, quantize: str | None = None,
                    calibration_prompts: list[str] | None = None, calibration_images: list | None = None,
                    calibration_size: int = 32) -> Path:
    """Export `pipe` (loaded on the CPU in float32) to `out` in format "openvino" or "onnx".

    static_shape: (height, width) in pixels to fix the UNet's and VAE's spatial size (dynamic without);
    batch: fix the UNet's and VAE's batch (dynamic without; larger batches run in pieces of it);
    precision (OpenVINO): "fp32" computes in float32, "auto" lets OpenVINO pick its fastest (bf16 on
    CPUs that have it); source_folder: the model's folder, whose atelier.json is copied.
    quantize="int8" (OpenVINO): the VAE decoder's up blocks in 8 bit (atelier.runtime.quantize),
    calibrated on `calibration_size` latents of `calibration_images` or, without them, latents the
    model generates from `calibration_prompts` (default: varied generic prompts).
    The folder appears complete or not at all; an existing one is replaced only with overwrite."""
    from atelier.core.facts import check_size, native_size, size_step

    runtime = _check_options(fmt, precision, batch, out, overwrite)
    _check_exportable(pipe)
    out = Path(out)
    if static_shape is not None:
        check_size(static_shape[1], static_shape[0], size_step(pipe), names=("static width", "static height"))
    height, width = static_shape or (native_size(pipe),) * 2
    fixed_batch = batch or 2
    spatial = set() if static_shape else {2, 3}
    free_batch = set() if batch else {0}
    check_quantize(quantize, fmt)
    if quantize is not None:
        if not isinstance(calibration_size, int) or calibration_size < 1:
            raise UserError(f"the calibration size must be a whole number >= 1, got {calibration_size!r}")
        if calibration_images:
            calibration = latents_of_images(pipe, list(calibration_images), calibration_size, height, width)
        else:
            calibration = latents_of_prompts(pipe, list(calibration_prompts or GENERIC_PROMPTS), calibration_size,
                                             height, width)
    quantized = None

    components: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        (tmp / "unet").mkdir()
        example = _unet_example(pipe, height, width, fixed_batch)
        dynamic = {name: set(free_batch) for name in example}
        dynamic["sample"] |= spatial
        dynamic["encoder_hidden_states"].add(1)  # long prompts: one chunk of tokens after another
        _export_graph(_UNetGraph(pipe.unet, list(example)[3:]), example, ["out_sample"], dynamic,
                      graph_path(tmp / "unet", "model", fmt), fmt)
        pipe.unet.save_config(tmp / "unet")
        components["unet"] = "unet"

        (tmp / "vae").mkdir()
        scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        images = torch.rand(fixed_batch, 3, height, width) * 2 - 1
        latents = torch.randn(fixed_batch, pipe.vae.config.latent_channels, height // scale, width // scale)
        _write_autoencoder(pipe.vae, tmp / "vae", fmt, images, latents, free_batch | spatial)
        components["vae"] = "vae"
        if quantize is not None:
            quantized = quantize_decoder(graph_path(tmp / "vae", "decoder", fmt), calibration)

        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                (tmp / name).mkdir()
                components[name] = _write_text_encoder(encoder, tmp / name, fmt, 2, _tokens(pipe))

        pipe.scheduler.save_pretrained(tmp / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).save_pretrained(tmp / name)
        import diffusers

        index = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__}
        index.update((k, list(v) if isinstance(v, tuple) else v) for k, v in dict(pipe.config).items())
        for name in NOT_EXPORTED:
            if name in index:
                index[name] = [None, None]
        if "requires_safety_checker" in index:
            index["requires_safety_checker"] = False
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        _write_defaults(pipe, tmp, source_folder)
        _write_record(tmp, fmt, runtime, precision=precision, static_shape=static_shape, batch=batch,
                      components=components, source=getattr(pipe, "atelier_source", ""), quantized=quantized)
    return out


def _write_defaults(pipe, folder: Path, source_folder) -> None:
    """The model's atelier.json as it was, or the defaults it was loaded with."""
    source = Path(source_folder) / "atelier.json" if source_folder is not None else None
    if source is not None and source.is_file():
        shutil.copyfile(source, folder / "atelier.json")
    elif getattr(pipe, "atelier_defaults", None):
        (folder / "atelier.json").write_text(json.dumps(pipe.atelier_defaults, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------------- a tiny autoencoder


def tiny_scale(tiny) -> int:
    """Pixels per latent of an AutoencoderTiny: each encoder block after the first halves the size."""
    return 2 ** (len(tiny.config.num_encoder_blocks) - 1)


def export_tiny_autoencoder(tiny, out, fmt: str, *, static_shape: tuple[int, int] | None = None,
                            batch: int | None = None, precision: str = "fp32", overwrite: bool = False) -> Path:
    """Export an AutoencoderTiny (loaded on the CPU in float32) to `out` in format "openvino" or "onnx":
    config.json, the encoder and decoder graphs (with TAESD's pixel scaling inside) and export.json.
    load_tiny_autoencoder(out) loads it back. The options are export_pipeline's."""
    from atelier.core.facts import check_size

    runtime = _check_options(fmt, precision, batch, out, overwrite)
    if isinstance(tiny, ExportedModule):
        raise UserError("this tiny autoencoder is already exported: export the original one instead")
    if not is_tiny(tiny):
        raise UserError(f"export_tiny_autoencoder exports an AutoencoderTiny, not a {type(tiny).__name__}")
    _check_cpu_float32([tiny])
    scale = tiny_scale(tiny)
    if static_shape is not None:
        check_size(static_shape[1], static_shape[0], scale, names=("static width", "static height"))
    height, width = static_shape or (8 * scale,) * 2
    fixed_batch = batch or 2
    dynamic = (set() if batch else {0}) | (set() if static_shape else {2, 3})
    images = torch.rand(fixed_batch, 3, height, width) * 2 - 1
    latents = torch.randn(fixed_batch, tiny.config.latent_channels, height // scale, width // scale)
    out = Path(out)
    with atomic_dir(out) as tmp:
        _write_autoencoder(tiny, tmp, fmt, images, latents, dynamic)
        _write_record(tmp, fmt, runtime, precision=precision, static_shape=static_shape, batch=batch,
                      components={TINY_VAE: TINY_VAE}, source=getattr(tiny, "atelier_source", ""))
    return out
