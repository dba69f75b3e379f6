"""Load model folders with plain diffusers (no atelier) and save fixed-seed outputs to an .npz.

    python tests/portable_load.py OUT.npz KIND=FOLDER ...   (KIND: pipeline | sdxl | taesd | unet)

tests/test_portable.py runs it once on transformers 5.x and once with a transformers 4.x install
first on PYTHONPATH, and compares the two files.
"""

import sys

import numpy as np
import torch

CAPTIONS = ["a large red circle at the top left and a small blue square in the center", "", "a green triangle"]


def tokenizers_agree(folder):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(folder)
    fast = CLIPTokenizerFast.from_pretrained(folder)
    for text in CAPTIONS:
        a = slow(text, padding="max_length", truncation=True).input_ids
        b = fast(text, padding="max_length", truncation=True).input_ids
        if a != b:
            raise SystemExit(f"{folder}: CLIPTokenizer and CLIPTokenizerFast disagree on {text!r}: {a} != {b}")
    return np.array(slow(CAPTIONS[0]).input_ids)


def run_pipeline(folder, cls_name):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and module.dtype != torch.float32:
            raise SystemExit(f"{folder}: plain float32 load gave {name} in {module.dtype}")
    out = {"ids": tokenizers_agree(f"{folder}/tokenizer")}
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out["image"] = pipe(CAPTIONS[0], num_inference_steps=2, height=size, width=size, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        ids = pipe.tokenizer(CAPTIONS[0], padding="max_length", truncation=True, return_tensors="pt").input_ids
        out["text"] = pipe.text_encoder(ids)[0].numpy()
    return out


def run_taesd(folder):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(folder)
    latents = torch.randn(1, tiny.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {"decoded": tiny.decode(latents).sample.numpy()}


def run_unet(folder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return {"output": unet(x, 999, encoder_hidden_states=context).sample.numpy()}


def main(out_path, *specs):
    import diffusers
    import transformers

    results = {"versions": np.array([transformers.__version__, diffusers.__version__])}
    for spec in specs:
        kind, folder = spec.split("=", 1)
        if kind == "pipeline":
            found = run_pipeline(folder, "StableDiffusionPipeline")
        elif kind == "sdxl":
            found = run_pipeline(folder, "StableDiffusionXLPipeline")
            found["ids_2"] = tokenizers_agree(f"{folder}/tokenizer_2")
        elif kind == "taesd":
            found = run_taesd(folder)
        else:
            found = run_unet(folder)
        results.update({f"{folder}:{k}": v for k, v in found.items()})
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
