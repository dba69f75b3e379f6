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

from atelier.speed.numerics import apply_cpu_numerics, denormals_flushed
from atelier.testing.cli import one_error_line, run


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


def test_quantize_int8_and_a_bare_compile_mean_what_the_field_means(capsys, tmp_path):
    """`--quantize int8 --compile` as the diffusers guides write it: int8 weights, regional compile."""
    code, out, err = run(["generate", "a red circle", "--model", "toyworld-turbo", "--seed", 1, "--quantize", "int8",
                          "--compile", "--compile-backend", "eager", "--out", tmp_path / "q.png", "--json"], capsys)
    assert code == 0, err
    speed = json.loads(out)["speed"]
    assert speed["quantize"]["mode"] == "int8wo" and speed["compile"]["compile"] == "regional"


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


def test_compile_mode_needing_cuda_graphs_is_refused_on_cpu_in_one_line(capsys, tmp_path):
    for mode in ("reduce-overhead", "max-autotune"):
        code, out, err = run(["generate", "a red circle", "--model", "toyworld", "--compile", "regional",
                              "--compile-mode", mode, "--out", tmp_path / "a.png"], capsys)
        assert one_error_line(code, err) and out == "", err
        assert f"--compile-mode {mode} uses CUDA graphs and needs a CUDA GPU; on this cpu use the default mode" in err
    code, _, err = run(["train", "toyworld", "--out-dir", tmp_path / "run", "--compile", "regional",
                        "--compile-mode", "reduce-overhead", "--show-config"], capsys)
    assert one_error_line(code, err) and "uses CUDA graphs" in err, err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "run").exists()


def test_the_compile_mode_reaches_torch_compile(unet, monkeypatch):
    from atelier.speed import SpeedOptions, apply_speed, compile_unet
    from atelier.speed.cli import speed_options
    from atelier.testing import tiny_pipeline

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: calls.append((type(self).__name__, kwargs)))
    report = compile_unet(copy.deepcopy(unet), "regional", dynamic=False, compile_mode="reduce-overhead")
    assert report["mode"] == "reduce-overhead" and len(calls) == report["blocks"] == 4
    assert all(kwargs["mode"] == "reduce-overhead" and kwargs["dynamic"] is False for _, kwargs in calls)
    calls.clear()
    compile_unet(copy.deepcopy(unet), "full", compile_mode="max-autotune")
    assert calls == [("UNet2DConditionModel", {"dynamic": None, "fullgraph": False, "mode": "max-autotune"})]
    calls.clear()
    compile_unet(copy.deepcopy(unet), "full")
    assert "mode" not in calls[0][1]  # the default: torch.compile's own
    # the flag, through SpeedOptions and apply_speed (the CUDA check bypassed: this is a CPU)
    import argparse

    options = speed_options(argparse.Namespace(compile="full", compile_mode="reduce-overhead"))
    assert options.compile_mode == "reduce-overhead"
    monkeypatch.setattr(SpeedOptions, "check", lambda self, device=None: self)
    calls.clear()
    options.warm_up = False
    applied = apply_speed(tiny_pipeline("sd1"), options)
    assert calls == [("UNet2DConditionModel", {"dynamic": False, "fullgraph": False, "mode": "reduce-overhead"})]
    assert applied["compile"]["mode"] == "reduce-overhead"


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


TINY_TRAIN = ["--stages", "turbo", "--vae-steps", 1, "--text-steps", 1, "--unet-steps", 2, "--turbo-steps", 2,
              "--set", "checkpoint_every=1", "--set", "eval_every=1000", "--set", "eval_images=2",
              "--set", "eval_scenes=2", "--set", "turbo_pairs=0", "--set", "vae_full_steps=1", "--set", "vae_batch=2",
              "--set", "text_batch=4", "--set", "unet_batch=2", "--set", "turbo_batch=2", "--threads", 1]


def test_training_compiles_its_unets_in_place_and_checkpoints_keep_their_keys(capsys, tmp_path, kill_after_checkpoint):
    from safetensors.torch import load_file

    from atelier.train.checkpoint import load_state

    fast, plain = tmp_path / "fast", tmp_path / "plain"
    flags = ["--compile", "--compile-backend", "aot_eager", "--channels-last"]  # --compile alone: regional
    kill_after_checkpoint(1, loop="unet")  # killed after the first checkpoint of the compiled, channels-last UNet
    code, _, _ = run(["train", "toyworld", "--out-dir", fast, *TINY_TRAIN, *flags], capsys)
    assert code == 130
    kill_after_checkpoint(None)
    code, _, err = run(["train", "toyworld", "--out-dir", fast, *TINY_TRAIN, *flags], capsys)
    assert code == 0, err
    assert "[unet] resumed at step 1" in err
    assert "[unet] speed: compile regional (7 modules per UNet, default mode, aot_eager), channels-last on 1 UNet(s)" in err
    assert "[turbo] speed: compile regional" in err and "on 2 UNet(s)" in err  # the student and its frozen teacher
    code, _, err = run(["train", "toyworld", "--out-dir", plain, *TINY_TRAIN], capsys)
    assert code == 0, err
    assert "speed:" not in err

    config = json.loads((fast / "config.json").read_text())
    assert (config["compile"], config["compile_backend"], config["channels_last"]) == ("regional", "aot_eager", True)
    done = json.loads((fast / "unet" / "done.json").read_text())
    assert done["steps"] == 2 and done["speed"]["compile"]["blocks"] == 7 and done["speed"]["channels_last"] is True
    for stage in ("unet", "turbo"):
        states = [load_state(run_dir / stage / "checkpoint.safetensors") for run_dir in (fast, plain)]
        assert list(states[0]["unet"]) == list(states[1]["unet"]) and len(states[0]["unet"]) > 100
        assert not any("_orig_mod" in key for key in states[0]["unet"])
        assert len(states[0]["losses"]) == 2
    for model in ("toyworld", "toyworld-turbo"):
        weights = [load_file(run_dir / "weights" / model / "unet" / "diffusion_pytorch_model.safetensors")
                   for run_dir in (fast, plain)]
        assert list(weights[0]) == list(weights[1])
        assert all(w.is_contiguous() for w in weights[0].values())
    meta = json.loads((fast / "weights" / "toyworld" / "atelier.json").read_text())
    assert meta["trained_with"]["compile"] == "regional"


def test_a_compiled_modules_copy_runs_its_own_weights(unet):
    from atelier.speed import compile_unet
    from atelier.speed.compile import plain_copy, uncompile

    model = copy.deepcopy(unet)
    compile_unet(model, "regional", dynamic=False, backend="aot_eager")
    clone = plain_copy(model)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in clone.modules())
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for module in (clone, reference):
            for p in module.parameters():
                p.mul_(0.5)
    inputs = _inputs(unet)
    assert torch.allclose(_out(clone, inputs), _out(reference, inputs), atol=1e-5)  # its own weights, not model's
    assert torch.allclose(_out(model, inputs), _out(unet, inputs), atol=1e-5)
    uncompile(model)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


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
