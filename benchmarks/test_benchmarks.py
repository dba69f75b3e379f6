"""The benchmark scripts' own machinery: RESULTS.md sections and commands, what the edit timing
includes, and the LEDITS++ baseline's reconstruction. Run: pytest benchmarks/test_benchmarks.py"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import _results
from _results import REPO, command_line, replace_section, section_text, write_section

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_command_line_is_relative_to_the_repository_and_keeps_the_measured_environment():
    script = REPO / "benchmarks" / "samplers.py"
    argv = ["--results", str(REPO / "benchmarks" / "RESULTS.md"), f"--out={REPO / 'runs' / 'x y'}", "--repeats", "2"]
    environ = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "HOME": "/root"}
    command = command_line(str(script), argv, environ)
    assert command == ("OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/samplers.py --results benchmarks/RESULTS.md "
                       "'--out=runs/x y' --repeats 2")
    assert str(REPO) not in command


def test_command_line_refuses_paths_outside_the_repository(tmp_path):
    with pytest.raises(ValueError, match="outside the repository"):
        command_line(str(REPO / "benchmarks" / "edits.py"), ["--results", str(tmp_path / "RESULTS.md")], {})
    with pytest.raises(SystemExit, match="edits.py: error: .*outside the repository"):
        _results.check_command(str(REPO / "benchmarks" / "edits.py"), ["--results", str(tmp_path / "RESULTS.md")])


def test_a_section_is_replaced_in_place_and_the_others_are_kept():
    text = "# Benchmark results\n\nintro\n\n" + section_text("a", "A", "old a", "python a.py") + "\n" + \
        section_text("b", "B", "b body", "python b.py", "notes of b")
    out = replace_section(text, "a", section_text("a", "A", "new a\n## not a heading of ours", "python a.py --x"))
    assert out.index("new a") < out.index("b body")
    assert "old a" not in out and "notes of b" in out and "python a.py --x" in out
    assert replace_section(out, "a", section_text("a", "A", "newer", "python a.py")).count("<!-- begin a -->") == 1
    appended = replace_section(out, "c", section_text("c", "C", "c body", "python c.py"))
    assert appended.startswith(out.rstrip("\n")) and appended.rstrip().endswith("<!-- end c -->")


def test_write_section_writes_atomically(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    write_section(path, "a", "A", "table", "python a.py")
    before = path.read_text()

    def broken_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_results.atomic_open.__globals__["os"], "replace", broken_replace)
    with pytest.raises(OSError):
        write_section(path, "a", "A", "other table", "python a.py")
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]


def test_edit_time_is_the_edit_call_alone(monkeypatch):
    import edits

    def slow_judge(case, result, image):
        time.sleep(0.05)
        return result

    monkeypatch.setattr(edits, "score_edit", slow_judge)
    calls = []
    scores, seconds = edits.evaluate_method(lambda case, image, seed: calls.append(seed) or seed, ["c"] * 4, ["i"] * 4)
    assert scores == [0, 1, 2, 3]
    assert calls == [0, 0, 1, 2, 3]  # one untimed warm-up
    assert seconds < 0.01



def run_partial(monkeypatch, argv) -> list[tuple]:
    """edits.py's output and the RESULTS.md sections it would write, without touching RESULTS.md."""
    import edits

    sections = []
    monkeypatch.setattr(edits, "write_section", lambda *args: sections.append(args))
    monkeypatch.setattr(edits.torch, "set_num_threads", lambda n: None)
    assert edits.main(["--threads", "1", "--results", str(REPO / "benchmarks" / "RESULTS.md"), *argv]) == 0
    return sections


def test_partial_cases_give_every_method_only_the_captions_a_user_writes(monkeypatch):
    import edits
    from atelier.toyworld import parse_caption, render

    captions = []

    def perfect(case, image, seed):
        captions.append((case.source_caption, case.target_caption))
        return render(case.target)

    def draws_the_target_caption(case, image, seed):  # img2img's failure: the unmentioned objects are gone
        return render(parse_caption(case.target_caption))

    monkeypatch.setattr(edits, "load_pipeline", lambda model: None)
    monkeypatch.setattr(edits, "Editor", lambda pipe: None)
    monkeypatch.setattr(edits, "methods_for", lambda model, pipe, editor: {
        "perfect": perfect, "draws the target caption": draws_the_target_caption})
    [(path, key, title, table, command, notes)] = run_partial(monkeypatch, ["--partial", "3", "--models", "toyworld"])
    assert key == "partial-edits-toyworld" and command.endswith("--partial 3 --models toyworld")
    assert all(len(parse_caption(c).objects) == 1 for pair in captions for c in pair)
    rows = {line[16:50].strip(): line.split() for line in table.splitlines() if line.startswith("toyworld ")}
    assert rows["perfect"][-3:] == ["100%"] * 3 and "100.0%" in rows["perfect"]
    assert rows["draws the target caption"][-3:] == ["0%"] * 3
    assert table.splitlines()[2].split()[-3:] == ["color", "shape", "size"]


