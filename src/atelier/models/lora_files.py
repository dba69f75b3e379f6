"""LoRA files everyone can use: diffusers/peft LoRAs as kohya ("webui") files, which A1111, Forge,
ComfyUI, InvokeAI and diffusers' own kohya converter all read, and kohya DoRA files back into diffusers.

The kohya layout: one entry per adapted layer, named after the layer with dots made underscores and
a prefix for the model part, each with `.lora_down.weight` (peft's lora_A), `.lora_up.weight`
(lora_B) and `.alpha` (a scalar: the layer's scale is alpha / rank), plus `.dora_scale` for DoRA.

    lora_unet_...   the UNet: SD 1.x/2.x under diffusers' module names (kohya sd-scripts trains
                    those on a diffusers UNet), SDXL under the original SGM names
                    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)
    lora_te_...     the text encoder of SD 1.x/2.x (transformers' CLIPTextModel names)
    lora_te1_/te2_  SDXL's two text encoders

diffusers ships the other direction (`_convert_non_diffusers_lora_to_diffusers`) and only a partial
`convert_state_dict_to_kohya` (alpha fixed to the rank, `lora_te1_` even for SD 1.x, no SGM names,
DoRA magnitudes left unnamed), so the layer naming here is written by hand, with the key renames of
older diffusers layouts left to diffusers' `convert_*_to_peft` and the SGM block numbering to
`atelier.models.singlefile` (shared with single-file checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from atelier.errors import UserError

PEFT_PREFIX = "base_model.model."  # peft's save_pretrained of a single model
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

# The key layout a family's LoRA files use; toyworld models are SD 1.x-shaped.
_LAYOUTS = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "toyworld": "sd1"}
_TEXT_PREFIXES = {  # layout -> kohya prefix of text_encoder, text_encoder_2
    "sd1": {"text_encoder": "lora_te_"},
    "sd2": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
# kohya sd-scripts' `ss_base_model_version` (model_util.get_model_version_str_for_sd1_sd2,
# sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0); A1111 reads SDXL from the "sdxl_" prefix.
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "toyworld": "toyworld"}
_SDXL_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl.json"


@dataclass
class LoraLayer:
    """One adapted layer: lora_A (down), lora_B (up), DoRA's magnitude, the kohya alpha if known."""

    component: str
    module: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def layout_of(family: str) -> str:
    if family not in _LAYOUTS:
        raise UserError(f"unknown model family {family!r} for a LoRA file: use one of {', '.join(_LAYOUTS)}")
    return _LAYOUTS[family]


# ----------------------------------------------------------------------------- reading diffusers/peft


def _component_of(key: str) -> tuple[str, str]:
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    for component in ("unet", "text_encoder_2", "text_encoder"):
        if key.startswith(component + "."):
            return component, key[len(component) + 1:]
    # a bare model's state dict (get_peft_model_state_dict of one model)
    return ("text_encoder" if key.startswith(("text_model.", "encoder.layers.")) else "unet"), key


# peft's in-memory names carry the adapter name: `lora_A.default.weight`
_ADAPTER_INFIX = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!(?:weight|bias)$)[A-Za-z_][\w-]*(?=\.weight$|$)")


