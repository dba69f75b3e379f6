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
