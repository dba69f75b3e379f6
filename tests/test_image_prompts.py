"""IP-Adapters through diffusers on tiny SD1 / SDXL pipelines: tiny CLIP vision encoders and tiny
adapters with h94 state dicts (`image_proj.*`, `ip_adapter.1.to_k_ip.weight`, ...), saved in the
h94/IP-Adapter layout and loaded back from that layout, a plain folder, a single file and a hub
cache; scale 0 is the text-only image bit for bit; several adapters, per-block scales, masks; each
reference is embedded once."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.errors import UserError
from atelier.generate import GenerationRequest, generate
from atelier.image_prompts import load_ip_adapter, recorded_image_prompts, resolve_adapter, sha256_of
from atelier.core.infotext import parse_parameters
from atelier.testing import tiny_pipeline
from atelier.testing.ip_adapters import base_adapter, write_h94_layout

@pytest.fixture(scope="module")
def h94(tmp_path_factory):
    return write_h94_layout(tmp_path_factory.mktemp("IP-Adapter"))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        path = folder / f"ref{k}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run(pipe, prompts=(), **kw):
    kw = {"seed": 3, "steps": 2, "width": 16, "height": 16, **kw}
    request = GenerationRequest("a red circle", cfg_scale=kw.pop("cfg", 5.0), image_prompts=list(prompts), **kw)
    return generate(pipe, request, progress=False)


def pixels(result):
    return np.asarray(result[0].image)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_layout_folder_base_adapter_changes_the_image_and_scale_0_is_text_only(h94, refs, family):
    pipe = tiny_pipeline(family)
    text_only = pixels(run(pipe))
    adapters = load_ip_adapter(pipe, h94)
    assert adapters.names == ["ip-adapter_sd15" if family == "sd1" else "ip-adapter_sdxl"]
    assert adapters.adapters[0].tokens == 4
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    off = pixels(run(pipe, [adapters.reference(refs[0], scale=0.0)]))
    assert np.array_equal(off, text_only)
    on = run(pipe, [adapters.reference(refs[0], scale=1.0)])
    assert not np.array_equal(pixels(on), text_only)
    fields = parse_parameters(on[0].parameters)
    assert fields["IP-Adapter"] == adapters.names[0]
    assert fields["IP-Adapter image"] == f"sha256:{sha256_of(refs[0])}"
    assert fields["IP-Adapter scale"] == "1"


def test_plus_adapter_from_a_single_file_finds_its_encoder_in_the_layout(h94, refs):
    pipe = tiny_pipeline("sd1")
    text_only = pixels(run(pipe))
    adapters = load_ip_adapter(pipe, h94 / "models" / "ip-adapter-plus_sd15.safetensors")
    assert (adapters.adapters[0].kind, adapters.adapters[0].tokens) == ("plus", 16)
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    assert np.array_equal(pixels(run(pipe, [adapters.reference(refs[0], scale=0)])), text_only)
    assert not np.array_equal(pixels(run(pipe, [adapters.reference(refs[0], scale=0.8)])), text_only)


def test_sdxl_vit_h_adapter_takes_the_sd15_encoder_and_a_variant_picks_the_file(h94, refs):
    files = resolve_adapter(h94, family="sdxl", variant="plus")
    assert files.weights == h94 / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"
    assert files.image_encoder == h94 / "models" / "image_encoder"
    pipe = tiny_pipeline("sdxl")
    adapters = load_ip_adapter(pipe, h94, variant="plus")
    assert adapters.adapters[0].kind == "plus"
    run(pipe, [adapters.reference(refs[0], scale=0.5)])


def test_plain_folder_and_single_file_with_an_explicit_encoder(h94, refs, tmp_path):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    shutil.copy(h94 / "models" / "ip-adapter_sd15.safetensors", folder / "adapter.safetensors")
    with pytest.raises(UserError, match="no image encoder found for adapter.safetensors"):
        load_ip_adapter(tiny_pipeline("sd1"), folder)
    shutil.copytree(h94 / "models" / "image_encoder", folder / "image_encoder")
    pipe = tiny_pipeline("sd1")
    from_folder = pixels(run(pipe, [load_ip_adapter(pipe, folder).reference(refs[0])]))

    lone = tmp_path / "lone.safetensors"
    shutil.copy(folder / "adapter.safetensors", lone)
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, lone, image_encoder=h94 / "models" / "image_encoder")
    assert adapters.names == ["lone"]
    assert np.array_equal(pixels(run(pipe, [adapters.reference(refs[0])])), from_folder)


def _hub_cache(root, h94, files):
    repo = root / "models--h94--IP-Adapter"
    snapshot = repo / "snapshots" / ("0" * 40)
    for rel in files:
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (h94 / rel).is_dir():
            shutil.copytree(h94 / rel, target)
        else:
            shutil.copy(h94 / rel, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_id_from_the_cache_only_and_a_missing_file_is_named(h94, refs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "hub", h94, ["models/ip-adapter-plus_sd15.safetensors"])
    with pytest.raises(UserError, match=r"'h94/IP-Adapter' file models/ip-adapter_sd15.safetensors is not in the Hugging Face cache"):
        load_ip_adapter(tiny_pipeline("sd1"), None)
    with pytest.raises(UserError, match=r"file models/image_encoder/config.json is not in the Hugging Face cache"):
        load_ip_adapter(tiny_pipeline("sd1"), "h94/IP-Adapter", variant="plus")
    _hub_cache(tmp_path / "hub", h94, ["models/image_encoder"])
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, "plus")  # a variant of the cached h94/IP-Adapter
    assert adapters.adapters[0].files.repo == "h94/IP-Adapter"
    cached = pixels(run(pipe, [adapters.reference(refs[0], scale=0.7)]))
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors")
    assert np.array_equal(pixels(run(pipe, [adapters.reference(refs[0], scale=0.7)])), cached)
    pipe = tiny_pipeline("sd1")
    local = load_ip_adapter(pipe, h94, variant="plus")
    assert np.array_equal(pixels(run(pipe, [local.reference(refs[0], scale=0.7)])), cached)


def test_two_adapters_at_once_and_their_metadata(h94, refs):
    pipe = pipe_both = tiny_pipeline("sd1")
    both = load_ip_adapter(pipe, [h94, h94], variant=["base", "plus"])
    assert [a.kind for a in both.adapters] == ["base", "plus"]
    prompts = [both.reference(refs[0], scale=0.6), both.reference(refs[1], adapter=1, scale=0.4)]
    together = run(pipe, prompts)
    fields = parse_parameters(together[0].parameters)
    assert fields["IP-Adapter"] == "ip-adapter_sd15" and fields["IP-Adapter 2"] == "ip-adapter-plus_sd15"
    assert fields["IP-Adapter 2 image"] == f"sha256:{sha256_of(refs[1])}" and fields["IP-Adapter 2 scale"] == "0.4"
    assert [r.name for r in recorded_image_prompts(fields)] == both.names
    # the second adapter at scale 0 leaves the first one's image
    first_only = run(pipe, [both.reference(refs[0], scale=0.6), both.reference(refs[1], adapter=1, scale=0)])
    pipe = tiny_pipeline("sd1")
    single = load_ip_adapter(pipe, h94)
    assert np.array_equal(pixels(first_only), pixels(run(pipe, [single.reference(refs[0], scale=0.6)])))
    assert not np.array_equal(pixels(first_only), pixels(together))
    with pytest.raises(UserError, match="ip-adapter-plus_sd15 is loaded but has no reference"):
        run(pipe_both, [both.reference(refs[0])])
    with pytest.raises(UserError, match="must all come from one IPAdapters"):
        run(pipe_both, [single.reference(refs[0]), both.reference(refs[0], adapter=1)])


def test_per_block_scales_instantstyle(h94, refs):
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, h94)
    style = {"up": {"block_1": [0.0, 1.0]}}  # the tiny UNet's last up block has two attention layers
    styled = pixels(run(pipe, [adapters.reference(refs[0], scale=style)]))
    scales = {name: proc.scale[0] for name, proc in pipe.unet.attn_processors.items() if hasattr(proc, "scale")}
    assert scales == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": 0.0,
                      "mid_block.attentions.0.transformer_blocks.0.attn2.processor": 0.0,
                      "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 0.0,
                      "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": 1.0}
    full = pixels(run(pipe, [adapters.reference(refs[0], scale=1.0)]))
    off = pixels(run(pipe, [adapters.reference(refs[0], scale=0.0)]))
    assert not np.array_equal(styled, full) and not np.array_equal(styled, off)
    fields = parse_parameters(run(pipe, [adapters.reference(refs[0], scale=style)])[0].parameters)
    assert json.loads(fields["IP-Adapter scale"]) == style
    with pytest.raises(UserError, match="no up block_0 with attention; its up blocks with attention are block_1"):
        run(pipe, [adapters.reference(refs[0], scale={"up": {"block_0": [1.0]}})])
    with pytest.raises(UserError, match="Expected 2 scales for up.block_1, got 3"):
        run(pipe, [adapters.reference(refs[0], scale={"up": {"block_1": [1.0, 0.0, 1.0]}})])


def test_masks_confine_the_reference(h94, refs):
    pipe = tiny_pipeline("sd1")
    text_only = pixels(run(pipe))
    adapters = load_ip_adapter(pipe, h94)
    assert np.array_equal(pixels(run(pipe)), text_only)  # adapters loaded, no reference: left out
    unmasked = pixels(run(pipe, [adapters.reference(refs[0])]))
    black, white = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)
    half = Image.fromarray(np.repeat(np.array([[0] * 8 + [255] * 8], dtype=np.uint8), 16, axis=0))
    assert np.array_equal(pixels(run(pipe, [adapters.reference(refs[0], mask=black)])), text_only)
    assert np.abs(pixels(run(pipe, [adapters.reference(refs[0], mask=white)])).astype(int) - unmasked).max() <= 1
    halfway = run(pipe, [adapters.reference(refs[0], mask=half)])
    assert not np.array_equal(pixels(halfway), unmasked) and not np.array_equal(pixels(halfway), text_only)
    assert parse_parameters(halfway[0].parameters)["IP-Adapter mask"] == f"sha256:{sha256_of(half)}"


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_each_reference_is_embedded_once(h94, refs, variant):
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, h94, variant=variant)
    calls = []
    adapters.encoder.register_forward_hook(lambda *a: calls.append(1))
    first = run(pipe, [adapters.reference(refs[0], scale=0.7)], n_images=2)
    again = run(pipe, [adapters.reference(str(refs[0]), scale=0.7)], n_images=2, batch_size=2)
    assert adapters.encoded == 1
    assert len(calls) == (1 if variant == "base" else 2)  # Plus also embeds a black image for the negative
    assert [np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again)] == [True, True]
    run(pipe, [adapters.reference(refs[1], scale=0.7)])
    assert adapters.encoded == 2


def test_img2img_and_no_guidance(h94, refs):
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, h94)
    init = Image.open(refs[1]).convert("RGB").resize((16, 16))
    plain = pixels(run(pipe, init_image=init, steps=4, cfg=1.0))
    guided = pixels(run(pipe, [adapters.reference(refs[0])], init_image=init, steps=4, cfg=1.0))
    assert not np.array_equal(plain, guided)


def test_what_does_not_fit_is_one_clear_error(h94, refs, tmp_path):
    sd1 = tiny_pipeline("sd1")
    with pytest.raises(UserError, match="made for 96-wide cross-attention models; this model is 32-wide"):
        load_ip_adapter(sd1, h94 / "sdxl_models" / "ip-adapter_sdxl.safetensors")
    with pytest.raises(UserError, match="takes 24-wide image embeddings; the image encoder .* gives 16-wide"):
        load_ip_adapter(tiny_pipeline("sdxl"), h94 / "sdxl_models" / "ip-adapter_sdxl.safetensors",
                        image_encoder=h94 / "models" / "image_encoder")
    with pytest.raises(UserError, match="no adapter for SD 2.x models .*SD-Turbo"):
        load_ip_adapter(tiny_pipeline("turbo"), h94)
    with pytest.raises(UserError, match="has no models/ip-adapter-full-face_sd15.safetensors"):
        load_ip_adapter(sd1, h94, variant="full-face")
    with pytest.raises(UserError, match="unknown IP-Adapter variant 'huge'"):
        load_ip_adapter(sd1, h94, variant="huge")
    with pytest.raises(UserError, match="different image encoders"):
        load_ip_adapter(tiny_pipeline("sdxl"), [h94, h94], variant=["base", "plus"])
    pickled = tmp_path / "models" / "ip-adapter_sd15.bin"
    pickled.parent.mkdir()
    shutil.copytree(h94 / "models" / "image_encoder", pickled.parent / "image_encoder")
    state = base_adapter(sd1.unet)
    torch.save({g: {k.partition(".")[2]: v for k, v in state.items() if k.startswith(g)} for g in ("image_proj", "ip_adapter")},
               pickled)
    with pytest.raises(UserError, match="pickle file"):
        load_ip_adapter(sd1, pickled)
    adapters = load_ip_adapter(sd1, pickled, allow_pickle=True)
    pipe = tiny_pipeline("sd1")
    safe = load_ip_adapter(pipe, h94)
    assert np.array_equal(pixels(run(sd1, [adapters.reference(refs[0])])), pixels(run(pipe, [safe.reference(refs[0])])))
    pickled_encoder = tmp_path / "bin-encoder"
    pickled_encoder.mkdir()
    shutil.copy(h94 / "models" / "image_encoder" / "config.json", pickled_encoder)
    (pickled_encoder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="only pickle weights"):
        load_ip_adapter(tiny_pipeline("sd1"), h94, image_encoder=pickled_encoder)
    with pytest.raises(UserError, match="between 0 and 5"):
        safe.reference(refs[0], scale=-1)
    with pytest.raises(UserError, match="image not found"):
        safe.reference(tmp_path / "nope.png")


def test_edit_follows_the_reference_and_scale_0_changes_nothing(h94, refs):
    from atelier.edit import EditSettings, Editor

    pipe = tiny_pipeline("sd1")
    image = Image.open(refs[1]).convert("RGB").resize((16, 16))
    settings = EditSettings(method="ddpm", steps=3, mask_from="none", seed=1)
    plain = np.asarray(Editor(pipe).edit(image, "a red circle", "a blue circle", settings).image)
    adapters = load_ip_adapter(pipe, h94)
    hook = adapters.unet_hook([adapters.reference(refs[0], scale=0)])
    off = np.asarray(Editor(pipe).edit(image, "a red circle", "a blue circle", settings).image)
    hook.remove()
    hook = adapters.unet_hook([adapters.reference(refs[0], scale=1)])
    on = np.asarray(Editor(pipe).edit(image, "a red circle", "a blue circle", settings).image)
    hook.remove()
    assert np.array_equal(off, plain) and not np.array_equal(on, plain)
    # adapters loaded but no reference: every method edits as the text-only model, and the adapters'
    # scales are as they were afterwards
    adapters.set_scales([adapters.reference(refs[0], scale=0.7)])
    for method in ("ddpm", "diffedit", "turbo", "img2img"):
        s = EditSettings(method=method, steps=3, mask_from="none", seed=1, strength=0.6)
        text_only = np.asarray(Editor(tiny_pipeline("sd1")).edit(image, "a red circle", "a blue circle", s).image)
        assert np.array_equal(np.asarray(Editor(pipe).edit(image, "a red circle", "a blue circle", s).image), text_only)
    from atelier.image_prompts.adapters import ip_attention_processors

    assert all(p.scale == [0.7] for p in ip_attention_processors(pipe.unet))


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from atelier.testing import save_tiny_pipeline

    return save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("models") / "tiny-sd1")


def cli(argv, capsys):
    from atelier.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_records_the_reference_and_from_needs_it_back(model, h94, refs, tmp_path, capsys):
    from atelier.core.images import read_parameters

    out = tmp_path / "ip.png"
    base = ["generate", "a red circle", "--model", model, "--steps", "2", "--seed", "4", "--quiet"]
    code, _, err = cli(base + ["--out", out, "--ip-image", refs[0], "--ip-adapter", h94, "--ip-scale", "0.6"], capsys)
    assert code == 0, err
    fields = parse_parameters(read_parameters(out))
    assert (fields["IP-Adapter"], fields["IP-Adapter scale"]) == ("ip-adapter_sd15", "0.6")
    assert fields["IP-Adapter image"] == f"sha256:{sha256_of(refs[0])}"
    assert f'IP-Adapter image: "sha256:{sha256_of(refs[0])}"' in read_parameters(out)

    code, _, err = cli(["generate", "--from", out, "--out", tmp_path / "again.png", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "reference image (sha256:" in err and "not at hand: pass it with --ip-image" in err
    code, _, err = cli(["generate", "--from", out, "--out", tmp_path / "again.png", "--quiet", "--ip-image", refs[1],
                        "--ip-adapter", h94], capsys)
    assert code == 2 and "is not the reference" in err and err.count("\n") == 1
    code, _, err = cli(["generate", "--from", out, "--out", tmp_path / "again.png", "--quiet", "--ip-image", refs[0],
                        "--ip-adapter", h94, "--model", model], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))

    code, _, err = cli(base + ["--out", tmp_path / "plain.png"], capsys)
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "plain.png")))
    code, _, err = cli(base + ["--out", tmp_path / "style.png", "--ip-image", refs[0], "--ip-adapter", h94,
                               "--ip-scale", '{"up": {"block_1": [0.0, 1.0]}}'], capsys)
    assert code == 0, err
    assert json.loads(parse_parameters(read_parameters(tmp_path / "style.png"))["IP-Adapter scale"]) == {"up": {"block_1": [0.0, 1.0]}}


def test_cli_refusals_are_one_line(model, h94, refs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    out = ["--out", tmp_path / "x.png", "--steps", "2", "--quiet"]
    cases = [
        (["generate", "a red circle", "--ip-image", refs[0], "--ip-adapter", h94, *out], "is made for"),
        (["img2img", refs[1], "a red circle", "--model", "toyworld-turbo", "--ip-image", refs[0], "--ip-adapter",
          tmp_path / "no-such-adapter", *out], "no such file or folder"),
        (["generate", "a red circle", "--model", model, "--ip-image", refs[0], *out],
         "'h94/IP-Adapter' file models/ip-adapter_sd15.safetensors is not in the Hugging Face cache"),
        (["generate", "a red circle", "--model", model, "--ip-scale", "0.5", *out], "--ip-scale needs --ip-image"),
        (["generate", "a red circle", "--model", model, "--ip-image", tmp_path / "nope.png", "--ip-adapter", h94, *out],
         "reference image not found"),
        (["generate", "a red circle", "--model", model, "--ip-image", refs[0], "--ip-adapter", h94, "--ip-scale", "{oops",
          *out], "is not valid JSON"),
        (["edit", refs[1], "--source", "a red circle", "--target", "a blue circle", "--model", model, "--ip-image", refs[0],
          "--ip-adapter", h94, "--mask-from", "attention", "--out", tmp_path / "e.png"], "--mask-from attention/both"),
        (["edit", refs[1], "--source", "a red circle", "--target", "a blue circle", "--model", "toyworld-turbo",
          "--method", "one-step", "--ip-image", refs[0], "--out", tmp_path / "e.png"],
         "--ip-image does not apply to --method one-step: its image branch takes the image being edited"),
        (["edit", refs[1], "--source", "a red circle", "--target", "a blue circle", "--model", "toyworld-turbo",
          "--method", "one-step", "--ip-adapter", h94, "--image-branch", "off", "--out", tmp_path / "e.png"],
         "nothing would use the adapter"),
    ]
    for argv, message in cases:
        code, _, err = cli(argv, capsys)
        assert code == 2 and err.startswith("atelier: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (message, err)
    assert not (tmp_path / "x.png").exists()


def test_cli_edit_with_a_reference(model, h94, refs, tmp_path, capsys):
    from atelier.core.images import read_parameters

    image = tmp_path / "in.png"
    Image.open(refs[1]).convert("RGB").resize((16, 16)).save(image)
    edit = ["edit", image, "--source", "a red circle", "--target", "a blue circle", "--model", model, "--steps", "3",
            "--method", "ddpm", "--mask-from", "none"]
    assert cli(edit + ["--out", tmp_path / "plain.png"], capsys)[0] == 0
    code, _, err = cli(edit + ["--out", tmp_path / "ip.png", "--ip-image", refs[0], "--ip-adapter", h94], capsys)
    assert code == 0, err
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "ip.png")))
    fields = parse_parameters(read_parameters(tmp_path / "ip.png"))
    assert fields["IP-Adapter image"] == f"sha256:{sha256_of(refs[0])}" and fields["Edit source"] == "a red circle"
