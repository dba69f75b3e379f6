"""PIE-Bench's metrics as plain functions, computed the way its reference code does
(cure-lab/PnPInversion, evaluation/matrics_calculator.py, which wraps torchmetrics).

Conventions shared with the reference:
- images are HxWx3 uint8 (PIL images or arrays); PSNR / MSE / SSIM / LPIPS scale them to [0, 1]
  (LPIPS then to [-1, 1]);
- a mask (HxW, 1 = keep) is applied by *multiplying* both images by it and then measuring the whole
  image, so pixels outside the mask count as perfect matches (this is how PIE-Bench's
  "unedit part" numbers are made: mask = 1 - edit mask);
- PSNR uses data_range 1 and is +inf for identical images.

Model-based metrics take an already loaded model (see the `load_*` functions): structure distance
(DINO ViT-B/8 key self-similarity), LPIPS (VGG16, written here in plain torch: no torchvision) and
CLIP score (CLIP ViT-L/14). Loaders raise `UserError` for paths that are not usable weights.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atelier.errors import UserError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


# ----------------------------------------------------------------------------- pixels


def as_uint8(image) -> np.ndarray:
    """An HxWx3 uint8 array from a PIL image or an array."""
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array.astype(np.uint8, copy=False)


def _unit_pair(pred, target, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float32 in [0, 1], multiplied by `mask` (HxW or HxWx1/3) when given."""
    a = as_uint8(pred).astype(np.float32) / 255
    b = as_uint8(target).astype(np.float32) / 255
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        if m.ndim == 2:
            m = m[..., None]
        a, b = a * m, b * m
    return a, b


def mse(pred, target, mask=None) -> float:
    """Mean squared error over all pixels and channels, images in [0, 1]."""
    a, b = _unit_pair(pred, target, mask)
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def psnr(pred, target, mask=None) -> float:
    """Peak signal-to-noise ratio in dB with data range 1; +inf when the images are equal."""
    error = mse(pred, target, mask)
    return math.inf if error == 0 else 10 * math.log10(1.0 / error)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords / sigma) ** 2 / 2)
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(pred, target, mask=None, *, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity with an 11x11 gaussian window (sigma 1.5), data range 1.

    torchmetrics is not a dependency (its import needs torchvision here), so this is the standard
    formula written out as torchmetrics' StructuralSimilarityIndexMeasure computes it: reflect-pad by
    the window radius, gaussian-filter x, y, x², y², xy per channel, clamp the variances at 0, take
    the SSIM map, crop the padded border off and average.
    """
    a, b = _unit_pair(pred, target, mask)
    x = torch.from_numpy(a).double().permute(2, 0, 1)[None]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[None]
    size = int(3.5 * sigma + 0.5) * 2 + 1  # 11 for sigma 1.5, as torchmetrics derives it
    pad = (size - 1) // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad} pixels a side")
    channels = x.shape[1]
    window = _gaussian_window(size, sigma).expand(channels, 1, size, size)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    filtered = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), window, groups=channels)
    mu_x, mu_y, xx, yy, xy = filtered.split(1)
    var_x = (xx - mu_x**2).clamp(min=0)
    var_y = (yy - mu_y**2).clamp(min=0)
    cov = xy - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map[..., pad:-pad, pad:-pad].mean())


# ----------------------------------------------------------------------------- weights on disk


def read_tensors(paths, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the given files (or folders of weight files) merged into one dict.
    Pickled files (.pth/.pt/.bin) are read only with allow_pickle, through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for given in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(os.path.expanduser(os.fspath(given)))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
            if allow_pickle:
                files += sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if not files:
                raise UserError(f"{path} holds no .safetensors weights")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"no such weights file or folder: {path}")
        for file in files:
            if file.suffix in PICKLE_SUFFIXES:
                if not allow_pickle:
                    raise UserError(f"{file} is a pickle file: convert it to .safetensors, or pass --allow-pickle")
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the user's file
                    raise UserError(f"cannot read {file}: {exc}") from None
                state = state.get("state_dict", state) if isinstance(state, dict) else state
                if not isinstance(state, dict):
                    raise UserError(f"{file} does not hold a dict of tensors")
                tensors.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            else:
                try:
                    tensors.update(load_file(os.fspath(file)))
                except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                    raise UserError(f"cannot read {file} as safetensors: {exc}") from None
    return tensors


# ----------------------------------------------------------------------------- LPIPS (VGG)

# torchvision's vgg16().features up to relu5_3: numbers are 3x3 conv widths (each followed by a
# ReLU), "M" a 2x2 max-pool. Module indices therefore match torchvision's and the lpips package's.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
VGG16_MODULES = 30  # convs + ReLUs + pools above; torchvision's index 30 (the last pool) is unused


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 features (Zhang et al. 2018; the `lpips` package's `LPIPS(net="vgg")`).

    Note: PIE-Bench's reference code uses the SqueezeNet variant (torchmetrics' net_type="squeeze"),
    so VGG numbers are on a different scale from the paper's LPIPS column.
    """

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        # the lpips package's ScalingLayer: inputs in [-1, 1] to ImageNet-normalised values
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """Distance per batch item for images in [-1, 1]: unit-normalise each tapped layer over
        channels, squared difference, 1x1 linear weights, spatial mean, sum over the five layers."""
        total = 0
        for lin, f0, f1 in zip(self.lins, self.taps(x0), self.taps(x1)):
            n0 = f0 / (f0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n0 - n1) ** 2).mean(dim=(2, 3))
        return total.flatten()