def _peft_names(component: str, part: dict) -> dict:
    """Older diffusers layouts (`.lora.down.weight`, `to_q_lora`, `lora_linear_layer`) renamed to
    peft's, by diffusers' own converters."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    part = {_ADAPTER_INFIX.sub(r".\1", k): v for k, v in part.items()}
    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    if any("lora_linear_layer" in k or "_lora." in k for k in part):
        return convert_state_dict_to_peft(part)
    return part


def lora_layers(state_dict: dict) -> dict[tuple[str, str], LoraLayer]:
    """The layers of a diffusers or peft LoRA state dict, by (component, module name)."""
    parts: dict[str, dict] = {}
    for key, value in state_dict.items():
        component, rest = _component_of(key)
        parts.setdefault(component, {})[rest] = value
    layers: dict[tuple[str, str], LoraLayer] = {}
    for component, part in parts.items():
        for key, value in _peft_names(component, part).items():
            for suffix, field in ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                                  (".lora_magnitude_vector.weight", "magnitude"),
                                  (".lora_magnitude_vector", "magnitude"), (".alpha", "alpha")):
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    layer = layers.setdefault((component, module), LoraLayer(component, module))
                    setattr(layer, field, float(value) if field == "alpha" else value)
                    break
            else:
                if key.endswith(".lora_B.bias"):
                    raise UserError(f"LoRA layer {component}.{key[:-len('.lora_B.bias')]} has a bias (peft lora_bias), "
                                    "which kohya-format files cannot hold")
                raise UserError(f"not a LoRA weight: {component}.{key}")
    for layer in layers.values():
        if layer.down is None or layer.up is None:
            raise UserError(f"LoRA layer {layer.component}.{layer.module} lacks its "
                            f"{'lora_A (down)' if layer.down is None else 'lora_B (up)'} weight")
        if layer.up.shape[1] != layer.down.shape[0]:
            raise UserError(f"LoRA layer {layer.component}.{layer.module}: lora_A has rank {layer.down.shape[0]} "
                            f"but lora_B {layer.up.shape[1]}")
    return layers


# ----------------------------------------------------------------------------- alpha


def _component_configs(config) -> dict[str, dict]:
    """{component: LoraConfig fields} from a peft LoraConfig, its dict, a {component: config} dict,
    or the `lora_adapter_metadata` diffusers writes (keys "unet.r", "unet.lora_alpha", ...)."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise UserError(f"a LoRA config must be a peft LoraConfig or a dict, not {type(config).__name__}")
    if any(isinstance(config.get(c), (dict,)) or hasattr(config.get(c), "to_dict") for c in COMPONENTS):
        return {c: _component_configs(config[c])["*"] for c in COMPONENTS if config.get(c) is not None}
    prefixed = {}
    for key, value in config.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            prefixed.setdefault(component, {})[field] = value
    return prefixed or {"*": config}


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _peft_scale(config: dict, module: str, rank: int) -> float:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _kohya_alpha(layer: LoraLayer, alpha, configs: dict) -> float:
    """The kohya `alpha` that gives the layer the scale it has in diffusers/peft (scale = alpha / rank)."""
    if isinstance(alpha, dict):
        for key in (f"{layer.component}.{layer.module}", layer.module):
            if key in alpha:
                return float(alpha[key])
    elif alpha is not None:
        return float(alpha)
    if layer.alpha is not None:
        return layer.alpha
    config = configs.get(layer.component, configs.get("*"))
    if config:
        return _peft_scale(config, layer.module, layer.rank) * layer.rank
    return float(layer.rank)  # no alpha anywhere: diffusers loads such a file at scale 1


# ----------------------------------------------------------------------------- writing kohya


def _sdxl_unet_config() -> dict:
    return json.loads(_SDXL_CONFIG.read_text(encoding="utf-8"))["unet"]


def kohya_name(layer: LoraLayer, layout: str, unet_config=None) -> str:
    """The kohya name of one layer (`lora_unet_...`, `lora_te_...`, `lora_te1_/2_...`)."""
    from atelier.models.singlefile import unet_module_to_original

    if layer.component == "unet":
        module = layer.module
        if layout == "sdxl":
            try:
                module = unet_module_to_original(module, unet_config or _sdxl_unet_config())
            except ValueError:
                raise UserError(f"LoRA layer unet.{layer.module} is not a layer of an SDXL UNet") from None
        return "lora_unet_" + module.replace(".", "_")
    prefix = _TEXT_PREFIXES[layout].get(layer.component)
    if prefix is None:
        raise UserError(f"LoRA layer {layer.component}.{layer.module}: an {layout} model has no {layer.component}")
    # kohya names follow transformers 4's CLIPTextModel (`text_model.encoder...`); transformers 5 dropped
    # the `text_model` level, and diffusers' loader drops it again when the encoder has none.
    module = layer.module if layer.module.startswith("text_model.") else "text_model." + layer.module
    return prefix + module.replace(".", "_")


