"""StreamEngine: stream batch equals frame-by-frame denoising, warm-up without garbage, live updates,
residual CFG, the similarity filter, frame kinds, and every pipeline family."""

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.errors import UserError
from atelier.generate.metadata import parse_parameters
from atelier.stream import StreamEngine, strength_to_t_indices
from atelier.stream.stream_math import next_residual_noise, renoise, stage_coefficients, x0_and_eps
from atelier.testing.tiny import tiny_pipeline
from atelier.toyworld import judge, parse_caption, render_pil, sample_scene

import random



def _frames(n, seed=0):
    rng = random.Random(seed)
    return [render_pil(sample_scene(rng)) for _ in range(n)]


def _engine(pipe, **kw):
    prepare = kw.pop("prepare", {})
    engine = StreamEngine(pipe, **kw)
    engine.prepare(**{"prompt": "a large red circle in the center", **prepare})
    return engine


def _diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


# ---------------------------------------------------------------------------- the math


def test_strength_maps_to_the_tail_of_the_schedule():
    assert strength_to_t_indices(1.0, 50, 1) == [0]
    assert strength_to_t_indices(0.5, 50, 2) == [25, 37]
    assert strength_to_t_indices(0.7, 50, 2) == [15, 32]
    assert strength_to_t_indices(0.01, 50, 3) == [49]
    with pytest.raises(ValueError):
        strength_to_t_indices(0.0, 50, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_invert_the_forward_process(prediction_type):
    alphas = torch.linspace(0.999, 0.01, 1000)
    a, b = stage_coefficients(torch.cumprod(alphas, 0).clamp(min=1e-4), [100, 600])
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = renoise(x0, eps, a, b)
    output = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction_type]
    got_x0, got_eps = x0_and_eps(output, x_t, a, b, prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, eps, atol=1e-4, rtol=1e-4)


