"""Frames in and out of the engine in the three kinds StreamDiffusion accepts: a PIL image (or a
list of them), a uint8 array (H, W, 3) / (N, H, W, 3), a float tensor in [-1, 1] (3, H, W) / (N, 3, H, W).
Output comes back in the kind that came in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atelier.errors import UserError


@dataclass(frozen=True)
class FrameKind:
    kind: str  # "pil" | "pil_list" | "array" | "tensor"
    batched: bool


def to_tensor(frames, width: int, height: int) -> tuple[torch.Tensor, FrameKind]:
    """(N, 3, height, width) float32 in [-1, 1], resized when the input has another size."""
    if isinstance(frames, Image.Image):
        return _resize(_pil(frames), width, height), FrameKind("pil", False)
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, Image.Image) for f in frames):
        return torch.cat([_resize(_pil(f), width, height) for f in frames]), FrameKind("pil_list", True)
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
            raise UserError(f"an array frame must be uint8 (H, W, 3) or (N, H, W, 3), got {frames.dtype} {frames.shape}")
        batched = frames.ndim == 4
        t = torch.from_numpy(np.ascontiguousarray(frames if batched else frames[None])).permute(0, 3, 1, 2)
        return _resize(t.float() / 127.5 - 1.0, width, height), FrameKind("array", batched)
    if isinstance(frames, torch.Tensor):
        if not frames.is_floating_point() or frames.ndim not in (3, 4) or frames.shape[-3] != 3:
            raise UserError(f"a tensor frame must be float (3, H, W) or (N, 3, H, W) in [-1, 1], got {frames.dtype} {tuple(frames.shape)}")
        batched = frames.ndim == 4
        t = frames if batched else frames[None]
        return _resize(t.detach().float().cpu().clamp(-1, 1), width, height), FrameKind("tensor", batched)
    raise UserError(f"a frame must be a PIL image, a uint8 array or a float tensor, got {type(frames).__name__}")


def from_tensor(images: torch.Tensor, kind: FrameKind):
    """Inverse of `to_tensor` for (N, 3, H, W) images in [-1, 1]."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if kind.kind == "tensor":
        return images if kind.batched else images[0]
    arrays = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if kind.kind == "array":
        return arrays if kind.batched else arrays[0]
    pictures = [Image.fromarray(a) for a in arrays]
    return pictures if kind.batched else pictures[0]


def _pil(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _resize(t: torch.Tensor, width: int, height: int) -> torch.Tensor:
    if t.shape[-2:] == (height, width):
        return t
    return F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
