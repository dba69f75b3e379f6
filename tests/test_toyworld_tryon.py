"""Try-on cases of the toy world (docs/toyworld.md "Try-on cases", docs/tryon-toyworld.md): the contract's
geometry, the judge on rendered ground truths, the VITON-HD folder layout, and `evaluate_tryon`."""

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.errors import UserError
from atelier.toyworld import render
from atelier.toyworld.render import box_pixels
from atelier.toyworld.scene import BASE_COLOURS, BASE_SHAPES, CELL_CENTRES, CELLS, Scene, ToyObject
from atelier.toyworld.tryon import (CELL_BOX, TryOnCase, cell_mask, make_tryon_case, read_pairs, read_tryon_cases,
                                    score_tryon, score_tryon_folder, tryon_cases, write_tryon_data)


@pytest.fixture(autouse=True)
def no_cached_weights(tmp_path, monkeypatch):
    """No LPIPS backbone is ever found in a cache during these tests."""
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "atelier-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_mask_is_the_slot_cells_21px_box_on_the_cell_centre():
    for cell, (col, row, _) in CELLS.items():
        m = cell_mask(cell)
        assert m.shape == (64, 64) and m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
        ys, xs = np.nonzero(m)
        assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (CELL_BOX, CELL_BOX) == (21, 21)
        assert (xs.min() + xs.max()) / 2 == CELL_CENTRES[col] and (ys.min() + ys.max()) / 2 == CELL_CENTRES[row]
        assert (m == 255).sum() == 21 * 21
        # every object the slot can hold (any size, shape, jitter) lies inside the mask
        for size in ("small", "large"):
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    x0, y0, x1, y1 = box_pixels(ToyObject("square", "red", size, cell, dx, dy))
                    assert m[y0:y1 + 1, x0:x1 + 1].all()


def test_garment_is_a_large_central_product_shot_and_ground_truth_keeps_size_cell_jitter():
    for case in tryon_cases(60, seed=3, paired=False) + tryon_cases(60, seed=3):
        assert 1 <= len(case.person.objects) <= 3 and any(o is case.slot for o in case.person.objects)
        g = case.garment
        assert (g.size, g.cell, g.dx, g.dy) == ("large", "center", 0, 0)
        assert g.shape in BASE_SHAPES and g.colour in BASE_COLOURS
        worn = case.ground_truth.object_in(case.slot.cell)
        assert (worn.shape, worn.colour) == (g.shape, g.colour)
        assert (worn.size, worn.cell, worn.dx, worn.dy) == (case.slot.size, case.slot.cell, case.slot.dx, case.slot.dy)
        assert [o for o in case.ground_truth.objects if o.cell != case.slot.cell] == case.untouched()
        assert (case.mask() == cell_mask(case.slot.cell)).all()
    for case in tryon_cases(30, seed=3):  # paired: the garment is the slot's own, ground truth == person
        assert case.paired and case.ground_truth == case.person
        assert (render(case.ground_truth) == render(case.person)).all()
    assert any(not c.paired for c in tryon_cases(30, seed=3, paired=False))
    with pytest.raises(ValueError):
        make_tryon_case(Scene((ToyObject("circle", "red", "small", "top"),)), ToyObject("circle", "red", "small", "top"))


def test_judge_finds_every_rendered_ground_truth_and_rejects_the_untouched_person():
    differing = 0
    for paired in (True, False):
        for case in tryon_cases(120, seed=7, paired=paired):
            s = score_tryon(render(case.ground_truth), case)
            assert s["success"] and s["preserved"] and s["scene_match"] and s["preservation"] == 1.0, (case, s)
            if not case.paired:
                person = score_tryon(render(case.person), case)
                assert not person["success"] and person["preserved"]
                differing += 1
    assert differing > 100
    # a result that loses an untouched object is not preserved; per-object details say which
    case = next(c for c in tryon_cases(50, seed=1, paired=False) if len(c.person.objects) == 3 and not c.paired)
    lost = case.untouched()[0]
    s = score_tryon(render(case.ground_truth.replace_object(lost, None)), case)
    assert s["success"] and not s["preserved"] and s["preservation"] == 0.5 and not s["scene_match"]
    assert [o["ok"] for o in s["objects"] if o["cell"] == lost.cell] == [False]