@pytest.mark.slow
def test_partial_run_of_the_one_step_method(monkeypatch):
    [(path, key, title, table, command, notes)] = run_partial(
        monkeypatch, ["--partial", "3", "--models", "toyworld-turbo", "--only", "one-step"])
    assert key == "partial-edits-toyworld-turbo"
    rows = [line for line in table.splitlines() if line.startswith("toyworld-turbo ")]
    assert [line[16:52].strip() for line in rows] == ["one-step (inverter)", "one-step (inverter, image branch)"]
    assert all(len(line[52:].split()) == 8 for line in rows)


def test_real_size_speed_counts_each_methods_unet_work(monkeypatch):
    """The real-size speed part on a tiny turbo architecture: every method a row, and the UNet work the
    methods are made of (one-step: the inverter on source and target prompt, then one generator call;
    turbo: 4 inversion steps, 4 mask samples on a batch of 2, 4 edit steps; ddpm: guided, each step on a batch of 2)."""
    import _real_size
    import edits
    from atelier.models.loader import _record
    from atelier.testing.tiny import tiny_pipeline

    monkeypatch.setattr(_real_size, "random_pipeline", lambda name: _record(tiny_pipeline("turbo"), name, None))
    [(path, key, title, table, command, notes)] = run_partial(
        monkeypatch, ["--speed", "2", "--real-size", "sd-turbo", "--size", "64"])
    assert key == "edit-speed-sd-turbo" and command.endswith("--speed 2 --real-size sd-turbo --size 64")
    rows = {line[:34].strip(): line[34:].split() for line in table.splitlines()[4:7]}
    assert list(rows) == ["ddpm (25 steps x 0.8, CFG 7.5)", "turbo (4 steps, noise mask)", "one-step (inverter)"]
    assert rows["one-step (inverter)"][1] == "1.0" and float(rows["turbo (4 steps, noise mask)"][1]) > 1
    assert rows["one-step (inverter)"][2] == "3" and rows["turbo (4 steps, noise mask)"][2] == "16"
    assert rows["ddpm (25 steps x 0.8, CFG 7.5)"][2] == str(20 * 2 + 4 * 2 + 20 * 2)


@pytest.mark.parametrize("argv, words", [
    (["--real-size", "sd-turbo"], "--real-size goes with --speed N"),
    (["--one-step-ablation", "2", "--real-size", "sd-turbo"], "--real-size goes with --speed N"),
    (["--speed", "2", "--real-size", "sd3"], "no bundled config 'sd3'; choose from"),
    (["--speed", "2", "--real-size", "sd-turbo", "--size", "100"], "--size takes a positive multiple of 8"),
])
def test_real_size_refusals_are_one_line(argv, words, capsys):
    import edits

    with pytest.raises(SystemExit) as exc:
        edits.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and words in err and "Traceback" not in err


@pytest.mark.slow
def test_one_step_ablation_runs_every_change_on_both_case_sets(monkeypatch):
    import edits

    [(path, key, title, table, command, notes)] = run_partial(monkeypatch, ["--one-step-ablation", "2", "--partial", "2"])
    assert key == "one-step-ablation" and command.endswith("--one-step-ablation 2 --partial 2")
    rows = table.splitlines()[4:]
    assert [row[:54].strip() for row in rows] == list(edits.ONE_STEP_STEPS)
    assert all(len(row[54:].split()) == 4 for row in rows)  # success and preserved, full and partial

@pytest.mark.slow
def test_leditspp_baseline_reconstructs_the_source_with_the_edit_off():
    import edits
    from atelier.models import load_pipeline
    from atelier.toyworld import edit_cases, render_pil
    from atelier.toyworld.edits import psnr

    run = edits.leditspp_runner(load_pipeline("toyworld"))
    for i, case in enumerate(edit_cases(2, seed=edits.CASE_SEED)):
        image = render_pil(case.source)
        # measured: ~40 dB (the VAE round trip is ~41); inverted under the source caption: ~23 dB
        assert psnr(np.asarray(image), np.asarray(run(case, image, i, edit=False))) > 33


