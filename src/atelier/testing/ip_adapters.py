"""Tiny IP-Adapters for tests and benchmarks: a CLIP vision encoder and adapters with h94 state dicts
(`image_proj.*`, `ip_adapter.1.to_k_ip.weight`, ...) for any tiny UNet, and the h94/IP-Adapter layout
written with them. Random weights, seeded; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}
RESAMPLER_HIDDEN = 32  # the Plus resampler's width (1280 in h94's adapters); heads = to_q rows / 64


def save_encoder(folder, projection_dim=16, seed=0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=projection_dim, **VISION)).save_pretrained(folder)
    return folder


def _rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


def _ip_layers(unet, g, prefix="ip_adapter."):
    """`{prefix}{2k+1}.to_k_ip.weight` / `to_v_ip` for the k-th cross-attention layer, as h94 numbers them."""
    out = {}
    cross = unet.config.cross_attention_dim
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for k, name in enumerate(names):
        module = unet.get_submodule(name.removesuffix(".processor"))
        width = module.to_q.out_features
        out[f"{prefix}{2 * k + 1}.to_k_ip.weight"] = _rand(g, width, cross)
        out[f"{prefix}{2 * k + 1}.to_v_ip.weight"] = _rand(g, width, cross)
    return out


def base_adapter(unet, projection_dim=16, seed=1):
    """An h94 IP-Adapter (4 image tokens from the projected image embedding)."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": _rand(g, 4 * cross, projection_dim), "image_proj.proj.bias": _rand(g, 4 * cross),
             "image_proj.norm.weight": 1 + _rand(g, cross), "image_proj.norm.bias": _rand(g, cross)}
    return {**state, **_ip_layers(unet, g)}


def plus_adapter(unet, tokens=16, seed=2):
    """An h94 IP-Adapter Plus: the Resampler (tencent-ailab's key names, 4 layers) over the
    penultimate hidden states of the encoder."""
    g = torch.Generator().manual_seed(seed)
    cross, dim, inner = unet.config.cross_attention_dim, RESAMPLER_HIDDEN, 64
    state = {"latents": _rand(g, 1, tokens, dim), "proj_in.weight": _rand(g, dim, VISION["hidden_size"]),
             "proj_in.bias": _rand(g, dim), "proj_out.weight": _rand(g, cross, dim), "proj_out.bias": _rand(g, cross),
             "norm_out.weight": 1 + _rand(g, cross), "norm_out.bias": _rand(g, cross)}
    for i in range(4):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"layers.{i}.{norm}.weight"] = 1 + _rand(g, dim)
            state[f"layers.{i}.{norm}.bias"] = _rand(g, dim)
        state[f"layers.{i}.0.to_q.weight"] = _rand(g, inner, dim)
        state[f"layers.{i}.0.to_kv.weight"] = _rand(g, 2 * inner, dim)
        state[f"layers.{i}.0.to_out.weight"] = _rand(g, dim, inner)
        state[f"layers.{i}.1.1.weight"] = _rand(g, 4 * dim, dim)
        state[f"layers.{i}.1.3.weight"] = _rand(g, dim, 4 * dim)
    return {**{f"image_proj.{k}": v for k, v in state.items()}, **_ip_layers(unet, g)}


def write_h94_layout(root) -> Path:
    """The h94/IP-Adapter layout for the tiny SD1 and SDXL pipelines: ViT-"H" in models/, ViT-"bigG"
    (another width) in sdxl_models/."""
    from safetensors.torch import save_file

    from atelier.testing.tiny import tiny_pipeline

    root = Path(root)
    sd1, sdxl = tiny_pipeline("sd1").unet, tiny_pipeline("sdxl").unet
    save_encoder(root / "models" / "image_encoder", projection_dim=16, seed=0)
    save_encoder(root / "sdxl_models" / "image_encoder", projection_dim=24, seed=3)
    save_file(base_adapter(sd1), root / "models" / "ip-adapter_sd15.safetensors")
    save_file(plus_adapter(sd1), root / "models" / "ip-adapter-plus_sd15.safetensors")
    save_file(base_adapter(sd1, seed=5), root / "models" / "ip-adapter_sd15_light.safetensors")
    save_file(base_adapter(sdxl, projection_dim=24), root / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    save_file(plus_adapter(sdxl), root / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors")
    return root


def write_adapter_folder(folder, unet, seed=1) -> Path:
    """A folder holding one base adapter for `unet` (e.g. toyworld-turbo's) and its `image_encoder/`:
    what `load_ip_adapter(pipe, folder)` and `atelier serve --ip-adapter folder` take."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_encoder(folder / "image_encoder", projection_dim=16, seed=0)
    save_file(base_adapter(unet, projection_dim=16, seed=seed), folder / "adapter.safetensors")
    return folder
