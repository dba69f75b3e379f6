"""Regression check of the shipped toy-world models: a small fixed set of held-out captions, judged.
(The full measurement, 300 captions, is benchmarks/toyworld.py.)"""

import random

import numpy as np
import pytest

from atelier.generate import GenerationRequest, generate
from atelier.models import detect_family, load_pipeline, resolve_model_path
from atelier.toyworld.judge import judge
from atelier.toyworld.scene import sample_scene

CAPTIONS_SEED = 4_000_000_000  # far from the trainer's seeds


def scenes():
    rng = random.Random(CAPTIONS_SEED)
    return [sample_scene(rng, n) for n in (1, 2, 3) for _ in range(4)]


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name) for name in ("toyworld", "toyworld-turbo")}


def test_builtin_models_are_small_safetensors_with_their_defaults(pipes):
    total = 0
    for name in pipes:
        folder = resolve_model_path(name)
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
        total += sum(p.stat().st_size for p in files)
    assert total < 60e6
    toy, turbo = detect_family(pipes["toyworld"]), detect_family(pipes["toyworld-turbo"])
    assert (toy.sampler, toy.steps, toy.guidance_scale, toy.prediction_type) == ("DPM++ 2M", 20, 3.0, "v_prediction")
    assert (turbo.sampler, turbo.steps, turbo.guidance_scale, turbo.is_turbo) == ("Euler", 1, 0.0, True)


# Of these 12 (4 each with 1, 2, 3 objects) the shipped models get 10, 9 and 12 fully right; the
# thresholds leave one image of slack for floating-point differences between machines.
@pytest.mark.parametrize("model, steps, need_objects, need_scene", [
    ("toyworld", None, 9, 9),  # defaults: DPM++ 2M, 20 steps, CFG 3
    ("toyworld-turbo", None, 8, 8),  # defaults: 1 step, guidance off
    ("toyworld-turbo", 4, 11, 11),
])
def test_generated_scenes_are_judged_right(pipes, model, steps, need_objects, need_scene):
    objects = scene = 0
    for k, s in enumerate(scenes()):
        rng = random.Random(k)
        image = generate(pipes[model], GenerationRequest(s.caption(rng), steps=steps, seed=k), progress=False)[0].image
        verdict = judge(np.asarray(image), s)
        objects += verdict.objects_right
        scene += verdict.match
    assert objects >= need_objects and scene >= need_scene, (objects, scene)


def test_shipped_files_name_no_path_of_the_machine_that_made_them():
    """Configs and records of every shipped folder: no `_name_or_path`, no absolute path."""
    import json

    from atelier.models.loader import BUILTIN_DIR

    def strings(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                assert k != "_name_or_path", key
                yield from strings(v, f"{key}.{k}")
        elif isinstance(value, list):
            for v in value:
                yield from strings(v, key)
        elif isinstance(value, str):
            yield key, value

    files = sorted(BUILTIN_DIR.rglob("*.json"))
    assert len(files) > 20
    for path in files:
        if path.name in ("tokenizer.json", "vocab.json"):
            continue
        for key, text in strings(json.loads(path.read_text(encoding="utf-8"))):
            assert not text.startswith(("/", "~")) and ":\\" not in text, (path, key, text)


def test_builtin_tryon_model_dresses_toy_persons_and_keeps_the_rest():
    """`toyworld-tryon` (shipped, OOTDiffusion with the garment UNet frozen, the default of `atelier tryon`) on 16 toy cases of its own
    seed: everything outside the mask is the person's, and the garment's shape and colour reach the slot
    in a share close to the benchmark's (benchmarks/tryon.py, shipped part: 95-96 %; here 16 of 16, two of
    slack)."""
    from PIL import Image

    from atelier.toyworld import render
    from atelier.toyworld.tryon import score_tryon, tryon_cases
    from atelier.tryon import load_tryon_model, try_on

    model = load_tryon_model("toyworld-tryon")
    assert model.method == "ootd"
    right = 0
    for k, case in enumerate(tryon_cases(16, seed=CAPTIONS_SEED % 2**31, paired=False)):
        person = Image.fromarray(render(case.person))
        result = try_on(model, person, Image.fromarray(render(case.garment_scene)), Image.fromarray(case.mask()), seed=k)
        outside = case.mask() == 0
        assert np.array_equal(np.asarray(result)[outside], np.asarray(person)[outside])
        score = score_tryon(result, case)
        assert score["preserved"]
        right += score["garment_right"]
    assert right >= 14


# Each model with its own adapter, objects right of 8 per object count at least: toyworld at the target
# shares of 8 (90 / 75 / 55 %, rounded down; benchmarks/image_prompts.py measures 97.5 / 82.5 / 60 % on 40
# each; the adapter before its continued training got 7 / 3 / 2 here, this one 8 / 7 / 5); toyworld-turbo
# with its own toyworld-turbo-ip (8 / 6 / 3 here; 97.5 / 75 / 62.5 % on the benchmark's 40 each) above
# what toyworld-ip, trained on toyworld's UNet, draws on it (5 / 3 / 2 here).
IP_FLOORS = {"toyworld": (7, 6, 4), "toyworld-turbo": (7, 5, 3)}


@pytest.mark.parametrize("model", ["toyworld", "toyworld-turbo"])
def test_builtin_ip_adapter_draws_the_reference_alone(pipes, model):
    """The model's own adapter (shipped) through `atelier generate "" --ip-image REF`: 8 held-out
    references each of 1, 2 and 3 objects, the judge's objects right at least IP_FLOORS."""
    from atelier.image_prompts import load_ip_adapter
    from atelier.toyworld.judge import detect
    from atelier.toyworld.render import render_pil

    pipe = pipes[model]
    adapters = load_ip_adapter(pipe, None)
    rng = random.Random(CAPTIONS_SEED + 1)
    right = {1: 0, 2: 0, 3: 0}
    try:
        for k, scene in enumerate(sample_scene(rng, n) for n in (1, 2, 3) for _ in range(8)):
            prompt = adapters.reference(render_pil(scene))
            image = generate(pipe, GenerationRequest("", seed=k, image_prompts=[prompt]), progress=False)[0].image
            found = sorted((o.shape, o.colour, o.size) for o in detect(np.asarray(image)))
            right[len(scene.objects)] += found == sorted((o.shape, o.colour, o.size) for o in scene.objects)
    finally:
        adapters.unload()
    floors = IP_FLOORS[model]
    assert right[1] >= floors[0] and right[2] >= floors[1] and right[3] >= floors[2], right
