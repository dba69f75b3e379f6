"""atelier.speed: CPU numerics, quantization, compilation, attention backends, and their CLI flags.

Tiny seeded UNets (atelier.testing.tiny) for the library functions; the built-in toyworld model for
the end-to-end commands. torch.compile runs with the "aot_eager" backend here: inductor compiles the
tiny UNet's blocks in ~40 s on this 2-core CPU (the same code path up to code generation).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from atelier.cli import main
from atelier.speed.numerics import apply_cpu_numerics, denormals_flushed


@pytest.fixture(autouse=True)
def restore_numerics():
    """Every test leaves denormal flushing and the thread count as it found them."""
    flushed, threads = denormals_flushed(), torch.get_num_threads()
    yield
    torch.set_flush_denormal(flushed)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    from atelier.testing import tiny_components

    return tiny_components("sd1")["unet"]


def _inputs(unet, batch=2):
    from atelier.speed.compile import dummy_unet_inputs

    torch.manual_seed(0)
    return dummy_unet_inputs(unet, batch)


def _out(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err):
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("atelier: error: ") and "Traceback" not in err


# ------------------------------------------------------------------------------ quantization

TOLERANCE = {"int8wo": 0.02, "int8dq": 0.05, "int4wo": 0.1}  # max abs error on outputs of std ~1


@pytest.mark.parametrize("mode", ["int8wo", "int8dq", "int4wo"])
def test_each_cpu_mode_quantizes_the_linear_layers_and_keeps_the_output_close(unet, mode):
    from atelier.speed import linear_layers, model_bytes, quantize_module

    inputs = _inputs(unet)
    reference = _out(unet, inputs)
    model = copy.deepcopy(unet)
    names = linear_layers(model)
    report = quantize_module(model, mode)
    modules = dict(model.named_modules())
    for name in names:  # each is a quantized layer now: a quanto QLinear or a torchao weight subclass
        layer = modules[name]
        assert type(layer) is not torch.nn.Linear or type(layer.weight) is not torch.nn.Parameter, name
    assert type(model.conv_in.weight) is torch.nn.Parameter  # skipped by default, as are convolutions
    assert type(model.time_embedding.linear_1) is torch.nn.Linear
    assert report["layers"] == len(names) > 10
    assert report["bytes_after"] == model_bytes(model) < report["bytes_before"] == model_bytes(unet)
    error = (_out(model, inputs) - reference).abs().max().item()
    print(f"{mode} ({report['backend']}): max abs error {error:.4f}, {report['bytes_before']} -> {report['bytes_after']} bytes")
    assert 0 < error < TOLERANCE[mode]


def test_skip_patterns_leave_modules_in_full_precision(unet):
    from atelier.speed import linear_layers, quantize_module

    model = copy.deepcopy(unet)
    report = quantize_module(model, "int8wo", skip="conv_in,up_blocks.*")
    assert report["skipped"] == ["conv_in", "up_blocks.*"]
    modules = dict(model.named_modules())
    kept = [n for n in linear_layers(unet, ()) if n.startswith("up_blocks.")]
    assert kept and all(type(modules[n]) is torch.nn.Linear for n in kept)
    assert type(model.time_embedding.linear_1) is not torch.nn.Linear  # not skipped this time
    assert report["layers"] == len(linear_layers(unet, ())) - len(kept)


def test_a_quantized_unet_saves_and_loads_back(unet, tmp_path):
    from atelier.speed import load_quantized, model_bytes, quantize_module, save_quantized

    inputs = _inputs(unet)
    model = copy.deepcopy(unet)
    quantize_module(model, "int8wo")
    save_quantized(model, tmp_path / "q")
    unet.save_pretrained(tmp_path / "float")
    loaded = load_quantized(tmp_path / "q")
    assert type(loaded) is type(unet) and loaded.atelier_quantized == {"mode": "int8wo", "backend": "quanto", "inference_mode": True}
    assert torch.equal(_out(loaded, inputs), _out(model, inputs))
    assert model_bytes(loaded) == model_bytes(model) < model_bytes(unet)
    saved = (tmp_path / "q" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert saved < (tmp_path / "float" / "diffusion_pytorch_model.safetensors").stat().st_size


def test_torchao_models_cannot_be_saved_and_bad_modes_are_refused(unet, tmp_path):
    from atelier.errors import UserError
    from atelier.speed import quantize_module, save_quantized

    model = copy.deepcopy(unet)
    quantize_module(model, "int8dq")
    with pytest.raises(UserError, match="quanto"):
        save_quantized(model, tmp_path / "q")
    with pytest.raises(UserError, match="unknown quantization mode"):
        quantize_module(copy.deepcopy(unet), "int3")
    with pytest.raises(UserError, match="no Linear layer"):
        quantize_module(copy.deepcopy(unet), "int8wo", skip="*")
    with pytest.raises(UserError, match="needs calibration"):
        quantize_module(copy.deepcopy(unet), "int8dq", backend="quanto")


def test_quanto_int8dq_with_calibration_is_close(unet):
    from atelier.speed import quantize_module

    inputs = _inputs(unet)
    model = copy.deepcopy(unet)
    report = quantize_module(model, "int8dq", backend="quanto", calibrate=lambda: model(**inputs))
    error = (_out(model, inputs) - _out(unet, inputs)).abs().max().item()
    print(f"int8dq (quanto, calibrated on the same inputs): max abs error {error:.4f}")
    assert report["backend"] == "quanto" and 0 < error < TOLERANCE["int8dq"]


def test_bad_speed_flags_fail_in_one_line_before_loading(capsys, tmp_path):
    for flags, words in ((["--threads", 0], "--threads must be"),
                         (["--quantize", "int4wo", "--quantize-backend", "torchao"], "use the quanto backend"),
                         (["--quantize", "int8dq", "--quantize-backend", "quanto"], "needs calibration")):
        code, _, err = run(["generate", "a red circle", "--model", "toyworld", *flags, "--out", tmp_path / "a.png"], capsys)
        assert one_error_line(code, err) and words in err, err


def test_fp8_is_refused_below_sm89_in_one_line(capsys, tmp_path):
    from atelier.speed import fp8_supported

    assert "8.9" in fp8_supported("cpu")
    code, out, err = run(["generate", "a red circle", "--model", "toyworld", "--quantize", "fp8",
                          "--out", tmp_path / "a.png"], capsys)
    assert one_error_line(code, err) and "--quantize fp8 needs" in err and out == ""
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("mode", ["int8wo", "int4wo"])  # int4wo: quanto's packed weights under generate's grad mode
def test_quantize_generates_end_to_end(mode, capsys, tmp_path):
    from PIL import Image

    code, out, err = run(["generate", "a red circle", "--model", "toyworld", "--steps", 4, "--seed", 1,
                          "--quantize", mode, "--out", tmp_path / "q.png", "--json"], capsys)
    assert code == 0, err
    speed = json.loads(out)["speed"]
    assert speed["quantize"]["mode"] == mode and speed["quantize"]["layers"] > 50
    assert speed["quantize"]["bytes_after"] < speed["quantize"]["bytes_before"]
    lines = [line for line in err.splitlines() if line.startswith("atelier: speed:")]
    assert len(lines) == 1 and f"{mode} (quanto)" in lines[0]
    assert Image.open(tmp_path / "q.png").size == (64, 64)


def test_img2img_and_edit_take_the_speed_flags_and_report_them(capsys, tmp_path):
    from atelier.toyworld import parse_caption, render_pil

    source = "a large red circle at the top left"
    render_pil(parse_caption(source)).save(tmp_path / "in.png")
    code, out, err = run(["img2img", tmp_path / "in.png", "a large blue circle at the top left", "--model", "toyworld",
                          "--steps", 4, "--seed", 1, "--channels-last", "--out", tmp_path / "i2i.png", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["speed"]["channels_last"] is True and "channels-last" in err
    code, out, err = run(["edit", tmp_path / "in.png", "--source", source, "--target", "a large blue circle at the top left",
                          "--method", "img2img", "--steps", 4, "--quantize", "int4wo", "--out", tmp_path / "e.png", "--json"],
                         capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["speed"]["quantize"]["mode"] == "int4wo" and (tmp_path / "e.png").is_file()
    code, _, err = run(["edit", tmp_path / "in.png", "--source", source, "--target", "x", "--quantize", "fp8"], capsys)
    assert one_error_line(code, err) and "fp8" in err


# ------------------------------------------------------------------------------ attention


def test_unknown_or_unusable_attention_backend_is_one_line(capsys, tmp_path):
    code, _, err = run(["generate", "a red circle", "--model", "toyworld", "--attention", "nope",
                        "--out", tmp_path / "a.png"], capsys)
    assert one_error_line(code, err) and "unknown attention backend 'nope'" in err and "native" in err
    code, _, err = run(["generate", "a red circle", "--model", "toyworld", "--attention", "flash",
                        "--out", tmp_path / "a.png"], capsys)
    assert one_error_line(code, err) and "'flash' is not usable here" in err


def test_an_attention_backend_runs_the_same_attention_through_the_dispatcher(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from atelier.speed import attention_backends, set_attention
    from atelier.speed.attention import DispatchAttnProcessor

    assert attention_backends("cpu")["native"] is None and attention_backends("cpu")["flash"] is not None
    model = copy.deepcopy(unet)
    inputs = _inputs(model)
    reference = _out(model, inputs)
    assert set_attention(model, "_native_math") == len(model.attn_processors) > 0
    assert all(isinstance(p, DispatchAttnProcessor) for p in model.attn_processors.values())
    assert torch.allclose(_out(model, inputs), reference, atol=1e-5)
    set_attention(model, "native")
    assert all(type(p) is AttnProcessor2_0 for p in model.attn_processors.values())


# ------------------------------------------------------------------------------ compile


def test_regional_compile_matches_eager_and_follows_the_batch(unet):
    from atelier.speed import compile_unet, warm_up

    model = copy.deepcopy(unet)
    report = compile_unet(model, "regional", dynamic=True, backend="aot_eager")
    assert report["compile"] == "regional" and report["blocks"] == 4  # the BasicTransformerBlocks
    assert warm_up(model, batch=2) > 0
    for batch in (1, 3):  # the stream's varying batch
        inputs = _inputs(unet, batch)
        assert torch.allclose(_out(model, inputs), _out(unet, inputs), atol=1e-5)
    assert compile_unet(model, "off") == {"compile": "off"}


def test_the_stream_engine_runs_on_a_compiled_unet_whatever_its_batch():
    import random

    from atelier.speed import SpeedOptions, apply_speed, describe
    from atelier.stream import StreamEngine
    from atelier.testing import tiny_pipeline
    from atelier.toyworld import render_pil, sample_scene

    eager, compiled = tiny_pipeline("turbo"), tiny_pipeline("turbo")
    applied = apply_speed(compiled, SpeedOptions(compile="regional", compile_backend="aot_eager"), dynamic_default=True,
                          inference_mode=False)
    assert applied["compile"]["dynamic"] is True and applied["compile"]["warm_up_s"] > 0
    assert "compile regional (4 modules, dynamic, warm-up" in describe(applied)
    frames = [render_pil(sample_scene(random.Random(k))).resize((16, 16)) for k in range(3)]
    for stages in ([20], [10, 30, 45]):  # stream batches of 1 and 3 latents
        outputs = []
        for pipe in (eager, compiled):
            engine = StreamEngine(pipe, t_index_list=stages)
            engine.prepare(prompt="a red circle")
            outputs.append([np.asarray(engine(frame), dtype=int) for frame in frames])
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(*outputs))


def test_apply_speed_reports_what_it_did():
    from atelier.speed import SpeedOptions, apply_speed, describe
    from atelier.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    inputs = _inputs(pipe.unet)
    reference = _out(pipe.unet, inputs)
    options = SpeedOptions(quantize="int8wo", channels_last=True, threads=1, attention="_native_math",
                           quantize_text_encoder=True)  # compile: in the stream test
    applied = apply_speed(pipe, options)
    assert applied["flush_denormal"] is True and applied["threads"] == 1 and applied["channels_last"] is True
    assert "compile" not in applied and applied["attention"]["backend"] == "_native_math" and applied["quantize"]["layers"] > 10
    assert applied["quantize_text_encoder"]["layers"] == len([m for m in pipe.text_encoder.modules() if type(m).__name__ == "QLinear"]) > 0
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (_out(pipe.unet, inputs) - reference).abs().max() < TOLERANCE["int8wo"]
    line = describe(applied)
    assert line.startswith("atelier: speed: denormals flushed, 1 threads, int8wo (quanto)") and "\n" not in line
    assert "channels-last" in line and "(and text_encoder)" in line and "compile" not in line


def test_the_warm_up_call_fits_every_unet_family():
    from atelier.speed import warm_up
    from atelier.testing import tiny_components

    for family in ("sd2", "sdxl"):  # SDXL's added conditions (pooled text embeddings, time ids) included
        assert warm_up(tiny_components(family)["unet"], batch=2) > 0


# ------------------------------------------------------------------------------ CPU numerics


def test_flushing_denormals_is_applied_and_can_be_turned_off():
    torch.set_flush_denormal(False)
    assert not denormals_flushed()
    assert apply_cpu_numerics("cpu", threads=1) == {"flush_denormal": True, "threads": 1}
    assert denormals_flushed() and torch.get_num_threads() == 1
    assert apply_cpu_numerics("cpu", flush_denormal=False)["flush_denormal"] is False
    assert not denormals_flushed()


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_flushes_denormals_by_default_without_changing_the_image(capsys, tmp_path):
    argv = ["generate", "a red circle", "--model", "toyworld", "--steps", 4, "--seed", 3, "--json"]
    code, out, _ = run([*argv, "--keep-denormals", "--threads", 1, "--out", tmp_path / "kept.png"], capsys)
    assert code == 0 and json.loads(out)["speed"]["flush_denormal"] is False and not denormals_flushed()
    code, out, _ = run([*argv, "--out", tmp_path / "flushed.png"], capsys)
    assert code == 0 and json.loads(out)["speed"]["flush_denormal"] is True and denormals_flushed()
    difference = np.abs(_pixels(tmp_path / "kept.png") - _pixels(tmp_path / "flushed.png"))
    print(f"pixels differing: {(difference > 0).sum()} of {difference.size}, max {difference.max()}")
    assert difference.max() <= 1


def test_training_flushes_denormals_and_refuses_quantize(capsys, tmp_path):
    torch.set_flush_denormal(False)
    code, out, _ = run(["train", "toyworld", "--out-dir", tmp_path / "run", "--show-config"], capsys)
    assert code == 0 and denormals_flushed()
    code, _, err = run(["train", "toyworld", "--out-dir", tmp_path / "run", "--show-config", "--keep-denormals"], capsys)
    assert code == 0 and not denormals_flushed()
    code, _, err = run(["train", "inverter", "--quantize", "int8wo"], capsys)
    assert one_error_line(code, err) and "--quantize is not supported for training" in err


# ------------------------------------------------------------------------------ speed info


def test_speed_info_json(capsys):
    code, out, err = run(["speed", "info", "--json", "--threads", 1], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert {"device", "dtype", "attention_backends", "quantization", "flush_denormal", "threads"} <= set(info)
    assert info["device"] == "cpu" and info["threads"] == 1 and info["flush_denormal"] is True
    assert "native" in info["attention_backends"] and "flash" in info["attention_unavailable"]
    q = info["quantization"]
    assert q["fp8_capable"] is False and q["modes"]["int8wo"] == "quanto" and q["modes"]["int8dq"] == "torchao"
    assert q["modes"]["fp8"].startswith("unavailable")
    code, out, _ = run(["speed", "info", "--keep-denormals"], capsys)
    assert code == 0 and "denormals flushed: no" in out and "attention backends usable here:" in out
