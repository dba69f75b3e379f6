"""atelier.generate: A1111 infotext metadata, PNG files, and generation on tiny pipelines.

The infotext expectations follow A1111's own writer and reader (modules/processing.py
create_infotext, modules/infotext_utils.py quote / parse_generation_parameters). Pipelines are
tiny, randomly initialised SD models (atelier.testing.tiny), so pictures are noise-like but every
number in them is decided by the request: equal requests must give equal pixels and a changed
setting must change them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from atelier.errors import UserError
from atelier.generate import (
    GenerationRequest,
    format_parameters,
    generate,
    open_image,
    parse_parameters,
    read_parameters,
    request_from_parameters,
    save_png,
)

STEPS = 3


# ---------------------------------------------------------------------------------------------
# infotext format


def test_infotext_lines_follow_a1111():
    text = format_parameters(
        "a red circle",
        "blurry",
        {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 42,
         "Size": "512x768", "Model": "v1-5", "Denoising strength": 0.75, "Clip skip": 2},
    )
    assert text == (
        "a red circle\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        "Model: v1-5, Denoising strength: 0.75, Clip skip: 2"
    )


def test_no_negative_line_without_negative_prompt_and_none_values_dropped():
    text = format_parameters("cat", "", {"Steps": 4, "Sampler": "Euler a", "Model hash": None, "Seed": 1})
    assert text == "cat\nSteps: 4, Sampler: Euler a, Seed: 1"


def test_values_with_commas_colons_and_newlines_are_json_quoted_and_read_back():
    params = {"Steps": 2, "Sampler": "Euler", "Seed": 3, "Model": "my, model: v2",
              "Template": 'a {cat|dog}, "quoted"\nsecond line'}
    text = format_parameters("p", "", params)
    last = text.split("\n")[-1]
    assert 'Model: "my, model: v2"' in last
    assert r'Template: "a {cat|dog}, \"quoted\"\nsecond line"' in last
    parsed = parse_parameters(text)
    assert parsed["Model"] == "my, model: v2"
    assert parsed["Template"] == 'a {cat|dog}, "quoted"\nsecond line'


def test_parse_a1111_infotext_with_multiline_prompt_and_negative():
    text = (
        "girl with an artist's beret, determined, blue eyes,\n"
        "desert scene, ((eyeshadow)), (coquettish:1.2)\n"
        "Negative prompt: ugly, fat, [blurry],\n"
        "bad anatomy\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 965400086, "
        "Size: 512x512, Model hash: 45dee52b, Model: \"sd, 1.5\", Version: v1.9.0"
    )
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == (
        "girl with an artist's beret, determined, blue eyes,\ndesert scene, ((eyeshadow)), (coquettish:1.2)"
    )
    assert parsed["Negative prompt"] == "ugly, fat, [blurry],\nbad anatomy"
    assert parsed["Steps"] == "20"
    assert parsed["Sampler"] == "Euler a"
    assert parsed["Schedule type"] == "Automatic"
    assert parsed["CFG scale"] == "7"
    assert parsed["Seed"] == "965400086"
    assert parsed["Size"] == "512x512"
    assert parsed["Model hash"] == "45dee52b"
    assert parsed["Model"] == "sd, 1.5"
    assert parsed["Version"] == "v1.9.0"


def test_parse_without_negative_or_parameter_line():
    parsed = parse_parameters("a cat\nSteps: 5, Sampler: Euler, Seed: 9")
    assert parsed == {"Prompt": "a cat", "Negative prompt": "", "Steps": "5", "Sampler": "Euler", "Seed": "9"}
    # A last line with fewer than three `Key: value` pairs is prompt text, as in A1111.
    assert parse_parameters("a cat\nstyle: oil, dark") == {"Prompt": "a cat\nstyle: oil, dark", "Negative prompt": ""}


# ---------------------------------------------------------------------------------------------
# PNG files


def _noise_image(w=16, h=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_png_parameters_round_trip_and_no_temporary_files(tmp_path):
    text = "a cat, café\nNegative prompt: dog\nSteps: 2, Sampler: Euler, Seed: 1"
    path = save_png(_noise_image(), tmp_path / "out" / "a.png", text)
    assert read_parameters(path) == text
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(_noise_image()))
    save_png(_noise_image(seed=1), path, "second\nSteps: 1, Sampler: Euler, Seed: 2")  # replaces
    assert read_parameters(path).startswith("second")
    assert os.listdir(tmp_path / "out") == ["a.png"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = save_png(_noise_image(), tmp_path / "a.png", "old\nSteps: 1, Sampler: Euler, Seed: 1")

    class Broken:
        def save(self, f, **kwargs):
            f.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_png(Broken(), path, "new")
    assert read_parameters(path).startswith("old")
    assert os.listdir(tmp_path) == ["a.png"]


def test_parameters_from_jpeg_exif_user_comment(tmp_path):
    text = "a cat\nSteps: 2, Sampler: Euler, Seed: 1"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")  # as A1111 (piexif) writes it
    path = tmp_path / "a.jpg"
    _noise_image().save(path, exif=exif)
    assert read_parameters(path) == text


def test_open_image_refuses_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        open_image(tmp_path / "text.png")
    good = save_png(_noise_image(64, 64), tmp_path / "good.png", "x")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        open_image(tmp_path / "cut.png")
    Image.new("L", (4100, 4)).save(tmp_path / "wide.png")
    with pytest.raises(UserError, match="too large"):
        open_image(tmp_path / "wide.png")


# ---------------------------------------------------------------------------------------------
# generation


@pytest.fixture(scope="module")
def sd1():
    from atelier.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def _pixels(result):
    return np.asarray(result.image).astype(np.int16)


def _request(**kw):
    return GenerationRequest(**{"prompt": "a red circle", "steps": STEPS, "seed": 100, "sampler": "Euler a", **kw})


def _differ(a, b) -> bool:
    return np.abs(_pixels(a) - _pixels(b)).max() > 2


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE"])  # ancestral noise; Brownian-tree noise
def test_image_k_is_the_same_whatever_the_batch_size(sd1, sampler):
    one_call = generate(sd1, _request(sampler=sampler, n_images=2, batch_size=2), progress=False)
    one_by_one = generate(sd1, _request(sampler=sampler, n_images=2, batch_size=1), progress=False)
    alone = generate(sd1, _request(sampler=sampler, seed=101), progress=False)
    assert [r.seed for r in one_call] == [100, 101]
    for a, b in zip(one_call, one_by_one):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # batched matmuls may round differently
    assert np.abs(_pixels(one_call[1]) - _pixels(alone[0])).max() <= 1
    assert _differ(one_call[0], one_call[1])  # and the two seeds do give different images


def test_infotext_records_the_request(sd1):
    results = generate(
        sd1, _request(negative_prompt="blurry", sampler="DPM++ 2M", schedule="karras", cfg_scale=6.5,
                      n_images=2, model_name="tiny-sd1"), progress=False,
    )
    for k, r in enumerate(results):
        lines = r.parameters.split("\n")
        assert lines[0] == "a red circle"
        assert lines[1] == "Negative prompt: blurry"
        assert lines[2].startswith(
            f"Steps: {STEPS}, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: {100 + k}, "
            "Size: 16x16, Model: tiny-sd1"
        )
        assert "Denoising strength" not in r.parameters
        parsed = parse_parameters(r.parameters)
        assert parsed["Seed"] == str(100 + k)
        assert parsed["Negative prompt"] == "blurry"


def test_defaults_come_from_the_model_family(sd1):
    from atelier.models import detect_family
    from atelier.samplers import a1111_fields

    family = detect_family(sd1)
    (r,) = generate(sd1, GenerationRequest("a red circle", seed=1, steps=2), progress=False)
    assert r.fields["CFG scale"] == family.guidance_scale
    assert (r.fields["Sampler"], r.fields["Schedule type"]) == a1111_fields(family.sampler)
    assert r.fields["Size"] == "16x16"  # the tiny model's native size


def test_sampler_changes_the_image_and_is_recorded(sd1):
    euler = generate(sd1, _request(sampler="Euler"), progress=False)[0]
    dpm = generate(sd1, _request(sampler="DPM++ 2M", schedule="karras"), progress=False)[0]
    assert euler.fields["Sampler"] == "Euler" and dpm.fields["Sampler"] == "DPM++ 2M"
    assert dpm.fields["Schedule type"] == "Karras"
    assert _differ(euler, dpm)


def test_img2img_strength_changes_the_result_and_is_recorded(sd1):
    init = _noise_image(24, 24, seed=5)
    weak = generate(sd1, _request(init_image=init, strength=0.3, steps=10), progress=False)[0]
    strong = generate(sd1, _request(init_image=init, strength=0.9, steps=10), progress=False)[0]
    assert weak.image.size == (24, 24)
    assert weak.fields["Denoising strength"] == 0.3
    assert "Denoising strength: 0.9" in strong.parameters
    assert _differ(weak, strong)


def test_guidance_options_change_the_image_and_are_recorded(sd1):
    # a high CFG scale makes the tiny random model's (weak) text conditioning visible in the pixels
    base = generate(sd1, _request(cfg_scale=15.0), progress=False)[0]
    pag = generate(sd1, _request(cfg_scale=15.0, pag_scale=3.0), progress=False)[0]
    rescale = generate(sd1, _request(cfg_scale=15.0, guidance_rescale=0.7), progress=False)[0]
    skip = generate(sd1, _request(cfg_scale=15.0, clip_skip=2), progress=False)[0]
    assert pag.fields["PAG scale"] == 3 and _differ(pag, base)
    assert rescale.fields["CFG Rescale phi"] == 0.7 and _differ(rescale, base)
    assert skip.fields["Clip skip"] == 2 and _differ(skip, base)
    assert not {"PAG scale", "CFG Rescale phi", "Clip skip"} & base.fields.keys()


@pytest.mark.parametrize("pag", [0.0, 2.0])  # PAG's UNet batch is [negative, positive, positive]
def test_prompt_editing_swaps_the_prompt_mid_way(sd1, pag):
    def image(prompt):
        request = _request(prompt=prompt, steps=6, cfg_scale=15.0, pag_scale=pag, n_images=2, batch_size=2)
        return generate(sd1, request, progress=False)[1]

    red, blue = image("a red circle"), image("a blue circle")
    edit = image("a [red:blue:1] circle")  # red for step 0, blue from step 1 on
    never = image("a [red:blue:6] circle")  # the swap would come after the last step
    assert _differ(edit, red) and _differ(edit, blue)
    assert np.array_equal(_pixels(never), _pixels(red))
    assert edit.prompt == "a [red:blue:1] circle"


def test_wildcards_are_expanded_per_image_seed(sd1, tmp_path):
    from atelier.prompts import expand_prompt

    (tmp_path / "color.txt").write_text("red\ngreen\nblue\nyellow\npurple\norange\n")
    template = "a __color__ circle"
    results = generate(sd1, _request(prompt=template, n_images=4, batch_size=4, wildcard_dir=tmp_path, steps=2),
                       progress=False)
    prompts = [r.prompt for r in results]
    assert prompts == [expand_prompt(template, 100 + k, wildcard_dir=tmp_path) for k in range(4)]
    assert len(set(prompts)) > 1
    for r in results:
        assert parse_parameters(r.parameters)["Prompt"] == r.prompt
        assert r.fields["Template"] == template


def test_per_image_prompts_and_seeds_share_a_call_and_keep_their_images(sd1, tmp_path, monkeypatch):
    import atelier.generate.run as generation

    (tmp_path / "color.txt").write_text("red\ngreen\nblue\n")
    long = "a red circle, " + ", ".join(["a big blue square"] * 20)  # more than 75 tokens: a call of its own
    pairs = [("a red circle", 7), ("a blue square", 100), ("a __color__ triangle", 3), (long, 7),
             ("a green diamond", 2**64 - 1)]
    real, calls = generation._run_chunk, []

    def counted(pipeline, request, prompts, negatives, seeds, *args, **kw):
        calls.append(list(seeds))
        return real(pipeline, request, prompts, negatives, seeds, *args, **kw)

    monkeypatch.setattr(generation, "_run_chunk", counted)
    request = _request(per_image=pairs, n_images=5, batch_size=5, cfg_scale=15.0, wildcard_dir=tmp_path)
    together = generate(sd1, request, progress=False)
    assert calls == [[7, 100, 3], [7], [2**64 - 1]]  # equal token lengths only: padding would change a picture
    assert [r.seed for r in together] == [seed for _, seed in pairs]
    for r, (template, seed) in zip(together, pairs):
        (alone,) = generate(sd1, _request(prompt=template, seed=seed, cfg_scale=15.0, wildcard_dir=tmp_path),
                            progress=False)
        assert np.abs(_pixels(r) - _pixels(alone)).max() <= 1  # batched matmuls may round differently
        assert (r.prompt, r.parameters) == (alone.prompt, alone.parameters)
        fields = parse_parameters(r.parameters)
        assert (fields["Prompt"], fields["Seed"]) == (r.prompt, str(seed))
    assert together[2].prompt != pairs[2][0] and together[2].fields["Template"] == pairs[2][0]
    assert "Template" not in together[0].fields
    assert _differ(together[0], together[3])  # the same seed, another prompt


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"per_image": [("a cat", 1)], "n_images": 2}, "1 \\(prompt, seed\\) pairs for 2 images"),
        ({"per_image": [], "n_images": 1}, "0 \\(prompt, seed\\) pairs for 1 images"),
        ({"per_image": "a cat"}, "list of \\(prompt, seed\\) pairs"),
        ({"per_image": ["a cat"]}, r"per_image\[0\] must be a \(prompt, seed\) pair"),
        ({"per_image": [("a cat", 1, 2)]}, r"per_image\[0\] must be a \(prompt, seed\) pair"),
        ({"per_image": [("a cat", 1), (None, 2)], "n_images": 2}, r"per_image\[1\]: the prompt must be text"),
        ({"per_image": [("a cat", "1")]}, r"per_image\[0\]: seed must be a whole number"),
        ({"per_image": [("a cat", True)]}, r"per_image\[0\]: seed must be a whole number"),
        ({"per_image": [("a cat", -1)]}, r"per_image\[0\]: seed must be between 0 and"),
        ({"per_image": [("a cat", 2**64)]}, r"per_image\[0\]: seed must be between 0 and"),
    ],
)
def test_per_image_pairs_are_checked(changes, message):
    from atelier.generate.request import validate_request

    with pytest.raises(UserError, match=message):
        validate_request(_request(**changes))
    # the request's own seed is not used then: seed + n_images may pass the largest seed
    validate_request(_request(seed=2**64 - 1, per_image=[("a cat", 0), ("a dog", 1)], n_images=2))


def test_parameters_read_back_make_the_same_image(sd1):
    first = generate(sd1, _request(prompt="a (blue:1.2) square", negative_prompt="red, dark", sampler="DPM++ 2M",
                                   schedule="karras", clip_skip=2, pag_scale=1.5, guidance_rescale=0.3,
                                   seed=7, n_images=2), progress=False)[1]
    again = generate(sd1, GenerationRequest(**request_from_parameters(parse_parameters(first.parameters))),
                     progress=False)[0]
    assert again.parameters == first.parameters
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"width": 20}, "multiple of 8"),
        ({"height": 8192}, "limit"),
        ({"steps": 0}, "steps"),
        ({"init_image": _noise_image(), "steps": 2, "strength": 0.2}, "no step"),
        ({"sampler": "Nonsense sampler"}, "Nonsense"),
        ({"guidance_rescale": 1.5}, "rescale"),
        ({"seed": -5}, "seed"),
        ({"emphasis": "loud"}, "emphasis"),
    ],
)
def test_bad_requests_are_user_errors(sd1, changes, message):
    with pytest.raises(UserError, match=message):
        generate(sd1, _request(**changes), progress=False)


def test_sdxl_and_turbo_pipelines():
    from atelier.testing import tiny_pipeline

    sdxl = tiny_pipeline("sdxl")
    results = generate(sdxl, _request(prompt="a [red:blue:1] circle", steps=3, pag_scale=1.0, cfg_scale=4.0,
                                      guidance_rescale=0.5, n_images=2, batch_size=2), progress=False)
    assert [r.fields["PAG scale"] for r in results] == [1, 1]
    assert _differ(results[0], results[1])
    turbo = tiny_pipeline("turbo")
    (r,) = generate(turbo, GenerationRequest("a red circle", seed=3), progress=False)
    assert r.fields["Steps"] == 1 and r.fields["CFG scale"] == 0 and r.fields["Sampler"] == "Euler"


# ---------------------------------------------------------------------------------------------
# bounds on every number (issue 11): a typo or a corrupt file must not start a run that never ends


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": 99999999999}, "steps"),
        ({"steps": 100000}, "steps"),
        ({"cfg_scale": float("inf")}, "CFG scale"),
        ({"cfg_scale": float("nan")}, "CFG scale"),
        ({"cfg_scale": 1e6}, "CFG scale"),
        ({"guidance_rescale": float("nan")}, "rescale"),
        ({"pag_scale": float("inf")}, "PAG scale"),
        ({"pag_scale": float("nan")}, "PAG scale"),
        ({"clip_skip": 10**6}, "clip skip"),
        ({"n_images": 10**9}, "number of images"),
        ({"batch_size": 10**6}, "batch size"),
        ({"width": 10**12}, "limit"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**64 - 1, "n_images": 2}, "largest seed"),
        ({"init_image": _noise_image(), "strength": float("nan")}, "strength"),
        ({"init_image": _noise_image(), "strength": float("inf")}, "strength"),
    ],
)
def test_numbers_out_of_bounds_are_user_errors(changes, message):
    from atelier.generate.request import validate_request

    with pytest.raises(UserError, match=message):
        validate_request(_request(**changes))


@pytest.mark.parametrize("field", ["Steps: 99999999999", "Steps: 100000", "CFG scale: nan", "CFG scale: inf",
                                   "PAG scale: nan", "Clip skip: 123456789"])
def test_numbers_read_from_metadata_are_bounded_too(field):
    from atelier.generate.request import validate_request

    params = parse_parameters(f"a cat\nSampler: Euler, Seed: 1, Size: 16x16, {field}")
    with pytest.raises(UserError):
        validate_request(GenerationRequest(**request_from_parameters(params)))


def test_64_bit_seeds_as_comfyui_writes_them(sd1):
    top = 2**64 - 1
    results = generate(sd1, _request(seed=top - 1, n_images=2, steps=1), progress=False)
    assert [r.seed for r in results] == [top - 1, top]
    assert results[1].fields["Seed"] == top and _differ(results[0], results[1])
    again = generate(sd1, GenerationRequest(**request_from_parameters(parse_parameters(results[1].parameters))),
                     progress=False)[0]
    assert np.array_equal(_pixels(again), _pixels(results[1]))
    drawn = generate(sd1, _request(seed=None, steps=1), progress=False)[0]
    assert 0 <= drawn.seed < 2**32  # a random seed stays in A1111's range


# ---------------------------------------------------------------------------------------------
# A1111's hires fix


def _hires_request(upscaler="Latent", **kw):
    from atelier.generate.hires import HiresFix

    hires = HiresFix(upscaler=upscaler, **{k: kw.pop(k) for k in ("scale", "steps", "resize_x", "resize_y") if k in kw})
    return _request(**{"sampler": "Euler", "steps": 3, "strength": 0.5, "cfg_scale": 7.0, "hires": hires, **kw})


def test_hires_schedule_runs_the_hires_steps_as_a1111():
    from atelier.generate.hires import HiresFix

    for run in range(1, 41):
        for strength in (0.05, 0.1, 0.3, 1 / 3, 0.5, 0.7, 0.75, 0.9, 0.999, 1.0):
            steps, total, effective = HiresFix(steps=run).schedule(20, strength)
            assert total == max(run, int(run / min(strength, 0.999)))  # A1111 setup_img2img_steps
            assert steps == run and min(int(total * effective), total) == run  # diffusers' get_timesteps
    assert HiresFix(steps=0).schedule(12, 0.5)[0] == 12  # 0: as many as the first pass


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos", "Nearest", "None"])
def test_hires_fix_upscales_redraws_records_and_reproduces(sd1, upscaler):
    calls = []
    hook = sd1.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        (r,) = generate(sd1, _hires_request(upscaler, scale=2.0, steps=2), progress=False)
    finally:
        hook.remove()
    assert r.image.size == (32, 32)
    assert len(calls) == 3 + 2  # the first pass's steps, then exactly the Hires steps
    assert (r.fields["Size"], r.fields["Denoising strength"]) == ("16x16", 0.5)
    assert (r.fields["Hires upscale"], r.fields["Hires steps"], r.fields["Hires upscaler"]) == (2, 2, upscaler)
    again = generate(sd1, GenerationRequest(**request_from_parameters(parse_parameters(r.parameters))),
                     progress=False)[0]
    assert again.parameters == r.parameters
    assert np.array_equal(_pixels(again), _pixels(r))


def test_hires_upscalers_and_strength_change_the_picture(sd1):
    latent = generate(sd1, _hires_request("Latent"), progress=False)[0]
    lanczos = generate(sd1, _hires_request("Lanczos"), progress=False)[0]
    stronger = generate(sd1, _hires_request("Latent", strength=0.9), progress=False)[0]
    plain = generate(sd1, _request(sampler="Euler", steps=3, cfg_scale=7.0, width=32, height=32), progress=False)[0]
    assert _differ(latent, lanczos) and _differ(latent, stronger) and _differ(latent, plain)


def test_hires_resize_crops_like_a1111(sd1):
    (r,) = generate(sd1, _hires_request(resize_x=40, resize_y=24, steps=1), progress=False)
    assert r.image.size == (40, 24)
    assert r.fields["Hires resize"] == "40x24" and "Hires upscale" not in r.fields
    parsed = parse_parameters(r.parameters)
    again = generate(sd1, GenerationRequest(**request_from_parameters(parsed)), progress=False)[0]
    assert np.array_equal(_pixels(again), _pixels(r))
    # A1111's own reader splits "Hires resize: 40x24" into Hires resize-1 and -2; that form reads too
    split = {k: v for k, v in parsed.items() if k != "Hires resize"} | {"Hires resize-1": "40", "Hires resize-2": "24"}
    assert request_from_parameters(split)["hires"] == request_from_parameters(parsed)["hires"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ("Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+", "R-ESRGAN 4x\\+.*not supported"),
        ("Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent, Hires prompt: a dog", "Hires prompt"),
        ("Hires upscale: 2, Hires upscaler: Latent", "no Denoising strength"),
        ("Denoising strength: 0.5, Hires upscale: inf, Hires upscaler: Latent", "hires upscale"),
        ("Denoising strength: 0.5, Hires upscale: 4, Hires upscaler: Latent, Size: 2048x2048", "limit"),
        ("Denoising strength: 0.01, Hires upscale: 2, Hires steps: 150, Hires upscaler: Latent", "schedule"),
    ],
)
def test_hires_settings_that_cannot_run_are_one_clear_error(sd1, fields, message):
    params = parse_parameters(f"a cat\nSteps: 2, Sampler: Euler, Seed: 1, {fields}")
    with pytest.raises(UserError, match=message):
        generate(sd1, GenerationRequest(**request_from_parameters(params)), progress=False)


def test_pag_with_img2img_and_the_hires_pass(sd1):
    # diffusers' SD 1.x PAG img2img pipeline takes no guidance_rescale argument at all
    init = _noise_image(16, 16, seed=2)
    plain = generate(sd1, _request(init_image=init, strength=0.6, steps=3, cfg_scale=15.0), progress=False)[0]
    pag = generate(sd1, _request(init_image=init, strength=0.6, steps=3, cfg_scale=15.0, pag_scale=3.0), progress=False)[0]
    assert pag.fields["PAG scale"] == 3 and _differ(pag, plain)
    (hires,) = generate(sd1, _hires_request(pag_scale=2.0, steps=1), progress=False)
    assert hires.image.size == (32, 32) and hires.fields["PAG scale"] == 2
    with pytest.raises(UserError, match="rescale"):
        generate(sd1, _request(init_image=init, strength=0.6, pag_scale=3.0, guidance_rescale=0.5), progress=False)
