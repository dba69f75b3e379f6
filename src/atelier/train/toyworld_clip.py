"""`toyworld-clip`: the toy world's CLIP, trained contrastively on rendered scenes and their captions.

A transformers `CLIPModel`: a small ViT (64×64 pixels, 8×8 patches) and a text tower initialised
from the toy text encoder, trained with CLIP's symmetric InfoNCE loss (captions that describe the
same scene count as matches, so phrase order and duplicates do not push apart what is equal) plus an
auxiliary probe that reads every cell's object (shape, colour, size or empty) off the projected image
embedding — the signal IP-Adapter's base projection consumes, so it must carry the whole scene. The
probe is dropped at export.

Its vision tower is the image encoder of `toyworld-ip` (a `CLIPVisionModelWithProjection` loads from
the folder) and the toy world's feature extractor for CLIP score and FID.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from atelier.toyworld.scene import BASE_COLOURS, BASE_SHAPES, CELLS, SIZES, sample_scene
from atelier.train.loop import TrainLoop, lr_at

VISION_CONFIG = dict(
    image_size=64, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, hidden_act="quick_gelu",
)
PROJECTION_DIM = 128
# CLIP's own pixel statistics (CLIPImageProcessor's defaults), so the processor saved with the model
# is a plain CLIP processor at 64 px.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OBJECT_CLASSES = 1 + len(BASE_SHAPES) * len(BASE_COLOURS) * len(SIZES)  # per cell: empty or one object


@dataclass
class ClipTrainConfig:
    out_dir: str = "runs/toyworld-clip"
    base_model: str = "toyworld"  # its tokenizer and text encoder start the text tower
    seed: int = 0
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    text_lr_scale: float = 0.1  # the pretrained text tower moves slower than the new vision tower
    probe_weight: float = 0.5
    checkpoint_every: int = 100
    eval_every: int = 250
    eval_size: int = 256
    mixed_precision: str = "no"


def image_processor():
    from transformers import CLIPImageProcessor

    size = VISION_CONFIG["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Renders in [-1, 1] (N, 3, 64, 64) -> CLIP pixel values, as `image_processor()` makes them."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def make_clip(text_encoder, seed: int):
    """A CLIPModel whose text tower is a copy of `text_encoder` (a CLIPTextModel)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    text_config = text_encoder.config.to_dict()
    text_config["projection_dim"] = PROJECTION_DIM
    config = CLIPConfig(text_config=text_config, vision_config=CLIPVisionConfig(**VISION_CONFIG, projection_dim=PROJECTION_DIM).to_dict(),
                        projection_dim=PROJECTION_DIM)
    model = CLIPModel(config)
    model.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    return model


def scene_key(scene) -> tuple:
    return tuple(sorted(o.key() for o in scene.objects))


def cell_labels(scene) -> list[int]:
    """Per cell (in CELLS order): 0 when empty, else 1 + the object's (shape, colour, size) index."""
    labels = [0] * len(CELLS)
    shapes, colours, sizes, cells = list(BASE_SHAPES), list(BASE_COLOURS), list(SIZES), list(CELLS)
    for o in scene.objects:
        k = (shapes.index(o.shape) * len(colours) + colours.index(o.colour)) * len(sizes) + sizes.index(o.size)
        labels[cells.index(o.cell)] = 1 + k
    return labels


