"""atelier.bench: prompt sets, sharded and resumable generation runs (also across processes under
`accelerate launch` and after kill -9), `read_run`, and the toy MJHQ of `atelier toyworld mjhq`.

Runs use the built-in `toyworld` model on the CPU with 1-4 steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from atelier.bench import PromptItem, read_prompts, read_run, run_generation, shard, work_units
from atelier.bench.prompts import prompt_format
from atelier.cli import main
from atelier.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = "1"

PROMPTS = [
    "a large red circle in the center",
    "a small blue square at the top left",
    "a large green triangle on the right and a small yellow diamond at the bottom",
    "a small purple circle at the top",
    "a large orange square at the bottom left",
]


@pytest.fixture(scope="module")
def pipe():
    from atelier.models import load_pipeline

    return load_pipeline("toyworld", device="cpu")


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def _units(outdir) -> set[str]:
    return {p.name for p in (Path(outdir) / "images").iterdir()}


def _decodes(path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "atelier.cli", *args]


# ---------------------------------------------------------------------------------------------
# prompt sets


def test_reads_mjhq_meta_data(tmp_path):
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps({"f0a1": {"category": "people", "prompt": "a portrait"},
                                "0b2c": {"category": "animals", "prompt": "a cat"}}), encoding="utf-8")
    assert read_prompts(path) == [PromptItem("f0a1", "a portrait", "people"), PromptItem("0b2c", "a cat", "animals")]
    assert read_prompts(tmp_path) == read_prompts(path)  # the folder names its meta_data.json


def test_reads_plain_lines_with_line_numbers_as_ids(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n\n", encoding="utf-8")
    assert read_prompts(path) == [PromptItem("00001", "a cat"), PromptItem("00003", "a dog")]


def test_reads_partiprompts_tsv(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text('Prompt\tCategory\tChallenge\tNote\n'
                    'a "quoted" bird\tAnimals\tSimple Detail\t\n'
                    'a tall building\tArchitecture\tBasic\tnote\n', encoding="utf-8")
    assert read_prompts(path) == [PromptItem("00001", 'a "quoted" bird', "Animals"),
                                  PromptItem("00002", "a tall building", "Architecture")]


def test_format_by_content_without_a_known_extension(tmp_path):
    for name, text, kind in [("a.data", '{"x": {"prompt": "p", "category": "c"}}', "mjhq"),
                             ("b.data", "Prompt\tCategory\np\tc\n", "tsv"),
                             ("c.data", "p one\np two\n", "lines")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert prompt_format(tmp_path / name) == kind
    assert read_prompts(tmp_path / "b.data") == [PromptItem("00001", "p", "c")]


@pytest.mark.parametrize("name, text, problem", [
    ("meta_data.json", '{"a": {"prompt": "x"', "not valid JSON"),
    ("meta_data.json", '["a", "b"]', "expected a JSON object"),
    ("meta_data.json", '{"a": {"category": "c"}}', "entry 'a' has no \"prompt\""),
    ("meta_data.json", '{"../x": {"prompt": "p"}}', "cannot be a file name"),
    ("parti.tsv", "Text\tCategory\nx\ty\n", "no Prompt column"),
    ("parti.tsv", "Category\tPrompt\nonly one\n", "line 2 has 1 column"),
    ("p.txt", "\n\n", "has no prompts"),
])
def test_malformed_prompt_sets_are_one_line_errors(tmp_path, capsys, name, text, problem):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=problem) as info:
        read_prompts(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert main(["bench", "generate", "--prompts", str(path), "--outdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and str(path) in err[0]


def test_missing_prompts_file_is_an_error(tmp_path, capsys):
    assert main(["bench", "generate", "--prompts", str(tmp_path / "nope.txt"), "--outdir", str(tmp_path)]) == 2
    assert "prompts file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# sharding, runs, read_run


@pytest.mark.parametrize("n, world", [(0, 3), (1, 2), (7, 1), (7, 3), (12, 5), (30, 8)])
def test_shards_partition_the_units(n, world):
    units = work_units([f"p{i}" for i in range(n)], 1, 0)
    shards = [shard(units, r, world) for r in range(world)]
    assert sorted((u for s in shards for u in s), key=units.index) == units
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_processes_run_by_rank_make_the_run_together(pipe, tmp_path):
    items = [PromptItem(f"{i:03d}", p, "toy") for i, p in enumerate(PROMPTS[:3])]
    kwargs = dict(model="toyworld", images_per_prompt=2, seed=7, steps=1, progress=False)
    first = run_generation(items, tmp_path, pipe, state=(0, 2), **kwargs)
    assert first.written == 3 and len(_units(tmp_path)) == 3
    assert not read_run(tmp_path).complete
    second = run_generation(items, tmp_path, pipe, state=(1, 2), **kwargs)
    assert second.written == 3
    run = read_run(tmp_path)
    assert run.complete and [(i.id, i.seed) for i in run.images] == [(u.id, u.seed) for u in work_units(["000", "001", "002"], 2, 7)]
    assert all(i.category == "toy" and i.prompt == PROMPTS[int(i.id)] for i in run.images)
    from atelier.generate import parse_parameters, read_parameters

    fields = parse_parameters(read_parameters(run.images[1].path))
    assert fields["Prompt"] == PROMPTS[0] and fields["Seed"] == "8" and fields["Steps"] == "1"
    again = run_generation(items, tmp_path, pipe, state=(0, 1), **kwargs)  # one process resumes: nothing to do
    assert (again.written, again.skipped) == (0, 6)


def test_a_failing_prompt_is_counted_and_left_for_the_next_run(pipe, tmp_path, monkeypatch, capsys):
    import atelier.generate.run as generation

    real = generation.generate
    items = [PromptItem(f"{i}", p) for i, p in enumerate(PROMPTS[:3])]
    kwargs = dict(model="toyworld", images_per_prompt=2, steps=1, batch_size=2, progress=False)

    def flaky(pipe, request, **kw):
        if PROMPTS[1] in request.prompts():
            raise RuntimeError("out of memory")
        return real(pipe, request, **kw)

    monkeypatch.setattr(generation, "generate", flaky)
    summary = run_generation(items, tmp_path, pipe, **kwargs)
    assert (summary.written, summary.failed) == (4, 2)
    assert summary.failures == [{"id": "1", "seed": s, "error": "out of memory"} for s in (0, 1)]
    assert "1 seeds 0-1 failed: out of memory" in capsys.readouterr().err
    assert read_run(tmp_path).missing == [("1", 0), ("1", 1)]
    monkeypatch.setattr(generation, "generate", real)
    again = run_generation(items, tmp_path, pipe, **kwargs)
    assert (again.written, again.skipped, again.failed) == (2, 4, 0) and read_run(tmp_path).complete


def test_a_run_whose_first_calls_all_fail_stops(pipe, tmp_path, monkeypatch):
    import atelier.generate.run as generation

    calls = []

    def broken(pipe, request, **kw):
        calls.append(request.prompt)
        raise RuntimeError("broken driver")

    monkeypatch.setattr(generation, "generate", broken)
    items = [PromptItem(f"{i}", p) for i, p in enumerate(PROMPTS)]
    with pytest.raises(RuntimeError, match="broken driver"):
        run_generation(items, tmp_path, pipe, model="toyworld", steps=1, batch_size=1, progress=False)
    assert len(calls) == 3


@pytest.mark.parametrize("n_prompts, per_prompt", [(6, 1), (3, 2)])
def test_a_call_batches_images_of_different_prompts_without_changing_them(pipe, tmp_path, monkeypatch,
                                                                           n_prompts, per_prompt):
    import numpy as np

    import atelier.generate.run as generation
    from atelier.generate import parse_parameters, read_parameters

    texts = [*PROMPTS, "a small red triangle at the bottom right"]
    items = [PromptItem(f"{i}", texts[i]) for i in range(n_prompts)]
    real, calls = generation._run_chunk, []

    def counted(pipeline, request, prompts, negatives, seeds, *args, **kw):
        calls.append(list(zip(prompts, seeds)))
        return real(pipeline, request, prompts, negatives, seeds, *args, **kw)

    monkeypatch.setattr(generation, "_run_chunk", counted)
    kwargs = dict(model="toyworld", images_per_prompt=per_prompt, seed=11, steps=2, progress=False)
    assert run_generation(items, tmp_path / "one", pipe, batch_size=1, **kwargs).written == 6
    assert len(calls) == 6
    calls.clear()
    assert run_generation(items, tmp_path / "four", pipe, batch_size=4, **kwargs).written == 6
    assert [len(c) for c in calls] == [4, 2]  # ceil(6 / 4) calls, the units in order
    assert [pair for c in calls for pair in c] == [(i.prompt, 11 + k) for i in items for k in range(per_prompt)]
    batched, alone = read_run(tmp_path / "four"), read_run(tmp_path / "one")
    assert batched.complete and [(i.id, i.seed) for i in batched.images] == [(i.id, i.seed) for i in alone.images]
    for a, b in zip(batched.images, alone.images):
        with Image.open(a.path) as x, Image.open(b.path) as y:
            pixels_a, pixels_b = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
        assert np.abs(pixels_a - pixels_b).max() <= 1  # batched matmuls may round differently
        fields = parse_parameters(read_parameters(a.path))
        assert (fields["Prompt"], fields["Seed"]) == (a.prompt, str(a.seed)) and "Template" not in fields
        assert read_parameters(a.path) == read_parameters(b.path)


def test_two_processes_under_accelerate_write_every_image_once(tmp_path, prompts_file):
    outdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "atelier.cli", "bench", "generate", "--prompts", str(prompts_file), "--outdir", str(outdir),
           "--images-per-prompt", "2", "--steps", STEPS, "--device", "cpu", "--quiet", "--json"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])  # printed by rank 0 only
    assert (summary["written"], summary["processes"]) == (10, 2)
    units = work_units([f"{n:05d}" for n in range(1, 6)], 2, 0)
    records = [json.loads(line) for log in (outdir / "logs").glob("rank*.jsonl") for line in log.read_text().splitlines()]
    written = [(r["id"], r["seed"]) for r in records]
    assert sorted(written) == sorted((u.id, u.seed) for u in units)  # each unit exactly once
    for rank in (0, 1):  # by the process its shard names
        assert {(r["id"], r["seed"]) for r in records if r["rank"] == rank} == {(u.id, u.seed) for u in shard(units, rank, 2)}
    assert _units(outdir) == {u.file for u in units}
    assert all(_decodes(p) for p in (outdir / "images").iterdir())


def test_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path, prompts_file):
    args = ["bench", "generate", "--prompts", str(prompts_file), "--images-per-prompt", "6", "--steps", "4",
            "--batch-size", "1", "--device", "cpu", "--quiet"]
    reference = tmp_path / "reference"
    assert main([*args, "--outdir", str(reference)]) == 0
    expected = _units(reference)
    assert len(expected) == 30

    outdir = tmp_path / "run"
    proc = subprocess.Popen(_cli(*args, "--outdir", str(outdir)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    images = outdir / "images"
    while time.monotonic() < deadline and proc.poll() is None:
        if images.is_dir() and len(list(images.glob("*.png"))) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png") if _decodes(p)}
    assert 4 <= len(done) < 30
    # what a crash can leave besides: a truncated PNG for a unit not yet made and stray temporaries
    missing = sorted(expected - set(done))[0]
    data = (reference / "images" / missing).read_bytes()
    (images / missing).write_bytes(data[: len(data) // 2])
    assert not _decodes(images / missing)
    (images / f".{missing}.k3x9_q.tmp").write_bytes(b"half")
    (images / "leftover.tmp").write_bytes(b"")
    time.sleep(0.05)  # a rewrite would show in the mtimes

    resumed = subprocess.run(_cli(*args, "--outdir", str(outdir), "--json"), env=ENV, capture_output=True,
                             text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] == len(done) and summary["written"] == 30 - len(done) and summary["failed"] == 0
    assert _units(outdir) == expected  # no temporaries left, nothing more, nothing less
    assert all(_decodes(p) for p in images.iterdir())
    assert {name: (images / name).stat().st_mtime_ns for name in done} == done  # finished ones kept
    for name in expected:  # and the resumed run makes the same pictures as the uninterrupted one
        with Image.open(images / name) as a, Image.open(reference / "images" / name) as b:
            assert a.tobytes() == b.tobytes() and a.text["parameters"] == b.text["parameters"]


def test_resume_with_other_settings_is_refused(tmp_path, prompts_file, capsys):
    args = ["bench", "generate", "--prompts", str(prompts_file), "--outdir", str(tmp_path / "run"),
            "--steps", STEPS, "--limit", "2", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").iterdir()}
    capsys.readouterr()
    for change in (["--steps", "2"], ["--seed", "5"], ["--cfg-scale", "5"], ["--limit", "3"]):
        assert main([*args, *change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and "--overwrite" in err[0], err
    assert main([*args, "--steps", "2", "--quiet"]) == 2
    assert "steps 1 -> 2" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").iterdir()} == before
    (tmp_path / "run" / "logs" / "rank5.jsonl").write_text('{"id": "00001", "seed": 0, "rank": 5}\n')
    assert main([*args, "--steps", "2", "--overwrite"]) == 0  # starts again with the new settings
    logs = {p.name: p.read_text().splitlines() for p in (tmp_path / "run" / "logs").iterdir()}
    assert list(logs) == ["rank0.jsonl"] and len(logs["rank0.jsonl"]) == 2  # the old run's records are gone
    run = read_run(tmp_path / "run")
    assert run.complete and run.manifest["parameters"]["steps"] == 2
    from atelier.generate import parse_parameters, read_parameters

    assert all(parse_parameters(read_parameters(i.path))["Steps"] == "2" for i in run.images)


# ---------------------------------------------------------------------------------------------
# the toy MJHQ


def test_toy_mjhq_layout_and_determinism(tmp_path):
    from atelier.toyworld.judge import judge
    from atelier.toyworld.mjhq import CATEGORIES, category_of
    from atelier.toyworld.scene import parse_caption

    assert main(["toyworld", "mjhq", "--out", str(tmp_path / "a"), "--per-category", "2", "--seed", "3"]) == 0
    assert main(["toyworld", "mjhq", "--out", str(tmp_path / "b"), "--per-category", "2", "--seed", "3"]) == 0
    assert main(["toyworld", "mjhq", "--out", str(tmp_path / "c"), "--per-category", "2", "--seed", "4"]) == 0
    meta = json.loads((tmp_path / "a" / "meta_data.json").read_text())
    assert len(CATEGORIES) == 10 and len(meta) == 20
    assert sorted(p.name for p in (tmp_path / "a" / "mjhq30k_imgs").iterdir()) == sorted(CATEGORIES)
    for entry_id, entry in meta.items():
        assert set(entry) == {"category", "prompt"}
        assert category_of(parse_caption(entry["prompt"])) == entry["category"]
        image = tmp_path / "a" / "mjhq30k_imgs" / entry["category"] / f"{entry_id}.png"
        import numpy as np

        assert judge(np.asarray(Image.open(image).convert("RGB")), entry["prompt"]).match
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 21
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert json.loads((tmp_path / "c" / "meta_data.json").read_text()) != meta


def test_read_run_of_a_toy_mjhq_run_gives_every_image_its_category(pipe, tmp_path):
    from atelier.toyworld.mjhq import write_toy_mjhq

    meta = json.loads(write_toy_mjhq(tmp_path / "mjhq", 1, seed=1).read_text())
    summary = run_generation(read_prompts(tmp_path / "mjhq"), tmp_path / "run", pipe, model="toyworld",
                             images_per_prompt=2, seed=0, steps=1, progress=False)
    assert summary.written == 20 and summary.failed == 0
    run = read_run(tmp_path / "run")
    assert run.complete and len(run.images) == 20
    assert {(i.id, i.seed) for i in run.images} == {(k, s) for k in meta for s in (0, 1)}
    for image in run.images:
        assert image.category == meta[image.id]["category"] and image.prompt == meta[image.id]["prompt"]
        assert image.path == tmp_path / "run" / "images" / f"{image.id}_{image.seed}.png" and image.path.is_file()
    assert run.manifest["images_per_prompt"] == 2 and run.manifest["model"] == "toyworld"
    with pytest.raises(UserError, match="not a bench run"):
        read_run(tmp_path / "mjhq")
