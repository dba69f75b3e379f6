"""atelier.edit: inversions reconstruct, masks find the edited region, edits take on the toy world
while the rest stays, the CLI (single and batch) and bad input."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.edit import Denoiser, EditSettings, Editor
from atelier.edit.inversion import ddim_invert, ddim_step, ddpm_noise_maps, ddpm_step, edit_timesteps
from atelier.edit.masks import CrossAttentionStore, changed_token_positions, estimate_masks
from atelier.errors import UserError
from atelier.generate.metadata import read_parameters
from atelier.testing.tiny import tiny_pipeline
from atelier.toyworld import edit_cases, judge, parse_caption, render_pil, score_edit


@pytest.fixture(scope="module")
def toyworld():
    from atelier.models import load_pipeline

    return load_pipeline("toyworld")


@pytest.fixture(scope="module")
def turbo():
    from atelier.models import load_pipeline

    return load_pipeline("toyworld-turbo")


def _latent(den, caption="a large red circle at the top left and a small blue square in the center"):
    pixels = torch.from_numpy(np.asarray(render_pil(parse_caption(caption)), dtype=np.float32) / 127.5 - 1)
    return den.encode_image(pixels.permute(2, 0, 1)[None])


def _eps_fn(den, prompt):
    hidden, pooled = den.conditioning([prompt])
    return lambda x, t: den.x0_eps(x, t, hidden, pooled)[1]


@torch.no_grad()
@pytest.mark.parametrize("family", ["toyworld", "sd2", "sdxl"])
def test_ddpm_noise_maps_reconstruct_exactly(family, toyworld):
    pipe = toyworld if family == "toyworld" else tiny_pipeline(family)
    den = Denoiser(pipe)
    x0 = _latent(den) if family == "toyworld" else torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = edit_timesteps(pipe, 10)[3:]
    eps_fn = _eps_fn(den, "a large red circle at the top left")
    xs, zs = ddpm_noise_maps(den, x0, ts, eps_fn, torch.Generator().manual_seed(1))
    x = xs[0]
    for i, t in enumerate(ts):
        x = ddpm_step(den, x, eps_fn(x, t), t, ts[i + 1] if i + 1 < len(ts) else -1, zs[i])
        torch.testing.assert_close(x, xs[i + 1], atol=1e-3, rtol=1e-3)
    # another prompt with the same noise maps lands elsewhere: the maps carry the image, not the answer
    other = _eps_fn(den, "a small green triangle at the bottom right")
    y = xs[0]
    for i, t in enumerate(ts):
        y = ddpm_step(den, y, other(y, t), t, ts[i + 1] if i + 1 < len(ts) else -1, zs[i])
    assert (y - x0).abs().mean() > 1e-3


@torch.no_grad()
def test_ddim_inversion_comes_back_close(toyworld):
    den = Denoiser(toyworld)
    x0 = _latent(den)
    ts = edit_timesteps(toyworld, 50)[25:]
    eps_fn = _eps_fn(den, "a large red circle at the top left and a small blue square in the center")
    xs = ddim_invert(den, x0, ts, eps_fn)
    assert len(xs) == len(ts) + 1 and torch.equal(xs[-1], x0)
    x = xs[0]
    for i, t in enumerate(ts):
        x = ddim_step(den, x, eps_fn(x, t), t, ts[i + 1] if i + 1 < len(ts) else -1)
    assert (x - x0).abs().mean() < 0.15 * x0.abs().mean()


def test_edit_timesteps_follow_the_model_spacing(toyworld, turbo):
    assert edit_timesteps(turbo, 4) == [999, 749, 499, 249]
    ts = edit_timesteps(toyworld, 25)
    assert ts[0] > ts[-1] and len(ts) == 25 and ts[-1] == 1  # leading spacing with steps_offset 1


def test_changed_tokens_and_attention_store(toyworld):
    tok = toyworld.tokenizer
    src, tgt = changed_token_positions(tok, "a large red circle at the top left", "a large blue circle at the top left")
    ids_s, ids_t = tok("a large red circle at the top left").input_ids, tok("a large blue circle at the top left").input_ids
    assert [tok.convert_ids_to_tokens(ids_s[i]) for i in src] == ["red</w>"]
    assert [tok.convert_ids_to_tokens(ids_t[i]) for i in tgt] == ["blue</w>"]
    removed, added = changed_token_positions(tok, "a red circle and a blue square", "a red circle")
    assert added == [] and {tok.convert_ids_to_tokens(tok("a red circle and a blue square").input_ids[i]) for i in removed} == {"blue</w>", "square</w>"}

    before = dict(toyworld.unet.attn_processors)
    store = CrossAttentionStore((16, 16), levels=(2,))
    store.install(toyworld.unet)
    assert any(type(p).__name__ == "_StoringProcessor" for p in toyworld.unet.attn_processors.values())
    store.remove(toyworld.unet)
    assert {k: type(v) for k, v in toyworld.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


@torch.no_grad()
@pytest.mark.parametrize(
    "kind, source, target",
    [
        ("noise", "a large red circle at the top left and a large green square at the bottom right",
         "a large yellow circle at the top left and a large green square at the bottom right"),
        # the toy text encoder puts an object's position in its phrase's own words, so the attention
        # mask is tested on an added object, whose words include where it goes
        ("attention", "a large red circle at the top left",
         "a large red circle at the top left and a large green square at the bottom right"),
    ],
)
def test_masks_find_the_changed_region(toyworld, kind, source, target):
    den = Denoiser(toyworld)
    maps = estimate_masks(den, _latent(den, source), source, target, attention=True)
    soft = maps[kind]
    changed, unchanged = (soft[:8, :8], soft[8:, 8:]) if kind == "noise" else (soft[8:, 8:], soft[:8, :8])
    assert changed.mean() > 2 * unchanged.mean(), (kind, float(changed.mean()), float(unchanged.mean()))


def test_edits_take_and_keep_the_rest(toyworld):
    editor = Editor(toyworld)
    cases = edit_cases(10, seed=99)
    successes, ious = 0, []
    for case in cases:
        source = render_pil(case.source)
        result = editor.edit(source, case.source_caption, case.target_caption, EditSettings(method="ddpm", seed=1))
        score = score_edit(case, result.image, source)
        successes += score.success
        assert score.preservation == 1.0 and score.background_psnr > 30, case
        mask = np.asarray(result.mask) > 127
        ious.append((mask & case.mask()).sum() / max(1, (mask | case.mask()).sum()))
    assert successes >= 8
    assert np.mean(ious) > 0.3
    # plain img2img on the same cases follows the caption but repaints the background
    plain = editor.edit(render_pil(cases[0].source), cases[0].source_caption, cases[0].target_caption, EditSettings(method="img2img"))
    assert score_edit(cases[0], plain.image, render_pil(cases[0].source)).background_psnr < 50


def test_turbo_edits_in_four_steps(turbo):
    editor = Editor(turbo)
    hits = 0
    for colour in ("blue", "green", "yellow"):
        source = "a large red circle at the top left and a small purple triangle at the bottom right"
        target = source.replace("red", colour)
        result = editor.edit(render_pil(parse_caption(source)), source, target, EditSettings(method="auto"))
        assert result.settings.method == "turbo" and result.settings.steps == 4
        hits += judge(result.image, target).match
    assert hits >= 2


def test_bad_settings_are_refused(toyworld):
    editor = Editor(toyworld)
    image = render_pil(parse_caption("a large red circle in the center"))
    for settings, words in ((EditSettings(method="magic"), "unknown edit method"), (EditSettings(strength=1.5), "strength"),
                            (EditSettings(mask_from="eyes"), "mask-from"), (EditSettings(mask_threshold=2), "threshold")):
        with pytest.raises(UserError, match=words):
            editor.edit(image, "a", "b", settings)
    with pytest.raises(UserError, match="empty"):
        editor.edit(image, "", "a large blue circle in the center")
    with pytest.raises(UserError, match="multiple of"):
        editor.edit(image.resize((60, 60)), "a", "b")


def test_every_family_edits():
    for family in ("sd1", "sdxl"):
        pipe = tiny_pipeline(family)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
        result = Editor(pipe).edit(image, "a cat", "a dog", EditSettings(method="ddpm", steps=4, mask_from="both"))
        assert result.image.size == (32, 32) and result.mask.size == (32, 32)


def test_evaluate_sees_the_edit_methods():
    from atelier.edit import METHODS

    assert {"auto", "ddpm", "diffedit", "turbo", "img2img"} <= set(METHODS)


# ---------------------------------------------------------------------------- CLI


def test_cli_single_edit_writes_image_mask_and_metadata(tmp_path, capsys):
    source = "a large red circle at the top left"
    render_pil(parse_caption(source)).save(tmp_path / "in.png")
    code = main(["edit", str(tmp_path / "in.png"), "--source", source, "--target", "a large blue circle at the top left",
                 "--out", str(tmp_path / "out.png"), "--mask-out", str(tmp_path / "mask.png"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "ddpm"
    assert judge(Image.open(tmp_path / "out.png"), "a large blue circle at the top left").match
    assert Image.open(tmp_path / "mask.png").mode == "L"
    params = read_parameters(tmp_path / "out.png")
    assert params.startswith("a large blue circle at the top left") and "Edit source" in params


def test_cli_batch_loads_once_and_checks_every_line(tmp_path, capsys):
    rng = random.Random(0)
    lines = []
    for i, case in enumerate(edit_cases(3, seed=rng.randint(0, 99))):
        render_pil(case.source).save(tmp_path / f"s{i}.png")
        lines.append(json.dumps({"image": f"s{i}.png", "source": case.source_caption, "target": case.target_caption, "out": f"e{i}.png"}))
    (tmp_path / "cases.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["edit", "--cases", str(tmp_path / "cases.jsonl"), "--outdir", str(tmp_path / "out"), "--model", "toyworld-turbo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["method"] for o in out] == ["turbo"] * 3
    assert all((tmp_path / "out" / f"e{i}.png").is_file() for i in range(3))

    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    assert main(["edit", "--cases", str(tmp_path / "bad.jsonl"), "--outdir", str(tmp_path / "o2")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # nothing written when a line is bad


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.png", "--source", "a", "--target", "b"], "image not found"),
        (["--cases", "nope.jsonl", "--outdir", "o"], "cases file not found"),
        (["img.png"], "give IMAGE, --source and --target"),
        (["--cases", "x.jsonl"], "--cases needs --outdir"),
    ],
)
def test_cli_user_errors_are_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["edit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
