"""Full-size pipelines with random weights, for the benchmarks' real-size parts.

    from _real_size import random_pipeline
    pipe = random_pipeline("sd-turbo")   # any of atelier's bundled configs: sd1, sd2, sd2-base, sd-turbo, sdxl, sdxl-turbo

The architecture comes from atelier's bundled config (`atelier.models.loader.bundled_config_dir`: the
real model's component configs and the real CLIP tokenizer, built offline); the weights are random
(seeded), fp32 on the CPU. What such a pipeline is good for is time and memory, never pictures.
"""

from __future__ import annotations

import json


def random_pipeline(name: str, seed: int = 0):
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from atelier.models.loader import _record, bundled_config_dir

    folder = bundled_config_dir(name)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    torch.manual_seed(seed)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    parts = {"unet": diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(folder / "unet")),
             "vae": diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae")),
             "scheduler": getattr(diffusers, index["scheduler"][1]).from_config(scheduler_config),
             "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
             "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer")}
    if "text_encoder_2" in index:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return _record(pipe.to(torch.float32), name, folder)  # what load_pipeline records: the family's defaults (turbo)
