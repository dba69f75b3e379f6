"""`atelier generate`, `atelier img2img`, `atelier info` and the `atelier` entry point.

One tiny SD 1.x pipeline is saved as a diffusers folder and passed as --model; most commands run
in-process through `atelier.cli.main`, a couple through a real subprocess.
"""

from __future__ import annotations

import argparse
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
    parts = {m["name"] for m in listing["components"]}
    assert parts >= {"toyworld-taesd", "toyworld-inverter", "toyworld-ip", "toyworld-clip", "toyworld-tryon"}
    assert not parts & {m["name"] for m in listing["builtin"]}  # a component is not offered as a pipeline
    code, out, _ = run(["models"], capsys)
    assert code == 0 and "built-in components:" in out and "toyworld-taesd" in out
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


# ---------------------------------------------------------------------------------------------
# bounded numbers, hires fix, output paths, --quiet, imports (issue 11)


def _png_with(path, text, size=16):
    return save_png(Image.new("RGB", (size, size), "gray"), path, text)


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "99999999999"],
        ["--steps", "100000"],
        ["--cfg", "inf"],
        ["--cfg", "nan"],
        ["--pag-scale", "nan"],
        ["--guidance-rescale", "nan"],
        ["--clip-skip", "100000"],
        ["--n", "1000000000"],
        ["--batch-size", "100000"],
        ["--seed", str(2**64)],
        ["--hires-upscale", "inf"],
        ["--hires-upscale", "2", "--strength", "nan"],
        ["--hires-steps", "99999999999"],
    ],
)
def test_numbers_out_of_bounds_fail_in_one_line_before_loading(argv, tmp_path, capsys):
    # the model does not exist: a bound checked before loading is the error reported
    code, out, err = run(["generate", "x", "--model", tmp_path / "no-model", "--outdir", tmp_path / "o", *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("atelier: error: ") and "no-model" not in err, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


@pytest.mark.parametrize("field", ["Steps: 99999999999", "Steps: 100000", "CFG scale: inf", "CFG scale: nan"])
def test_numbers_from_metadata_are_bounded(field, tmp_path, capsys):
    png = _png_with(tmp_path / "a.png", f"a cat\n{field}, Sampler: Euler, Seed: 1, Size: 16x16")
    code, _, err = run(["generate", "--from", png, "--model", tmp_path / "no-model", "--out", tmp_path / "b.png"], capsys)
    assert code == 2 and err.count("\n") == 1 and field.split(":")[0].lower() in err.lower()


A1111_HIRES = (
    "a red circle\nNegative prompt: blurry\n"
    "Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 16x16, Model hash: 1234abcd, "
    "Model: tiny-sd1, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: {upscaler}, "
    "Version: v1.10.1"
)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_generate_from_an_a1111_hires_image(model, tmp_path, capsys, upscaler):
    png = _png_with(tmp_path / "a1111.png", A1111_HIRES.format(upscaler=upscaler), size=32)
    out = tmp_path / "hires.png"
    code, _, err = run(["generate", "--from", png, "--model", model, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert Image.open(out).size == (32, 32)
    fields = parse_parameters(read_parameters(out))
    assert {k: fields[k] for k in ("Size", "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler")} == {
        "Size": "16x16", "Denoising strength": "0.5", "Hires upscale": "2", "Hires steps": "2", "Hires upscaler": upscaler}
    again = tmp_path / "again.png"
    assert run(["generate", "--from", out, "--model", model, "--out", again, "--quiet"], capsys)[0] == 0
    assert np.array_equal(pixels(again), pixels(out))
    # the same hires fix from the command line
    same = tmp_path / "same.png"
    run(["generate", "a red circle", "--negative", "blurry", "--model", model, "--steps", 2, "--sampler", "Euler a",
         "--seed", 5, "--hires-upscale", 2, "--hires-steps", 2, "--hires-upscaler", upscaler, "--strength", 0.5,
         "--out", same, "--quiet"], capsys)
    assert np.array_equal(pixels(same), pixels(out))


def test_an_upscaler_model_is_one_line_naming_it(model, tmp_path, capsys):
    png = _png_with(tmp_path / "esrgan.png", A1111_HIRES.format(upscaler="R-ESRGAN 4x+"))
    code, out, err = run(["generate", "--from", png, "--model", model, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and err.count("\n") == 1 and "'R-ESRGAN 4x+' is not supported" in err and out == ""
    code, _, _ = run(["generate", "--from", png, "--model", model, "--hires-upscaler", "Lanczos",
                      "--out", tmp_path / "x.png", "--quiet"], capsys)
    assert code == 0  # another upscaler given on the command line replaces it


def _unwritable(tmp_path, kind):
    if kind == "read-only file system":
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs Linux /proc")
        return "/proc/atelier-test-out"
    if kind == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "sub"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker / "sub"


@pytest.mark.parametrize("kind", ["read-only file system", "read-only folder", "under a file"])
@pytest.mark.parametrize("option", ["--outdir", "--out"])
def test_unwritable_outputs_fail_in_one_line_before_any_work(kind, option, tmp_path, capsys):
    target = _unwritable(tmp_path, kind)
    if option == "--out":
        target = f"{target}/x.png"
    # the model does not exist: an output checked before loading is the error reported
    code, out, err = run(["generate", "x", "--model", tmp_path / "no-model", option, target], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"atelier: error: {option}"), err
    assert "no-model" not in err and out == ""


def test_out_naming_an_existing_folder(model, tmp_path, capsys):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for argv in (["generate", "x", "--model", model, "--out", folder], ["generate", "x", "--out", tmp_path],
                 ["toyworld", "render", "--out", tmp_path], ["toyworld", "render", "--out", "/proc/x.png"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("atelier: error: "), (argv, err)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, _, err = run(["toyworld", "edits", "--n", 1, "--outdir", blocker], capsys)
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err


def test_generated_png_follows_the_umask(model, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, _ = run(["generate", "x", "--model", model, "--steps", 1, "--quiet", "--out", tmp_path / "a.png"], capsys)
    finally:
        os.umask(old)
    assert code == 0 and (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


def test_quiet_silences_library_warnings_but_not_errors(model, tmp_path, capsys):
    import warnings

    # DPM++ SDE on a Karras schedule makes torchsde warn about its Brownian interval
    argv = ["generate", "x", "--model", model, "--steps", 3, "--sampler", "DPM++ SDE", "--schedule", "karras"]
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        assert run([*argv, "--out", tmp_path / "a.png"], capsys)[0] == 0
    assert any("torchsde" in w.filename for w in loud)  # without --quiet the warning shows
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        code, out, err = run([*argv, "--quiet", "--out", tmp_path / "b.png"], capsys)
    assert code == 0 and quiet == [] and err == ""
    code, _, err = run([*argv, "--quiet", "--cfg", "nan", "--out", tmp_path / "c.png"], capsys)
    assert code == 2 and err.startswith("atelier: error: ")


def test_quiet_in_a_real_process_prints_nothing_on_stderr(model, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="info", TRANSFORMERS_VERBOSITY="info")
    proc = subprocess.run([sys.executable, "-m", "atelier.cli", "generate", "x", "--model", model, "--steps", "3",
                           "--sampler", "DPM++ SDE", "--schedule", "karras", "--quiet", "--out", "a.png"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.strip() == "a.png"


def test_a_broken_import_in_a_command_module_fails_loudly(tmp_path, monkeypatch):
    import atelier.cli

    (tmp_path / "broken_command.py").write_text("import atelier.no_such_module\n\ndef register(sub):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(atelier.cli, "COMMAND_MODULES", [*atelier.cli.COMMAND_MODULES, "broken_command"])
    with pytest.raises(ModuleNotFoundError, match="atelier.no_such_module"):
        atelier.cli.build_parser()


def test_the_toy_world_contract_is_inside_the_repository():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "toyworld.md").is_file()
    for doc in [root / "README.md", *(root / "docs").glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        assert "shared/toyworld.md" not in text, doc
        for target in re.findall(r"\]\(([^)#]*toyworld[^)#]*\.md)", text):
            assert (doc.parent / target).is_file(), (doc, target)


def _commands(parser, prefix=()):
    """Every (sub)command path of the parser, the top level included."""
    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_every_help_shows_real_defaults_only(capsys):
    """No "(default: None)" anywhere: an option without a default says nothing, or says in words what
    happens without it."""
    from atelier.cli import build_parser

    for command in _commands(build_parser()):
        with pytest.raises(SystemExit):
            main(command + ["--help"])
        out = capsys.readouterr().out
        assert "(default: None)" not in " ".join(out.split()), command
