"""The toy world's contract: scenes, captions, renderer geometry, the judge, edit cases."""

import hashlib
import json
import random

import numpy as np
import pytest
from scipy import ndimage

from atelier.cli import main
from atelier.errors import UserError
from atelier.toyworld import (PARTIAL_EDIT_TYPES, detect, edit_cases, judge, make_edit, parse_caption, render,
                              sample_scene, score_edit)
from atelier.toyworld.scene import BASE_COLOURS, BASE_SHAPES, CELLS, COLOURS, SHAPES, Scene, ToyObject


def test_caption_follows_the_contract_and_parses_back():
    rng = random.Random(3)
    scene = Scene((ToyObject("circle", "red", "large", "top left"), ToyObject("square", "blue", "small", "center")))
    assert scene.caption() == "a large red circle at the top left and a small blue square in the center"
    three = sample_scene(rng, 3)
    cap = three.caption(random.Random(1))
    assert cap.count(", ") == 1 and cap.count(" and ") == 1
    assert parse_caption(cap).keys() == three.keys()
    assert parse_caption("") == Scene(())
    assert parse_caption("a small teal ring at the top").objects[0].shape == "ring"


@pytest.mark.parametrize("bad", ["a big red thing", "a large red circle at the top left and", "a large red circle at the top left and a small red square at the top left"])
def test_caption_parser_rejects_what_is_not_a_caption(bad):
    with pytest.raises(UserError):
        parse_caption(bad)


def test_render_geometry_is_exact():
    bg = np.array([245, 245, 245])

    def covered(shape, size):
        img = render(Scene((ToyObject(shape, "red", size, "center"),))).astype(float)
        # fraction of each pixel covered, recovered from the blend with the background
        alpha = (img - bg)[..., 1] / (50 - 245)
        return alpha

    assert covered("square", "small").sum() == pytest.approx(81, abs=0.5)
    assert covered("square", "large").sum() == pytest.approx(256, abs=0.5)
    assert covered("circle", "large").sum() == pytest.approx(np.pi * 64, rel=0.01)
    assert covered("triangle", "large").sum() == pytest.approx(128, rel=0.01)
    assert covered("diamond", "large").sum() == pytest.approx(128, rel=0.01)
    assert covered("ring", "large").sum() == pytest.approx(np.pi * (64 - 16), rel=0.02)
    assert covered("bar", "large").sum() == pytest.approx(16 * 16 / 3, rel=0.02)
    # the triangle's apex is up: more mass in the lower half
    tri = covered("triangle", "large")
    assert tri[33:].sum() > 2 * tri[:32].sum()


def test_objects_in_sampled_scenes_never_touch():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng, 3, SHAPES, tuple(COLOURS))
        img = render(scene)
        fg = np.any(img != 245, axis=-1)
        _, n = ndimage.label(fg, structure=np.ones((3, 3)))
        assert n == 3


def test_judge_is_exact_on_5000_rendered_scenes_with_reserved_concepts():
    wrong = []
    for i in range(5000):
        rng = random.Random(i)
        # every fifth scene draws from the reserved shapes and colour too
        shapes, colours = (SHAPES, tuple(COLOURS)) if i % 5 == 0 else (BASE_SHAPES, tuple(BASE_COLOURS))
        scene = sample_scene(rng, None, shapes, colours)
        if not judge(render(scene), scene).match:
            wrong.append(scene)
    assert wrong == []


def _perturbed(kind, img, rng):
    x = img.astype(float)
    if kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(0.7, 0.7, 0))
    elif kind == "drift":
        x = x + rng.uniform(-18, 18, size=3)
    elif kind == "noise":
        x = x + rng.normal(0, 8, size=x.shape)
    elif kind == "soft":  # what a VAE tends to do: blur, slight drift and noise at once
        x = ndimage.gaussian_filter(x, sigma=(0.5, 0.5, 0)) + rng.uniform(-10, 10, size=3) + rng.normal(0, 4, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["blur", "drift", "noise", "soft"])
def test_judge_tolerates_what_models_draw(kind):
    rng = np.random.default_rng(0)
    right = 0
    for i in range(200):
        scene = sample_scene(random.Random(10_000 + i))
        right += judge(_perturbed(kind, render(scene), rng), scene).match
    assert right >= 194  # ≥97%


def test_judge_reports_what_is_wrong():
    scene = parse_caption("a large red circle at the top left and a small blue square in the center")
    other = parse_caption("a large red square at the top left and a small blue square at the bottom")
    verdict = judge(render(other), scene)
    assert not verdict.match and not verdict.objects_right
    assert verdict.cells_right == 0.5
    by_expected = {p["expected"][0]: p for p in verdict.per_object}
    assert by_expected["circle"]["shape"] is False and by_expected["circle"]["cell"] is True
    assert judge(np.full((64, 64, 3), 245, np.uint8), scene).detected == []
    assert detect(np.full((64, 64, 3), 245, np.uint8)) == []


