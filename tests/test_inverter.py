"""SwiftEdit-style one-step editing: inverter training (resumes after a kill, both stages, the manifest
command, refused options), the attention-rescaling processor, the shipped toyworld-inverter
(reconstruction PSNR, a colour edit the judge accepts) and `atelier edit --method one-step`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.edit import EditSettings, Editor
from atelier.edit.methods import _pixels
from atelier.edit.one_step import MaskedPromptAttention, generate, inverter_folder
from atelier.errors import UserError
from atelier.toyworld import edit_cases, judge, parse_caption, psnr, render_pil
from atelier.train import inverter as inv_mod
from atelier.train.checkpoint import load_state
from atelier.train.inverter import InverterConfig, prepare_manifest, train_inverter

# Measured: 37.1 dB mean on 100 rendered edit-case sources (seed 2024) with the shipped inverter, see
# docs/inverter-training.md. The bound leaves a margin for other torch builds.
MIN_INVERSION_PSNR = 34.0



@pytest.fixture(scope="module")
def toy_adapter(tmp_path_factory, turbo):
    """A tiny IP-Adapter folder for toyworld-turbo (ip-adapter.safetensors + image_encoder/), random weights."""
    from safetensors.torch import save_file

    from atelier.testing.ip_adapters import base_adapter, save_encoder

    folder = tmp_path_factory.mktemp("toy-ip")
    save_encoder(folder / "image_encoder")
    save_file(base_adapter(turbo.unet), folder / "ip-adapter.safetensors")
    return folder


@pytest.fixture
def turbo_ip():
    """A toyworld-turbo of its own: the image-branch tests load adapters into it."""
    from atelier.models import load_pipeline

    return load_pipeline("toyworld-turbo")


def _tiny(tmp_path, **kw) -> InverterConfig:
    settings = dict(output_dir=str(tmp_path / "run"), train_batch_size=2, max_train_steps=4,
                    checkpointing_steps=2, validation_steps=100, validation_images=2)
    return InverterConfig(**{**settings, **kw})


# ---------------------------------------------------------------------------- training


def _image_branch_options(mode, adapter_folder) -> dict:
    """The ablation's modes: (a) text only, (b) a pretrained adapter, frozen, (c) the branch trained from scratch."""
    return {"text": {}, "frozen": {"ip_adapter": str(adapter_folder)},
            "trained": {"train_ip_adapter": True, "image_encoder_path": str(adapter_folder / "image_encoder")}}[mode]


@pytest.mark.parametrize("mode", ["text", "frozen", "trained"])
def test_stage1_resumes_after_a_kill_exactly(tmp_path, monkeypatch, capsys, mode, toy_adapter):
    options = _image_branch_options(mode, toy_adapter)
    straight = train_inverter(_tiny(tmp_path / "a", **options))
    losses = load_state(tmp_path / "a" / "run" / "stage1" / "checkpoint.safetensors")["losses"]

    real, calls = inv_mod.stage1_loss, {"n": 0}

    def dies_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(inv_mod, "stage1_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_inverter(_tiny(tmp_path / "b", **options))
    assert load_state(tmp_path / "b" / "run" / "stage1" / "checkpoint.safetensors")["step"] == 2
    monkeypatch.setattr(inv_mod, "stage1_loss", real)
    resumed = train_inverter(_tiny(tmp_path / "b", **options))
    assert "resumed at step 2" in capsys.readouterr().err  # progress talk goes to stderr, --json to stdout
    again = load_state(tmp_path / "b" / "run" / "stage1" / "checkpoint.safetensors")["losses"]
    np.testing.assert_allclose(again, losses, rtol=1e-4)
    assert resumed["steps"] == straight["steps"] == 4
    run = tmp_path / "b" / "run" / "stage1"
    assert (run / "loss.png").is_file() and (run / "final" / "config.json").is_file()
    info = json.loads((run / "final" / "atelier.json").read_text())
    assert info["kind"] == "inverter"
    # finished: running again only reports
    assert train_inverter(_tiny(tmp_path / "b", **options))["resumed_done"]
    if mode == "text":
        assert "ip_adapter" not in info and "ip_adapter" not in resumed
    elif mode == "frozen":  # G ran with the adapter as it is; the inverter records which one
        assert info["ip_adapter"]["weights"] == str((toy_adapter / "ip-adapter.safetensors").resolve())
        assert not info["ip_adapter"]["trained"] and not (run / "final" / "ip-adapter.safetensors").exists()
    else:  # the branch trained with F, written beside it, resumed exactly with it (checkpoint and optimizer)
        from safetensors.torch import load_file

        assert info["ip_adapter"] == {"weights": "ip-adapter.safetensors", "name": "ip-adapter", "trained": True,
                                      "image_encoder": str((toy_adapter / "image_encoder").resolve())}
        trained = load_file(run / "final" / "ip-adapter.safetensors")
        start = load_file(tmp_path / "b" / "run" / "ip-adapter-init.safetensors")
        assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in trained)
        straight_adapter = load_file(tmp_path / "a" / "run" / "stage1" / "final" / "ip-adapter.safetensors")
        for key in trained:
            torch.testing.assert_close(trained[key], straight_adapter[key], rtol=1e-4, atol=1e-6)