def test_residual_noise_is_the_noise_relative_to_the_input():
    """If x_t = aX + b r and the model predicts eps, the next stage's x_t' = a'X + b' r'."""
    X, r, eps, n2 = (torch.randn(1, 4, 2, 2) for _ in range(4))
    a, b, a2, b2 = (torch.tensor(v) for v in (0.3, 0.95, 0.6, 0.8))
    x_t = a * X + b * r
    x0 = (x_t - b * eps) / a
    x_next = renoise(x0, n2, a2, b2)
    r2 = next_residual_noise(r, eps, n2, a, b, a2, b2)
    torch.testing.assert_close(x_next, a2 * X + b2 * r2, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- stream batch


@pytest.mark.parametrize("cfg_type", ["none", "self", "full", "initialize"])
def test_stream_batch_equals_frame_by_frame(turbo, cfg_type):
    frames = _frames(6)
    kw = dict(t_index_list=[10, 25, 40], cfg_type=cfg_type, prepare={"guidance_scale": 1.4, "negative_prompt": "a small blue square"})
    stream = _engine(turbo, use_denoising_batch=True, **kw)
    single = _engine(turbo, use_denoising_batch=False, **kw)
    latency = 2
    streamed = [stream(f) for f in frames]
    reference = [single(f) for f in frames]
    for k in range(len(frames) - latency):
        assert _diff(streamed[k + latency], reference[k]) <= 2, f"frame {k} differs"
    # and the frames really differ from one another, so the comparison can fail
    assert _diff(reference[0], reference[1]) > 50


def test_frame_buffer_size_two_equals_frame_by_frame(turbo):
    frames = _frames(8, seed=1)
    kw = dict(t_index_list=[15, 32], frame_buffer_size=2)
    stream, single = _engine(turbo, use_denoising_batch=True, **kw), _engine(turbo, use_denoising_batch=False, **kw)
    pairs = [frames[i : i + 2] for i in range(0, 8, 2)]
    streamed = [stream(p) for p in pairs]
    reference = [single(p) for p in pairs]
    for k in range(3):
        for j in range(2):
            assert _diff(streamed[k + 1][j], reference[k][j]) <= 2


def test_no_garbage_warm_up_frames(turbo):
    """The first outputs are the first frame's own result (StreamDiffusion #65: brown frames)."""
    frame = render_pil(parse_caption("a large red circle at the top left"))
    other = render_pil(parse_caption("a small green square at the bottom right"))
    stream = _engine(turbo, t_index_list=[10, 25, 40], prepare={"prompt": "a large red circle at the top left"})
    single = _engine(turbo, t_index_list=[10, 25, 40], use_denoising_batch=False, prepare={"prompt": "a large red circle at the top left"})
    expected = single(frame)
    assert judge(expected, "a large red circle at the top left").match
    outputs = [stream(frame), stream(other), stream(other)]
    for out in outputs:
        assert _diff(out, expected) <= 2
    stream.update(seed=7)  # a new seed refills the buffer from the next frame: again no garbage
    assert judge(stream(frame), "a large red circle at the top left").objects_right


def test_one_stage_has_no_latency(turbo):
    stream = _engine(turbo, t_index_list=[20])
    a, b = _frames(2, seed=3)
    single = _engine(turbo, t_index_list=[20], use_denoising_batch=False)
    assert _diff(stream(a), single(a)) <= 2 and _diff(stream(b), single(b)) <= 2


# ---------------------------------------------------------------------------- the prompt takes


def test_prompt_edit_takes_on_toy_world_frames(turbo):
    """At the defaults (two stages over the last 70 %), the stream follows a changed prompt."""
    engine = StreamEngine(turbo)
    assert engine.settings()["t_index_list"] == [15, 32]
    source = render_pil(parse_caption("a large red circle at the top left"))
    engine.prepare("a large red circle at the top left")
    assert judge(engine(source), "a large red circle at the top left").match
    hits = 0
    for colour in ("blue", "green", "yellow", "purple"):
        target = f"a large {colour} circle at the top left"
        engine.update(prompt=target)
        for _ in range(2):  # the frame in flight leaves first
            out = engine(source)
        hits += judge(out, target).match
    assert hits >= 3


def test_live_updates_without_prepare(turbo):
    engine = _engine(turbo, t_index_list=[15, 32])
    frame = _frames(1, seed=4)[0]
    base = [engine(frame) for _ in range(3)][-1]

    engine.update(prompt="a small yellow triangle at the bottom right")
    changed = [engine(frame) for _ in range(3)][-1]
    assert _diff(changed, base) > 50

    engine.update(prompt="a large red circle in the center", cfg_type="full", guidance_scale=2.0, negative_prompt="a large blue square")
    full = [engine(frame) for _ in range(3)][-1]
    engine.update(negative_prompt="a small green ring at the top right")
    full_other_negative = [engine(frame) for _ in range(3)][-1]
    assert _diff(full, full_other_negative) > 10

    engine.update(cfg_type="self", delta=0.5)
    assert engine(frame).size == (64, 64)
    engine.update(cfg_type="none", blend_prompt="a small yellow triangle at the bottom right", blend=1.0)
    blended = [engine(frame) for _ in range(3)][-1]
    assert _diff(blended, changed) <= 2  # blend 1.0 is the blend prompt alone

    engine.update(strength=0.5)
    assert engine.settings()["t_index_list"] == [25, 37]
    engine.update(t_index_list=[5, 20, 40])
    assert engine.settings()["strength"] == pytest.approx(0.9)
    assert engine(frame).size == (64, 64)


def test_a1111_weights_change_the_stream(turbo):
    engine = _engine(turbo, t_index_list=[15, 32])
    frame = _frames(1, seed=5)[0]
    engine.update(prompt="a large red circle and a small blue square")
    plain = [engine(frame) for _ in range(3)][-1]
    engine.update(prompt="a large red circle and a (small blue square:1.6)")
    weighted = [engine(frame) for _ in range(3)][-1]
    assert _diff(plain, weighted) > 5


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"cfg_type": "partial"}, "cfg_type"),
        ({"seed": 1.5}, "seed"),
        ({"strength": 0}, "strength"),
        ({"t_index_list": [30, 10]}, "increase"),
        ({"t_index_list": [60]}, "t_index_list"),
        ({"t_index_list": []}, "t_index_list"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * 5000}, "limit"),
        ({"wings": 2}, "unknown"),
        ({"guidance_scale": float("inf")}, "finite"),
        ({"delta": float("nan")}, "finite"),
        ({"blend": 10**400}, "finite"),
        ({"seed": 10**5000}, "seed"),  # too long to print: the message must still be made
        ({"strength": float("-inf")}, "finite"),
        ({"width": 128}, "fixed by the model"),
    ],
)
def test_bad_settings_are_refused_and_change_nothing(turbo, changes, words):
    engine = _engine(turbo)
    before = engine.settings()
    with pytest.raises(UserError, match=words):
        engine.update(**changes)
    assert engine.settings() == before