def _dora_scale(layer: LoraLayer) -> torch.Tensor:
    """peft's magnitude (one per output channel; (out,) for Linear, (1, out, 1, 1) for Conv2d) in the
    LyCORIS layout ComfyUI reads as output-axis DoRA: (out, 1) or (out, 1, 1, 1)."""
    out_features = layer.up.shape[0]
    if layer.magnitude.numel() != out_features:
        raise UserError(f"DoRA magnitude of {layer.component}.{layer.module} has {layer.magnitude.numel()} values "
                        f"for {out_features} output channels")
    return layer.magnitude.reshape(out_features, *[1] * (layer.down.dim() - 1))


def kohya_state_dict(state_dict: dict, family: str, *, alpha=None, config=None, unet_config=None) -> dict:
    """A diffusers/peft LoRA state dict (what `save_lora_weights` writes: `unet.<module>.lora_A.weight`,
    `text_encoder(_2).…`, DoRA's `lora_magnitude_vector`; also older diffusers names and peft's
    `base_model.model.` keys) in the kohya layout of `family` ("sd1", "sd2", "sdxl", "toyworld").

    alpha: the kohya alpha of every layer, or {module: alpha}; otherwise taken from `config` (a peft
    LoraConfig, or diffusers' `lora_adapter_metadata`: r, lora_alpha, rank/alpha patterns, rsLoRA),
    from `.alpha` entries of the state dict, or the rank (scale 1, as diffusers loads such files).
    unet_config: the SDXL UNet's config for the SGM block numbering (default: SDXL's own).
    """
    layout = layout_of(family)
    if is_kohya_keys(state_dict):
        raise UserError("this LoRA is in the kohya layout already")
    configs = _component_configs(config)
    out: dict[str, torch.Tensor] = {}
    for layer in lora_layers(state_dict).values():
        name = kohya_name(layer, layout, unet_config)
        if f"{name}.lora_down.weight" in out:
            raise UserError(f"two LoRA layers share the kohya name {name}")
        out[f"{name}.lora_down.weight"] = layer.down.detach().contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(_kohya_alpha(layer, alpha, configs), dtype=torch.float32)
        if layer.magnitude is not None:
            out[f"{name}.dora_scale"] = _dora_scale(layer).detach().contiguous()
    if not out:
        raise UserError("the LoRA state dict holds no LoRA layers")
    return out


