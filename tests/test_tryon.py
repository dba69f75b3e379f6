"""Virtual try-on (atelier.tryon) on tiny SD 1.x components from small configs under fixed seeds: the
9-channel UNet made from a 4-channel one, CatVTON's attention-only parameters (tiny, and the full-size
49.57 M on the meta device), OOTDiffusion's outfitting fusion, guidance, the person kept outside the
mask, the model folder in plain diffusers, the CLI's one-line errors, and a training run that resumes
exactly after a kill and whose model the batch command runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.core.infotext import parse_parameters
from atelier.errors import UserError
from atelier.testing import save_tiny_pipeline, tiny_pipeline
from atelier.testing.cli import one_error_line, run
from atelier.train.checkpoint import read_state
from atelier.tryon.inpaint_unet import inpainting_unet
from atelier.tryon.methods import SkipAttnProcessor, attention_parameters
from atelier.tryon.model import build_tryon_model, load_tryon_model, save_tryon_model
from atelier.tryon.pipeline import try_on

SIZE = (24, 20)  # person images: W x H, not the model's 16 x 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("base") / "sd1"))


def _person_garment_mask(seed=0):
    rng = np.random.default_rng(seed)
    person = Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    garment = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((SIZE[1], SIZE[0]), np.uint8)
    mask[4:16, 3:18] = 255
    return person, garment, Image.fromarray(mask)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A VITON-HD-layout folder: 3 train and 2 test pairs (masks in agnostic-mask/ and mask/)."""
    root = tmp_path_factory.mktemp("viton")
    for split, n, masks in (("train", 3, "agnostic-mask"), ("test", 2, "mask")):
        for sub in ("image", "cloth", masks):
            (root / split / sub).mkdir(parents=True)
        lines = []
        for k in range(n):
            person, garment, mask = _person_garment_mask(10 * k + (split == "test"))
            person.save(root / split / "image" / f"{k:05d}_00.jpg", quality=95)
            garment.save(root / split / "cloth" / f"{k:05d}_00.jpg", quality=95)
            mask.save(root / split / masks / (f"{k:05d}_00_mask.png" if masks == "agnostic-mask" else f"{k:05d}_00.png"))
            lines.append(f"{k:05d}_00.jpg {k:05d}_00.jpg")
        (root / f"{split}_pairs.txt").write_text("\n".join(lines) + "\n")
    (root / "test_unpaired_pairs.txt").write_text("00000_00.jpg 00001_00.jpg\n00001_00.jpg 00000_00.jpg\n")
    return root


@pytest.fixture(scope="module")
def models(base):
    """Both methods from the tiny text-to-image base, their new conv_in channels set as if trained (zero,
    the mask and the masked image would not reach the UNet yet)."""
    built = {}
    for k, method in enumerate(("catvton", "ootd")):
        model = build_tryon_model(base, method)
        with torch.no_grad():
            g = torch.Generator().manual_seed(k)
            weight = model.unet.conv_in.weight
            weight[:, 4:] = 0.3 * torch.randn(weight[:, 4:].shape, generator=g)
        built[method] = model
    return built


# ---------------------------------------------------------------- the UNets

def test_the_inpainting_unet_starts_as_the_text_to_image_unet_and_round_trips_in_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    base = tiny_pipeline("sd1").unet
    widened, new = inpainting_unet(tiny_pipeline("sd1").unet)
    assert new and widened.config.in_channels == 9 and widened.conv_in.in_channels == 9
    g = torch.Generator().manual_seed(0)
    x, extra, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        want = base(x, 500, text).sample
        for extra_channels in (torch.zeros_like(extra), extra):  # zero weights: the new inputs change nothing yet
            torch.testing.assert_close(widened(torch.cat([x, extra_channels], 1), 500, text).sample, want, rtol=0, atol=1e-6)
    widened.save_pretrained(tmp_path / "unet")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert again.config.in_channels == 9
    assert inpainting_unet(again) == (again, False)  # a 9-channel UNet is used as it is


def test_an_inpainting_base_is_used_as_it_is(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from atelier.testing import tiny_components

    components = tiny_components("sd1")
    inpainting_unet(components["unet"])
    with torch.no_grad():
        components["unet"].conv_in.weight[:, 4:] = 0.1
    StableDiffusionInpaintPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "inpaint")
    catvton = build_tryon_model(tmp_path / "inpaint", "catvton")
    assert not catvton.widened and torch.equal(catvton.unet.conv_in.weight, components["unet"].conv_in.weight)
    ootd = build_tryon_model(tmp_path / "inpaint", "ootd")  # the garment UNet takes the latent channels
    assert ootd.net.garment_unet.config.in_channels == 4
    assert torch.equal(ootd.net.garment_unet.conv_in.weight, components["unet"].conv_in.weight[:, :4])