_VGG_KEY = re.compile(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"(?:^|\.)lin(\d)(?:\.model\.1)?\.weight$")


def lpips_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map weights named as torchvision (`features.N.*`), the lpips package's full model
    (`net.sliceK.N.*`, `linK.model.1.weight`) or plain `linK.weight` to `LPIPS`'s names."""
    state = {}
    for key, value in tensors.items():
        if m := _VGG_KEY.search(key):
            if int(m.group(1)) < VGG16_MODULES:
                state[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif m := _LIN_KEY.search(key):
            state[f"lins.{m.group(1)}.weight"] = value
    return state


def load_lpips_vgg(paths, *, allow_pickle: bool = False, device="cpu") -> LPIPS:
    """LPIPS (VGG) from local weight files: the VGG16 features and the five LPIPS linear layers,
    in one file or several (e.g. torchvision's vgg16 weights and lpips' vgg.pth, as safetensors)."""
    state = lpips_state_dict(read_tensors(paths, allow_pickle=allow_pickle))
    model = LPIPS()
    expected = {k for k in model.state_dict() if k not in ("shift", "scale")}
    missing = sorted(expected - state.keys())
    if missing:
        what = []
        if any(k.startswith("features.") for k in missing):
            what.append("VGG16 features (features.N.weight/bias, as torchvision's vgg16)")
        if any(k.startswith("lins.") for k in missing):
            what.append("LPIPS linear layers (lin0..lin4, as the lpips package's vgg.pth)")
        raise UserError(f"LPIPS weights {paths}: missing {' and '.join(what)}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"LPIPS weights {paths} do not fit VGG16: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval().to(device)


@torch.no_grad()
def lpips(model: LPIPS, pred, target, mask=None) -> float:
    """LPIPS distance (0 for identical images) between two HxWx3 images."""
    a, b = _unit_pair(pred, target, mask)
    device = model.shift.device
    x0 = torch.from_numpy(a).permute(2, 0, 1)[None].to(device) * 2 - 1
    x1 = torch.from_numpy(b).permute(2, 0, 1)[None].to(device) * 2 - 1
    return float(model(x0, x1).mean())


# ----------------------------------------------------------------------------- structure distance (DINO)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224  # PIE-Bench: Resize(224, max_size=480) before the ViT


def load_dino(folder, *, allow_pickle: bool = False, device="cpu"):
    """A transformers ViTModel folder (facebook/dino-vitb8 in PIE-Bench)."""
    from transformers import ViTModel

    folder = Path(os.path.expanduser(os.fspath(folder)))
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        model, info = ViTModel.from_pretrained(os.fspath(folder), add_pooling_layer=False, output_loading_info=True,
                                               use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle reads .bin)"
        raise UserError(f"cannot load DINO ViT from {folder}{hint}: {str(exc).strip().splitlines()[0]}") from None
    _refuse_missing(folder, info)
    return model.eval().to(device)


def _refuse_missing(folder, info) -> None:
    """transformers fills weights it did not find with random values; a metric must not run on them."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{folder}: the weights lack {len(missing)} tensors (e.g. {missing[0]}); is it the right model?")


def _last_key_projection(model) -> nn.Linear:
    """The key projection of the last transformer block: `encoder.layer.N.attention.attention.key`
    in transformers 4, `layers.N.attention.k_proj` in transformers 5."""
    keys = [module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[-1] in ("k_proj", "key")]
    if not keys:
        raise UserError("the DINO model has no attention key projection (k_proj / key)")
    return keys[-1]


def _resize_shorter(x: torch.Tensor, size: int, max_size: int) -> torch.Tensor:
    """torchvision's Resize(size, max_size) on a tensor: bilinear, antialiased (its default since
    torchvision 0.17), shorter side to `size`, longer side truncated and capped at `max_size`."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    if (new_h, new_w) == (h, w):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def dino_key_self_similarity(model, image) -> torch.Tensor:
    """Cosine self-similarity (tokens x tokens, CLS included) of the last block's keys.

    As in PIE-Bench (and Splice's structure loss it borrows), the image goes in as float 0..255 and is
    then "ImageNet-normalised" as if it were in 0..1: the reference does exactly this, so its
    numbers are reproduced only this way.
    """
    device = next(model.parameters()).device
    x = torch.from_numpy(as_uint8(image).astype(np.float32)).permute(2, 0, 1)[None].to(device)
    x = _resize_shorter(x, DINO_SIZE, max_size=480)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    captured = []
    handle = _last_key_projection(model).register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        model(pixel_values=x, interpolate_pos_encoding=True)
    finally:
        handle.remove()
    keys = captured[0][0].float()  # tokens x (heads * head_dim): all heads' keys side by side
    norms = keys.norm(dim=1, keepdim=True)
    return (keys @ keys.T) / (norms @ norms.T).clamp(min=1e-8)


def structure_distance(model, pred, target) -> float:
    """MSE between the DINO key self-similarity matrices of two images (PIE-Bench reports x10^3)."""
    return float(F.mse_loss(dino_key_self_similarity(model, pred), dino_key_self_similarity(model, target)))


# ----------------------------------------------------------------------------- CLIP score


def _image_processor(folder: Path):
    try:  # transformers 5 names the torchvision-free processor CLIPImageProcessorPil
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    if (folder / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(os.fspath(folder))
    return Processor()  # CLIP's own: shorter side 224 (bicubic), centre crop 224, CLIP mean/std


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(os.fspath(folder))
    # every OpenAI CLIP shares one tokenizer; atelier can write it offline from open_clip's BPE file
    from atelier.models.loader import atelier_cache_dir
    from atelier.models.tokenizers import write_clip_tokenizer

    cached = atelier_cache_dir() / "clip-tokenizer"
    if not (cached / "vocab.json").is_file():
        write_clip_tokenizer(cached)
    return CLIPTokenizer.from_pretrained(os.fspath(cached))


class ClipScorer:
    """A CLIPModel with its tokenizer and image processor (openai/clip-vit-large-patch14 in PIE-Bench)."""

    def __init__(self, model, tokenizer, processor):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor


def load_clip(folder, *, allow_pickle: bool = False, device="cpu") -> ClipScorer:
    from transformers import CLIPModel

    folder = Path(os.path.expanduser(os.fspath(folder)))
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        model, info = CLIPModel.from_pretrained(os.fspath(folder), output_loading_info=True,
                                                use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle reads .bin)"
        raise UserError(f"cannot load CLIP from {folder}{hint}: {str(exc).strip().splitlines()[0]}") from None
    _refuse_missing(folder, info)
    return ClipScorer(model.eval().to(device), _tokenizer(folder), _image_processor(folder))


@torch.no_grad()
def clip_score(scorer: ClipScorer, image, text: str, mask=None) -> float:
    """torchmetrics' CLIPScore: 100 x cosine(image embedding, text embedding), floored at 0.
    With `mask`, the image is multiplied by it first (PIE-Bench's edited-region score)."""
    from PIL import Image

    pixels = as_uint8(image)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        pixels = np.uint8(pixels * (m[..., None] if m.ndim == 2 else m))
    model = scorer.model
    device = next(model.parameters()).device
    pixel_values = scorer.processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer([text], padding=True, truncation=True, return_tensors="pt",
                              max_length=model.config.text_config.max_position_embeddings)
    image_emb = model.visual_projection(model.vision_model(pixel_values=pixel_values.to(device)).pooler_output)
    text_emb = model.text_projection(model.text_model(input_ids=tokens["input_ids"].to(device),
                                                      attention_mask=tokens["attention_mask"].to(device)).pooler_output)
    cosine = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return max(float(100 * cosine[0]), 0.0)