def test_results_file_has_only_script_sections_with_repository_relative_commands():
    text = (Path(__file__).parent / "RESULTS.md").read_text()
    for machine_path in ("/work", "/tmp", "/root", "/home"):
        assert machine_path not in text
    sections = text.split("<!-- begin ")[1:]
    assert len(sections) == text.count("\n## ")
    for section in sections:
        key = section.split(" -->", 1)[0]
        assert f"<!-- end {key} -->" in section, key
        command = section.split("Command (repository root):\n\n    ", 1)[1].split("\n", 1)[0]
        assert " python benchmarks/" in f" {command}", (key, command)


def test_stream_reference_benchmark_refuses_in_one_line_without_an_adapter_and_runs_small(tmp_path, capsys):
    import stream
    from atelier.models import load_pipeline
    from atelier.testing.ip_adapters import write_adapter_folder

    with pytest.raises(SystemExit) as exc:
        stream.main(["--reference", "1", "--threads", "1", "--ip-adapter", str(tmp_path / "missing")])
    message = str(exc.value)
    assert message.startswith("stream.py: error: --reference needs an IP-Adapter for toyworld-turbo") and "\n" not in message

    folder = write_adapter_folder(tmp_path / "toy-ip", load_pipeline("toyworld-turbo").unet)  # random weights
    argv = ["--reference", "2", "--case-frames", "2", "--ip-scales", "1", "--ip-adapter", str(folder), "--threads", "1"]
    assert stream.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    by_mode = {" ".join(r[:2]) if r[0] != "none" else "none": r for r in rows if r and r[0] in ("none", "source", "input")}
    assert set(by_mode) == {"none", "source frame", "input frame"}
    assert by_mode["none"][1] == "0.00" and by_mode["input frame"][2] == "1.00"
    assert all(row[-2] == "-" for row in by_mode.values())  # no LPIPS weights given: PSNR only


def test_image_prompts_benchmark_runs_small_and_judges(capsys):
    import image_prompts

    assert image_prompts.main(["--models", "toyworld-turbo", "--per-count", "1", "--pairs", "1"]) == 0
    out = capsys.readouterr().out
    assert "variation (empty prompt, reference only): 1 obj" in out and "text's scene found" in out
    assert image_prompts.monotonic([1.0, 0.5, 0.5, 0.0], rising=False) and not image_prompts.monotonic([0, 1, 0], True)


def test_inverter_ablation_runs_small(capsys):
    import inverter_ablation

    assert inverter_ablation.parse_variant("b=runs/x/final:on") == ("b", "runs/x/final", "on")
    assert inverter_ablation.parse_variant("a=toyworld-inverter") == ("a", "toyworld-inverter", "off")
    assert inverter_ablation.main(["--variant", "shipped=toyworld-inverter:off", "--cases", "2", "--partial", "2"]) == 0
    assert "shipped (off)" in capsys.readouterr().out


