"""`atelier.evaluate`: PIE-Bench's mask format, the metrics, the runner and `atelier evaluate pie-bench`,
on a tiny synthetic PIE-Bench folder of toy-world images and tiny random metric models."""

import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.cli import main
from atelier.errors import UserError
from atelier.evaluate import metrics
from atelier.evaluate.methods import available_methods, get_method
from atelier.evaluate.pie_bench import (
    METRICS,
    SKIP_NOTES,
    MetricSuite,
    case_mask,
    decode_mask,
    load_cases,
    load_metric_suite,
    run_pie_bench,
    strip_brackets,
)
from atelier.toyworld import render_pil, sample_scene

# ----------------------------------------------------------------------------- a tiny PIE-Bench


def encode_rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's encoding: (start, length) of each run of 1s in the row-major flattened mask."""
    flat = np.concatenate([[0], mask.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def box_mask_512(top, left, bottom, right) -> np.ndarray:
    """A 512x512 edit mask: the box given in 64x64 image pixels, scaled by 8."""
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[top * 8 : bottom * 8, left * 8 : right * 8] = 1
    return mask


BOXES = [(8, 8, 32, 32), (30, 20, 60, 50), (0, 0, 20, 64)]


def write_pie_bench(root, n=3):
    cases = {}
    for i in range(n):
        key = f"{i:012d}"
        type_id = str(i % 2)
        rel = f"{type_id}_toy/{key}.png"
        path = root / "annotation_images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        render_pil(sample_scene(random.Random(i))).save(path)
        cases[key] = {
            "image_path": rel,
            "original_prompt": "a [red] circle on the left",
            "editing_prompt": "a [blue] circle on the left",
            "editing_instruction": "make the circle blue",
            "editing_type_id": type_id,
            "blended_word": "circle circle",
            "mask": encode_rle(box_mask_512(*BOXES[i % len(BOXES)])),
        }
    (root / "mapping_file.json").write_text(json.dumps(cases))
    return root


@pytest.fixture
def pie(tmp_path):
    return write_pie_bench(tmp_path / "PIE-Bench_v1")


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """No metric weights are ever found in a cache during these tests."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def toyworld_pipe():
    from atelier.models import load_pipeline

    return load_pipeline("toyworld", device="cpu")


def corrupt(pipe, image, source_prompt, target_prompt, seed):
    rng = np.random.default_rng(seed)
    noisy = np.asarray(image).astype(float) + rng.normal(0, 20, size=np.asarray(image).shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


corrupt.needs_pipe = False


# ----------------------------------------------------------------------------- mask format


def test_rle_decoding_matches_a_hand_made_mask():
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[100:140, 200:260] = 1
    mask[300, :] = 1  # a run that wraps across a whole row
    mask[511, 500:] = 1  # a run ending at the last pixel
    rle = encode_rle(mask)
    assert np.array_equal(decode_mask(rle, border=False), mask)
    with_border = decode_mask(rle)
    assert with_border[0].all() and with_border[-1].all() and with_border[:, 0].all() and with_border[:, -1].all()
    assert np.array_equal(with_border[1:-1, 1:-1], mask[1:-1, 1:-1])
    # a run past the end is cut, as the reference does
    assert decode_mask([512 * 512 - 2, 10], border=False).sum() == 2
    # hand-written pairs: start 3 length 2 on a 2x4 image
    assert decode_mask([3, 2], (2, 4), border=False).tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
    for bad in ([1, 2, 3], [1, -2], "12", [1.5, 2]):
        with pytest.raises(UserError):
            decode_mask(bad)


def test_masks_are_resized_to_the_image():
    rle = encode_rle(box_mask_512(8, 16, 24, 40))
    small = case_mask(rle, (64, 64))
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[8:24, 16:40] = 1
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1
    assert small.shape == (64, 64) and np.array_equal(small, expected)
    assert np.array_equal(case_mask(rle, (512, 512)), decode_mask(rle))


def test_cases_load_with_brackets_stripped(pie):
    cases = load_cases(pie)
    assert [c.key for c in cases] == ["000000000000", "000000000001", "000000000002"]
    assert cases[0].source_prompt == "a red circle on the left" and cases[0].target_prompt == "a blue circle on the left"
    assert cases[1].editing_type == "1" and cases[0].blended_word == "circle circle"
    assert strip_brackets("a [cat] sitting on [a mat]") == "a cat sitting on a mat"


# ----------------------------------------------------------------------------- pixel metrics


def test_psnr_mse_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    b = a + 1
    assert metrics.mse(a, a) == 0 and metrics.psnr(a, a) == math.inf
    assert metrics.mse(a, b) == pytest.approx((1 / 255) ** 2, rel=1e-5)
    assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255), rel=1e-5)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    # masking multiplies both images: differences outside the mask do not count
    c = a.copy()
    c[:10] = 0
    keep = np.ones((40, 48))
    keep[:10] = 0
    assert metrics.psnr(a, c, keep) == math.inf and metrics.psnr(a, c) < 30

    # SSIM against an independent formulation: scipy's gaussian filter (mirror = torch's reflect,
    # radius int(3.5 * 1.5 + 0.5) = 5), with and without the border of 5 PIE-Bench's torchmetrics cropped
    from scipy.ndimage import gaussian_filter

    noisy = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    x, y = a / 255.0, noisy / 255.0

    def blur(img):
        return np.stack([gaussian_filter(img[..., k], 1.5, truncate=3.5, mode="mirror") for k in range(3)], -1)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = np.maximum(blur(x * x) - mx**2, 0), np.maximum(blur(y * y) - my**2, 0), blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    full = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(a, noisy, crop_border=True) == pytest.approx(full[5:-5, 5:-5].mean(), abs=1e-5)
    assert metrics.ssim(a, noisy) == pytest.approx(full.mean(), abs=1e-5) and metrics.ssim(a, noisy) < 0.99


# ----------------------------------------------------------------------------- model metrics (tiny random weights)


LPIPS_VGG_CHANNELS = (64, 128, 256, 512, 512)


def random_vgg16_features() -> dict:
    """torchvision's vgg16 `features.N.*` with random weights (no download: weights=None)."""
    from torchvision.models import vgg16

    return {f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """Random VGG16 features named as torchvision's (the lpips package ships its linear layers)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = random_vgg16_features()
    tensors["classifier.0.weight"] = torch.zeros(2, 2)  # extra torchvision keys are ignored
    path = tmp_path_factory.mktemp("lpips") / "vgg16.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from atelier.models.tokenizers import write_word_tokenizer

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    folder = tmp_path_factory.mktemp("clip")
    write_word_tokenizer("a red blue circle square on the left right".split(), folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab[tok.bos_token], "eos_token_id": vocab[tok.eos_token],
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def toy(i):
    return render_pil(sample_scene(random.Random(i)))


def test_lpips_vgg_from_local_weights(lpips_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "atelier-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = metrics.load_lpips_vgg(lpips_file)
    a, b = toy(1), toy(2)
    assert metrics.lpips(model, a, a) == 0
    d = metrics.lpips(model, a, b)
    assert d > 0 and d == pytest.approx(metrics.lpips(model, b, a), rel=1e-5)
    # weights of another network are refused, naming what is missing
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(UserError, match="lack features.2|shape"):
        metrics.load_lpips_vgg(wrong)
    # no weights given and none cached: one line naming the file to provide
    with pytest.raises(UserError, match="vgg16.safetensors"):
        metrics.load_lpips_vgg()
    # torchvision's hub-cache file is a pickle: read only when pickles are allowed
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(random_vgg16_features(), hub / metrics.HUB_FILES["vgg16"])
    with pytest.raises(UserError, match="allow-pickle"):
        metrics.load_lpips_vgg()
    from_hub = metrics.load_lpips_vgg(allow_pickle=True)
    assert metrics.lpips(from_hub, a, a) == 0 and metrics.lpips(from_hub, a, b) > 0
    # linear layers in the weights (as the lpips package's own vgg.pth) replace the shipped ones
    lins = tmp_path / "vgg.pth"
    torch.save({f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate(LPIPS_VGG_CHANNELS)}, lins)
    with pytest.raises(UserError, match="pickle"):
        metrics.load_lpips_vgg([lpips_file, lins])
    assert metrics.lpips(metrics.load_lpips_vgg([lpips_file, lins], allow_pickle=True), a, b) == 0


def test_dino_structure_distance(dino_dir):
    model = metrics.load_dino(dino_dir)
    a, b = toy(1), toy(2)
    sim = metrics.dino_key_self_similarity(model, a)
    assert sim.shape == (1 + 28 * 28,) * 2  # 224 / patch 8, plus CLS
    assert torch.allclose(sim.diagonal(), torch.ones(sim.shape[0]), atol=1e-4)
    assert metrics.structure_distance(model, a, a) == 0
    assert metrics.structure_distance(model, a, b) > 0


def test_weights_that_do_not_fit_the_config_are_refused(dino_dir, tmp_path):
    import shutil

    wrong = tmp_path / "dino-wrong"
    shutil.copytree(dino_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="lack"):  # never a metric on randomly initialised layers
        metrics.load_dino(wrong)


def test_clip_score(clip_dir):
    from transformers import CLIPTokenizer

    scorer = metrics.load_clip(clip_dir)
    model, tok = scorer.model, CLIPTokenizer.from_pretrained(str(clip_dir))
    texts = ["a red circle on the left", "a blue square", "the right circle", "a square on the left"]
    for i in range(3):
        image = toy(i)
        pixels = scorer.processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model(pixel_values=pixels, **tok(texts, padding=True, return_tensors="pt"))
            cosine = out.logits_per_image[0] / model.logit_scale.exp()  # CLIP's own forward, independently
        for text, cos in zip(texts, cosine):
            assert metrics.clip_score(scorer, image, text) == pytest.approx(max(100 * float(cos), 0), abs=1e-3)
    mask = np.zeros((64, 64))
    mask[10:30, 10:30] = 1
    region = [metrics.clip_score(scorer, toy(0), t, mask) for t in texts]
    whole = [metrics.clip_score(scorer, toy(0), t) for t in texts]
    assert all(0 <= r <= 100 for r in region) and region != whole


def test_clip_folder_without_tokenizer_gets_the_real_clip_tokenizer(tmp_path, monkeypatch):
    from atelier.models.tokenizers import open_clip_bpe_path

    try:
        open_clip_bpe_path()
    except UserError:
        pytest.skip("the CLIP BPE file ships with open_clip_torch, which is not installed")
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "atelier-cache"))
    tok = metrics._tokenizer(tmp_path)
    assert len(tok) == 49408 and tok("a photo of a cat").input_ids[0] == 49406


def test_missing_weights_skip_their_metrics_with_a_note(tmp_path):
    suite = load_metric_suite()
    assert suite.dino is None and suite.lpips is None and suite.clip is None
    assert suite.notes == [SKIP_NOTES["dino"], SKIP_NOTES["lpips"], SKIP_NOTES["clip"]]
    assert "--dino" in suite.notes[0] and "facebook/dino-vitb8" in suite.notes[0]
    assert "--lpips-vgg" in suite.notes[1] and "--clip" in suite.notes[2]
    assert suite.metrics == ["psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"]
    with pytest.raises(UserError, match="no such weights"):
        load_metric_suite(lpips_vgg=["/no/such/file.safetensors"])
    with pytest.raises(UserError, match="config.json"):
        load_metric_suite(dino=tmp_path)


# ----------------------------------------------------------------------------- the runner


def test_reconstruct_end_to_end(pie, toyworld_pipe, tmp_path):
    out = tmp_path / "out"
    result = run_pie_bench(pie, "reconstruct", pipe=toyworld_pipe, suite=MetricSuite(), out_dir=out)
    assert result["cases"] == 3 and result["metrics"] == ["psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"]
    for row in result["per_case"]:
        assert row["psnr_unedit_part"] == math.inf and row["mse_unedit_part"] == 0
        assert row["ssim_unedit_part"] == pytest.approx(1.0)
    assert set(result["summary"]) == {"all", "0", "1"}
    assert result["summary"]["0"]["cases"] == 2 and result["summary"]["all"]["psnr_unedit_part"] == math.inf
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["all"]["psnr_unedit_part"] == "inf" and saved["summary"]["all"]["mse_unedit_part"] == 0
    summary_csv = (out / "summary.csv").read_text().splitlines()
    assert summary_csv[0].startswith("editing_type_id,editing_type,cases,psnr_unedit_part")
    assert summary_csv[1].startswith("all,all types,3,inf,0.0")
    assert len((out / "cases.csv").read_text().splitlines()) == 4
    assert not list(out.glob(".*tmp"))


def test_a_corrupting_method_scores_lower(pie):
    result = run_pie_bench(pie, corrupt, suite=MetricSuite(), limit=2)
    assert result["cases"] == 2
    for row in result["per_case"]:
        assert 15 < row["psnr_unedit_part"] < 40 and row["mse_unedit_part"] > 0 and row["ssim_unedit_part"] < 0.9

    def edit_inside_mask_only(pipe, image, source_prompt, target_prompt, seed):
        pixels = np.asarray(image).copy()
        pixels[10:30, 10:30] = 0  # inside BOXES[0], the first case's edit region
        return Image.fromarray(pixels)

    edit_inside_mask_only.needs_pipe = False
    first = run_pie_bench(pie, edit_inside_mask_only, suite=MetricSuite(), limit=1)["per_case"][0]
    assert first["psnr_unedit_part"] == math.inf


def test_all_metrics_with_tiny_models(pie, dino_dir, clip_dir, lpips_file, toyworld_pipe):
    suite = load_metric_suite(dino=dino_dir, clip=clip_dir, lpips_vgg=[lpips_file])
    assert suite.notes == []
    same = run_pie_bench(pie, "reconstruct", suite=suite, limit=2)
    assert same["metrics"] == list(METRICS)
    for row in same["per_case"]:
        assert row["structure_distance"] == 0 and row["lpips_unedit_part"] == 0
        assert row["clip_similarity_source_image"] >= 0 and row["clip_similarity_target_image_edit_part"] >= 0
    edited = run_pie_bench(pie, "img2img", pipe=toyworld_pipe, suite=suite, limit=1)
    row = edited["per_case"][0]
    assert row["structure_distance"] > 0 and row["lpips_unedit_part"] > 0
    assert math.isfinite(row["psnr_unedit_part"])


# ----------------------------------------------------------------------------- methods


def test_method_registry(monkeypatch):
    assert {"reconstruct", "img2img"} <= set(available_methods())
    with pytest.raises(UserError, match="known methods: .*img2img.*reconstruct"):
        get_method("nope")
    fake = types.ModuleType("atelier.edit")
    fake.METHODS = {"p2p": corrupt}
    monkeypatch.setitem(sys.modules, "atelier.edit", fake)
    assert get_method("p2p") is corrupt and "reconstruct" in available_methods()


def test_img2img_method_edits_the_image(toyworld_pipe):
    source = toy(4)
    out = get_method("img2img")(toyworld_pipe, source, "a red circle", "a blue square", 0)
    assert out.size == source.size
    assert not np.array_equal(np.asarray(out), np.asarray(source))
    again = get_method("img2img")(toyworld_pipe, source, "a red circle", "a blue square", 0)
    assert np.array_equal(np.asarray(out), np.asarray(again))


# ----------------------------------------------------------------------------- the command


def test_cli_json_and_files(pie, tmp_path, dino_dir, capsys):
    out = tmp_path / "res"
    code = main(["evaluate", "pie-bench", "--data", str(pie), "--method", "reconstruct", "--limit", "2",
                 "--dino", str(dino_dir), "--out", str(out), "--json", "--save-images"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["cases"] == 2 and result["summary"]["all"]["structure_distance"] == 0
    assert result["summary"]["all"]["psnr_unedit_part"] == "inf"
    assert "note: LPIPS skipped" in captured.err and "note: CLIP scores skipped" in captured.err
    assert (out / "results.json").is_file() and (out / "images" / "0_toy" / "000000000000.png").is_file()

    assert main(["evaluate", "pie-bench", "--data", str(pie), "--method", "reconstruct", "--types", "1"]) == 0
    text = capsys.readouterr().out
    assert "1 change object" in text and "PSNR" in text and "0 random" not in text


@pytest.mark.parametrize("problem", ["no-folder", "no-mapping", "bad-json", "missing-field", "bad-mask", "bad-type"])
def test_cli_user_errors_are_one_line(problem, pie, capsys):
    mapping = pie / "mapping_file.json"
    data = json.loads(mapping.read_text())
    first = data["000000000000"]
    if problem == "no-folder":
        pie = pie / "missing"
    elif problem == "no-mapping":
        mapping.unlink()
    elif problem == "bad-json":
        mapping.write_text("{not json")
    elif problem == "missing-field":
        del first["mask"]
    elif problem == "bad-mask":
        first["mask"] = [1, 2, 3]
    elif problem == "bad-type":
        first["editing_type_id"] = "12"
    if problem in ("missing-field", "bad-mask", "bad-type"):
        mapping.write_text(json.dumps(data))
    code = main(["evaluate", "pie-bench", "--data", str(pie), "--method", "reconstruct"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("atelier: error: ") and len(err.strip().splitlines()) == 1


def test_cli_unknown_method_and_missing_model(pie, capsys):
    assert main(["evaluate", "pie-bench", "--data", str(pie), "--method", "magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown editing method 'magic'" in err and "img2img" in err and "reconstruct" in err
    assert main(["evaluate", "pie-bench", "--data", str(pie), "--method", "img2img"]) == 2
    assert "needs a model: give --model" in capsys.readouterr().err
