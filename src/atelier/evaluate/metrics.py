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
(DINO ViT-B/8 key self-similarity), LPIPS and DISTS (their own packages, `lpips` and `DISTS_pytorch`,
with backbones read from local files) and CLIP score (CLIP ViT-L/14). Loaders raise `UserError` for
paths that are not usable weights; nothing is ever downloaded.
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


def ssim(pred, target, mask=None, *, crop_border: bool = False, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Structural similarity with an 11x11 gaussian window (sigma 1.5), data range 1.

    The standard formula written out as torchmetrics' `structural_similarity_index_measure` computes it
    (tests/test_metrics_reference.py checks the two agree): reflect-pad by the window radius,
    gaussian-filter x, y, x², y², xy per channel, clamp the variances at 0, take the SSIM map and
    average it. With `crop_border`, a border of the window radius is cut off the map first, as
    torchmetrics did before Lightning-AI/torchmetrics#2721 (2024): PIE-Bench's numbers were made so.
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
    return float((ssim_map[..., pad:-pad, pad:-pad] if crop_border else ssim_map).mean())


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


# ----------------------------------------------------------------------------- LPIPS and DISTS (their packages)

# The ImageNet backbones LPIPS and DISTS run on, by torchvision name, with the file torchvision's
# hub cache keeps each one's weights in (a pickle).
BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
HUB_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth",
             "squeezenet1_1": "squeezenet1_1-b8a52dc0.pth"}
# `net.slice3.12.weight` (lpips) and `stage4.17.bias` (DISTS) hold torchvision's `features.12.weight`,
# `features.17.bias`: both packages slice torchvision's `features` keeping its module indices.
_SLICE_KEY = re.compile(r"^(?:net\.)?(?:slice|stage)\d+\.(\d+\..+)$")
_LIN_KEY = re.compile(r"(?:^|\.)lin(\d)(?:\.model\.1)?\.weight$")


def backbone_weights(arch: str, given=None, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of torchvision's `arch` (vgg16, alexnet, squeezenet1_1) from `given` (files or
    folders, see `read_tensors`), else from `<atelier cache>/<arch>.safetensors`, else (only with
    allow_pickle) from torchvision's hub cache file."""
    if given:
        return read_tensors(given, allow_pickle=allow_pickle)
    from atelier.models.loader import atelier_cache_dir

    safetensors = atelier_cache_dir() / f"{arch}.safetensors"
    if safetensors.is_file():
        return read_tensors(safetensors)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[arch]
    if hub_file.is_file() and allow_pickle:
        return read_tensors(hub_file, allow_pickle=True)
    hint = f"; {hub_file} is there, a pickle: add --allow-pickle" if hub_file.is_file() else ""
    raise UserError(f"no {arch} weights: give --weights FILE, or put torchvision's {arch} weights as .safetensors "
                    f"at {safetensors} (torchvision's {HUB_FILES[arch]} converted){hint}")


