"""Concept-learning sets of the toy world: the reserved concepts, token captions, the scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atelier.testing.cli import one_error_line, run
from atelier.toyworld import render, render_pil
from atelier.toyworld.concepts import CONCEPTS, held_out_examples, instance_examples, score_concept
from atelier.toyworld.scene import Scene, ToyObject


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_rendered_examples_score_right_and_token_replaces_only_the_concept(concept):
    instances = instance_examples(concept, 8, token="sks")
    held = held_out_examples(concept, 50, token="sks", instances=instances)
    assert len(held) == 50
    assert not {tuple(e.scene.keys()) for e in held} & {tuple(e.scene.keys()) for e in instances}
    for ex in instances + held[:20]:
        assert concept not in ex.caption.split() and ex.caption.split().count("sks") == 1
        assert ex.caption.replace("sks", concept) == ex.true_caption
        assert score_concept(render(ex.scene), ex, concept) == {"concept_right": True, "rest_right": True, "match": True}


def test_base_word_in_place_of_the_concept_fails_only_the_concept():
    ex = next(e for e in held_out_examples("ring", 50) if len(e.scene.objects) == 2)
    carrier, other = ex.scene.objects
    drawn = Scene((ToyObject(**{**carrier.__dict__, "shape": "circle"}), other))
    assert score_concept(render(drawn), ex, "ring") == {"concept_right": False, "rest_right": True, "match": False}
    wrong_colour = "blue" if carrier.colour != "blue" else "red"
    drawn = Scene((ToyObject(**{**carrier.__dict__, "colour": wrong_colour}), other))
    assert score_concept(render(drawn), ex, "ring") == {"concept_right": True, "rest_right": False, "match": False}
    assert score_concept(np.full((64, 64, 3), 245, np.uint8), ex, "ring")["concept_right"] is False


def test_concept_data_cli(tmp_path, capsys):
    code, out, _ = run(["toyworld", "concept-data", "--concept", "teal", "--out", str(tmp_path / "d"), "--n", "3",
                        "--held-out", "4", "--token", "zq", "--json"], capsys)
    assert code == 0 and json.loads(out)["instance"] == 3
    captions = sorted((tmp_path / "d" / "instance").glob("*.txt"))
    assert len(captions) == 3 and all("zq" in p.read_text() for p in captions)
    assert all(p.with_suffix(".png").is_file() for p in captions)
    assert len((tmp_path / "d" / "held_out.jsonl").read_text().splitlines()) == 4
    code, _, err = run(["toyworld", "concept-data", "--concept", "cyan", "--out", str(tmp_path / "e")], capsys)
    assert one_error_line(code, err) and "unknown concept 'cyan'" in err


def test_decoder_inversion_gives_back_a_colour_the_toy_encoder_never_learnt():
    """The toy VAE never saw teal: its encoder's latents decode to another colour, so a LoRA trained on
    them cannot learn teal. Decoder inversion (train lora's --decoder_inversion_steps) gets latents
    that decode to the image, a small step from the encoder's."""
    import torch

    from atelier.core.vae import decode, encode, invert_decoder
    from atelier.models import load_pipeline

    vae = load_pipeline("toyworld").vae.requires_grad_(False)
    examples = held_out_examples("teal", 4)
    x = torch.from_numpy(np.stack([render(e.scene) for e in examples])).permute(0, 3, 1, 2).float() / 127.5 - 1

    def concept_found(z):
        with torch.no_grad():
            images = ((decode(vae, z).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [score_concept(i, e, "teal")["concept_right"] for i, e in zip(images, examples)]

    with torch.no_grad():
        encoded = encode(vae, x)
    inverted = invert_decoder(vae, x, encoded, 100)
    assert not any(concept_found(encoded))
    assert all(concept_found(inverted))
    assert (inverted - encoded).pow(2).mean().sqrt() < 0.3 * encoded.pow(2).mean().sqrt()
    assert not any(p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_composites_paste_the_instance_object_into_a_free_cell_exactly(concept):
    import random

    from atelier.toyworld.concepts import ConceptExample, composites
    from atelier.toyworld.scene import sample_scene

    instances = instance_examples(concept, 8, token="sks")
    rng = random.Random(5)
    scenes = [sample_scene(rng, rng.randint(1, 3)) for _ in range(40)]
    backgrounds = [(render(s), s.caption(rng)) for s in scenes] + [(render(scenes[0]), "a photo of a cat")]
    out = composites(instances, [render(e.scene) for e in instances], backgrounds, 16, seed=3)
    assert len(out) == 16
    for k, (picture, caption) in enumerate(out):
        ex = instances[k % 8]
        carrier = ex.scene.objects[0]
        assert caption.split().count("sks") == 1 and ex.carrier_phrase() in caption
        others = _phrases(caption) - {ex.carrier_phrase()}
        background = next(s for s in scenes if {o.phrase() for o in s.objects} == others)
        assert len(background.objects) <= 2 and carrier.cell not in {o.cell for o in background.objects}
        union = Scene((carrier,) + background.objects)
        # the renderer's picture of the union scene, up to rounding: the instance's own background is gone
        assert np.abs(picture.astype(int) - render(union).astype(int)).max() <= 1
        assert score_concept(picture, ConceptExample(union, caption, caption), concept)["match"]


def _phrases(caption):
    import re

    return set(re.split(r", | and ", caption))


def test_composites_refuse_when_no_background_leaves_the_cell_free():
    from atelier.errors import UserError
    from atelier.toyworld.concepts import composites

    instances = instance_examples("bar", 1, token="sks")
    cell = instances[0].scene.objects[0].cell
    blocked = Scene((ToyObject("circle", "red", "small", cell),))
    with pytest.raises(UserError, match="no background leaves"):
        composites(instances, [render(instances[0].scene)], [(render(blocked), blocked.caption())], 1)


def test_concept_data_cli_writes_composites(tmp_path, capsys):
    import random

    from atelier.toyworld.scene import sample_scene

    backgrounds = tmp_path / "class"
    backgrounds.mkdir()
    rng = random.Random(0)
    for k in range(12):
        scene = sample_scene(rng, rng.randint(1, 2))
        render_pil(scene).save(backgrounds / f"{k}.png")
        (backgrounds / f"{k}.txt").write_text(scene.caption(rng) + "\n")
    code, out, _ = run(["toyworld", "concept-data", "--concept", "bar", "--out", str(tmp_path / "d"), "--n", "4",
                        "--composites", "6", "--backgrounds", str(backgrounds), "--json"], capsys)
    assert code == 0 and json.loads(out)["composites"] == 6
    pasted = sorted((tmp_path / "d" / "instance").glob("composite-*.txt"))
    assert len(pasted) == 6 and all(p.read_text().count("sks") == 1 for p in pasted)
    assert all(p.with_suffix(".png").is_file() for p in pasted)
    for extra, words in ((["--composites", "2"], "needs N >= 0 and --backgrounds"),
                         (["--composites", "2", "--backgrounds", str(tmp_path / "none")], "not a folder"),
                         (["--composites", "2", "--backgrounds", str(tmp_path / "d")], "no 64 x 64 image with a caption")):
        code, _, err = run(["toyworld", "concept-data", "--concept", "bar", "--out", str(tmp_path / "e"), *extra], capsys)
        assert one_error_line(code, err) and words in err, err
