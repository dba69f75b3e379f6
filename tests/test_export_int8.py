"""`atelier export --format openvino --quantize int8`: the VAE decoder's up blocks in 8 bit (NNCF),
calibrated on the model's own latents (toy captions by default for the toy models, a folder of images
or a prompt file when given); its input stage stays in the export's precision; the export still
draws what it is asked and records how close its decoder stays. Bad options are one line. And the
exported graphs serve several threads at once (one infer request per thread)."""

from __future__ import annotations

import json
import random
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.testing.cli import run
from atelier.toyworld import judge, psnr, render_pil, sample_scene

CAPTION = "a large red circle at the top left"



@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    from atelier.cli import main

    out = tmp_path_factory.mktemp("int8") / "model"
    code = main(["export", "toyworld-turbo", "--out", str(out), "--format", "openvino", "--precision", "auto",
                 "--quantize", "int8", "--calibration-size", "12", "--quiet"])
    assert code == 0
    return out


def _quantized_layers(xml) -> set[str]:
    """Names of the decoder's layers that take 8-bit inputs (FakeQuantize nodes feed them)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    names = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                names.add(target.get_node().get_friendly_name())
    return names


def test_int8_quantizes_the_decoders_up_blocks_and_keeps_its_input_stage(int8):
    record = json.loads((int8 / "export.json").read_text())
    assert record["quantized"]["vae_decoder"] == "int8"
    assert record["quantized"]["calibration_latents"] == 12
    assert record["quantized"]["worst_psnr_db"] >= 30  # against the unquantized decoder, on its calibration
    quantized = _quantized_layers(int8 / "vae" / "decoder.xml")
    assert any("up_blocks" in name and "conv" in name for name in quantized)
    assert not [n for n in quantized if "mid_block" in n or "conv_in" in n or "post_quant_conv" in n]
    assert not _quantized_layers(int8 / "unet" / "model.xml")  # the UNet stays as exported
    assert not _quantized_layers(int8 / "vae" / "encoder.xml")


def test_the_int8_export_still_draws_the_caption(int8, turbo, tmp_path, capsys):
    from atelier.generate import generate
    from atelier.generate.request import GenerationRequest

    out = tmp_path / "int8.png"
    code, _, err = run(["generate", CAPTION, "--model", int8, "--seed", 3, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    image = Image.open(out).convert("RGB")
    reference = generate(turbo, GenerationRequest(prompt=CAPTION, seed=3), progress=False)[0].image
    assert judge(reference, CAPTION).match and judge(image, CAPTION).match
    assert psnr(image, reference) >= 25  # bf16 UNet + 8-bit decoder against fp32 PyTorch


def test_the_int8_decoder_decodes_like_the_vae(int8, turbo):
    from atelier.core import vae as vae_calls
    from atelier.models import load_pipeline

    pipe = load_pipeline(int8)
    scenes = [render_pil(sample_scene(random.Random(k))) for k in range(4)]
    pixels = torch.stack([torch.from_numpy(np.asarray(s, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for s in scenes])
    with torch.no_grad():
        latents = vae_calls.encode(turbo.vae, pixels)
        want, got = vae_calls.decode(turbo.vae, latents), vae_calls.decode(pipe.vae, latents)
    to_image = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert psnr(to_image(got), to_image(want)) >= 30


def test_calibration_from_a_folder_of_frames_or_a_prompt_file(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        render_pil(sample_scene(random.Random(k))).save(frames / f"{k:03d}.png")
    (frames / "notes.txt").write_text("not an image")
    code, out, err = run(["export", "toyworld-turbo", "--out", tmp_path / "a", "--format", "openvino", "--quantize", "int8",
                          "--calibration", frames, "--calibration-size", 5, "--json", "--quiet"], capsys)
    assert code == 0, err
    record = json.loads(out)  # stdout holds the JSON alone (NNCF's progress goes to stderr)
    assert record["quantized"]["calibration_latents"] == 5
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small blue square in the center\n\na large green triangle at the bottom right\n")
    code, out, err = run(["export", "toyworld-turbo", "--out", tmp_path / "b", "--format", "openvino", "--quantize", "int8",
                          "--calibration", prompts, "--calibration-size", 2, "--json", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["quantized"]["calibration_latents"] == 2


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--format", "onnx", "--quantize", "int8"], "--format openvino"),
        (["--format", "openvino", "--quantize", "int4"], "unknown --quantize"),
        (["--format", "openvino", "--calibration", "prompts.txt"], "--calibration is for --quantize"),
        (["--format", "openvino", "--quantize", "int8", "--calibration", "MISSING"], "no such file"),
        (["--format", "openvino", "--quantize", "int8", "--calibration", "EMPTY_DIR"], "no images"),
        (["--format", "openvino", "--quantize", "int8", "--calibration-size", "0"], "calibration size"),
    ],
)
def test_bad_quantize_options_give_one_line_and_write_nothing(extra, words, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a small blue square in the center\n")
    (tmp_path / "EMPTY_DIR").mkdir()
    extra = [str(tmp_path / a) if a in ("prompts.txt", "MISSING", "EMPTY_DIR") else a for a in extra]
    code, _, err = run(["export", "toyworld-turbo", "--out", tmp_path / "out", *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_a_tiny_autoencoder_is_not_quantized_and_missing_nncf_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run(["export", "toyworld-taesd", "--out", tmp_path / "t", "--format", "openvino", "--quantize", "int8"], capsys)
    assert code == 2 and err.count("\n") == 1 and "tiny autoencoder" in err
    monkeypatch.setitem(sys.modules, "nncf", None)
    code, _, err = run(["export", "toyworld-turbo", "--out", tmp_path / "out", "--format", "openvino", "--quantize", "int8"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install nncf" in err
    assert not (tmp_path / "out").exists()


def test_an_exported_graph_serves_several_threads_at_once(int8):
    """Sessions of `atelier serve` share one loaded model: each thread gets its own infer request."""
    from atelier.models import load_pipeline

    pipe = load_pipeline(int8)
    torch.manual_seed(0)
    inputs = [(torch.randn(2, 4, 16, 16), torch.randn(2, 16, 128)) for _ in range(4)]
    with torch.no_grad():
        alone = [pipe.unet(x, 500, encoder_hidden_states=h).sample for x, h in inputs]
    results, errors = {}, []

    def work(k):
        try:
            x, h = inputs[k]
            for _ in range(20):
                with torch.no_grad():
                    results[k] = pipe.unet(x, 500, encoder_hidden_states=h).sample
                assert torch.allclose(results[k], alone[k], atol=1e-5)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