@pytest.mark.parametrize("prompt, words", [("(" * 600 + "cat", "nests brackets"), ("a (cat:1.2.3)", "bad attention weight")])
def test_a_prompt_that_does_not_encode_changes_nothing(turbo, prompt, words):
    engine = _engine(turbo, t_index_list=[15, 32])
    frame = _frames(1, seed=3)[0]
    before, settings = [engine(frame) for _ in range(3)][-1], engine.settings()
    with pytest.raises(UserError, match=words):
        engine.update(prompt=prompt, seed=7)
    assert engine.settings() == settings  # nor the seed that came with it
    assert _diff(engine(frame), before) == 0
    engine(frame)
    assert parse_parameters(engine.infotext())["Prompt"] == settings["prompt"]
    # later changes that re-encode the prompts still work
    assert engine.update(negative_prompt="a small green square", cfg_type="full", guidance_scale=2.0)["cfg_type"] == "full"
    assert engine.update(blend_prompt="a large blue circle", blend=0.5)["blend"] == 0.5
    assert engine(frame).size == (64, 64)


def test_schema_and_validation_come_from_one_spec(turbo):
    """Every bound the page is told about is the bound update() applies, and nothing else."""
    schema = StreamEngine.settings_schema(turbo)
    engine = _engine(turbo)
    assert set(engine.settings()) <= set(schema)
    for key, spec in schema.items():
        if spec.get("readOnly"):
            with pytest.raises(UserError, match="fixed"):
                engine.update(**{key: spec["default"]})
            continue
        if spec["type"] in ("number", "integer"):
            low, high = spec["minimum"], spec["maximum"]
            for value in (low, high):
                assert engine.update(**{key: value})[key] == pytest.approx(value), (key, value)
            step = 1 if spec["type"] == "integer" else 1e-9
            for value in (low - step, high + step, float("inf"), float("nan")):
                with pytest.raises(UserError, match=key):
                    engine.update(**{key: value})
            engine.update(**{key: spec["default"]})
        elif spec["type"] == "string":
            for value in spec.get("enum", ["", "x" * spec.get("maxLength", 0)]):
                engine.update(**{key: value})
            with pytest.raises(UserError, match=key):
                engine.update(**{key: "nope" if "enum" in spec else "x" * (spec["maxLength"] + 1)})
            engine.update(**{key: spec["default"]})
        elif spec["type"] == "array":
            assert spec["items"]["type"] == "integer" and spec["minItems"] == 1
            with pytest.raises(UserError, match=key):
                engine.update(**{key: list(range(spec["maxItems"] + 1))})
    assert schema["strength"]["minimum"] > 0  # strength 0 would noise nothing


def test_frames_before_prepare_are_refused(turbo):
    with pytest.raises(UserError, match="prepare"):
        StreamEngine(turbo)(_frames(1)[0])


# ---------------------------------------------------------------------------- frames