def test_catvton_trains_self_attention_only_and_skips_cross_attention(models):
    net = models["catvton"].net
    params = net.trainable("attention")
    names = {name for name, p in net.unet.named_parameters() if any(p is q for q in params)}
    assert names and all(".attn1." in name for name in names)
    assert len(names) == sum(1 for n, _ in net.unet.named_parameters() if ".attn1." in n)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in net.unet.parameters()) / 5
    assert all(isinstance(p, SkipAttnProcessor) for n, p in net.unet.attn_processors.items() if n.endswith("attn2.processor"))
    assert len(net.trainable("all")) == len(list(net.unet.parameters()))


def test_catvton_attention_only_is_4957_m_parameters_of_sd15_inpainting():
    from diffusers import UNet2DConditionModel

    from atelier.models.loader import CONFIGS_DIR

    config = {k: v for k, v in json.loads((CONFIGS_DIR / "sd1.json").read_text())["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**config, "in_channels": 9})
    count = sum(p.numel() for p in attention_parameters(unet))
    assert round(count / 1e6, 2) == 49.57, count  # CatVTON's figure
    assert count == 49_574_080  # 16 layers: 5 of width 320, 5 of 640, 6 of 1280; 4 d² + d each


def _latents(seed, n=1):
    g = torch.Generator().manual_seed(seed)
    masked, garment = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    mask = (torch.rand(n, 1, 8, 8, generator=g) > 0.5).float()
    return masked, mask, garment


@torch.no_grad()
def test_ootd_fuses_the_garment_unets_self_attention_states(models):
    net = models["ootd"].net
    assert all(type(p).__name__ == "RecordSelfAttn" for n, p in net.garment_unet.attn_processors.items() if "attn1" in n)
    masked, mask, garment = _latents(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    states = net.condition(garment)
    assert sorted(states) == sorted(n for n in net.unet.attn_processors if n.endswith("attn1.processor"))
    out = net(x, t, mask, masked, states)
    torch.testing.assert_close(net(x, t, mask, masked, net.condition(garment)), out, rtol=0, atol=0)
    other = net(x, t, mask, masked, net.condition(garment.flip(-1) * 2))
    assert (other - out).abs().max() > 1e-4
    dropped = net(x, t, mask, masked, net.condition(garment, torch.tensor([True])))
    torch.testing.assert_close(dropped, net(x, t, mask, masked, net.condition(torch.zeros_like(garment))))


# ---------------------------------------------------------------- sampling

@pytest.mark.parametrize("method", ["catvton", "ootd"])
def test_guidance_1_calls_the_unet_once_per_step_and_the_person_is_kept_outside_the_mask(models, method):
    model = models[method]
    calls = []
    unet_forward = model.net.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(len(sample))
        return unet_forward(sample, *args, **kwargs)

    garment_calls = []
    if method == "ootd":
        garment_forward = model.net.garment_unet.forward
        model.net.garment_unet.forward = lambda *a, **k: (garment_calls.append(1), garment_forward(*a, **k))[1]
    person, garment, mask = _person_garment_mask(3)
    model.net.unet.forward = counting
    try:
        plain = try_on(model, person, garment, mask, steps=3, guidance=1.0, seed=0)
        assert calls == [1, 1, 1]
        calls.clear()
        guided = try_on(model, person, garment, mask, steps=3, guidance=3.0, seed=0)
        assert calls == [2, 2, 2]  # one batch of [no garment | garment] per step
    finally:
        del model.net.unet.forward
        if method == "ootd":
            del model.net.garment_unet.forward
            assert garment_calls == [1, 1]  # once per image, at t = 0 (the guided batch in one call)
    assert plain.size == guided.size == person.size
    inside = np.asarray(mask) > 127
    for image in (plain, guided):
        a, p = np.asarray(image), np.asarray(person)
        assert np.array_equal(a[~inside], p[~inside])
        assert not np.array_equal(a[inside], p[inside])
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))
    again = try_on(model, person, garment, mask, steps=3, guidance=1.0, seed=0)
    assert np.array_equal(np.asarray(again), np.asarray(plain))


def test_a_mask_of_another_size_and_bad_settings_are_refused(models):
    person, garment, mask = _person_garment_mask()
    with pytest.raises(UserError, match="must have the person image's size"):
        try_on(models["catvton"], person, garment, mask.resize((16, 16)), steps=1)
    with pytest.raises(UserError, match="guidance"):
        try_on(models["catvton"], person, garment, mask, steps=1, guidance=0.5)


# ---------------------------------------------------------------- the model folder

@pytest.mark.parametrize("method", ["catvton", "ootd"])
def test_the_model_folder_round_trips_and_loads_in_plain_diffusers(models, tmp_path, method):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    folder = save_tryon_model(models[method], tmp_path / method)
    info = json.loads((folder / "tryon.json").read_text())
    assert info["method"] == method and info["resolution"] == [16, 16]
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert unet.config.in_channels == 9
    AutoencoderKL.from_pretrained(folder, subfolder="vae")
    DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    if method == "ootd":
        assert UNet2DConditionModel.from_pretrained(folder, subfolder="garment_unet").config.in_channels == 4
    loaded = load_tryon_model(folder, device="cpu")
    person, garment, mask = _person_garment_mask(4)
    a = try_on(models[method], person, garment, mask, steps=2, guidance=2.0, seed=1)
    b = try_on(loaded, person, garment, mask, steps=2, guidance=2.0, seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="not catvton|not ootd"):
        load_tryon_model(folder, method="ootd" if method == "catvton" else "catvton")


def test_an_exported_model_keeps_its_results_and_names_no_path_of_this_machine(models, tmp_path):
    from atelier.tryon import export_tryon_model

    earlier = {"steps": 3, "model": str(tmp_path / "first" / "final"), "trained_with": {"data": str(tmp_path / "d0")}}
    trained = save_tryon_model(models["catvton"], tmp_path / "run" / "final",
                               {"trained_with": {"data": str(tmp_path / "data"), "output_dir": str(tmp_path / "run"),
                                                 "base": str(tmp_path / "first" / "final")},
                                "fine_tuned_from": earlier})
    folder = export_tryon_model(trained, tmp_path / "shipped")
    assert next((folder / "unet").glob("*.safetensors")).stat().st_size < \
        0.6 * next((trained / "unet").glob("*.safetensors")).stat().st_size  # stored in fp16
    texts = [p.read_text() for p in folder.rglob("*.json")]
    assert not any(str(tmp_path) in t or "_name_or_path" in t or str(Path.home()) in t for t in texts)
    assert not any(str(models["catvton"].source) in t for t in texts)  # the base model's folder
    info = json.loads((folder / "tryon.json").read_text())
    assert info["trained_with"] == {"data": "data", "output_dir": "run", "base": "final"}
    assert info["fine_tuned_from"] == {"steps": 3, "model": "final", "trained_with": {"data": "d0"}}
    person, garment, mask = _person_garment_mask(4)
    a = np.asarray(try_on(load_tryon_model(trained), person, garment, mask, steps=2, seed=1), dtype=float)
    b = np.asarray(try_on(load_tryon_model(folder), person, garment, mask, steps=2, seed=1), dtype=float)
    assert np.abs(a - b).mean() < 2  # fp16 weights: 8-bit pixels within rounding on average


def test_a_missing_or_damaged_model_folder_is_one_clear_error(models, tmp_path):
    folder = save_tryon_model(models["catvton"], tmp_path / "m")
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot load unet"):
        load_tryon_model(folder, device="cpu")
    (folder / "tryon.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tryon_model(folder)
    with pytest.raises(UserError, match="not a try-on model folder"):
        load_tryon_model(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_tryon_model(tmp_path / "nowhere")


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def catvton_folder(models, tmp_path_factory):
    return save_tryon_model(models["catvton"], tmp_path_factory.mktemp("cli") / "catvton")


def test_tryon_command_writes_the_result_with_its_parameters(catvton_folder, data, tmp_path, capsys):
    person, garment = data / "test" / "image" / "00000_00.jpg", data / "test" / "cloth" / "00001_00.jpg"
    mask = data / "test" / "mask" / "00000_00.png"
    out = tmp_path / "r.png"
    code, stdout, _ = run(["tryon", person, garment, "--mask", mask, "--model", catvton_folder, "--steps", 2,
                           "--guidance", 1.5, "--seed", 7, "--out", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["out"] == str(out)
    import hashlib

    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["Try-on method"] == "catvton" and params["Steps"] == "2" and params["Guidance"] == "1.5"
    assert params["Seed"] == "7" and params["Model"] == "catvton"  # the folder's name
    assert params["Person hash"] == hashlib.sha256(person.read_bytes()).hexdigest()
    assert params["Mask hash"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert Image.open(out).size == Image.open(person).size


def test_tryon_command_errors_are_one_line(catvton_folder, data, tmp_path, capsys):
    person, garment = data / "test" / "image" / "00000_00.jpg", data / "test" / "cloth" / "00000_00.jpg"
    mask = data / "test" / "mask" / "00000_00.png"
    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    common = ["--model", catvton_folder, "--steps", 1, "--out", tmp_path / "o.png"]
    cases = {
        "not found": ["tryon", tmp_path / "none.jpg", garment, "--mask", mask, *common],
        "not an image": ["tryon", person, text, "--mask", mask, *common],
        "person image's size": ["tryon", person, garment, "--mask", small, *common],
        "unknown try-on method": ["tryon", person, garment, "--mask", mask, "--method", "vitonhd", *common],
        "--mask is required": ["tryon", person, garment, *common],
        "toyworld-nothing": ["tryon", person, garment, "--mask", mask, "--model", "toyworld-nothing",
                             "--out", tmp_path / "o.png"],
        "--pairs needs": ["tryon", "--pairs", data / "test_pairs.txt"],
    }
    for expected, argv in cases.items():
        code, _, err = run(argv, capsys)
        assert one_error_line(code, err) and expected in err, (expected, err)


# ---------------------------------------------------------------- training

def _train(tmp_path, base, data, **kw):
    from atelier.train.tryon import TryOnTrainConfig, train_tryon

    settings = dict(method="catvton", data=str(data), base=base, output_dir=str(tmp_path / "out"), max_train_steps=4,
                    train_batch_size=2, checkpointing_steps=2, learning_rate=1e-3, validation_steps=4,
                    num_validation_images=2, validation_inference_steps=2, condition_dropout=0.5, threads=1)
    return train_tryon(TryOnTrainConfig(**{**settings, **kw}))


def test_catvton_training_resumes_exactly_after_a_kill_and_the_batch_command_runs_its_model(
        tmp_path, base, data, capsys, kill_after_checkpoint):
    from safetensors.torch import load_file

    straight = _train(tmp_path / "a", base, data)
    kill_after_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", base, data)
    kill_after_checkpoint(None)
    with pytest.raises(UserError, match="other settings"):  # a resume with other settings is refused
        _train(tmp_path / "b", base, data, learning_rate=5e-4)
    capsys.readouterr()
    resumed = _train(tmp_path / "b", base, data)
    assert "resumed at step 2" in capsys.readouterr().err
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert read_state(a / "checkpoint-4" / "training_state.safetensors")["losses"] == \
        read_state(b / "checkpoint-4" / "training_state.safetensors")["losses"]
    wa, wb = (load_file(next((x / "final" / "unet").glob("*.safetensors"))) for x in (a, b))
    for key, value in wa.items():
        torch.testing.assert_close(wb[key], value, rtol=0, atol=0)
    assert straight["steps"] == resumed["steps"] == 4
    for name in ("loss.png", "settings.json", "done.json", "validation/step_000004.png", "final/tryon.json"):
        assert (a / name).is_file(), name
    grid = Image.open(a / "validation" / "step_000004.png")
    assert grid.size == (3 * 16, 2 * 16)  # rows of person | garment | result
    # a text-to-image base: conv_in was widened, and trains with the self-attention layers
    settings = json.loads((a / "settings.json").read_text())
    assert settings["widened_conv_in"] and settings["options"]["trainable"] == "attention"
    assert wa["conv_in.weight"][:, 4:].abs().max() > 0

    # the batch command over the unpaired test pairs, with the trained model
    code, out, err = run(["tryon", "--pairs", data / "test_unpaired_pairs.txt", "--data", data, "--outdir",
                          tmp_path / "results", "--model", a / "final", "--steps", 2, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["results"] == 2
    made = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert made == ["00000_00__00001_00.png", "00001_00__00000_00.png"]  # the names `atelier evaluate tryon` reads
    lines = (tmp_path / "results" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["garment"].endswith("00001_00.jpg")
    # a finished run says so
    assert _train(tmp_path / "a", base, data)["resumed_done"]


def test_ootd_with_a_frozen_garment_unet_trains_only_the_tryon_unet(tmp_path, base, data):
    from safetensors.torch import load_file

    summary = _train(tmp_path, base, data, method="ootd", freeze_garment_unet=True, max_train_steps=1,
                     validation_steps=None, checkpointing_steps=1)
    final = tmp_path / "out" / "final"
    garment = load_file(next((final / "garment_unet").glob("*.safetensors")))
    original = tiny_pipeline("sd1").unet.state_dict()  # the base's UNet
    for key, value in garment.items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    tryon = load_file(next((final / "unet").glob("*.safetensors")))
    changed = [k for k, v in tryon.items() if k != "conv_in.weight" and k in original and not torch.equal(v, original[k])]
    assert changed and summary["steps"] == 1
    assert load_tryon_model(final, device="cpu").method == "ootd"


def test_training_refusals_are_one_line(tmp_path, base, data, capsys):
    argv = ["train", "tryon", "--data", data, "--base", base, "--output_dir", tmp_path / "o", "--max_train_steps", 1]
    for extra, expected in ((["--method", "vton"], "--method"), (["--use_8bit_adam"], "--use_8bit_adam"),
                            (["--condition_dropout", "2"], "--condition_dropout"),
                            (["--freeze_garment_unet"], "--freeze_garment_unet")):
        code, _, err = run(argv + extra, capsys)
        assert one_error_line(code, err) and expected in err, err
    code, _, err = run(["train", "tryon", "--data", tmp_path / "none", "--output_dir", tmp_path / "o"], capsys)
    assert one_error_line(code, err) and "not found" in err


def test_training_fine_tunes_a_try_on_model_given_as_base(tmp_path, base, data, capsys, monkeypatch):
    """--base a try-on model folder: training starts from its weights (not the text-to-image base's),
    keeps its method, and records where it came from; a cosine schedule decays the rate to 0."""
    from safetensors.torch import load_file

    first = _train(tmp_path / "a", base, data, method="ootd", freeze_garment_unet=True, max_train_steps=2,
                   validation_steps=None)
    from atelier.train.loop import TrainLoop

    rates, original_run = [], TrainLoop.run

    def recording_run(self, step_fn, lr=None, **kw):
        rates.extend(lr(i) for i in range(self.total))
        return original_run(self, step_fn, lr=lr, **kw)

    monkeypatch.setattr(TrainLoop, "run", recording_run)
    # a rate too small to move fp32 weights visibly: the result must be the first model, not the base
    second = _train(tmp_path / "b", first["model"], data, method="ootd", freeze_garment_unet=True, max_train_steps=2,
                    validation_steps=None, learning_rate=1e-12, lr_scheduler="cosine")
    start, tuned = (load_file(next((Path(s["model"]) / "unet").glob("*.safetensors"))) for s in (first, second))
    base_unet = tiny_pipeline("sd1").unet.state_dict()
    for key, value in start.items():
        torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-6)
    assert any(not torch.allclose(start[k], v) for k, v in base_unet.items() if k != "conv_in.weight" and k in start)
    info = json.loads((Path(second["model"]) / "tryon.json").read_text())
    assert info["method"] == "ootd" and info["fine_tuned_from"]["model"] == first["model"]
    assert info["fine_tuned_from"]["steps"] == 2 and info["base_model"] == base
    assert not json.loads((tmp_path / "b" / "out" / "settings.json").read_text())["widened_conv_in"]
    assert rates[0] == pytest.approx(1e-12) and 0 < rates[1] < rates[0]  # cosine over the run's 2 steps
    # the wrong method, or a prompt for a model that keeps its own, is one clear line
    capsys.readouterr()
    for extra, expected in ((["--method", "catvton"], "an ootd try-on model, not catvton"), (["--method", "ootd", "--prompt", "x"], "--prompt")):
        code, _, err = run(["train", "tryon", "--data", data, "--base", first["model"], "--output_dir", tmp_path / "c",
                            "--max_train_steps", 1] + extra, capsys)
        assert one_error_line(code, err) and expected in err, err
    with pytest.raises(UserError, match="--lr_scheduler"):
        _train(tmp_path / "d", base, data, lr_scheduler="sine")
