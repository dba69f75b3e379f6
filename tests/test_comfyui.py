"""ComfyUI PNGs: `atelier info` reads the API-format `prompt` graph ComfyUI saves beside its editor
`workflow`, and `atelier generate --from` makes the image again with the mapped sampler.

The graphs are shaped as ComfyUI writes them: its default text-to-image graph, the SDXL base +
refiner example (two KSamplerAdvanced nodes), a LoRA loader in the model path and a seed node.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from atelier.generate import parse_parameters, read_parameters
from atelier.testing.cli import one_error_line, run

SEED = 2**64 - 7  # ComfyUI seeds are 64-bit


def default_graph(**sampler):
    """ComfyUI's default graph (API format), with tiny-model settings."""
    return {
        "3": {"inputs": {"seed": SEED, "steps": 2, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                         "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["5", 0], **sampler},
              "class_type": "KSampler", "_meta": {"title": "KSampler"}},
        "4": {"inputs": {"ckpt_name": "tiny-sd1.safetensors"}, "class_type": "CheckpointLoaderSimple",
              "_meta": {"title": "Load Checkpoint"}},
        "5": {"inputs": {"width": 16, "height": 16, "batch_size": 1}, "class_type": "EmptyLatentImage",
              "_meta": {"title": "Empty Latent Image"}},
        "6": {"inputs": {"text": "a red circle, (blue:1.2) background", "clip": ["10", 0]},
              "class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "7": {"inputs": {"text": "text, watermark", "clip": ["10", 0]}, "class_type": "CLIPTextEncode",
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}},
        "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save Image"}},
        "10": {"inputs": {"stop_at_clip_layer": -2, "clip": ["4", 1]}, "class_type": "CLIPSetLastLayer",
               "_meta": {"title": "CLIP Set Last Layer"}},
    }


