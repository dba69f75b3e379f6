"""`atelier export` and exported models: toyworld-turbo exported to OpenVINO and ONNX loads as a
diffusers pipeline, generates (txt2img, img2img) what PyTorch does and runs the stream engine;
a tiny SDXL exports too (two text encoders, pooled output, time ids); clip skip reads the exported
hidden states; static shapes; what the exported model refuses; one-line errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.errors import UserError
from atelier.toyworld import judge, render_pil, sample_scene
from atelier.testing.cli import run

CAPTION = "a large red circle at the top left"
FORMATS = ["openvino", "onnx"]


def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """toyworld-turbo exported by the command, once per format."""
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for fmt in FORMATS:
        code = main(["export", "toyworld-turbo", "--out", str(root / fmt), "--format", fmt, "--quiet"])
        assert code == 0
        folders[fmt] = root / fmt
    return folders


def _generate(pipe, **kw):
    from atelier.generate import generate
    from atelier.generate.request import GenerationRequest

    return generate(pipe, GenerationRequest(prompt=CAPTION, seed=3, **kw), progress=False)[0].image


# ---------------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_keeps_the_diffusers_layout(exported, fmt):
    from atelier.models.families import detect_family_from_folder
    from atelier.runtime import is_exported, read_export_info

    folder = exported[fmt]
    suffix = {"openvino": ".xml", "onnx": ".onnx"}[fmt]
    for path in ["unet/model", "vae/encoder", "vae/decoder", "text_encoder/model"]:
        assert (folder / (path + suffix)).is_file(), path
    for path in ["model_index.json", "atelier.json", "scheduler/scheduler_config.json", "unet/config.json",
                 "vae/config.json", "text_encoder/config.json", "text_encoder/final_layer_norm.safetensors"]:
        assert (folder / path).is_file(), path
    assert (folder / "tokenizer").is_dir()
    assert not list(folder.parent.glob(".*.tmp")), "the atomic write left a temporary folder"
    assert not list((folder / "unet").glob("*.safetensors")) and not list((folder / "vae").glob("*.safetensors"))
    info = read_export_info(folder)
    assert info["format"] == fmt and set(info["components"]) == {"unet", "vae", "text_encoder"}
    assert is_exported(folder)
    assert json.loads((folder / "atelier.json").read_text())["defaults"]["turbo"] is True
    assert detect_family_from_folder(folder).family  # `atelier models DIR` reads it like any folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_loads_as_a_diffusers_pipeline(exported, fmt):
    from diffusers import StableDiffusionPipeline

    from atelier.models import detect_family, load_pipeline
    from atelier.runtime.modules import ExportedTextEncoder, ExportedUNet, ExportedVAE

    pipe = load_pipeline(exported[fmt])
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.unet, ExportedUNet) and isinstance(pipe.vae, ExportedVAE)
    assert isinstance(pipe.text_encoder, ExportedTextEncoder)
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert detect_family(pipe).family and pipe.atelier_defaults["turbo"] is True


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_exported_component_computes_what_pytorch_does(exported, fmt, turbo):
    """UNet, VAE encoder and decoder, text encoder (every hidden state): other sizes and batches
    than the ones exported with, within float32 rounding."""
    from atelier.models import load_pipeline

    pipe = load_pipeline(exported[fmt])
    torch.manual_seed(0)
    x, hidden = torch.randn(3, 4, 32, 16), torch.randn(3, 64, pipe.unet.config.cross_attention_dim)  # two chunks
    t = torch.tensor([999.0, 500.0, 3.0])
    with torch.no_grad():
        close = lambda a, b: torch.allclose(a, b, atol=1e-3, rtol=1e-3)  # noqa: E731
        assert close(pipe.unet(x, t, encoder_hidden_states=hidden).sample, turbo.unet(x, t, encoder_hidden_states=hidden).sample)
        images = torch.rand(2, 3, 64, 128) * 2 - 1
        assert close(pipe.vae.encode(images).latent_dist.mean, turbo.vae.encode(images).latent_dist.mean)
        assert close(pipe.vae.encode(images).latent_dist.logvar, turbo.vae.encode(images).latent_dist.logvar)
        assert close(pipe.vae.decode(x).sample, turbo.vae.decode(x).sample)
        ids = turbo.tokenizer([CAPTION, ""], padding="max_length", return_tensors="pt").input_ids
        got, want = pipe.text_encoder(ids, output_hidden_states=True), turbo.text_encoder(ids, output_hidden_states=True)
        assert close(got.last_hidden_state, want.last_hidden_state) and close(got.pooler_output, want.pooler_output)
        assert len(got.hidden_states) == len(want.hidden_states)
        assert all(close(a, b) for a, b in zip(got.hidden_states, want.hidden_states))


# ---------------------------------------------------------------------------------- the same images


@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_on_the_exported_model_matches_pytorch(exported, fmt, turbo, tmp_path, capsys):
    out = tmp_path / "exported.png"
    code, _, err = run(["generate", CAPTION, "--model", exported[fmt], "--seed", 3, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    image = Image.open(out).convert("RGB")
    reference = _generate(turbo)
    assert psnr(image, reference) >= 30
    verdict, expected = judge(image, CAPTION), judge(reference, CAPTION)
    assert verdict.match == expected.match and verdict.match, (verdict, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_img2img_on_the_exported_model_matches_pytorch(exported, fmt, turbo):
    from atelier.models import load_pipeline

    init = render_pil(sample_scene(random.Random(5)))
    kw = dict(init_image=init, strength=0.5, steps=2)
    got = _generate(load_pipeline(exported[fmt]), **kw)
    assert psnr(got, _generate(turbo, **kw)) >= 30


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_stream_engine_runs_on_the_exported_model(exported, fmt, turbo):
    from atelier.models import load_pipeline
    from atelier.stream import StreamEngine

    frames = [render_pil(sample_scene(random.Random(k))) for k in range(3)]
    outputs = []
    for pipe in (load_pipeline(exported[fmt]), turbo):
        engine = StreamEngine(pipe)
        engine.prepare(prompt="a large red circle in the center", seed=2)
        outputs.append([engine(frame) for frame in frames])
    for got, want in zip(*outputs):
        assert got.size == want.size
        assert psnr(got, want) >= 30


def test_a_tiny_sdxl_exports_with_both_text_encoders(tmp_path):
    """SDXL: two text encoders (the second one's projected pooled output), time ids, clip skip 2."""
    from atelier.runtime import export_pipeline, load_exported
    from atelier.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    export_pipeline(pipe, tmp_path / "xl", "onnx")
    exported = load_exported(tmp_path / "xl")
    assert type(exported).__name__ == "StableDiffusionXLPipeline"
    assert json.loads((tmp_path / "xl" / "export.json").read_text())["components"]["text_encoder_2"] == "text_projection"
    kw = dict(steps=2, cfg_scale=3.0, width=64, height=64)
    assert psnr(_generate(exported, **kw), _generate(pipe, **kw)) >= 30


def test_clip_skip_reads_the_exported_hidden_states(tmp_path):
    from atelier.runtime import export_pipeline, load_exported
    from atelier.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    export_pipeline(pipe, tmp_path / "sd1", "onnx")
    exported = load_exported(tmp_path / "sd1")
    kw = dict(steps=2, cfg_scale=3.0, width=64, height=64)
    plain, skipped = _generate(exported, **kw), _generate(exported, clip_skip=2, **kw)
    assert psnr(plain, skipped) < 60  # clip skip changed the image ...
    assert psnr(skipped, _generate(pipe, clip_skip=2, **kw)) >= 30  # ... as it does in PyTorch


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_static_shape_runs_any_batch_and_refuses_other_sizes(fmt, tmp_path, turbo, capsys):
    # OpenVINO folds a static graph's timestep ops into the input, which then answers to several
    # names ("50", "55", "timestep", "timesteps"): the inputs are fed by the names atelier gave them
    out = tmp_path / "static"
    code, _, err = run(["export", "toyworld-turbo", "--out", out, "--format", fmt, "--static-shape", "64x64",
                        "--batch", 1, "--quiet"], capsys)
    assert code == 0, err
    from atelier.models import load_pipeline

    pipe = load_pipeline(out)
    side = 64 // pipe.vae_scale_factor
    assert pipe.unet.graph.inputs["sample"][0] == 1 and pipe.unet.graph.inputs["sample"][2:] == [side, side]
    x = torch.randn(3, 4, side, side)
    hidden = torch.randn(3, 32, pipe.unet.config.cross_attention_dim)
    want = turbo.unet(x, 500, encoder_hidden_states=hidden).sample
    got = pipe.unet(x, 500, encoder_hidden_states=hidden).sample  # three runs of batch 1
    assert torch.allclose(got, want, atol=1e-3)
    code, _, err = run(["generate", CAPTION, "--model", out, "--width", 128, "--height", 128,
                        "--out", tmp_path / "big.png", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "static shape" in err


# ---------------------------------------------------------------------------------- refusals


def test_what_the_exported_model_cannot_do_is_refused(exported, tmp_path, capsys):
    from atelier.models import load_pipeline

    folder = exported["onnx"]
    code, _, err = run(["generate", CAPTION, "--model", folder, "--pag-scale", 2, "--out", tmp_path / "p.png", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "exported" in err
    for flag in (["--quantize", "int8wo"], ["--compile", "regional"], ["--channels-last"]):
        code, _, err = run(["generate", CAPTION, "--model", folder, *flag, "--out", tmp_path / "q.png", "--quiet"], capsys)
        assert code == 2 and err.count("\n") == 1 and "exported" in err, (flag, err)
    for kwargs, word in [({"device": "cuda"}, "CPU"), ({"dtype": "bf16"}, "float32"), ({"lora": "x.safetensors"}, "LoRA")]:
        with pytest.raises(UserError, match=word):
            load_pipeline(folder, **kwargs)
    pipe = load_pipeline(folder)
    with pytest.raises(UserError, match="exported"):
        pipe.unet(torch.randn(1, 4, 16, 16), 1, encoder_hidden_states=torch.randn(1, 32, 128),
                  cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(UserError, match="already exported"):
        from atelier.runtime import export_pipeline

        export_pipeline(pipe, tmp_path / "again", "onnx")


# ---------------------------------------------------------------------------------- errors


def test_a_second_export_is_refused_unless_overwrite(exported, capsys):
    folder = exported["onnx"]
    before = (folder / "unet" / "model.onnx").stat().st_mtime_ns
    code, _, err = run(["export", "toyworld-turbo", "--out", folder, "--format", "onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert (folder / "unet" / "model.onnx").stat().st_mtime_ns == before
    code, _, err = run(["export", "toyworld-turbo", "--out", folder, "--format", "onnx", "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert (folder / "unet" / "model.onnx").stat().st_mtime_ns != before
    assert not list(folder.parent.glob(".*.tmp"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["NOT_A_MODEL_DIR", "--format", "onnx"], "not a diffusers model folder"),
        (["toyworld-turbo", "--format", "tensorrt"], "unknown export format"),
        (["toyworld-turbo", "--format", "onnx", "--static-shape", "big"], "HEIGHTxWIDTH"),
        (["toyworld-turbo", "--format", "onnx", "--static-shape", "60x64"], "multiple of"),
        (["toyworld-turbo", "--format", "openvino", "--precision", "int4"], "precision"),
    ],
)
def test_bad_inputs_give_one_line(argv, words, tmp_path, capsys):
    (tmp_path / "NOT_A_MODEL_DIR").mkdir()
    argv = [str(tmp_path / a) if a == "NOT_A_MODEL_DIR" else a for a in argv]
    code, _, err = run(["export", *argv, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt, package", [("openvino", "openvino"), ("onnx", "onnxruntime")])
def test_a_missing_runtime_package_is_one_line(fmt, package, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    code, _, err = run(["export", "toyworld-turbo", "--out", tmp_path / "out", "--format", fmt], capsys)
    assert code == 2 and err.count("\n") == 1 and f"pip install {package}" in err, err