def test_frame_kinds_round_trip(turbo):
    engine = _engine(turbo, t_index_list=[30])
    picture = _frames(1, seed=6)[0]
    out_pil = engine(picture)
    assert isinstance(out_pil, Image.Image) and out_pil.size == (64, 64)
    array = np.asarray(picture)
    out_array = engine(array)
    assert out_array.dtype == np.uint8 and out_array.shape == (64, 64, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 127.5 - 1
    out_tensor = engine(tensor)
    assert out_tensor.shape == (1, 3, 64, 64) and out_tensor.min() >= -1 and out_tensor.max() <= 1
    assert _diff(out_array, out_pil) == 0
    assert _diff(((out_tensor[0].permute(1, 2, 0) + 1) * 127.5).round().numpy(), out_pil) <= 1
    big = picture.resize((256, 256))
    assert engine(big).size == (64, 64)  # resized to the stream's size
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32), "frame.png", torch.zeros(1, 4, 64, 64)):
        with pytest.raises(UserError):
            engine(bad)


def test_similarity_filter_skips_still_frames(turbo):
    engine = _engine(turbo, t_index_list=[30], similarity_filter=True, similarity_threshold=0.9)
    frame = _frames(1, seed=7)[0]
    first = engine(frame)
    outputs = [engine(frame) for _ in range(10)]
    assert engine.stats["skipped"] >= 9  # identical frames: skip probability 1, at most 10 in a row
    assert all(_diff(o, first) == 0 for o in outputs)
    moving = _frames(1, seed=8)[0]
    engine(moving)
    assert engine.stats["frames"] == 2


def test_txt2img_from_pure_noise_follows_the_caption(turbo):
    engine = _engine(turbo, t_index_list=[0], prepare={"prompt": "a large blue square in the center"})
    image = engine.txt2img()
    assert judge(image, "a large blue square in the center").objects_right
    assert _diff(image, engine(None)) == 0  # fixed noise: the same image again


def test_infotext_records_the_stream(turbo):
    from atelier.generate.metadata import parse_parameters

    engine = _engine(turbo, t_index_list=[15, 32], cfg_type="self", prepare={"guidance_scale": 1.5, "seed": 9})
    engine(_frames(1)[0])
    params = parse_parameters(engine.infotext())
    assert params["Prompt"] == "a large red circle in the center"
    assert params["Seed"] == "9" and params["Size"] == "64x64" and params["RCFG"] == "self"
    assert params["Denoising strength"] == "0.7" and params["Stream t_index"] == "[15 32] of 50"


# ---------------------------------------------------------------------------- other pipelines


@pytest.mark.parametrize("family", ["sd1", "sd2", "turbo", "sdxl"])
def test_every_family_streams(family):
    pipe = tiny_pipeline(family)
    kw = dict(t_index_list=[10, 30], cfg_type="initialize", prepare={"prompt": "a cat", "guidance_scale": 1.5})
    stream, single = _engine(pipe, **kw), _engine(pipe, use_denoising_batch=False, **kw)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(4)]
    streamed, reference = [stream(f) for f in frames], [single(f) for f in frames]
    assert streamed[0].size == (stream.width, stream.height)
    for k in range(3):
        assert _diff(streamed[k + 1], reference[k]) <= 2


def test_lcm_scheduler_and_tiny_autoencoder():
    from diffusers import AutoencoderTiny, LCMScheduler

    pipe = tiny_pipeline("sd1")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    assert pipe.vae_scale_factor == 2  # AutoencoderTiny with two blocks downsamples 2×, as this VAE does
    engine = StreamEngine(pipe, t_index_list=[0, 2], vae=taesd)
    engine.prepare("a cat", num_inference_steps=4)
    assert engine.is_lcm_scheduler and engine.tiny_vae
    out = engine(Image.new("RGB", (engine.width, engine.height), (120, 30, 200)))
    assert out.size == (engine.width, engine.height)
    assert engine.settings()["num_inference_steps"] == 4