def test_edit_cases_cover_every_kind_with_exact_targets_and_masks():
    cases = edit_cases(250, seed=0)
    assert {c.kind for c in cases} == {"color", "shape", "size", "add", "remove"}
    for case in cases:
        target_img, source_img = render(case.target), render(case.source)
        exact = score_edit(case, target_img)
        assert exact.success and exact.preservation == 1.0
        assert exact.background_psnr == float("inf")  # nothing outside the mask changes
        assert not score_edit(case, source_img).success  # doing nothing is not an edit
        changed = np.any(target_img != source_img, axis=-1)
        assert not (changed & ~case.mask()).any()
        assert 1 <= len(case.target.objects) <= 3
        assert parse_caption(case.target_caption).keys() == case.target.keys()



def test_partial_edit_cases_name_only_the_edited_object_and_keep_the_others():
    cases = edit_cases(150, seed=0, partial=True)
    assert {c.kind for c in cases} == set(PARTIAL_EDIT_TYPES)
    for case in cases:
        assert 2 <= len(case.source.objects) <= 3
        old, new = case.changed
        assert parse_caption(case.source_caption).keys() == [old.key()]
        assert parse_caption(case.target_caption).keys() == [new.key()]
        assert old in case.source.objects and new.cell == old.cell
        assert sum(getattr(old, a) != getattr(new, a) for a in ("shape", "colour", "size")) == 1
        assert set(case.source.objects) - set(case.target.objects) == {old}
        assert set(case.target.objects) - set(case.source.objects) == {new}
        assert case.untouched() and all(o in case.target.objects for o in case.untouched())
        target_img, source_img = render(case.target), render(case.source)
        assert not (np.any(target_img != source_img, axis=-1) & ~case.mask()).any()
        assert score_edit(case, target_img).success and score_edit(case, target_img).preservation == 1.0
        assert not score_edit(case, source_img).success
        # img2img with the target caption alone draws the edited object and nothing else: not a success
        assert not score_edit(case, render(parse_caption(case.target_caption))).success


def test_partial_captions_only_for_attribute_edits():
    scene = sample_scene(random.Random(0), 2)
    with pytest.raises(ValueError, match="partial-caption edits"):
        make_edit(scene, "add", random.Random(0), partial=True)
    with pytest.raises(ValueError, match="partial-caption edits"):
        edit_cases(5, kinds=("remove",), partial=True)


def _fingerprint(cases) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(json.dumps(c.to_dict(), sort_keys=True).encode())
        h.update(c.mask().tobytes())
        h.update(json.dumps([o.__dict__ for o in c.changed], sort_keys=True).encode())
    return h.hexdigest()[:16]


def test_full_caption_edit_cases_are_the_same_as_before_partial_cases_existed():
    # recorded from the generator before partial-caption cases were added
    assert _fingerprint(edit_cases(250, seed=0)) == "991a866233143496"
    assert _fingerprint(edit_cases(250, seed=2024)) == "970029da906ea9fb"
    first = edit_cases(1, seed=0)[0]
    assert first.source_caption == "a small blue diamond at the top left and a large purple triangle at the bottom left"
    assert first.target_caption == "a small green diamond at the top left and a large purple triangle at the bottom left"

def test_cli_render_judge_edits(tmp_path, capsys):
    out = tmp_path / "scene.png"
    assert main(["toyworld", "render", "a small green triangle on the right", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"] == "a small green triangle on the right"
    assert main(["toyworld", "judge", str(out), "--caption", "a small green triangle on the right", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["match"] is True
    assert main(["toyworld", "edits", "--n", "5", "--outdir", str(tmp_path / "e")]) == 0
    lines = (tmp_path / "e" / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 5 and (tmp_path / "e" / json.loads(lines[0])["image"]).exists()
    capsys.readouterr()
    assert main(["toyworld", "judge", str(tmp_path / "missing.png")]) == 2
    assert main(["toyworld", "render", "a huge red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("atelier: error:") for line in err)


def test_cli_writes_partial_caption_edit_cases(tmp_path, capsys):
    assert main(["toyworld", "edits", "--partial", "--n", "3", "--outdir", str(tmp_path / "e")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "e" / "cases.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == list(PARTIAL_EDIT_TYPES)
    for line in lines:
        assert len(parse_caption(line["source"]).objects) == len(parse_caption(line["target"]).objects) == 1
        assert len(line["scene"]["source"]) >= 2
    capsys.readouterr()
    assert main(["toyworld", "edits", "--partial", "--kinds", "add", "--outdir", str(tmp_path / "f")]) == 2
    assert "choose from color, shape, size" in capsys.readouterr().err