def addnet_hash(data: bytes) -> str:
    """kohya's `sshs_model_hash` of safetensors bytes: the SHA-256 of the tensor data after the header
    (what A1111 shows as a LoRA's hash and Civitai as AutoV3)."""
    import hashlib

    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def _kohya_metadata(tensors: dict, family: str) -> dict[str, str]:
    """kohya sd-scripts' training metadata that readers look at (A1111 uses ss_base_model_version / ss_v2
    to tell SDXL and SD 2 LoRAs apart)."""
    downs = {k[: -len(".lora_down.weight")]: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    linear = [n for n, v in downs.items() if v.dim() == 2 or v.shape[-1] == v.shape[-2] == 1]
    conv = [n for n in downs if n not in linear]

    def most_common(values):
        values = list(values)
        return max(set(values), key=values.count) if values else None

    def number(x):
        return str(int(x)) if float(x).is_integer() else str(float(x))

    dim = most_common(int(downs[n].shape[0]) for n in linear or conv)
    alpha = most_common(float(tensors[f"{n}.alpha"]) for n in linear or conv)
    args = {}
    if conv:
        args["conv_dim"] = str(most_common(int(downs[n].shape[0]) for n in conv))
        args["conv_alpha"] = number(most_common(float(tensors[f"{n}.alpha"]) for n in conv))
    dora = any(k.endswith(".dora_scale") for k in tensors)
    if dora:
        args.update(algo="lora", dora_wd="True")
    meta = {
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": number(alpha),
        "ss_base_model_version": _BASE_MODEL_VERSION[family],
        "ss_v2": str(layout_of(family) == "sd2"),
    }
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def save_kohya_copy(diffusers_lora_file, out_file, family, *, alpha=None, metadata=None) -> Path:
    """Write a kohya-format copy of a diffusers LoRA file (`pytorch_lora_weights.safetensors`) for
    A1111, Forge and ComfyUI, atomically, with kohya's `ss_*` metadata and `sshs_model_hash`.
    The layers' alphas come from `alpha` (see `kohya_state_dict`) or the file's own adapter metadata."""
    from safetensors import safe_open
    from safetensors.torch import save

    from atelier.core.io import atomic_open
    from atelier.models.singlefile import _first_line

    source, out_file = Path(diffusers_lora_file), Path(out_file)
    if out_file.suffix != ".safetensors":
        raise UserError(f"a kohya LoRA file is written as .safetensors, not {out_file.suffix or 'no suffix'}: {out_file}")
    try:
        with safe_open(os.fspath(source), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
            file_metadata = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise UserError(f"cannot read the LoRA file {source}: {_first_line(exc)}") from None
    config = None
    if file_metadata.get("lora_adapter_metadata"):
        try:
            config = json.loads(file_metadata["lora_adapter_metadata"])
        except ValueError:
            raise UserError(f"{source}: its lora_adapter_metadata is not JSON") from None
    tensors = kohya_state_dict(state, family, alpha=alpha, config=config)
    meta = {"format": "pt", **_kohya_metadata(tensors, family)}
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    meta["sshs_model_hash"] = addnet_hash(save(tensors, meta))  # the data part does not depend on the header
    with atomic_open(out_file, "wb") as f:
        f.write(save(tensors, meta))
    return out_file


# ----------------------------------------------------------------------------- reading kohya DoRA


def is_kohya_keys(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(KOHYA_PREFIXES) for k in keys)


def _bake_alphas(state: dict) -> dict:
    """Multiply each lora_up by alpha / rank and drop the alphas: the same layers at scale 1."""
    out = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            name = key[: -len(".lora_up.weight")]
            if f"{name}.alpha" in state:
                rank = state[f"{name}.lora_down.weight"].shape[0]
                value = value * (float(state[f"{name}.alpha"]) / rank)
        out[key] = value
    return out


def diffusers_dora_from_kohya(state_dict: dict, unet_config) -> dict:
    """A kohya/LyCORIS DoRA LoRA (`.dora_scale` entries) as the diffusers state dict
    `save_lora_weights` would have written, alphas baked into lora_B.

    diffusers' loader drops `dora_scale` from kohya files (with a warning); its converter
    `_convert_non_diffusers_lora_to_diffusers` does map them, so atelier runs the converter itself and
    gives the magnitudes peft's shapes. Only output-axis DoRA (peft's, LyCORIS `wd_on_out`) exists in
    peft; input-axis files (older LyCORIS, the only kind A1111 applies) are refused."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    for key, scale in state_dict.items():
        if key.endswith(".dora_scale"):
            up = state_dict.get(key[: -len(".dora_scale")] + ".lora_up.weight")
            if up is None or scale.shape[0] != up.shape[0] or scale.numel() != up.shape[0]:
                raise UserError(f"DoRA layer {key[: -len('.dora_scale')]} decomposes along the input axis (older LyCORIS): "
                                "diffusers and peft apply DoRA along the output axis only")
    try:
        state = _maybe_map_sgm_blocks_to_diffusers(_bake_alphas(state_dict), unet_config)
        converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    except (KeyError, ValueError) as exc:
        raise UserError(f"not a kohya LoRA diffusers can read: {exc}") from None
    parts: dict[str, dict] = {}
    for key, value in converted.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    out = {}
    for component, part in parts.items():
        if component != "unet":
            part = convert_state_dict_to_diffusers(part)
        for key, value in _peft_names(component, part).items():
            if key.endswith(".lora_magnitude_vector.weight"):
                key = key[: -len(".weight")]
            out[f"{component}.{key}"] = value
    for key, value in list(out.items()):
        if key.endswith(".lora_magnitude_vector"):
            up = out[key[: -len(".lora_magnitude_vector")] + ".lora_B.weight"]
            out[key] = value.reshape(1, -1, 1, 1) if up.dim() == 4 else value.reshape(-1)
    return out