def test_evaluate_benchmark_runs_small(capsys):
    """The two loops give identical features, and the toy-FID table has every setting and a verdict."""
    import evaluate

    assert evaluate.main(["--per-count", "1", "--references", "6", "--images", "2", "--size", "96", "--repeats", "1",
                          "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "largest feature difference between the two loops: 0.00e+00" in out
    for setting in ("toyworld (defaults)", "toyworld-turbo 1 step", "toyworld-turbo 2 steps", "toyworld-turbo 4 steps"):
        assert setting in out
    assert "ranking check PASSED" in out or "ranking check FAILED" in out


def test_speed_benchmark_runs_small(capsys):
    """Every configuration of part 1 on the toy UNet is a row with a ratio (none fails on this CPU)."""
    import speed

    assert speed.main(["--archs", "toy", "--repeats", "1", "--skip", "toy,stream,decoder", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("toy ")]
    assert len(table) == 2 + len(speed.unet_configs("toy"))
    assert not any("failed" in line for line in table), out


def test_speed_benchmark_decoder_part_runs_small(capsys):
    """Part 4 on the toy decoder: fp32 eager and the three OpenVINO rows, the 8-bit one close to fp32."""
    import speed

    assert speed.main(["--skip", "unet,toy,stream", "--decoder-archs", "toy", "--calibration", "4", "--repeats", "1",
                       "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy ")]
    assert len(rows) == 4 and "fp32 eager" in rows[0] and "int8 up blocks" in rows[3]
    ratio, seconds, psnr = rows[3].split("int8 up blocks")[1].split()[:3]
    assert float(ratio) > 0 and float(psnr) >= 30  # dB against fp32 eager, on latents outside the calibration


def test_lora_benchmark_runs_small_and_reuses_finished_runs(tmp_path, capsys):
    """Two training steps per run through the CLI, judged on two held-out captions; a second call reuses the runs."""
    import lora

    argv = ["--work", str(tmp_path), "--models", "toyworld-turbo", "--concepts", "ring", "--held-out", "2", "--prior", "2",
            "--steps", "2", "--inversion-steps", "1", "--skip", "composites,ablations,memory", "--threads", "1",
            "--ablation-model", "toyworld-turbo"]
    lora.CLASS_IMAGES = 2
    try:
        assert lora.main(argv) == 0
    finally:
        lora.CLASS_IMAGES = 100
    out = capsys.readouterr().out
    assert "toyworld-turbo  ring" in out and "+ ring LoRA (prior preservation)" in out
    assert "+ ring LoRA (recipe, base-model target x16)" in out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["toyworld-turbo-ring-defaults", "toyworld-turbo-ring-prior-preservation", "toyworld-turbo-ring-recipe",
                    "toyworld-turbo-ring-recipe-base-model-target", "toyworld-turbo-ring-recipe-base-model-target-x16",
                    "toyworld-turbo-ring-recipe-base-model-target-x4"]
    settings = json.loads((tmp_path / "runs" / runs[5] / "settings.json").read_text())["options"]
    assert settings["prior_loss_target"] == "base_model" and settings["prior_loss_weight"] == 4
    assert sorted(p.name for p in (tmp_path / "class-toyworld-turbo").glob("*.txt")) == ["class-00000.txt", "class-00001.txt"]
    stamp = (tmp_path / "runs" / runs[2] / "bench.json").stat().st_mtime_ns  # the concept run (the recipe)
    assert lora.main([*argv, "--skip", "composites,prior,ablations,memory"]) == 0
    assert (tmp_path / "runs" / runs[2] / "bench.json").stat().st_mtime_ns == stamp


def test_lora_benchmark_composites_part_trains_on_the_pasted_images(tmp_path, capsys, monkeypatch):
    import lora

    monkeypatch.setattr(lora, "CLASS_IMAGES", 8)
    assert lora.main(["--work", str(tmp_path), "--concepts", "bar,teal", "--held-out", "2", "--prior", "2", "--steps", "2",
                      "--skip", "concepts,prior,ablations,memory", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "bar      recipe + token warm-up + composites" in out and "teal" not in out
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["toyworld-bar-recipe", "toyworld-bar-recipe-+-composites", "toyworld-bar-recipe-+-token-warm-up-+-composites"]
    data = tmp_path / "data" / "bar-composites-toyworld" / "instance"
    assert len(list(data.glob("*.png"))) == 8 + lora.COMPOSITES
    assert all("sks" in p.read_text() for p in data.glob("composite-*.txt"))
    settings = json.loads((tmp_path / "runs" / runs[2] / "settings.json").read_text())["options"]
    assert settings["ti_warmup_steps"] == 1 and settings["instance_data_dir"] == str(data)


def test_tryon_memory_step_trains_only_self_attention_or_everything():
    import torch

    import _tryon_memory

    tiny = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1}
    threads = torch.get_num_threads()
    try:
        rows = [_tryon_memory.child(mode, ckpt, threads=1, overrides=tiny) for mode in _tryon_memory.MODES for ckpt in (False, True)]
    finally:
        torch.set_num_threads(threads)
    unet = _tryon_memory.sd15_inpainting_unet(tiny)
    attn1 = sum(p.numel() for n, p in unet.named_parameters() if ".attn1." in n)
    assert [r["trainable"] for r in rows] == [attn1, attn1, rows[2]["total_params"], rows[2]["total_params"]]
    assert all(r["unet_input"] == [1, 9, 32, 48] and r["peak_gb"] >= r["weights_gb"] > 0 for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) == 1  # same weights, same batch: the same first loss
    assert len(_tryon_memory.table(rows)) == 6
    with pytest.raises(ValueError):
        _tryon_memory.measure("lora", False)


@pytest.mark.parametrize("variant,flags", [("catvton", []), ("ootd", []), ("catvton-full", ["--trainable", "all"]),
                                           ("ootd-frozen", ["--freeze_garment_unet"])])
def test_tryon_benchmark_trains_with_the_settings_of_the_training_command(tmp_path, variant, flags):
    """The benchmark's run settings are `atelier train tryon`'s with the options the existing runs were made
    with, so train_tryon accepts (and reuses) those runs."""
    from dataclasses import asdict

    import tryon
    from atelier.cli import build_parser
    from atelier.train.tryon import config_from_args

    (tmp_path / "real-data").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(tmp_path / "real-data")  # runs/tryon/data -> the data folder
    method = tryon.VARIANTS[variant][0]
    args = build_parser().parse_args(
        ["train", "tryon", "--method", method, *flags, "--data", str(tmp_path / "real-data"), "--output_dir",
         str(tmp_path / "work" / variant), "--max_train_steps", "1500", "--train_batch_size", "16", "--validation_steps",
         "500", "--checkpointing_steps", "250", "--checkpoints_total_limit", "2", "--threads", "1"])
    bench = tryon.train_config(variant, tmp_path / "work" / "data", tmp_path / "work" / variant, 1500, 1)
    assert asdict(bench) == asdict(config_from_args(args))


def test_tryon_benchmark_runs_small_and_reuses_its_work(tmp_path, monkeypatch, capsys):
    """Data, four two-step runs, every part but memory, its sections in a RESULTS file; a second call draws nothing."""
    import tryon

    monkeypatch.chdir(tmp_path)  # relative paths: the command goes into the RESULTS file
    monkeypatch.setitem(tryon.RUN, "num_validation_images", 1)  # the final validation grid, small
    monkeypatch.setitem(tryon.RUN, "validation_inference_steps", 2)
    argv = ["--work", "work", "--steps", "2", "--train-n", "16", "--test-n", "4", "--cfg-pairs", "2", "--infer-steps", "2",
            "--skip", "memory", "--results", "RESULTS.md"]
    assert tryon.main(argv) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "RESULTS.md").read_text()
    for key in ("tryon-toy", "tryon-cfg", "tryon-ablations"):
        assert f"<!-- begin {key} -->" in text and f"<!-- end {key} -->" in text
    assert "tryon-memory" not in text and str(tmp_path) not in text and str(Path.home()) not in text
    assert "python benchmarks/tryon.py --work work --steps 2" in text
    assert "% of the slots are large" in text and "LPIPS" in text
    for variant in tryon.VARIANTS:
        assert (tmp_path / "work" / variant / "done.json").is_file()
        assert f"\n{variant} " in out
    toy = tmp_path / "work" / "results" / "catvton" / "steps2-g2.5"
    assert len(list((toy / "paired").glob("*__*.png"))) == len(list((toy / "unpaired").glob("*__*.png"))) == 4
    assert len(list((tmp_path / "work" / "results" / "ootd" / "steps2-g3.5" / "paired").glob("*.png"))) == 2  # cfg subset
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.png")}
    assert tryon.main(["--work", "work", "--steps", "2", "--train-n", "16", "--test-n", "4", "--infer-steps", "2",
                       "--only", "toy"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.png")} == stamps
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        tryon.main(["--work", "work", "--only", "toy", "--skip", "cfg"])
    assert exc.value.code == 2 and "--only and --skip exclude each other" in capsys.readouterr().err


def test_tryon_benchmark_memory_table_checks_catvtons_count(monkeypatch):
    import _tryon_memory
    import tryon

    def fake(mode, checkpointing, threads=1, steps=1, timeout=None):
        trainable = 49_574_080 if mode == "attention" else 859_535_364
        return {"mode": mode, "gradient_checkpointing": checkpointing, "trainable": trainable, "total_params": 859_535_364,
                "weights_gb": 4.0, "peak_gb": 5.0 if mode == "attention" else 14.0, "seconds_per_step": 14.2}

    monkeypatch.setattr(_tryon_memory, "measure", fake)
    lines, notes = tryon.memory_lines(1, 1)
    assert len(lines) == 6 and lines[2].split() == ["attention-only", "off", "49.57", "14.2", "4.00", "5.00", "1.00"]
    assert lines[5].split()[:3] == ["full", "on", "859.54"] and lines[5].split()[-1] == "10.00"
    assert "49,574,080 parameters, which matches CatVTON's 49.57 M" in notes


def test_tryon_benchmark_sees_a_run_another_process_trains(tmp_path):
    import subprocess
    import sys

    import tryon

    out = tmp_path / "runs" / "ootd"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train", "tryon", "--output_dir", "runs/ootd"],
                             cwd=tmp_path)
    try:
        deadline = time.time() + 10
        while tryon.training_elsewhere(out) is None and time.time() < deadline:
            time.sleep(0.05)
        assert tryon.training_elsewhere(out) == other.pid
        assert tryon.training_elsewhere(tmp_path / "runs" / "catvton") is None
    finally:
        other.kill()
        other.wait()
    assert tryon.training_elsewhere(out) is None