def test_manifest_and_stage2_on_it(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, caption in enumerate(["a large red circle in the center", "a small blue square at the top left"]):
        folder = images / "sub" if i else images
        render_pil(parse_caption(caption)).save(folder / f"scene{i}.png")
        if i == 0:
            (folder / f"scene{i}.txt").write_text(caption + "\n")
    (images / "notes.md").write_text("not an image")
    out = tmp_path / "manifest.jsonl"
    assert main(["train", "prepare-inverter-data", "--images", str(images), "--captions", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"manifest": str(out), "images": 2, "captioned": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a large red circle in the center", ""]

    summary = train_inverter(_tiny(tmp_path, stage=2, max_train_steps=2, train_data_manifest=str(out)))
    assert summary["stage"] == 2 and np.isfinite(summary["inversion_psnr"])
    log = json.loads((tmp_path / "run" / "stage2" / "done.json").read_text())["log"]
    assert "regulariser" in log[-1] and "l1" in log[-1]  # the documented fallback without LPIPS weights

    with pytest.raises(UserError, match="no images"):
        prepare_manifest(tmp_path / "run" / "stage2" / "final", tmp_path / "m2.jsonl")


def test_stage2_with_lpips_weights_through_the_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    from torchvision.models import vgg16

    torch.manual_seed(0)
    # random VGG16 features stand in for torchvision's (the lpips package ships its linear layers): only the plumbing is tested
    tensors = {f"features.{k}": v.contiguous() for k, v in vgg16(weights=None).features.state_dict().items()}
    save_file(tensors, tmp_path / "lpips_vgg.safetensors")
    assert main(["train", "inverter", "--stage", "2", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                 "--train_batch_size", "1", "--validation_steps", "1", "--lpips_weights", str(tmp_path / "lpips_vgg.safetensors"),
                 "--export_dir", str(tmp_path / "exported"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["exported"] == str(tmp_path / "exported")
    log = json.loads((tmp_path / "run" / "stage2" / "done.json").read_text())["log"]
    assert "lpips" in log[-1] and "l1" not in log[-1]
    from atelier.edit.one_step import load_inverter

    assert load_inverter(tmp_path / "exported").dtype == torch.float32  # fp16 on disk, loaded as asked


@pytest.mark.parametrize(
    "args, words",
    [
        (["--image_encoder_path", "h94/IP-Adapter"], "--image_encoder_path h94/IP-Adapter: not a CLIP vision model folder"),
        (["--train_ip_adapter"], "--train_ip_adapter needs --image_encoder_path DIR"),
        (["--max_train_steps", "0"], "--max_train_steps must be a whole number at least 1, not 0"),
        (["--train_data_manifest", "missing.jsonl", "--stage", "2"], "not found"),
    ],
)
def test_train_cli_refuses_clearly(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "inverter", "--output_dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------- attention rescaling


@torch.no_grad()
def test_masked_attention_is_the_edit_prompt_inside_and_the_source_outside(turbo):
    editor = Editor(turbo)
    den = editor.den
    hidden, _ = den.conditioning(["a large red circle in the center", "a large blue circle in the center"])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain_src, plain_tgt = (generate(den, noise, hidden[i:i + 1]) for i in (0, 1))
    for fill, expected in ((1.0, plain_tgt), (0.0, plain_src)):
        rescale = MaskedPromptAttention(torch.full((16, 16), fill), hidden[:1])
        rescale.install(den.unet)
        try:
            out = generate(den, noise, hidden[1:])
        finally:
            rescale.remove(den.unet)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert not any(type(p).__name__ == "_MaskedProcessor" for p in den.unet.attn_processors.values())


# ---------------------------------------------------------------------------- the image branch (IP-Adapter)

SOURCE = "a large red circle at the top left and a small purple triangle at the bottom right"
TARGET = SOURCE.replace("red", "blue")


def _edit(pipe, **kw):
    return Editor(pipe).edit(render_pil(parse_caption(SOURCE)), SOURCE, TARGET, EditSettings(method="one-step", **kw))


def test_image_branch_changes_the_edit_and_off_is_the_text_only_edit(turbo_ip, toy_adapter):
    from atelier.core.infotext import parse_parameters
    from atelier.image_prompts import load_ip_adapter

    plain, plain_whole = _edit(turbo_ip), _edit(turbo_ip, mask_from="none")
    assert plain.image_branch is None and "Image branch" not in plain.parameters(SOURCE, TARGET, "m")
    load_ip_adapter(turbo_ip, toy_adapter)  # an adapter the caller loaded: the source image is its image prompt
    branch = _edit(turbo_ip)
    assert branch.image_branch == "ip-adapter"
    assert not np.array_equal(np.asarray(branch.image), np.asarray(plain.image))
    fields = parse_parameters(branch.parameters(SOURCE, TARGET, "m"))
    assert (fields["Image branch"], fields["IP edit scale"], fields["IP keep scale"]) == ("ip-adapter", "0.2", "1.0")
    assert not np.array_equal(np.asarray(_edit(turbo_ip, ip_edit_scale=1.0).image), np.asarray(branch.image))
    # off: the adapter's tokens are left out, the text-only edit bit for bit (the UNet still gets embeddings)
    assert np.array_equal(np.asarray(_edit(turbo_ip, image_branch="off").image), np.asarray(plain.image))
    assert np.array_equal(np.asarray(_edit(turbo_ip, image_branch="off", mask_from="none").image), np.asarray(plain_whole.image))
    assert _edit(turbo_ip, mask_from="none").image_branch == "ip-adapter"


@torch.no_grad()
def test_image_scales_act_inside_and_outside_the_mask_in_mid_and_up_blocks_only(turbo_ip, toy_adapter):
    from atelier.image_prompts import load_ip_adapter

    load_ip_adapter(turbo_ip, toy_adapter)
    unet = turbo_ip.unet
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(16, 16)
    mask[:8] = 1  # the top half of the 8x8 grid (64 query positions) is inside
    inside = torch.zeros(64, dtype=torch.bool)
    inside[:32] = True
    text = torch.randn(2, 5, 128, generator=g)  # (source, target) prompts
    tokens = [torch.randn(1, 1, 4, 128, generator=g)]

    def run(name, edit=0.2, keep=1.0, mask=mask):
        original = unet.attn_processors[name]
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden = torch.randn(1, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(1))
        processor = MaskedPromptAttention(mask, text[:1], image_scales=(edit, keep)).processor_for(name, original)
        return processor(attn, hidden, (text[1:], tokens))[0], original(attn, hidden, (text[1:], tokens))[0]

    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    up = next(n for n in names if n.startswith("up_blocks."))
    down = next(n for n in names if n.startswith("down_blocks."))
    base = run(up)[0]
    changed = (run(up, edit=0.7)[0] != base).any(-1)
    assert changed[inside].all() and not changed[~inside].any()  # ip_edit_scale: inside only
    changed = (run(up, keep=0.3)[0] != base).any(-1)
    assert changed[~inside].all() and not changed[inside].any()  # ip_keep_scale: outside only
    assert torch.equal(run(down, edit=0.7, keep=0.3)[0], run(down)[0])  # down blocks: the adapter's own scale
    # inside everywhere at ip_edit_scale 1: diffusers' own IP-Adapter attention with the target prompt
    ours, theirs = run(up, edit=1.0, mask=torch.ones(16, 16))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours, theirs = run(down, mask=torch.ones(16, 16))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_one_step_edit_uses_the_adapter_its_inverter_was_trained_with(tmp_path, turbo_ip, toy_adapter, capsys):
    from atelier.train.inverter import export_inverter

    trained = train_inverter(_tiny(tmp_path, max_train_steps=1, train_ip_adapter=True,
                                   image_encoder_path=str(toy_adapter / "image_encoder")))
    exported = export_inverter(trained["final"], tmp_path / "exported")
    assert (tmp_path / "exported" / "ip-adapter.safetensors").is_file()
    result = _edit(turbo_ip, inverter=exported)
    assert result.image_branch == "ip-adapter"
    assert _edit(turbo_ip, inverter=exported, image_branch="off").image_branch is None
    render_pil(parse_caption(SOURCE)).save(tmp_path / "in.png")
    edit = ["edit", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGET, "--model", "toyworld-turbo",
            "--method", "one-step", "--inverter", exported]
    assert main(edit + ["--out", str(tmp_path / "out.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(result.image))
    from atelier.core.images import read_parameters

    assert "Image branch: ip-adapter, IP edit scale: 0.2, IP keep scale: 1.0" in read_parameters(tmp_path / "out.png")
    # the recorded adapter gone: one line naming it
    (tmp_path / "exported" / "ip-adapter.safetensors").unlink()
    capsys.readouterr()
    assert main(edit + ["--out", str(tmp_path / "out2.png")]) == 2
    err = capsys.readouterr().err  # (progress bars of the model loading before it)
    assert "the inverter was trained with the IP-Adapter" in err and err.count("atelier: error:") == 1


def test_an_adapter_from_the_built_in_weights_is_recorded_by_its_place_there(tmp_path):
    """An inverter trained with a built-in adapter names it as "builtin:..." in its atelier.json, so the
    inverter folder works on another machine or installation; other paths stay as they were."""
    from atelier.edit.one_step import recordable_path, recorded_adapter
    from atelier.models.loader import BUILTIN_DIR

    weights, encoder = BUILTIN_DIR / "toyworld-turbo-ip" / "ip-adapter.safetensors", BUILTIN_DIR / "toyworld-turbo-ip" / "image_encoder"
    record = {"weights": recordable_path(weights), "image_encoder": recordable_path(encoder), "name": "ip-adapter",
              "trained": False}
    assert record["weights"] == "builtin:toyworld-turbo-ip/ip-adapter.safetensors"
    assert record["image_encoder"] == "builtin:toyworld-turbo-ip/image_encoder"
    assert recordable_path(tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    (tmp_path / "inverter").mkdir()
    (tmp_path / "inverter" / "atelier.json").write_text(json.dumps({"kind": "inverter", "ip_adapter": record}))
    back = recorded_adapter(tmp_path / "inverter")
    assert Path(back["weights"]).samefile(weights) and Path(back["image_encoder"]).samefile(encoder)


def test_image_branch_refusals_are_one_line(tmp_path, toy_adapter, capsys):
    from safetensors.torch import save_file

    from atelier.testing import tiny_pipeline
    from atelier.testing.ip_adapters import base_adapter

    sd1_adapter = tmp_path / "sd1" / "ip-adapter.safetensors"
    sd1_adapter.parent.mkdir()
    save_file(base_adapter(tiny_pipeline("sd1").unet), sd1_adapter)
    lone = tmp_path / "lone" / "ip-adapter.safetensors"  # no image_encoder/ beside it
    lone.parent.mkdir()
    lone.write_bytes((toy_adapter / "ip-adapter.safetensors").read_bytes())
    train = ["train", "inverter", "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1", "--train_batch_size", "1"]
    image = tmp_path / "in.png"
    render_pil(parse_caption(SOURCE)).save(image)
    edit = ["edit", str(image), "--source", SOURCE, "--target", TARGET, "--model", "toyworld-turbo", "--method", "one-step",
            "--out", str(tmp_path / "e.png")]
    cases = [
        (train + ["--ip_adapter", str(sd1_adapter), "--image_encoder_path", str(toy_adapter / "image_encoder")],
         "is made for 32-wide cross-attention models; this model is 128-wide"),
        (train + ["--ip_adapter_weight_name", str(lone)], "no image encoder found for ip-adapter.safetensors"),
        (train + ["--image_encoder_path", str(toy_adapter / "image_encoder")], "--image_encoder_path needs an adapter"),
        (edit + ["--ip-adapter", str(sd1_adapter), "--ip-image-encoder", str(toy_adapter / "image_encoder")],
         "is made for 32-wide cross-attention models"),
        (edit + ["--ip-adapter", str(lone)], "no image encoder found"),
        (edit + ["--ip-edit-scale", "-1"], "ip_edit_scale (--ip-edit-scale) must be"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of model loading
        assert err.startswith("atelier: error: ") and words in err, (argv, err)
    assert "--image_encoder_path DIR" in (main(train + ["--ip_adapter_weight_name", str(lone)]), capsys.readouterr().err)[1]


# ---------------------------------------------------------------------------- the shipped inverter


@torch.no_grad()
def test_shipped_inverter_reconstructs_rendered_scenes(turbo):
    editor = Editor(turbo)
    one = editor.one_step()  # the default for toyworld-turbo: the built-in toyworld-inverter
    scores = []
    for case in edit_cases(48, seed=2024):
        image = render_pil(case.source)
        x0 = editor.den.encode_image(_pixels(image))
        out = editor.den.decode_latents(one.reconstruct(x0, case.source_caption))
        scores.append(psnr(((out[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), np.asarray(image)))
    assert np.mean(scores) > MIN_INVERSION_PSNR


def test_one_step_colour_edit_succeeds_and_keeps_the_rest(turbo):
    editor = Editor(turbo)
    source = "a large red circle at the top left and a small purple triangle at the bottom right"
    image = render_pil(parse_caption(source))
    hits = 0
    for colour in ("blue", "green", "yellow"):
        target = source.replace("red", colour)
        result = editor.edit(image, source, target, EditSettings(method="one-step"))
        assert result.settings.method == "one-step" and result.settings.steps == 1
        hits += judge(result.image, target).match
        corner = np.asarray(result.image)[40:, 40:]  # the triangle's cell: the mask reaches in a little
        assert psnr(corner, np.asarray(image)[40:, 40:]) > 30  # (measured 33 dB)
    assert hits >= 2


def test_one_step_settings_are_checked(turbo):
    editor = Editor(turbo)
    image = render_pil(parse_caption("a large red circle in the center"))
    for settings, words in ((EditSettings(method="one-step", mask_from="attention"), "noise or none"),
                            (EditSettings(method="one-step", edit_scale=-1), "edit_scale"),
                            (EditSettings(method="one-step", inverter="/nowhere/inverter"), "inverter not found")):
        with pytest.raises(UserError, match=words):
            editor.edit(image, "a large red circle in the center", "a large blue circle in the center", settings)


def test_a_model_without_an_inverter_must_name_one():
    from atelier.models import load_pipeline

    editor = Editor(load_pipeline("toyworld"))
    image = render_pil(parse_caption("a large red circle in the center"))
    with pytest.raises(UserError, match="--inverter"):
        editor.edit(image, "a large red circle in the center", "a large blue circle in the center", EditSettings(method="one-step"))


def test_registry_and_cli_one_step(turbo, tmp_path, capsys):
    from atelier.edit import METHODS

    assert "one-step" in METHODS
    source = "a large red circle at the top left"
    target = "a large blue circle at the top left"
    render_pil(parse_caption(source)).save(tmp_path / "in.png")
    code = main(["edit", str(tmp_path / "in.png"), "--source", source, "--target", target, "--model", "toyworld-turbo",
                 "--method", "one-step", "--inverter", str(inverter_folder("toyworld-inverter")),
                 "--out", str(tmp_path / "out.png"), "--mask-out", str(tmp_path / "mask.png"), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "one-step"
    # the same edit as the library's (how often edits succeed: benchmarks/edits.py)
    expected = Editor(turbo).edit(render_pil(parse_caption(source)), source, target, EditSettings(method="one-step"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(expected.image))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mask.png")), np.asarray(expected.mask))

    assert main(["edit", str(tmp_path / "in.png"), "--source", source, "--target", target, "--model", "toyworld-turbo",
                 "--method", "one-step", "--inverter", str(tmp_path / "nope")]) == 2
    assert "inverter not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the stream's edit mode


def test_stream_session_edit_mode(turbo):
    import asyncio

    from test_server import Client, RunningServer  # the server tests' real uvicorn + WebSocket client

    from atelier.server.app import create_app

    source = "a large red circle at the top left and a small purple triangle at the bottom right"
    target = source.replace("red", "green")
    frame = render_pil(parse_caption(source))
    expected = np.asarray(Editor(turbo).edit(frame, source, target, EditSettings(method="one-step")).image)

    async def run(server):
        a, b = await Client.open(server.ws()), await Client.open(server.ws())
        await a.ws.send(json.dumps({"type": "edit", "source": source, "target": target}))
        assert (await a.next_message("edit"))["edit"] == {"source": source, "target": target, "show_mask": False}
        edited, streamed = await a.frame(frame), await b.frame(frame)  # b stays a plain stream
        await a.ws.send(json.dumps({"type": "edit", "source": source, "target": target, "show_mask": True}))
        assert (await a.next_message("edit"))["edit"]["show_mask"] is True
        tinted = await a.frame(frame)
        await a.ws.send(json.dumps({"type": "edit", "source": source}))
        bad = await a.next_message("error")
        await a.ws.send(json.dumps({"type": "edit"}))
        assert (await a.next_message("edit"))["edit"] is None
        back = await a.frame(frame)
        await a.close()
        await b.close()
        return edited, streamed, bad, back, tinted

    with RunningServer(create_app(turbo, max_sessions=2)) as server:
        edited, streamed, bad, back, tinted = asyncio.run(run(server))
    redder = tinted[..., 0].astype(int) - edited[..., 0].astype(int)
    assert (redder > 20).mean() > 0.01 and (tinted != edited).any(axis=-1).mean() < 0.6  # the mask, not the frame
    assert np.array_equal(edited, expected) and judge(Image.fromarray(edited), target).match
    assert not np.array_equal(streamed, expected) and np.array_equal(back, streamed)
    assert bad["code"] == "bad_edit" and "target prompt" in bad["message"]


def test_partial_captions_keep_a_random_subset_of_the_phrases():
    import random

    from atelier.train.inverter import Data, caption_phrases, partial_caption

    caption = "a small red circle at the top, a large blue square on the left and a small green diamond in the center"
    phrases = caption_phrases(caption)
    assert len(phrases) == 3 and phrases[1] == "a large blue square on the left"
    rng = random.Random(0)
    for _ in range(20):
        kept = caption_phrases(partial_caption(caption, rng))
        assert 1 <= len(kept) < 3 and set(kept) <= set(phrases)
    assert partial_caption("a red circle in the center", rng) == "a red circle in the center"
    full, partial = Data(None, 64).batch(5, 8, images=False)[0], Data(None, 64, partial=1.0).batch(5, 8, images=False)[0]
    assert any(len(caption_phrases(p)) < len(caption_phrases(f)) for p, f in zip(partial, full))
    assert all(set(caption_phrases(p)) <= set(caption_phrases(f)) for p, f in zip(partial, full))


def test_the_image_branch_trains_from_scratch_as_a_plus_adapter(tmp_path, toy_adapter):
    from atelier.image_prompts import read_adapter
    from atelier.image_prompts.adapters import adapter_kind
    from atelier.train.inverter import export_inverter

    trained = train_inverter(_tiny(tmp_path, max_train_steps=1, train_ip_adapter=True, ip_image_proj="plus",
                                   image_encoder_path=str(toy_adapter / "image_encoder")))
    export_inverter(trained["final"], tmp_path / "exported")
    state = read_adapter(tmp_path / "exported" / "ip-adapter.safetensors")
    assert adapter_kind(state, "ip-adapter.safetensors") == ("plus", 16)
    fresh = read_adapter(tmp_path / "run" / "ip-adapter-init.safetensors")
    assert not torch.equal(fresh["image_proj"]["latents"].float(), state["image_proj"]["latents"].float())
