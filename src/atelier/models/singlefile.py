"""Single-file checkpoints in the original LDM/SGM layout (what A1111 and ComfyUI read and write).

Reading is diffusers' job (`from_single_file`); this module only adds what diffusers lacks:

* `original_state_dict(pipe)` / `save_single_file(pipe, path)`: diffusers -> original key layout.
  Hand-written because diffusers ships no installed converter in this direction (only the repo
  scripts `convert_diffusers_to_original_stable_diffusion.py` and `..._sdxl.py`, which hard-code the
  block counts of the full-size models). Here the renaming is derived from the UNet/VAE configs, so it
  works for any block layout, including the tiny test models; it is the exact inverse of diffusers'
  `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and
  `convert_open_clip_checkpoint` (the tests check the round trip).
* `inspect_checkpoint(path)`: open a .safetensors file without loading it, and tell which family
  (sd1 / sd2 / sdxl) its keys belong to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atelier.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {  # family -> (prefix of text encoder 1, prefix of text encoder 2)
    "sd1": ("cond_stage_model.transformer.", None),
    "sd2": ("cond_stage_model.model.", None),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}


# ----------------------------------------------------------------------------- UNet


_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "mid_block.resnets.0.": "middle_block.0.",
    "mid_block.attentions.0.": "middle_block.1.",
    "mid_block.resnets.1.": "middle_block.2.",
}
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def unet_prefix_map(config) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, for a UNet2DConditionModel config."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("the original layout needs the same layers_per_block for every block")
    n_blocks = len(config["block_out_channels"])
    stride = per_block + 1  # each LDM down level: per_block layers + one downsample slot
    prefixes = dict(_UNET_FIXED)
    for i in range(n_blocks):
        for j in range(per_block):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * stride + j}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * stride + j}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * stride}.0.op."
        up_has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(stride):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * stride + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * stride + j}.1."
        slot = 2 if up_has_attention else 1
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{i * stride + per_block}.{slot}.conv."
    return prefixes


def _split_by_prefix(state_dict, prefixes, what):
    """key -> (diffusers prefix, LDM prefix, rest of the key), using the longest matching prefix."""
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key in state_dict:
        for hf, ldm in ordered:
            if key.startswith(hf):
                out[key] = (hf, ldm, key[len(hf):])
                break
        else:
            raise ValueError(f"{what}: no original-layout name for {key!r}")
    return out


def _unet_rest_to_original(hf: str, rest: str) -> str:
    if ".resnets." in hf:
        for hf_part, ldm_part in _UNET_RESNET:
            if rest.startswith(hf_part + ".") or rest == hf_part:
                return ldm_part + rest[len(hf_part):]
    return rest


def unet_to_original(unet_state_dict, config) -> dict[str, torch.Tensor]:
    out = {}
    for key, (hf, ldm, rest) in _split_by_prefix(unet_state_dict, unet_prefix_map(config), "unet").items():
        out[UNET_PREFIX + ldm + _unet_rest_to_original(hf, rest)] = unet_state_dict[key]
    return out


def unet_module_to_original(name: str, config) -> str:
    """The LDM/SGM name of a diffusers UNet module ("down_blocks.1.attentions.0.proj_in" ->
    "input_blocks.4.1.proj_in"), without the checkpoint's `model.diffusion_model.` prefix."""
    (hf, ldm, rest), = _split_by_prefix({name + ".": None}, unet_prefix_map(config), "unet").values()
    return (ldm + _unet_rest_to_original(hf, rest)).rstrip(".")


# ----------------------------------------------------------------------------- VAE


def vae_to_original(vae_state_dict, config) -> dict[str, torch.Tensor]:
    n_blocks = len(config["block_out_channels"])
    prefixes = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for part in ("encoder", "decoder"):
        for name in ("conv_in.", "conv_out."):
            prefixes[f"{part}.{name}"] = f"{part}.{name}"
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for name in ("quant_conv.", "post_quant_conv."):
        prefixes[name] = name
    for i in range(n_blocks):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # the decoder's up blocks are numbered in reverse in the original layout
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n_blocks - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n_blocks - 1 - i}.upsample."
    names = {k: ldm + rest for k, (_, ldm, rest) in _split_by_prefix(vae_state_dict, prefixes, "vae").items()}
    attention_parts = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, ldm in names.items():
        value = vae_state_dict[key]
        ldm = ldm.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in ldm:
            block, rest = ldm.split(".mid.attn_1.")
            for hf_part, ldm_part in attention_parts.items():
                if rest.startswith(hf_part):
                    rest = ldm_part + rest[len(hf_part):]
                    break
            ldm = f"{block}.mid.attn_1.{rest}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[VAE_PREFIX + ldm] = value
    return out


# ----------------------------------------------------------------------------- text encoders


def _with_text_model_prefix(state_dict):
    """transformers >= 5 flattens CLIPTextModel (no `text_model.`); the original layout keeps it."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


def openai_clip_to_original(state_dict, prefix) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _with_text_model_prefix(state_dict).items()}


_OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def open_clip_to_original(state_dict, prefix) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP layout (fused q/k/v `in_proj`, transposed projection)."""
    sd = _with_text_model_prefix(state_dict)
    out = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_prefix = "text_model.encoder.layers."
    for key, value in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix):].split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                fused.setdefault(block + "attn.in_proj_" + kind, {})[proj[0]] = value
                continue
            for hf_part, ldm_part in _OPEN_CLIP_LAYER:
                if rest.startswith(hf_part):
                    out[block + ldm_part + rest[len(hf_part):]] = value
                    break
            else:
                raise ValueError(f"text encoder: no original-layout name for {key!r}")
        else:
            raise ValueError(f"text encoder: no original-layout name for {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ----------------------------------------------------------------------------- whole pipelines


def original_state_dict(pipe, family: str | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) under original LDM/SGM key names."""
    if family is None:
        from atelier.models.families import detect_family

        family = detect_family(pipe).family
    te1, te2 = CLIP_PREFIX[family]
    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if family == "sd2":
        sd.update(open_clip_to_original(pipe.text_encoder.state_dict(), te1))
    else:
        sd.update(openai_clip_to_original(pipe.text_encoder.state_dict(), te1))
    if te2 is not None:
        sd.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), te2))
    return sd


def save_single_file(pipe, path, *, family: str | None = None, metadata: dict | None = None) -> Path:
    """Write `pipe` as one A1111/ComfyUI-style .safetensors checkpoint; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"single-file checkpoints are written as .safetensors, not {path.suffix or 'no suffix'}: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in original_state_dict(pipe, family).items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", **(metadata or {})})
    return path


# ----------------------------------------------------------------------------- reading


@dataclass
class CheckpointInfo:
    path: Path
    family: str | None  # "sd1" | "sd2" | "sdxl" | None when the keys match none of them
    keys: list[str] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict, repr=False)


def family_from_keys(keys) -> str | None:
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return None


def inspect_checkpoint(path) -> CheckpointInfo:
    """Read the header of a .safetensors checkpoint (no tensors); UserError if it is not readable."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError / ValueError
        raise UserError(f"cannot read {path} as a safetensors checkpoint ({_first_line(exc)}); is the file complete?") from None
    return CheckpointInfo(path=path, family=family_from_keys(keys), keys=keys, metadata=metadata)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def modelspec_summary(metadata: dict[str, str]) -> dict:
    """The Stability ModelSpec fields some trainers write (`modelspec.architecture`, ...), if any."""
    spec = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith("modelspec.")}
    if "__metadata__" in metadata:
        try:
            spec.update(json.loads(metadata["__metadata__"]))
        except ValueError:
            pass
    return spec
