"""Training image prompts: the toy CLIP (contrastive, exported so its vision tower is an IP-Adapter image
encoder) and `atelier train ip-adapter` on tiny components (the recipe's trainable set, exact resume
after a kill, an h94 adapter that diffusers and --ip-adapter load, and refusals in one line)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.generate import GenerationRequest, generate
from atelier.image_prompts import load_ip_adapter, read_adapter
from atelier.testing import save_tiny_pipeline, tiny_pipeline
from atelier.testing.ip_adapters import save_encoder
from atelier.train import ip_adapter as ip_mod
from atelier.train.checkpoint import load_state
from atelier.train.ip_adapter import IPAdapterConfig, train_ip_adapter


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    return save_tiny_pipeline(tiny_pipeline("sd1"), tmp_path_factory.mktemp("sd1") / "model")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return save_encoder(tmp_path_factory.mktemp("enc") / "image_encoder", projection_dim=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The training script's data file: a JSON list of {"image_file", "text"}."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    items = []
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        items.append({"image_file": f"{k}.png", "text": "a red circle" if k % 2 else "a blue square"})
    (folder / "data.json").write_text(json.dumps(items))
    return folder / "data.json"


def _cfg(tmp_path, tiny_sd1, encoder, data, **kw) -> IPAdapterConfig:
    settings = dict(pretrained_model_name_or_path=str(tiny_sd1), image_encoder_path=str(encoder),
                    data_json_file=str(data), output_dir=str(tmp_path / "run"), train_batch_size=2,
                    max_train_steps=4, checkpointing_steps=2, validation_steps=4, num_validation_images=2,
                    learning_rate=1e-2)
    return IPAdapterConfig(**{**settings, **kw})


def _steers(pipe, adapters, tmp_path, grey: int) -> bool:
    """A flat grey reference changes the tiny pipeline's image of a caption (the adapter is wired in)."""
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((16, 16, 3), grey, np.uint8)).save(ref)
    request = dict(seed=1, steps=2, width=16, height=16, cfg_scale=5.0)
    plain = generate(pipe, GenerationRequest("a red circle", **request), progress=False)[0].image
    steered = generate(pipe, GenerationRequest("a red circle", image_prompts=[adapters.reference(ref)], **request),
                       progress=False)[0].image
    return not np.array_equal(np.asarray(plain), np.asarray(steered))


def test_ip_adapter_trains_only_the_adapter_resumes_exactly_and_loads_back(tmp_path, tiny_sd1, encoder, data,
                                                                           monkeypatch, capsys):
    straight = train_ip_adapter(_cfg(tmp_path / "a", tiny_sd1, encoder, data))
    losses = load_state(tmp_path / "a" / "run" / "checkpoint.safetensors")["losses"]

    real, calls = ip_mod.Data.batch, {"n": 0}

    def dies_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the validation references, steps 1 and 2, then killed
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ip_mod.Data, "batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_ip_adapter(_cfg(tmp_path / "b", tiny_sd1, encoder, data))
    monkeypatch.setattr(ip_mod.Data, "batch", real)
    resumed = train_ip_adapter(_cfg(tmp_path / "b", tiny_sd1, encoder, data))
    assert "resumed at step 2" in capsys.readouterr().err
    np.testing.assert_allclose(load_state(tmp_path / "b" / "run" / "checkpoint.safetensors")["losses"], losses, rtol=1e-5)
    assert resumed["steps"] == straight["steps"] == 4
    run = tmp_path / "b" / "run"
    assert (run / "loss.png").is_file() and list((run / "validation").glob("step_*.png"))

    # the h94 layout: only the projection and to_k_ip / to_v_ip, one pair per cross-attention layer
    final = run / "final"
    state = read_adapter(final / "ip-adapter.safetensors")
    assert sorted(state["image_proj"]) == ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
    pipe = tiny_pipeline("sd1")
    attn2 = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(state["ip_adapter"]) == sorted(f"{2 * k + 1}.{w}_ip.weight" for k in range(len(attn2)) for w in ("to_k", "to_v"))
    # the recipe's initialisation moved: to_k_ip started as to_k and trained
    to_k = pipe.unet.get_submodule(attn2[0].removesuffix(".processor")).to_k.weight
    assert not torch.allclose(state["ip_adapter"]["1.to_k_ip.weight"].float(), to_k, atol=1e-4)

    # it loads back through atelier (and so through diffusers' load_ip_adapter) and steers the image
    adapters = load_ip_adapter(pipe, final)
    assert _steers(pipe, adapters, tmp_path, grey=200)
    assert train_ip_adapter(_cfg(tmp_path / "b", tiny_sd1, encoder, data))["resumed_done"]


