"""`atelier generate`, `atelier img2img`, `atelier info` and the `atelier` entry point.

One tiny SD 1.x pipeline is saved as a diffusers folder and passed as --model; most commands run
in-process through `atelier.cli.main`, a couple through a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from atelier.cli import main
from atelier.generate import parse_parameters, read_parameters, save_png

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from atelier.testing import save_tiny_pipeline, tiny_pipeline

    return str(save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1"))


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", [[], ["generate"], ["img2img"], ["info"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: atelier" in out
    if command:
        assert command[0] in out
    else:
        assert "generate" in out and "img2img" in out and "info" in out


# ---------------------------------------------------------------------------------------------
# generate, info, --from


def test_generate_writes_png_with_parameters_and_info_prints_them(model, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, _ = run(["generate", "a red circle", "--negative", "blurry", "--model", model,
                           "--sampler", "Euler a", "--seed", 5, "--cfg", 6, "--out", out, *FAST], capsys)
    assert code == 0 and stdout.strip() == str(out)
    text = read_parameters(out)
    assert text.startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, ")
    fields = parse_parameters(text)
    assert (fields["Seed"], fields["CFG scale"], fields["Size"], fields["Model"]) == ("5", "6", "16x16", "tiny-sd1")

    code, stdout, _ = run(["info", out], capsys)
    assert code == 0 and stdout.strip() == text
    code, stdout, _ = run(["info", out, "--json"], capsys)
    data = json.loads(stdout)
    assert data["parameters"] == text and data["fields"]["Sampler"] == "Euler a"


def test_from_regenerates_the_same_pixels(model, tmp_path, capsys):
    first = tmp_path / "first.png"
    run(["generate", "a (blue:1.3) [circle:square:0.5]", "--negative", "red, dark", "--model", model,
         "--sampler", "DPM++ 2M", "--schedule", "karras", "--clip-skip", 2, "--pag-scale", 1.5,
         "--seed", 77, "--out", first, *FAST], capsys)
    again = tmp_path / "again.png"
    code, _, _ = run(["generate", "--from", first, "--model", model, "--out", again, "--quiet"], capsys)
    assert code == 0
    assert read_parameters(again) == read_parameters(first)
    assert np.array_equal(pixels(again), pixels(first))
    # an option given next to --from overrides the stored value
    other = tmp_path / "other.png"
    run(["generate", "--from", first, "--model", model, "--seed", 78, "--out", other, "--quiet"], capsys)
    assert parse_parameters(read_parameters(other))["Seed"] == "78"
    assert np.abs(pixels(other) - pixels(first)).max() > 2


def test_prompts_file_names_and_seeds(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n\na green triangle\n")
    outdir = tmp_path / "batch"
    code, stdout, _ = run(["generate", "--prompts-file", prompts, "--model", model, "--seed", 40,
                           "--outdir", outdir, "--sampler", "Euler", "--json", *FAST], capsys)
    assert code == 0
    data = json.loads(stdout)
    assert sorted(os.listdir(outdir)) == ["00000.png", "00001.png", "00002.png"]
    assert [d["path"] for d in data["images"]] == [str(outdir / f"0000{i}.png") for i in range(3)]
    for i, prompt in enumerate(["a red circle", "a blue square", "a green triangle"]):
        fields = parse_parameters(read_parameters(outdir / f"0000{i}.png"))
        assert fields["Prompt"] == prompt and fields["Seed"] == str(40 + i)
        assert data["images"][i]["seed"] == 40 + i
    # line 2 alone with seed 41 is the same picture as image 1 of the batch
    single = tmp_path / "single.png"
    run(["generate", "a blue square", "--model", model, "--seed", 41, "--sampler", "Euler", "--out", single, *FAST],
        capsys)
    assert np.abs(pixels(single) - pixels(outdir / "00001.png")).max() <= 1
    # a second run into the same folder continues the numbering instead of overwriting
    run(["generate", "a cat", "--model", model, "--outdir", outdir, "--n", 2, *FAST], capsys)
    assert sorted(os.listdir(outdir))[-2:] == ["00003.png", "00004.png"]


def test_img2img_records_strength_and_from_reproduces(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "i2i.png"
    code, _, _ = run(["img2img", init, "a red circle", "--strength", 0.5, "--model", model, "--seed", 3,
                      "--out", out, "--steps", 6, "--quiet"], capsys)
    assert code == 0
    fields = parse_parameters(read_parameters(out))
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "24x24"
    stronger = tmp_path / "i2i-strong.png"
    run(["img2img", init, "a red circle", "--strength", 0.9, "--model", model, "--seed", 3,
         "--out", stronger, "--steps", 6, "--quiet"], capsys)
    assert np.abs(pixels(out) - pixels(stronger)).max() > 2
    again = tmp_path / "again.png"
    code, _, _ = run(["img2img", init, "--from", out, "--model", model, "--out", again, "--quiet"], capsys)
    assert code == 0 and np.array_equal(pixels(again), pixels(out))


def test_wildcards_expand_per_image(model, tmp_path, capsys):
    from atelier.prompts import expand_prompt

    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "shape.txt").write_text("circle\nsquare\ntriangle\ndiamond\n")
    code, stdout, _ = run(["generate", "a red __shape__", "--wildcards", cards, "--model", model, "--seed", 9,
                           "--n", 3, "--outdir", tmp_path / "out", "--json", *FAST], capsys)
    assert code == 0
    images = json.loads(stdout)["images"]
    assert [i["prompt"] for i in images] == [expand_prompt("a red __shape__", 9 + k, wildcard_dir=cards) for k in range(3)]
    for i in images:
        fields = parse_parameters(read_parameters(i["path"]))
        assert fields["Prompt"] == i["prompt"] and fields["Template"] == "a red __shape__"


# ---------------------------------------------------------------------------------------------
# user errors: exit 2 and one line on stderr


def _error_cases(tmp_path, model):
    corrupt = tmp_path / "corrupt.png"
    save_png(Image.new("RGB", (32, 32), "red"), tmp_path / "ok.png", "x")
    corrupt.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 8)).save(huge)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (16, 16)).save(plain)
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    return {
        "missing image": ["info", tmp_path / "nope.png"],
        "missing model": ["generate", "x", "--model", tmp_path / "no-model"],
        "unknown sampler": ["generate", "x", "--model", model, "--sampler", "Magic 9000"],
        "corrupt image": ["img2img", corrupt, "x", "--model", model],
        "oversized image": ["img2img", huge, "x", "--model", model],
        "bad size": ["generate", "x", "--model", model, "--width", 30],
        "unreadable prompts file": ["generate", "--prompts-file", binary, "--model", model],
        "missing prompts file": ["generate", "--prompts-file", tmp_path / "none.txt", "--model", model],
        "no parameters for --from": ["generate", "--from", plain, "--model", model],
        "no parameters for info": ["info", plain],
        "--out with many images": ["generate", "x", "--model", model, "--n", 2, "--out", tmp_path / "a.png"],
        "prompt and prompts file": ["generate", "x", "--prompts-file", binary],
        "no prompt": ["generate", "--model", model],
    }


CASES = ["missing image", "missing model", "unknown sampler", "corrupt image", "oversized image", "bad size",
         "unreadable prompts file", "missing prompts file", "no parameters for --from", "no parameters for info",
         "--out with many images", "prompt and prompts file", "no prompt"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_exit_2_with_one_line(case, model, tmp_path, capsys):
    argv = _error_cases(tmp_path, model)[case]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv", [["info", "missing.png"], ["generate", "--prompts-file", "missing.txt"]])
def test_user_errors_in_a_real_process(argv, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "atelier.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("atelier: error: ")


# ---------------------------------------------------------------------------------------------
# models, --config, --lora


def test_models_lists_builtins_and_describes_a_folder(model, capsys):
    code, out, _ = run(["models", "--json"], capsys)
    listing = json.loads(out)
    assert code == 0 and {m["name"] for m in listing["builtin"]} >= {"toyworld", "toyworld-turbo"}
    assert "sd1" in listing["bundled_configs"]
    code, out, _ = run(["models", model, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["family"] == "sd1" and info["format"] == "diffusers folder"
    code, out, _ = run(["models", "toyworld-turbo", "--json"], capsys)
    info = json.loads(out)
    assert (info["is_turbo"], info["steps"], info["guidance_scale"]) == (True, 1, 0.0)


def test_single_file_with_config_and_lora_from_the_command_line(model, tmp_path, capsys):
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.testing import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(model)
    single = save_single_file(pipe, tmp_path / "tiny.safetensors")
    torch.manual_seed(5)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name="style.safetensors")
    lora = tmp_path / "style.safetensors"
    common = ["generate", "a cat", "--seed", "3", *FAST]
    assert run([*common, "--model", model, "--out", tmp_path / "folder.png"], capsys)[0] == 0
    assert run([*common, "--model", single, "--config", model, "--out", tmp_path / "file.png"], capsys)[0] == 0
    assert np.abs(pixels(tmp_path / "folder.png") - pixels(tmp_path / "file.png")).max() <= 2
    assert run([*common, "--model", model, "--lora", f"{lora}:0.8", "--out", tmp_path / "lora.png"], capsys)[0] == 0
    assert np.abs(pixels(tmp_path / "folder.png") - pixels(tmp_path / "lora.png")).max() > 10
    code, _, err = run([*common, "--model", model, "--lora", tmp_path / "missing.safetensors", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "missing.safetensors" in err and err.count("\n") == 1
