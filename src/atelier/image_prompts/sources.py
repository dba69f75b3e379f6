"""Where an IP-Adapter's files are: the adapter weights and the CLIP image encoder it was trained with.

Sources, as users have them:
  * the h94/IP-Adapter layout (a clone or a download of the repository): `models/ip-adapter_sd15.safetensors`,
    `models/ip-adapter-plus_sd15.safetensors`, `sdxl_models/ip-adapter_sdxl*.safetensors`, and the
    encoders in `models/image_encoder/` (ViT-H) and `sdxl_models/image_encoder/` (ViT-bigG);
  * any folder holding one adapter file and an `image_encoder/` folder;
  * a single adapter file, with the encoder next to it or named explicitly;
  * a hub id ("h94/IP-Adapter", or "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors") read from
    the Hugging Face cache only: nothing is downloaded, a missing file is named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import UserError

DEFAULT_HUB_REPO = "h94/IP-Adapter"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

# (model family, variant) -> the file of the h94 layout
H94_FILES = {
    ("sd1", "base"): "models/ip-adapter_sd15.safetensors",
    ("sd1", "light"): "models/ip-adapter_sd15_light.safetensors",
    ("sd1", "plus"): "models/ip-adapter-plus_sd15.safetensors",
    ("sd1", "plus-face"): "models/ip-adapter-plus-face_sd15.safetensors",
    ("sd1", "full-face"): "models/ip-adapter-full-face_sd15.safetensors",
    ("sdxl", "base"): "sdxl_models/ip-adapter_sdxl.safetensors",
    ("sdxl", "vit-h"): "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
    ("sdxl", "plus"): "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
    ("sdxl", "plus-face"): "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors",
}
VARIANTS = sorted({variant for _, variant in H94_FILES})
H94_FOLDERS = ("models", "sdxl_models")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_HELP = (
    "pickle files can run arbitrary code when loaded, so atelier loads only .safetensors by default; "
    "if you trust the file, pass allow_pickle=True (CLI: --allow-pickle), or use the .safetensors file"
)


@dataclass(frozen=True)
class AdapterFiles:
    name: str  # the weight file's stem, recorded in the metadata
    weights: Path
    image_encoder: Path  # a transformers CLIPVisionModelWithProjection folder
    repo: str | None = None  # the hub id it was found under, if any


def h94_encoder(relative: str) -> str:
    """The encoder folder of an h94 layout file: ViT-H in models/, ViT-bigG in sdxl_models/; the
    "vit-h" SDXL adapters use ViT-H and the SD 1.5 "vit-G" one uses bigG."""
    top, _, stem = relative.partition("/")
    lower = stem.lower()
    if "vit-h" in lower:
        return "models/image_encoder"
    if "vit-g" in lower:
        return "sdxl_models/image_encoder"
    return f"{top}/image_encoder"


def h94_relative(family: str, variant: str | None, weight_name: str | None) -> str:
    """The path inside an h94 layout for a weight name (a path, a file name or a stem) or a variant."""
    if weight_name:
        name = weight_name.replace(os.sep, "/")
        if "/" in name:
            return name
        if not name.endswith(ADAPTER_SUFFIXES):
            name += ".safetensors"
        top = "sdxl_models" if "sdxl" in name else "models"
        return f"{top}/{name}"
    variant = variant or "base"
    if variant not in VARIANTS:
        raise UserError(f"unknown IP-Adapter variant {variant!r}: choose from {', '.join(VARIANTS)}")
    if family == "sd2":
        raise UserError(
            "h94/IP-Adapter has no adapter for SD 2.x models (SD 2.1, SD-Turbo: 1024-wide cross-attention); "
            "its adapters fit SD 1.x (models/) and SDXL / SDXL-Turbo (sdxl_models/): pass an adapter trained "
            "for this model"
        )
    key = ("sdxl" if family == "sdxl" else "sd1", variant)
    if key not in H94_FILES:
        options = ", ".join(v for f, v in H94_FILES if f == key[0])
        raise UserError(f"h94/IP-Adapter has no {variant!r} adapter for {key[0]} models: choose from {options}")
    return H94_FILES[key]


def is_h94_layout(folder: Path) -> bool:
    return any((folder / sub).is_dir() for sub in H94_FOLDERS)


def model_adapter(model_folder) -> Path | None:
    """The adapter a model folder names as its own in `atelier.json` ("ip_adapter": a folder beside the
    model, or a path relative to it): how the built-in toy-world models find `toyworld-ip` and
    `toyworld-turbo-ip`."""
    import json

    if not model_folder:
        return None
    info = Path(model_folder) / "atelier.json"
    try:
        name = json.loads(info.read_text(encoding="utf-8")).get("ip_adapter") if info.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or not name:
        return None
    folder = (Path(model_folder).parent / name) if "/" not in name else (Path(model_folder) / name)
    return folder if folder.is_dir() else None


def resolve_adapter(source, *, family: str, variant: str | None = None, weight_name: str | None = None,
                    image_encoder=None) -> AdapterFiles:
    """The adapter file and image encoder folder behind `source` (see the module docstring) for a
    model of `family` ("sd1", "sd2", "sdxl"). `variant` ("base", "plus", ...) or `weight_name` picks the
    file in a layout; `image_encoder` names the encoder folder explicitly."""
    encoder = _explicit_encoder(image_encoder)
    if source is None:
        source = DEFAULT_HUB_REPO
    text = os.path.expanduser(os.fspath(source))
    path = Path(text)
    if path.is_file():
        return AdapterFiles(path.stem, path, encoder or _encoder_near(path))
    if path.is_dir():
        return _from_folder(path, family, variant, weight_name, encoder)
    if isinstance(source, str) and source in VARIANTS and variant is None:
        return resolve_adapter(DEFAULT_HUB_REPO, family=family, variant=source, weight_name=weight_name,
                               image_encoder=image_encoder)
    parts = text.split("/")
    if isinstance(source, str) and len(parts) >= 2 and _HUB_ID.match("/".join(parts[:2])) and not text.startswith((".", "/", "~")):
        repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
        return _from_hub_cache(repo, inner or None, family, variant, weight_name, encoder)
    raise UserError(f"IP-Adapter {source!r}: no such file or folder, and not a hub id (org/name)")


def _explicit_encoder(image_encoder) -> Path | None:
    if image_encoder is None:
        return None
    folder = Path(os.path.expanduser(os.fspath(image_encoder)))
    if not (folder / "config.json").is_file():
        raise UserError(f"image encoder {folder}: not a CLIP vision model folder (no config.json)")
    return folder


def _encoder_near(weights: Path) -> Path:
    """The encoder of a lone adapter file: `image_encoder/` beside it, or where the h94 layout keeps it."""
    candidates = [weights.parent / "image_encoder"]
    if weights.parent.name in H94_FOLDERS:
        candidates.insert(0, weights.parent.parent / h94_encoder(f"{weights.parent.name}/{weights.name}"))
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise UserError(
        f"no image encoder found for {weights.name} (looked in {', '.join(str(c) for c in candidates)}): pass the "
        "CLIP vision folder it was trained with (image_encoder=..., CLI --ip-image-encoder)"
    )


def _from_folder(folder: Path, family, variant, weight_name, encoder) -> AdapterFiles:
    if is_h94_layout(folder):
        relative = h94_relative(family, variant, weight_name)
        weights = folder / relative
        if not weights.is_file():
            raise UserError(f"{folder} has no {relative} (the h94/IP-Adapter layout)")
        encoder = encoder or folder / h94_encoder(relative)
        if not (encoder / "config.json").is_file():
            raise UserError(f"{folder} has no {h94_encoder(relative)}/ with the image encoder for {weights.name}")
        return AdapterFiles(weights.stem, weights, encoder)
    if weight_name:
        weights = folder / weight_name
        if not weights.is_file() and not weight_name.endswith(ADAPTER_SUFFIXES):
            weights = folder / f"{weight_name}.safetensors"
        if not weights.is_file():
            raise UserError(f"{folder} has no adapter file {weight_name}")
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(ADAPTER_SUFFIXES))
        safe = [p for p in files if p.suffix == ".safetensors"]
        files = safe or files
        if not files:
            raise UserError(f"{folder} holds no IP-Adapter file (.safetensors)")
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise UserError(f"{folder} holds several adapter files ({names}): name one (weight_name=..., or pass the file)")
        weights = files[0]
    return AdapterFiles(weights.stem, weights, encoder or _encoder_near(weights))


def _from_hub_cache(repo: str, inner, family, variant, weight_name, encoder) -> AdapterFiles:
    from huggingface_hub import try_to_load_from_cache

    from atelier.models.loader import hf_cache_dir

    cache = os.fspath(hf_cache_dir())
    relative = inner or h94_relative(family, variant, weight_name)

    def cached(filename: str) -> Path:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if not isinstance(found, str):
            raise UserError(
                f"'{repo}' file {filename} is not in the Hugging Face cache ({cache}); atelier never downloads at "
                f"run time: fetch it once with `hf download {repo} {filename}`, or pass a local folder or file"
            )
        return Path(found)

    weights = cached(relative)
    if encoder is None:
        encoder_dir = h94_encoder(relative) if relative.split("/")[0] in H94_FOLDERS else (
            "/".join(relative.split("/")[:-1] + ["image_encoder"]))
        config = cached(f"{encoder_dir}/config.json")
        weight_files = (f"{encoder_dir}/model.safetensors", f"{encoder_dir}/pytorch_model.bin")
        if not any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache), str) for f in weight_files):
            cached(weight_files[0])  # raises, naming the file
        encoder = config.parent
    return AdapterFiles(weights.stem, weights, encoder, repo=repo)