def sdxl_refiner_graph():
    """ComfyUI's SDXL example: base for steps 0-20 of 25, the refiner for the rest."""
    def encode(text, clip):
        return {"inputs": {"text": text, "clip": clip}, "class_type": "CLIPTextEncode"}

    return {
        "4": {"inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}, "class_type": "CheckpointLoaderSimple"},
        "5": {"inputs": {"width": 1024, "height": 1024, "batch_size": 1}, "class_type": "EmptyLatentImage"},
        "6": encode("evening sunset scenery blue sky nature, glass bottle with a galaxy in it", ["4", 1]),
        "7": encode("text, watermark", ["4", 1]),
        "10": {"inputs": {"add_noise": "enable", "noise_seed": 721897303308196, "steps": 25, "cfg": 8,
                          "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0, "end_at_step": 20,
                          "return_with_leftover_noise": "enable", "model": ["4", 0], "positive": ["6", 0],
                          "negative": ["7", 0], "latent_image": ["5", 0]}, "class_type": "KSamplerAdvanced"},
        "11": {"inputs": {"add_noise": "disable", "noise_seed": 0, "steps": 25, "cfg": 8, "sampler_name": "euler",
                          "scheduler": "normal", "start_at_step": 20, "end_at_step": 10000,
                          "return_with_leftover_noise": "disable", "model": ["12", 0], "positive": ["15", 0],
                          "negative": ["16", 0], "latent_image": ["10", 0]}, "class_type": "KSamplerAdvanced"},
        "12": {"inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}, "class_type": "CheckpointLoaderSimple"},
        "15": encode("evening sunset scenery blue sky nature, glass bottle with a galaxy in it", ["12", 1]),
        "16": encode("text, watermark", ["12", 1]),
        "17": {"inputs": {"samples": ["11", 0], "vae": ["12", 2]}, "class_type": "VAEDecode"},
        "19": {"inputs": {"filename_prefix": "ComfyUI", "images": ["17", 0]}, "class_type": "SaveImage"},
    }


def workflow_for(graph):
    """A small editor `workflow` chunk of the kind ComfyUI saves next to the prompt (atelier does not read it)."""
    nodes = [{"id": int(k), "type": v["class_type"], "widgets_values": []} for k, v in graph.items() if k.isdigit()]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": 0, "nodes": nodes, "links": [],
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def comfy_png(path, graph=None, *, workflow=True, size=16):
    info = PngInfo()
    if graph is not None:
        info.add_text("prompt", json.dumps(graph))
    if workflow:
        info.add_text("workflow", json.dumps(workflow_for(graph or default_graph())))
    Image.new("RGB", (size, size), "gray").save(path, pnginfo=info)
    return path


def test_info_reads_the_default_graph_in_a1111_form(tmp_path, capsys):
    png = comfy_png(tmp_path / "ComfyUI_00001_.png", default_graph())
    code, out, err = run(["info", png], capsys)
    assert code == 0 and err == ""
    assert out.strip() == (
        "a red circle, (blue:1.2) background\n"
        "Negative prompt: text, watermark\n"
        f"Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: {SEED}, Size: 16x16, "
        "Model: tiny-sd1, Clip skip: 2"
    )
    code, out, _ = run(["info", png, "--json"], capsys)
    data = json.loads(out)
    assert data["format"] == "comfyui" and data["not_reproducible"] == []
    assert data["fields"]["Sampler"] == "DPM++ 2M" and data["fields"]["Seed"] == str(SEED)


def test_generate_from_a_comfyui_png_uses_the_mapped_sampler(model, tmp_path, capsys):
    png = comfy_png(tmp_path / "comfy.png", default_graph())
    out = tmp_path / "again.png"
    code, _, err = run(["generate", "--from", png, "--model", model, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    fields = parse_parameters(read_parameters(out))
    assert (fields["Sampler"], fields["Schedule type"], fields["Seed"], fields["CFG scale"], fields["Clip skip"]) == (
        "DPM++ 2M", "Karras", str(SEED), "6.5", "2")
    same = tmp_path / "same.png"
    run(["generate", "a red circle, (blue:1.2) background", "--negative", "text, watermark", "--model", model,
         "--sampler", "DPM++ 2M", "--schedule", "karras", "--cfg", 6.5, "--seed", SEED, "--clip-skip", 2,
         "--steps", 2, "--out", same, "--quiet"], capsys)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(same)))
    euler = tmp_path / "euler.png"
    graph = default_graph(sampler_name="euler_ancestral", scheduler="normal")
    code, _, _ = run(["generate", "--from", comfy_png(tmp_path / "euler-a.png", graph), "--model", model,
                      "--out", euler, "--quiet"], capsys)
    fields = parse_parameters(read_parameters(euler))
    assert code == 0 and (fields["Sampler"], fields["Schedule type"]) == ("Euler a", "Normal")


def test_links_to_seed_and_text_nodes_are_followed(tmp_path, capsys):
    graph = default_graph(seed=["20", 0])
    graph["20"] = {"inputs": {"seed": 42}, "class_type": "Seed (rgthree)"}
    graph["6"]["inputs"]["text"] = ["21", 0]
    graph["21"] = {"inputs": {"text": "a blue square"}, "class_type": "Text Multiline"}
    code, out, _ = run(["info", comfy_png(tmp_path / "linked.png", graph)], capsys)
    assert code == 0 and out.startswith("a blue square\n") and "Seed: 42," in out


def test_sdxl_base_and_refiner_is_read_but_not_regenerated(model, tmp_path, capsys):
    png = comfy_png(tmp_path / "sdxl.png", sdxl_refiner_graph())
    code, out, err = run(["info", png], capsys)
    assert code == 0
    assert out.splitlines()[-1] == ("Steps: 25, Sampler: Euler, Schedule type: Normal, CFG scale: 8, "
                                    "Seed: 721897303308196, Size: 1024x1024, Model: sd_xl_base_1.0")
    assert "2 sampler nodes" in err and "steps 0 to 20 of 25" in err
    code, out, err = run(["generate", "--from", png, "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and "2 sampler nodes" in err and out == ""


@pytest.mark.parametrize(
    "change, message",
    [
        ("lora", "LoraLoader"),
        ("beta", "beta scheduler"),
        ("img2img", "VAEEncode"),
        ("unknown sampler", "euler_magic"),
    ],
)
def test_graphs_that_are_more_than_txt2img_are_refused_in_one_line(model, tmp_path, capsys, change, message):
    graph = default_graph()
    if change == "lora":
        graph["11"] = {"inputs": {"lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 0.8,
                                  "model": ["4", 0], "clip": ["4", 1]}, "class_type": "LoraLoader"}
        graph["3"]["inputs"]["model"] = ["11", 0]
    elif change == "beta":
        graph["3"]["inputs"]["scheduler"] = "beta"
    elif change == "img2img":
        graph["12"] = {"inputs": {"image": "input.png"}, "class_type": "LoadImage"}
        graph["13"] = {"inputs": {"pixels": ["12", 0], "vae": ["4", 2]}, "class_type": "VAEEncode"}
        graph["3"]["inputs"].update(latent_image=["13", 0], denoise=0.6)
    else:
        graph["3"]["inputs"]["sampler_name"] = "euler_magic"
    png = comfy_png(tmp_path / "graph.png", graph)
    code, out, err = run(["info", png], capsys)
    assert code == 0 and message in err  # shown, with a note on what is not reproducible
    code, out, err = run(["generate", "--from", png, "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert one_error_line(code, err) and message in err


def test_workflow_only_and_broken_graphs_are_one_line(tmp_path, capsys):
    only_workflow = comfy_png(tmp_path / "workflow.png", None)
    code, _, err = run(["info", only_workflow], capsys)
    assert one_error_line(code, err) and "workflow" in err
    broken = tmp_path / "broken.png"
    info = PngInfo()
    info.add_text("prompt", "{not json")
    Image.new("RGB", (8, 8)).save(broken, pnginfo=info)
    code, _, err = run(["info", broken], capsys)
    assert one_error_line(code, err) and "JSON" in err
    no_sampler = comfy_png(tmp_path / "nosampler.png", {"1": {"inputs": {}, "class_type": "SaveImage"}})
    code, _, err = run(["info", no_sampler], capsys)
    assert one_error_line(code, err) and "KSampler" in err