def test_tiny_autoencoder_sources(tmp_path, monkeypatch):
    from diffusers import AutoencoderTiny

    from atelier.models import load_tiny_autoencoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match="not a folder"):
        load_tiny_autoencoder("no such thing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .safetensors"):
        load_tiny_autoencoder(tmp_path / "empty")
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        load_tiny_autoencoder("madebyollin/taesd")
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    assert isinstance(load_tiny_autoencoder(tmp_path / "taesd"), AutoencoderTiny)


def test_stream_through_the_toyworld_tiny_autoencoder(turbo):
    """The tiny autoencoder stays close to the full VAE's stream (32-36 dB measured); it is a
    speed/quality trade-off: faint remnants of the input make the judge fail more often."""
    full, tiny = StreamEngine(turbo), StreamEngine(turbo, vae="toyworld-taesd")
    encoder_only = StreamEngine(turbo, vae_encoder="toyworld-taesd")  # the full VAE decodes
    assert tiny.tiny_vae and not full.tiny_vae and not encoder_only.tiny_vae
    for engine in (full, tiny, encoder_only):
        engine.prepare("a large blue circle at the top left")

    def psnr(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return 10 * np.log10(255**2 / ((a - b) ** 2).mean())

    for frame in _frames(3, seed=11):
        full.reset(), tiny.reset(), encoder_only.reset()
        expected = full(frame)
        through_tiny, through_encoder = psnr(expected, tiny(frame)), psnr(expected, encoder_only(frame))
        assert through_tiny > 28 and through_encoder > through_tiny, (through_tiny, through_encoder)


# ---------------------------------------------------------------------------- reference images (IP-Adapter)


@pytest.fixture(scope="module")
def h94(tmp_path_factory):
    from atelier.testing.ip_adapters import write_h94_layout

    return write_h94_layout(tmp_path_factory.mktemp("IP-Adapter"))


def _random_images(n, seed, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _run(pipe, frames, **kw):
    engine = _engine(pipe, **{"t_index_list": [10, 30], **kw})
    return engine, [np.asarray(engine(f)) for f in frames]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_reference_steers_and_scale_0_or_none_is_the_text_only_stream(h94, family):
    frames, (ref,) = _random_images(3, seed=1), _random_images(1, seed=2)
    guided = {"cfg_type": "full", "prepare": {"guidance_scale": 1.5, "negative_prompt": "a dog"}}
    _, text_only = _run(tiny_pipeline(family), frames, **guided)
    pipe = tiny_pipeline(family)
    engine = StreamEngine(pipe, ip_adapter=h94)  # loads the adapter into the pipeline
    assert engine.adapters is not None and StreamEngine.settings_schema(pipe)["ip_adapter"]["default"] is True
    _, no_reference = _run(pipe, frames, **guided)
    assert _same(no_reference, text_only)
    with_scale = lambda scale: {**guided, "prepare": {**guided["prepare"], "reference": ref, "ip_scale": scale}}  # noqa: E731
    assert _same(_run(pipe, frames, **with_scale(0.0))[1], text_only)
    engine, steered = _run(pipe, frames, **with_scale(1.0))
    assert not any(np.array_equal(a, b) for a, b in zip(steered, text_only))
    engine.update(reference=None)
    engine.reset()
    assert _same([np.asarray(engine(f)) for f in frames], text_only)


def test_update_swaps_references_without_re_preparing_and_embeds_each_once(h94):
    from atelier.image_prompts import load_ip_adapter, sha256_of

    frames, refs = _random_images(3, seed=3), _random_images(2, seed=4)
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, h94)  # already in the pipeline: the engine uses it
    engine = _engine(pipe, t_index_list=[20], prepare={"reference": refs[0], "ip_scale": 0.8})
    assert adapters.encoded == 1
    noise, cond = engine._noise, engine._cond
    first = [np.asarray(engine(f)) for f in frames]
    assert engine.update(reference=refs[1])["reference"] == f"sha256:{sha256_of(refs[1])}"
    second = [np.asarray(engine(f)) for f in frames]
    engine.update(reference=refs[0])  # seen before: not embedded again
    again = [np.asarray(engine(f)) for f in frames]
    assert adapters.encoded == 2 and engine._noise is noise and engine._cond is cond
    assert _same(again, first) and not _same(second, first)
    assert _same(second, _run(pipe, frames, t_index_list=[20], prepare={"reference": refs[1], "ip_scale": 0.8})[1])
    fields = parse_parameters(engine.infotext())
    assert (fields["IP-Adapter"], fields["IP-Adapter scale"]) == ("ip-adapter_sd15", "0.8")
    assert fields["IP-Adapter image"] == f"sha256:{sha256_of(refs[0])}"
    engine.update(ip_scale=0.0)
    assert _same([np.asarray(engine(f)) for f in frames], _run(pipe, frames, t_index_list=[20])[1])
    engine.update(reference=None)
    engine(frames[0])
    assert "IP-Adapter" not in parse_parameters(engine.infotext()) and engine.settings()["reference"] is None


@pytest.mark.parametrize("cfg_type", ["none", "full", "initialize"])
def test_the_input_frame_as_reference_travels_with_its_frame(h94, cfg_type):
    """reference="frame": each frame is embedded once as it enters and keeps its embedding through
    the stages, so stream batch still equals frame-by-frame denoising."""
    from atelier.image_prompts import load_ip_adapter

    frames = _random_images(5, seed=5)
    pipe = tiny_pipeline("sd1")
    adapters = load_ip_adapter(pipe, h94)
    encoder_calls = []
    adapters.encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    kw = {"cfg_type": cfg_type, "prepare": {"reference": "frame", "guidance_scale": 1.5, "negative_prompt": "a dog"}}
    stream, streamed = _run(pipe, frames, **kw)
    assert len(encoder_calls) == len(frames) and stream.settings()["reference"] == "frame"
    _, single = _run(pipe, frames, use_denoising_batch=False, **kw)
    for k in range(len(frames) - 1):
        assert _diff(streamed[k + 1], single[k]) <= 2, k
    _, plain = _run(pipe, frames, cfg_type=cfg_type, prepare=kw["prepare"] | {"reference": None})
    assert not _same(streamed, plain)
    assert parse_parameters(stream.infotext())["IP-Adapter image"] == "input frame"
    with pytest.raises(UserError, match="txt2img"):
        stream.txt2img()


def test_bad_references_are_refused_and_change_nothing(h94, tmp_path):
    from pathlib import Path

    from atelier.image_prompts import load_ip_adapter

    frames, (ref,) = _random_images(2, seed=6), _random_images(1, seed=7)
    plain = _engine(tiny_pipeline("sd1"))
    with pytest.raises(UserError, match="needs an IP-Adapter loaded"):
        plain.update(reference=ref)
    with pytest.raises(UserError, match="needs an IP-Adapter loaded"):
        plain.update(reference="frame")
    pipe = tiny_pipeline("sd1")
    load_ip_adapter(pipe, h94)
    engine = _engine(pipe, t_index_list=[20], prepare={"reference": ref, "ip_scale": 0.5})
    before, settings = [np.asarray(engine(f)) for f in frames], engine.settings()
    ref.save(tmp_path / "ref.png")
    bad = [({"reference": str(tmp_path / "ref.png")}, "not the text"), ({"reference": b"not an image"}, "cannot"),
           ({"reference": 5}, "reference image must be"), ({"reference": Path(tmp_path / "nope.png")}, "not found"),
           ({"ip_scale": -0.1}, "ip_scale"), ({"ip_scale": float("nan")}, "finite"), ({"ip_scale": "high"}, "ip_scale"),
           ({"reference": _random_images(1, seed=8)[0], "ip_scale": 9}, "ip_scale")]
    for changes, words in bad:
        with pytest.raises(UserError, match=words):
            engine.update(**changes)
        assert engine.settings() == settings, changes
    assert _same([np.asarray(engine(f)) for f in frames], before)
    assert engine.update(reference=Path(tmp_path / "ref.png"))["reference"].startswith("sha256:")
