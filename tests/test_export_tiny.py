"""A tiny autoencoder (AutoencoderTiny, TAESD) on the CPU fast path: `atelier export toyworld-taesd`
writes its encoder and decoder for ONNX Runtime / OpenVINO, `load_tiny_autoencoder` loads the folder
back as an ExportedTinyVAE that computes what PyTorch does, the stream engine runs it beside an
exported or a PyTorch model, and `atelier serve --tiny-vae` hands it to every session."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from atelier.errors import UserError
from atelier.testing.cli import one_error_line, run
from atelier.toyworld import render_pil, sample_scene

FORMATS = ["openvino", "onnx"]
SUFFIX = {"openvino": ".xml", "onnx": ".onnx"}


def tiny_autoencoder(seed: int = 0):
    """A random AutoencoderTiny of TAESD's layout, shrunk (8 pixels per latent, 8 channels per block)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()


def psnr(a, b) -> float:
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """toyworld-taesd exported by the command, once per format."""
    from atelier.cli import main

    root = tmp_path_factory.mktemp("tiny")
    for fmt in FORMATS:
        assert main(["export", "toyworld-taesd", "--out", str(root / fmt), "--format", fmt, "--quiet"]) == 0
    return {fmt: root / fmt for fmt in FORMATS}


# ---------------------------------------------------------------------------------- export and load


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_exported_tiny_autoencoder_computes_what_pytorch_does(fmt, tmp_path):
    """Encode and decode, TAESD's pixel scaling included, at other batches and sizes than exported with."""
    from atelier.core.vae import is_tiny
    from atelier.models import load_tiny_autoencoder
    from atelier.runtime import export_tiny_autoencoder
    from atelier.runtime.modules import ExportedTinyVAE

    tiny = tiny_autoencoder()
    export_tiny_autoencoder(tiny, tmp_path / "taesd", fmt)
    assert sorted(p.name for p in (tmp_path / "taesd").iterdir() if not p.name.endswith(".bin")) == sorted(
        ["config.json", "export.json", f"encoder{SUFFIX[fmt]}", f"decoder{SUFFIX[fmt]}"])
    loaded = load_tiny_autoencoder(tmp_path / "taesd")
    assert isinstance(loaded, ExportedTinyVAE) and is_tiny(loaded) and is_tiny(tiny)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.config.latent_channels == 4 and loaded.config.scaling_factor == tiny.config.scaling_factor
    torch.manual_seed(1)
    images, latents = torch.rand(3, 3, 64, 128) * 2 - 1, torch.randn(1, 4, 16, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(images).latents, tiny.encode(images).latents, atol=1e-3)
        assert torch.allclose(loaded.decode(latents).sample, tiny.decode(latents).sample, atol=1e-3)
        assert torch.allclose(loaded.encode(images, return_dict=False)[0], tiny.encode(images).latents, atol=1e-3)


def test_a_static_shape_and_batch_are_kept(tmp_path):
    from atelier.models import load_tiny_autoencoder
    from atelier.runtime import export_tiny_autoencoder

    tiny = tiny_autoencoder()
    export_tiny_autoencoder(tiny, tmp_path / "static", "onnx", static_shape=(32, 64), batch=1)
    loaded = load_tiny_autoencoder(tmp_path / "static")
    assert loaded.decoder_graph.inputs["latents"] == [1, 4, 4, 8]
    latents = torch.randn(3, 4, 4, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(latents).sample, tiny.decode(latents).sample, atol=1e-3)  # 3 runs of 1
    with pytest.raises(UserError, match="static shape"):
        loaded.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(UserError, match="multiple of 8"):
        export_tiny_autoencoder(tiny, tmp_path / "odd", "onnx", static_shape=(60, 64))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_command_exports_toyworld_taesd(exported, fmt):
    from atelier.models import load_tiny_autoencoder
    from atelier.runtime import is_exported, read_export_info

    folder = exported[fmt]
    info = read_export_info(folder)
    assert is_exported(folder) and info["format"] == fmt and info["components"] == {"tiny_vae": "tiny_vae"}
    assert info["exported_from"] == "toyworld-taesd" and info["static_shape"] is None and info["batch"] is None
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert not list(folder.parent.glob(".*.tmp"))
    loaded, tiny = load_tiny_autoencoder(folder), load_tiny_autoencoder("toyworld-taesd", device="cpu")
    images, latents = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(images).latents, tiny.encode(images).latents, atol=1e-3)
        assert torch.allclose(loaded.decode(latents).sample, tiny.decode(latents).sample, atol=1e-3)