def batch_of(seed: int, size: int):
    """Seeded scenes (1–3 objects), their renders in [-1, 1], captions and per-cell labels."""
    from atelier.toyworld.render import render

    rng = random.Random(seed)
    scenes = [sample_scene(rng, rng.randint(1, 3), BASE_SHAPES, tuple(BASE_COLOURS)) for _ in range(size)]
    captions = [s.caption(rng) for s in scenes]
    images = torch.from_numpy(np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    return scenes, captions, images.contiguous(), torch.tensor([cell_labels(s) for s in scenes])


def contrastive_loss(image_embeds, text_embeds, logit_scale, same: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy; `same[i, j]` marks captions that describe image i's scene
    (the target spreads evenly over them)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    targets = same.float() / same.float().sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


class CellProbe(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.head = torch.nn.Linear(width, len(CELLS) * OBJECT_CLASSES)

    def forward(self, embeds):
        return self.head(embeds).view(len(embeds), len(CELLS), OBJECT_CLASSES)


def _embeds(model, tokenizer, images, captions, device):
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    image_embeds = model.visual_projection(model.vision_model(pixel_values=normalize(images.to(device))).pooler_output)
    text_embeds = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return image_embeds, text_embeds


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, probe, *, n: int, seed: int) -> dict:
    """Image→caption and caption→image top-1 among `n` held-out scenes (a scene's other phrasings
    count as right), and the probe's per-cell accuracy."""
    was = model.training
    model.eval()
    scenes, captions, images, labels = batch_of(seed, n)
    device = next(model.parameters()).device
    image_embeds, text_embeds = _embeds(model, tokenizer, images, captions, device)
    sims = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    keys = [scene_key(s) for s in scenes]
    i2t = np.mean([keys[int(j)] == keys[i] for i, j in enumerate(sims.argmax(1))])
    t2i = np.mean([keys[int(i)] == keys[j] for j, i in enumerate(sims.argmax(0))])
    cells = float((probe(image_embeds).argmax(-1).cpu() == labels).float().mean()) if probe is not None else None
    model.train(was)
    return {"image_to_text": round(float(i2t), 4), "text_to_image": round(float(t2i), 4), "probe_cells": cells and round(cells, 4)}


def train_clip(cfg: ClipTrainConfig, *, text_encoder=None, tokenizer=None):
    """Train (or resume) toyworld-clip; returns (CLIPModel, tokenizer)."""
    from transformers import CLIPModel

    from atelier.models import load_pipeline

    loop = TrainLoop(Path(cfg.out_dir), cfg.steps, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                     name="clip", title="toyworld clip", mixed_precision=cfg.mixed_precision)
    final = loop.dir / "final"
    if text_encoder is None or tokenizer is None:
        base = load_pipeline(cfg.base_model, device="cpu")
        text_encoder, tokenizer = base.text_encoder, base.tokenizer
    if loop.done:
        return CLIPModel.from_pretrained(final), tokenizer
    model = make_clip(text_encoder.float(), cfg.seed)
    probe = CellProbe(PROJECTION_DIM)
    text_params = list(model.text_model.parameters())
    text_ids = {id(p) for p in text_params}
    other = [p for p in model.parameters() if id(p) not in text_ids] + list(probe.parameters())
    opt = torch.optim.AdamW([{"params": other}, {"params": text_params, "lr_scale": cfg.text_lr_scale}],
                            lr=cfg.lr, weight_decay=0.05)
    (model_t, probe_t), _ = loop.prepare({"clip": model, "probe": probe}, opt)
    model.train()

    def step(i, micro):
        scenes, captions, images, labels = batch_of(cfg.seed * 1_000_003 + i, cfg.batch)
        image_embeds, text_embeds = _embeds(loop.unwrap(model_t), tokenizer, images, captions, loop.device)
        keys = [scene_key(s) for s in scenes]
        same = torch.tensor([[a == b for b in keys] for a in keys], device=loop.device)
        loss = contrastive_loss(image_embeds, text_embeds, loop.unwrap(model_t).logit_scale, same)
        probe_loss = F.cross_entropy(probe_t(image_embeds).flatten(0, 1), labels.to(loop.device).flatten())
        return loss + cfg.probe_weight * probe_loss

    loop.run(step, lr=lambda i: lr_at(i, cfg.steps, cfg.lr), clip=1.0, window=20,
             evaluate=lambda parts: retrieval_accuracy(loop.unwrap(model_t), tokenizer, loop.unwrap(probe_t),
                                                       n=cfg.eval_size, seed=10_000_019))
    model = loop.unwrap(model_t).eval()
    model.save_pretrained(final)
    result = retrieval_accuracy(model, tokenizer, loop.unwrap(probe_t), n=1024, seed=20_000_033)
    loop.finish({"held_out_1024": result, "config": asdict(cfg)})
    return model, tokenizer


def export_clip(model, tokenizer, folder: Path) -> Path:
    """Write toyworld-clip: the CLIPModel (fp16 safetensors), its tokenizer and image processor."""
    from atelier.core.io import atomic_dir
    from atelier.models.save import make_portable

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        model.to(torch.float32)
        tokenizer.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        (Path(tmp) / "atelier.json").write_text(json.dumps(
            {"name": "toyworld-clip", "description": "the toy world's CLIP (docs/toyworld.md), trained contrastively on CPU"},
            indent=2), encoding="utf-8")
        make_portable(tmp)
    return folder


def export_vision_tower(model, folder: Path) -> Path:
    """The vision tower alone as a CLIPVisionModelWithProjection folder (an IP-Adapter's image_encoder/)."""
    from transformers import CLIPVisionModelWithProjection

    from atelier.core.io import atomic_dir

    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    with atomic_dir(Path(folder)) as tmp:
        vision.to(torch.float16).save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
    return Path(folder)