def test_cases_are_deterministic_by_seed_and_round_trip_through_json():
    assert tryon_cases(20, seed=5, paired=False) == tryon_cases(20, seed=5, paired=False)
    assert tryon_cases(20, seed=5) != tryon_cases(20, seed=6)
    for case in tryon_cases(10, seed=5, paired=False):
        again = TryOnCase.from_dict(json.loads(json.dumps(case.to_dict())))
        assert again == case and again.ground_truth == case.ground_truth


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_writes_vitonhd_layout_that_round_trips(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["toyworld", "tryon-data", "--out", str(out), "--n", "5", "--test-n", "4", "--seed", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train"], summary["test_paired"], summary["test_unpaired"]) == (5, 4, 4)
    train, paired, unpaired = (read_pairs(out / f) for f in ("train_pairs.txt", "test_pairs.txt", "test_unpaired_pairs.txt"))
    assert len(train) == 5 and len(paired) == 4 and len(unpaired) == 4
    assert all(p == g for p, g in train + paired) and all(p != g for p, g in unpaired)
    for split, pairs in (("train", train), ("test", paired + unpaired)):
        for person, garment in pairs:
            image = Image.open(out / split / "image" / person)
            mask = Image.open(out / split / "agnostic-mask" / f"{person[:-4]}_mask.png")
            cloth = Image.open(out / split / "cloth" / garment)
            assert image.format == cloth.format == mask.format == "PNG"
            assert image.size == cloth.size == mask.size == (64, 64) and mask.mode == "L"
    rows = read_tryon_cases(out)
    assert [r["split"] for r in rows] == ["paired"] * 4 + ["unpaired"] * 4
    for r in rows:
        test = out / "test"
        gt = np.asarray(Image.open(test / r["ground_truth"]).convert("RGB"))
        assert (gt == render(r["case"].ground_truth)).all()
        assert (np.asarray(Image.open(test / "cloth" / r["garment"]).convert("RGB")) == render(r["case"].garment_scene)).all()
        assert (np.asarray(Image.open(test / "agnostic-mask" / r["mask"])) == r["case"].mask()).all()
        person = np.asarray(Image.open(test / "image" / r["person"]).convert("RGB"))
        assert (person == render(r["case"].person)).all()
        if r["split"] == "paired":
            assert (gt == person).all()
        assert r["result"] == f"{r['split']}/{r['person'][:-4]}__{r['garment'][:-4]}.png"
    # the same seed gives the same bytes; a re-run over an interrupted write completes it, leaving no temporaries
    first = _digest(out)
    (out / "test" / "cases.jsonl").unlink()
    (out / "train" / "image" / ".000001.png.abc.tmp").write_bytes(b"half")
    write_tryon_data(out, 5, 4, seed=2)
    assert _digest(out) == first
    # the test split does not depend on the training size
    other = tmp_path / "other"
    write_tryon_data(other, 2, 4, seed=2)
    assert {k: v for k, v in _digest(other).items() if k.startswith("test")} == {k: v for k, v in first.items() if k.startswith("test")}


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--test-n", "0"], "--test-n must be at least 1"),
    (["--out", "FILE"], "not a folder"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "file")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "d")]
    assert main(["toyworld", "tryon-data", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atelier: error:") and message in err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tryon") / "data"
    write_tryon_data(out, n=2, test_n=6, seed=0)
    return out


def _results(data, folder, source):
    """A results folder whose images are each case's ground truth ("gt") or its untouched person ("person")."""
    for r in read_tryon_cases(data):
        target = folder / r["result"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "test" / (r["ground_truth"] if source == "gt" else f"image/{r['person']}"), target)
    return folder


def test_evaluate_tryon_ground_truths_and_untouched_persons(data, tmp_path):
    from atelier.evaluate.tryon import evaluate_tryon

    perfect = evaluate_tryon(_results(data, tmp_path / "gt", "gt"), data, kid_subsets=5)
    assert perfect["features"] == "toyworld" and perfect["reference_images"] == 6
    assert perfect["paired"]["ssim"] == pytest.approx(1.0) and perfect["paired"]["fid"] == pytest.approx(0, abs=1e-3)
    assert perfect["paired"]["lpips"] is None and "vgg16" in perfect["missing"]["lpips"]
    assert perfect["unpaired"]["pairs"] == 6 and perfect["unpaired"]["fid"] > perfect["paired"]["fid"]
    assert {s: (v["success"], v["preserved"]) for s, v in perfect["judge"].items()} == {
        "paired": (100.0, 100.0), "unpaired": (100.0, 100.0)}
    lazy = evaluate_tryon(_results(data, tmp_path / "persons", "person"), data, kid_subsets=5)
    differ = sum(not r["same_garment"] for r in read_tryon_cases(data) if r["split"] == "unpaired")
    assert lazy["judge"]["paired"]["success"] == 100.0  # paired: the person is the ground truth
    assert lazy["judge"]["unpaired"]["success"] == pytest.approx(100.0 * (6 - differ) / 6) and differ >= 4
    assert lazy["judge"]["unpaired"]["preserved"] == 100.0
    assert score_tryon_folder(tmp_path / "persons", data)["unpaired"]["success"] == lazy["judge"]["unpaired"]["success"]


def test_evaluate_tryon_lpips_from_given_weights_and_resized_results(data, tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    from atelier.evaluate.tryon import evaluate_tryon

    torch.manual_seed(0)
    weights = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, str(weights))
    results = _results(data, tmp_path / "gt", "gt")
    big = next((results / "paired").iterdir())
    Image.open(big).resize((128, 128), Image.NEAREST).save(big)  # a result at another size is resized to the person's
    out = evaluate_tryon(results, data, lpips_weights=weights, settings=("paired",), kid_subsets=5)
    assert "lpips" not in out["missing"] and out["paired"]["lpips"] == pytest.approx(0, abs=0.05)
    assert out["resized"] == 1 and "unpaired" not in out and out["judge"]["paired"]["success"] == 100.0


def test_evaluate_tryon_cli(data, tmp_path, capsys):
    results = _results(data, tmp_path / "gt", "gt")
    assert main(["evaluate", "tryon", "--results", str(results), "--data", str(data), "--kid-subsets", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["judge"]["unpaired"]["success"] == 100.0 and len(out["judge_per_case"]["paired"]) == 6
    assert main(["evaluate", "tryon", "--results", str(results), "--data", str(data), "--settings", "paired"]) == 0
    text = capsys.readouterr().out
    assert "SSIM 1.0000" in text and "missing: LPIPS (vgg) not computed" in text and "--lpips-weights" in text
    next((results / "unpaired").iterdir()).unlink()
    for argv in (["--results", str(results), "--data", str(data)],
                 ["--results", str(results), "--data", str(tmp_path)],
                 ["--results", str(tmp_path / "nope"), "--data", str(data)],
                 ["--results", str(results), "--data", str(data), "--settings", "sideways"]):
        assert main(["evaluate", "tryon", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("atelier: error:")