def test_the_command_prints_the_record_and_finds_a_taesd_folder(tmp_path, capsys):
    """A folder whose config.json is an AutoencoderTiny's (the madebyollin/taesd layout) exports as one."""
    tiny_autoencoder().save_pretrained(tmp_path / "taesd")
    code, out, err = run(["export", tmp_path / "taesd", "--out", tmp_path / "out", "--format", "onnx", "--json",
                          "--static-shape", "64x64", "--batch", 2], capsys)
    assert code == 0, err
    record = json.loads(out)
    assert record["out"] == str(tmp_path / "out") and record["components"] == {"tiny_vae": "tiny_vae"}
    assert record["static_shape"] == [64, 64] and record["batch"] == 2 and record["runtime"].startswith("onnxruntime")
    assert record == {"out": str(tmp_path / "out"), **json.loads((tmp_path / "out" / "export.json").read_text())}


# ---------------------------------------------------------------------------------- refusals


def test_a_missing_or_corrupt_graph_is_one_line(exported, tmp_path, capsys):
    import shutil

    from atelier.models import load_tiny_autoencoder

    for damage, words in [("missing", "is missing"), ("corrupt", "cannot load")]:
        folder = tmp_path / damage
        shutil.copytree(exported["onnx"], folder)
        if damage == "missing":
            (folder / "decoder.onnx").unlink()
        else:
            (folder / "decoder.onnx").write_bytes(b"not a graph")
        with pytest.raises(UserError, match=words) as exc:
            load_tiny_autoencoder(folder)
        assert "\n" not in str(exc.value) and "decoder.onnx" in str(exc.value)
        code, _, err = run(["serve", "--port", 0, "--tiny-vae", folder], capsys)
        assert one_error_line(code, err) and words in err, err


def test_what_an_exported_tiny_autoencoder_cannot_do_is_refused(exported, tmp_path, capsys):
    from atelier.models import load_pipeline, load_tiny_autoencoder
    from atelier.runtime import export_tiny_autoencoder

    folder = exported["onnx"]
    for kwargs, word in [({"device": "cuda"}, "CPU"), ({"dtype": "fp16"}, "float32")]:
        with pytest.raises(UserError, match=word) as exc:
            load_tiny_autoencoder(folder, **kwargs)
        assert "\n" not in str(exc.value)
    loaded = load_tiny_autoencoder(folder)
    with pytest.raises(UserError, match="bfloat16"):
        loaded.to(torch.bfloat16)
    with pytest.raises(UserError, match="already exported"):
        export_tiny_autoencoder(loaded, tmp_path / "again", "onnx")
    with pytest.raises(UserError, match="tiny autoencoder"):
        load_pipeline(folder)
    code, _, err = run(["export", folder, "--out", tmp_path / "again", "--format", "onnx"], capsys)
    assert one_error_line(code, err) and "already exported" in err


# ---------------------------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def exported_turbo(tmp_path_factory):
    from atelier.cli import main

    folder = tmp_path_factory.mktemp("turbo") / "onnx"
    assert main(["export", "toyworld-turbo", "--out", str(folder), "--format", "onnx", "--quiet"]) == 0
    return folder


def _stream(pipe, vae) -> list:
    from atelier.stream import StreamEngine

    engine = StreamEngine(pipe, vae=vae)
    assert engine.tiny_vae
    engine.prepare(prompt="a large red circle in the center", seed=2)
    return [engine(render_pil(sample_scene(random.Random(k)))) for k in range(3)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_stream_runs_the_exported_tiny_autoencoder(exported, exported_turbo, fmt):
    """Beside the exported model and beside the PyTorch one, frames as the PyTorch tiny path makes them."""
    from atelier.models import load_pipeline

    turbo = load_pipeline("toyworld-turbo", device="cpu")
    want = _stream(turbo, "toyworld-taesd")
    for pipe in (load_pipeline(exported_turbo), turbo):
        for got, expected in zip(_stream(pipe, exported[fmt]), want):
            assert got.size == expected.size and psnr(got, expected) >= 40