def test_continuing_from_an_adapter_starts_where_it_ended(tmp_path, tiny_sd1, encoder, data):
    first = train_ip_adapter(_cfg(tmp_path / "a", tiny_sd1, encoder, data, max_train_steps=2))
    second = _cfg(tmp_path / "b", tiny_sd1, encoder, data, max_train_steps=1, pretrained_ip_adapter_path=first["final"],
                  learning_rate=1e-12)
    train_ip_adapter(second)
    a = read_adapter(f"{first['final']}/ip-adapter.safetensors")
    b = read_adapter(tmp_path / "b" / "run" / "final" / "ip-adapter.safetensors")
    # the continued adapter's record carries the one it started from
    record = json.loads((tmp_path / "b" / "run" / "final" / "atelier.json").read_text())
    assert record["fine_tuned_from"] == json.loads((tmp_path / "a" / "run" / "final" / "atelier.json").read_text())
    assert record["fine_tuned_from"]["trained_with"]["max_train_steps"] == 2
    for group in ("image_proj", "ip_adapter"):
        for key in a[group]:
            torch.testing.assert_close(a[group][key].float(), b[group][key].float(), atol=2e-3, rtol=0)


def test_a_distilled_base_trains_at_its_sampling_timesteps(tmp_path, tiny_sd1, encoder, data, monkeypatch):
    """--train_timesteps: every training sample's timestep comes from the list (SD-Turbo's 999,749,499,249),
    or, with --train_timesteps_share, that share of them; the rest stay uniform; the record keeps the list."""
    seen = []
    real = ip_mod.AdapterTrainee.forward

    def recording(self, x_t, t, *args, **kwargs):
        seen.extend(int(v) for v in t)
        return real(self, x_t, t, *args, **kwargs)

    monkeypatch.setattr(ip_mod.AdapterTrainee, "forward", recording)
    summary = train_ip_adapter(_cfg(tmp_path / "a", tiny_sd1, encoder, data, train_timesteps=(999, 749, 499, 249),
                                    train_batch_size=4, max_train_steps=6))
    assert len(seen) == 24 and set(seen) <= {999, 749, 499, 249} and len(set(seen)) > 1
    record = json.loads((tmp_path / "a" / "run" / "final" / "atelier.json").read_text())
    assert record["trained_with"]["train_timesteps"] == [999, 749, 499, 249]
    assert summary["final"]
    seen.clear()
    train_ip_adapter(_cfg(tmp_path / "b", tiny_sd1, encoder, data, train_timesteps=(999,), train_timesteps_share=0.5,
                          train_batch_size=8, max_train_steps=4))
    assert 4 <= seen.count(999) < len(seen) == 32


@pytest.mark.parametrize("args, words", [
    (["--train_timesteps", "999,abc"], "not a comma-separated list of timesteps"),
    (["--train_timesteps", "1000"], "--train_timesteps must list training timesteps between 0 and 999"),
    (["--train_timesteps", "999", "--train_timesteps_share", "2"], "--train_timesteps_share must be"),
    (["--max_train_steps", "0"], "--max_train_steps must be a whole number at least 1"),
    (["--text_drop_rate", "1.5"], "--text_drop_rate must be"),
    (["--text_drop_rate", "0.5", "--image_drop_rate", "0.5", "--both_drop_rate", "0.1"], "must be at most 1"),
    (["--data_json_file", "missing.json"], "--data_json_file not found"),
    (["--pretrained_model_name_or_path", "{model}", "--data_json_file", "{data}"], "--image_encoder_path is required"),
])
def test_train_ip_adapter_cli_refuses_in_one_line(args, words, tmp_path, tiny_sd1, data, capsys):
    args = [a.format(model=tiny_sd1, data=data) for a in args]
    assert main(["train", "ip-adapter", "--output_dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_full_adapter_reads_every_encoder_token_and_loads_back(tmp_path, tiny_sd1, encoder, data):
    """--image_proj full: h94's full-face architecture (an MLP over the penultimate hidden states)."""
    summary = train_ip_adapter(_cfg(tmp_path, tiny_sd1, encoder, data, max_train_steps=2, image_proj="full"))
    state = read_adapter(f"{summary['final']}/ip-adapter.safetensors")
    assert sorted(state["image_proj"]) == sorted(f"proj.{i}.{w}" for i in (0, 2, 3) for w in ("weight", "bias"))
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, summary["final"])
    assert adapters.adapters[0].kind == "full"
    # trained against the same "no image" diffusers guides with: the hidden states of zero pixel values
    from atelier.train.ip_adapter import ImageEncoder

    pixels = torch.rand(1, 3, 32, 32)
    _, uncond = pipe.encode_image(pixels, "cpu", 1, output_hidden_states=True)
    torch.testing.assert_close(ImageEncoder(encoder, hidden_states=True).null(uncond), uncond)
    assert _steers(pipe, adapters, tmp_path, grey=40)


def test_a_plus_adapter_trains_in_the_h94_resampler_layout_and_loads_back(tmp_path, tiny_sd1, encoder, data):
    """--image_proj plus: tutorial_train_plus.py's Resampler, written under tencent-ailab's key names."""
    summary = train_ip_adapter(_cfg(tmp_path, tiny_sd1, encoder, data, max_train_steps=2, image_proj="plus",
                                    num_tokens=8))
    state = read_adapter(f"{summary['final']}/ip-adapter.safetensors")
    proj = state["image_proj"]
    assert proj["latents"].shape[1] == 8 and "layers.3.0.to_kv.weight" in proj and "layers.3.1.3.weight" in proj
    assert not any(".attn." in k or ".ff." in k or "ln0" in k for k in proj)
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, summary["final"])
    assert adapters.adapters[0].kind == "plus"
    # what diffusers built from the file writes back the same file, so a continued run starts where this ended
    from atelier.image_prompts.adapters import adapter_state_dict

    written = adapter_state_dict(pipe.unet)
    assert sorted(written) == sorted(f"{g}.{k}" for g in ("image_proj", "ip_adapter") for k in state[g])
    for group in ("image_proj", "ip_adapter"):
        for key, value in state[group].items():
            torch.testing.assert_close(written[f"{group}.{key}"].float(), value.float())
    assert _steers(pipe, adapters, tmp_path, grey=40)


