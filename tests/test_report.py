"""`atelier evaluate report`: a toy MJHQ run scored overall and per category, offline, end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from atelier.bench import read_run
from atelier.cli import main
from atelier.evaluate.distribution import files_features, fid, image_files, kid, load_features

PER_CATEGORY = 4


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy MJHQ (10 categories x PER_CATEGORY captions) and a 1-step toyworld-turbo run of it."""
    root = tmp_path_factory.mktemp("report")
    assert main(["toyworld", "mjhq", "--out", str(root / "mjhq"), "--per-category", str(PER_CATEGORY)]) == 0
    assert main(["bench", "generate", "--prompts", str(root / "mjhq" / "meta_data.json"), "--outdir",
                 str(root / "run"), "--model", "toyworld-turbo", "--quiet"]) == 0
    return root


def _report(args, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "report", *args, "--features", "toyworld", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_report_overall_and_per_category(toy_run, capsys):
    run, ref = toy_run / "run", toy_run / "mjhq" / "mjhq30k_imgs"
    result = _report([str(run), "--ref", str(ref)], capsys)
    categories = sorted(p.name for p in ref.iterdir())
    assert len(categories) == 10 and sorted(result["categories"]) == categories
    overall = result["overall"]
    assert overall["images"] == overall["reference_images"] == 10 * PER_CATEGORY
    for summary in result["categories"].values():
        assert summary["images"] == PER_CATEGORY and {"fid", "kid", "clip_score"} <= summary.keys()
    # the numbers are distribution.fid/kid on the run's and the reference's features
    extractor = load_features("toyworld")
    gen = files_features([i.path for i in read_run(run).images], extractor)
    reference = files_features(image_files(ref), extractor)
    assert overall["fid"] == pytest.approx(fid(gen, reference), rel=1e-9)
    assert overall["kid"] == pytest.approx(kid(gen, reference), rel=1e-9)
    # a faithful model's images match their captions under the toy CLIP
    assert overall["clip_score"] > 50
    # the files: JSON as printed, an HTML page naming every category, a grid each, the plots
    out = run / "report"
    assert json.loads((out / "report.json").read_text())["overall"] == overall
    page = (out / "report.html").read_text()
    assert all(c in page for c in categories)
    assert len(list(out.glob("grid_*.png"))) == 10
    for plot in ("fid_by_category.png", "clip_by_category.png"):
        assert Image.open(out / plot).size[0] > 100


def test_a_broken_run_scores_worse(toy_run, tmp_path, capsys):
    """FID, KID and CLIP score all move the right way when the images are replaced by noise."""
    ref = toy_run / "mjhq" / "mjhq30k_imgs"
    good = _report([str(toy_run / "run"), "--ref", str(ref), "--out", str(tmp_path / "good")], capsys)["overall"]
    broken = tmp_path / "broken"
    shutil.copytree(toy_run / "run", broken)
    rng = np.random.default_rng(0)
    for item in read_run(broken).images:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(item.path)
    bad = _report([str(broken), "--ref", str(ref)], capsys)["overall"]
    assert bad["fid"] > 2 * good["fid"] and bad["kid"] > good["kid"] and bad["clip_score"] < good["clip_score"]


def test_flat_reference_and_saved_statistics(toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "cache"))
    run = toy_run / "run"
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in image_files(toy_run / "mjhq" / "mjhq30k_imgs"):
        shutil.copy(path, flat / path.name)
    by_folder = _report([str(run), "--ref", str(flat), "--out", str(tmp_path / "a")], capsys)
    # a flat reference has no categories: overall scores, and only the CLIP score per category
    assert "fid" in by_folder["overall"]
    assert all("fid" not in s and "clip_score" in s for s in by_folder["categories"].values())
    assert main(["evaluate", "ref-stats", "toy", str(flat), "--features", "toyworld"]) == 0
    by_stats = _report([str(run), "--ref-stats", "toy", "--out", str(tmp_path / "b")], capsys)
    assert by_stats["overall"]["fid"] == pytest.approx(by_folder["overall"]["fid"], rel=1e-9)
    assert by_stats["overall"]["kid"] == pytest.approx(by_folder["overall"]["kid"], rel=1e-9)


@pytest.mark.parametrize("args, problem", [
    (["RUN"], "give --ref DIR or --ref-stats NAME"),
    (["RUN", "--ref", "REF", "--ref-stats", "x"], "give --ref DIR or --ref-stats NAME"),
    (["MISSING", "--ref", "REF"], "MISSING"),
    (["RUN", "--ref", "MISSING"], "MISSING"),
    (["RUN", "--ref", "REF", "--features", "pixels"], "unknown features"),
])
def test_report_user_errors_are_one_line(toy_run, capsys, args, problem):
    names = {"RUN": str(toy_run / "run"), "REF": str(toy_run / "mjhq" / "mjhq30k_imgs"),
             "MISSING": str(toy_run / "no-such-folder")}
    args = [names.get(a, a) for a in args]
    capsys.readouterr()
    assert main(["evaluate", "report", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem.replace("MISSING", "no-such-folder") in err[0]