def _load_backbone(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Fill every sliced torchvision layer of `model` (lpips' `net.sliceK.N.*`, DISTS' `stageK.N.*`)
    from tensors named as torchvision's (`features.N.*`) or as the package's own model."""
    state = {}
    for key, current in model.state_dict().items():
        m = _SLICE_KEY.match(key)
        if not m or key.endswith(".filter"):  # DISTS' L2 pooling filters are fixed, not weights
            continue
        value = tensors.get(f"features.{m.group(1)}", tensors.get(key))
        if value is None:
            raise UserError(f"{what}: the weights lack features.{m.group(1)} (torchvision's name); is it the right network?")
        if value.shape != current.shape:
            raise UserError(f"{what}: features.{m.group(1)} has shape {tuple(value.shape)}, expected {tuple(current.shape)}")
        state[key] = value
    model.load_state_dict(state, strict=False)


def load_lpips(net: str = "vgg", weights=None, *, allow_pickle: bool = False, device="cpu"):
    """The lpips package's `LPIPS(net=...)` (v0.1): its shipped linear layers (`lpips/weights/v0.1/`)
    over an ImageNet backbone read from local weights (`backbone_weights`). Linear layers in the
    weights (`linK.model.1.weight`, as the package's own vgg.pth) replace the shipped ones.

    PIE-Bench's reference uses `net="squeeze"` (torchmetrics' default net_type is "alex")."""
    import lpips as lpips_package

    if net not in BACKBONES:
        raise UserError(f"unknown LPIPS network {net!r}; choose from {', '.join(BACKBONES)}")
    tensors = backbone_weights(BACKBONES[net], weights, allow_pickle=allow_pickle)
    # pnet_rand builds the backbone untrained (no download); pretrained=True reads the shipped lin layers
    model = lpips_package.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _load_backbone(model, tensors, f"LPIPS ({net}) weights {weights or BACKBONES[net]}")
    lins = {f"lin{m.group(1)}.model.1.weight": v for k, v in tensors.items() if (m := _LIN_KEY.search(k))}
    try:
        model.load_state_dict(lins, strict=False)
    except RuntimeError as exc:
        raise UserError(f"LPIPS linear layers in {weights} do not fit {net}: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval().requires_grad_(False).to(device)


def load_lpips_vgg(paths=None, *, allow_pickle: bool = False, device="cpu"):
    """LPIPS (VGG), as PIE-Bench's `--lpips-vgg` and the inverter's perceptual loss load it."""
    return load_lpips("vgg", paths, allow_pickle=allow_pickle, device=device)


@torch.no_grad()
def lpips(model, pred, target, mask=None) -> float:
    """LPIPS distance (0 for identical images) between two HxWx3 images: the package's forward on
    images scaled to [-1, 1] (what `LPIPS(...)(x, y, normalize=True)` does with [0, 1] images)."""
    a, b = _unit_pair(pred, target, mask)
    device = next(model.parameters()).device
    x0 = torch.from_numpy(a).permute(2, 0, 1)[None].to(device) * 2 - 1
    x1 = torch.from_numpy(b).permute(2, 0, 1)[None].to(device) * 2 - 1
    return float(model(x0, x1).mean())


DISTS_WEIGHTS = "weights.pt"  # alpha and beta, shipped inside the DISTS_pytorch package


def load_dists(weights=None, *, allow_pickle: bool = False, device="cpu"):
    """DISTS_pytorch's `DISTS` (Ding et al. 2020) with VGG16 from local weights (`backbone_weights`)
    and the package's shipped alpha/beta. Its constructor would download VGG16 (`vgg16(pretrained=True)`)
    and read alpha/beta from `sys.prefix`: both are avoided, the forward pass is the package's."""
    import DISTS_pytorch
    from DISTS_pytorch import DISTS_pt
    from torchvision.models import vgg16

    tensors = backbone_weights("vgg16", weights, allow_pickle=allow_pickle)
    original = DISTS_pt.models.vgg16
    DISTS_pt.models.vgg16 = lambda pretrained=False, **kwargs: vgg16(weights=None)
    try:
        model = DISTS_pt.DISTS(load_weights=False)
    finally:
        DISTS_pt.models.vgg16 = original
    _load_backbone(model, tensors, f"DISTS weights {weights or 'vgg16'}")
    # the package's own file, a dict of two tensors: weights_only reads it without running code
    shipped = torch.load(Path(DISTS_pytorch.__file__).parent / DISTS_WEIGHTS, map_location="cpu", weights_only=True)
    model.alpha.data, model.beta.data = shipped["alpha"], shipped["beta"]
    return model.eval().to(device)


@torch.no_grad()
def dists(model, pred, target) -> float:
    """DISTS distance (0 for identical images) of two HxWx3 images given in [0, 1], as the package's
    `prepare_image` makes them (no resize)."""
    a, b = _unit_pair(pred, target)
    device = model.alpha.device
    x = torch.from_numpy(a).permute(2, 0, 1)[None].to(device)
    y = torch.from_numpy(b).permute(2, 0, 1)[None].to(device)
    return float(model(x, y))


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
        model, info = CLIPModel.from_pretrained(os.fspath(folder), output_loading_info=True, dtype=torch.float32,
                                                use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle else " (only .safetensors weights are read; --allow-pickle reads .bin)"
        raise UserError(f"cannot load CLIP from {folder}{hint}: {str(exc).strip().splitlines()[0]}") from None
    _refuse_missing(folder, info)
    return ClipScorer(model.eval().to(device), _tokenizer(folder), _image_processor(folder))


def _clip_pixels(scorer: ClipScorer, images) -> torch.Tensor:
    from PIL import Image

    pil = [Image.fromarray(as_uint8(image)) for image in images]
    return scorer.processor(images=pil, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def clip_image_embeddings(scorer: ClipScorer, images) -> torch.Tensor:
    """CLIP's projected image embeddings (`visual_projection` of the pooled vision output, what
    `CLIPModel.get_image_features` returns), the images prepared by the folder's image processor."""
    model = scorer.model
    pixel_values = _clip_pixels(scorer, images).to(next(model.parameters()).device)
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output).float()


@torch.no_grad()
def clip_text_embeddings(scorer: ClipScorer, texts) -> torch.Tensor:
    model = scorer.model
    device = next(model.parameters()).device
    tokens = scorer.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                              max_length=model.config.text_config.max_position_embeddings)
    return model.text_projection(model.text_model(input_ids=tokens["input_ids"].to(device),
                                                  attention_mask=tokens["attention_mask"].to(device)).pooler_output).float()


def clip_cosines(scorer: ClipScorer, images, texts) -> np.ndarray:
    """Cosine similarity of each image with its text (pairs in order)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    cosine = F.cosine_similarity(clip_image_embeddings(scorer, images), clip_text_embeddings(scorer, texts), dim=-1)
    return cosine.double().cpu().numpy()


def clip_score(scorer: ClipScorer, image, text: str, mask=None) -> float:
    """torchmetrics' CLIPScore of one pair: 100 x cosine(image embedding, text embedding), floored at 0.
    With `mask`, the image is multiplied by it first (PIE-Bench's edited-region score)."""
    pixels = as_uint8(image)
    if mask is not None:
        m = np.asarray(mask, dtype=np.float32)
        pixels = np.uint8(pixels * (m[..., None] if m.ndim == 2 else m))
    return max(float(100 * clip_cosines(scorer, [pixels], [text])[0]), 0.0)


def clip_score_mean(scorer: ClipScorer, images, texts, *, batch_size: int = 32) -> tuple[float, list[float]]:
    """torchmetrics' `CLIPScore` over many pairs, and each pair's own score. torchmetrics averages
    100 x cosine over the pairs and floors the *mean* at 0 (`compute`); a pair's score is floored
    on its own, so the two differ only when some cosines are negative."""
    cosines = np.concatenate([clip_cosines(scorer, images[i:i + batch_size], texts[i:i + batch_size])
                              for i in range(0, len(images), batch_size)])
    return max(float(100 * cosines.mean()), 0.0), [max(float(100 * c), 0.0) for c in cosines]