def test_a_whole_clip_as_the_encoder_is_written_as_its_vision_tower(tmp_path, tiny_sd1, data):
    """--image_encoder_path a whole CLIP (as toyworld-clip is): final/image_encoder holds the vision tower
    and its projection alone, the same weights, and loads as the adapter's encoder."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    from atelier.testing.ip_adapters import VISION

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, projection_dim=16, bos_token_id=97, eos_token_id=98)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**VISION, "projection_dim": 16}, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    summary = train_ip_adapter(_cfg(tmp_path, tiny_sd1, tmp_path / "clip", data, max_train_steps=1))
    written = load_file(f"{summary['final']}/image_encoder/model.safetensors")
    assert written and all(k.startswith(("vision_model.", "visual_projection.")) for k in written)
    for key, value in clip.state_dict().items():
        if key.startswith(("vision_model.", "visual_projection.")):
            torch.testing.assert_close(written[key].float(), value.float())
    adapters = load_ip_adapter(tiny_pipeline("sd1"), summary["final"])
    assert adapters.adapters[0].kind == "base"


def test_the_written_plus_layout_is_the_one_h94_ships(tmp_path):
    """An h94 Plus file (tencent-ailab's names) loaded by diffusers and written back is the same file."""
    from atelier.image_prompts.adapters import adapter_state_dict
    from atelier.testing.ip_adapters import plus_adapter

    pipe = tiny_pipeline("sd1")
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    save_encoder(folder / "image_encoder", projection_dim=16)
    original = plus_adapter(pipe.unet)
    save_file(original, folder / "ip-adapter.safetensors")
    load_ip_adapter(pipe, folder)
    written = adapter_state_dict(pipe.unet)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(written[key].float(), value.float())


# ---------------------------------------------------------------------------------------------
# the shipped toy adapter


@pytest.mark.parametrize("model", ["toyworld", "toyworld-turbo"])
def test_builtin_models_take_a_reference_alone_with_their_own_adapter(model, tmp_path, capsys):
    """`atelier generate "" --model toyworld --ip-image REF.png`: an empty prompt is valid with a
    reference, the model's own toyworld-ip is used without further options, and --from finds it again."""
    from atelier.core.images import read_parameters
    from atelier.core.infotext import parse_parameters
    from atelier.image_prompts import sha256_of
    from atelier.toyworld import parse_caption, render_pil

    ref = tmp_path / "ref.png"
    render_pil(parse_caption("a large red circle in the center and a small blue square at the top left")).save(ref)
    out, plain = tmp_path / "variation.png", tmp_path / "plain.png"
    base = ["generate", "", "--model", model, "--seed", "3", "--quiet"]
    assert main(base + ["--out", str(out), "--ip-image", str(ref)]) == 0, capsys.readouterr().err
    fields = parse_parameters(read_parameters(out))
    assert fields["IP-Adapter"] == "ip-adapter" and fields["IP-Adapter image"] == f"sha256:{sha256_of(ref)}"
    assert main(base + ["--out", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(out), "--out", str(again), "--quiet", "--ip-image", str(ref)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
