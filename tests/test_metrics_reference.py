"""`atelier.evaluate`'s metrics agree with the reference implementations: clean-fid, torchmetrics,
lpips and DISTS_pytorch, each run on the same tiny random models and features (nothing downloaded)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import clip_dir, toy  # noqa: F401 - clip_dir is a fixture

from atelier.cli import main
from atelier.errors import UserError
from atelier.evaluate import distribution as d
from atelier.evaluate import metrics


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No weights are found in any cache unless a test puts them there."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "atelier-cache"))
    monkeypatch.setattr(d, "_cleanfid_dirs", lambda: [])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))


def random_features(n, dim, seed):
    return np.random.default_rng(seed).normal(size=(n, dim))


class GivenFeatures(torch.nn.Module):
    """A torchmetrics `feature` module whose "images" are already the feature rows."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


# ----------------------------------------------------------------------------- FID and KID


def test_fid_equals_clean_fid_and_torchmetrics():
    from cleanfid.fid import fid_from_feats
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = random_features(60, 8, 0), random_features(50, 8, 1) * 1.5 + 0.3
    ours = d.fid(a, b)
    assert ours == pytest.approx(fid_from_feats(a, b), rel=1e-12)
    reference = FrechetInceptionDistance(feature=GivenFeatures(8)).set_dtype(torch.float64)
    reference.update(torch.from_numpy(a), real=True)
    reference.update(torch.from_numpy(b), real=False)
    assert ours == pytest.approx(float(reference.compute()), rel=1e-6)
    assert ours > 1 and d.fid(a, a) == pytest.approx(0, abs=1e-9)


def test_kid_equals_torchmetrics_on_one_full_subset_and_clean_fid_under_the_seed():
    from cleanfid.fid import kernel_distance
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = random_features(40, 8, 2), random_features(40, 8, 3) + 0.5
    reference = KernelInceptionDistance(feature=GivenFeatures(8), subsets=1, subset_size=40)
    reference.update(torch.from_numpy(a), real=True)
    reference.update(torch.from_numpy(b), real=False)
    mean, _ = reference.compute()
    ours = d.kid(a, b, num_subsets=1, max_subset_size=40)
    assert ours == pytest.approx(float(mean), rel=1e-6) and ours > 0

    c = random_features(30, 8, 4)
    np.random.seed(123)  # the caller's global RNG state survives
    before = np.random.get_state()[1].copy()
    ours = d.kid(a, c, max_subset_size=20, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)
    np.random.seed(7)
    assert ours == kernel_distance(a, c, max_subset_size=20)
    assert d.kid(a, c, max_subset_size=20, seed=8) != ours


# ----------------------------------------------------------------------------- clean-fid's Inception protocol


class TinyInceptionLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)
        self.fc = torch.nn.Linear(6, 2048)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class TinyInception(torch.nn.Module):
    """NVIDIA's file's interface as clean-fid calls it: `layers(x)` on 299 px input scaled to
    [-1, 1], and `forward(x, return_features=True)` resizing [0, 255] input itself."""

    def __init__(self):
        super().__init__()
        self.layers = TinyInceptionLayers()

    def forward(self, x, return_features: bool = False):
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    torch.jit.script(TinyInception()).save(str(folder / d.INCEPTION_FILE))
    return folder


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, size=(36, 44, 3), dtype=np.uint8)
        (folder / ("sub" if i == 3 else "")).mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / ("sub" if i == 3 else "") / f"{i}.png")
    return folder


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_inception_features_equal_clean_fid_folder_features(mode, inception_dir, images_dir):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(inception_dir), download=False, resize_inside=mode == "legacy_tensorflow")
    reference = get_folder_features(str(images_dir), model=model, num_workers=0, batch_size=4,
                                    device=torch.device("cpu"), mode=mode, verbose=False)
    extractor = d.load_features("inception", mode=mode, weights=inception_dir)
    ours = d.folder_features(images_dir, extractor, batch_size=3)
    assert ours.shape == (5, 2048) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
    if mode == "clean":  # the resize is not skipped: other inputs give other features
        assert not np.allclose(ours, d.folder_features(images_dir, d.load_features("inception", mode="legacy_tensorflow", weights=inception_dir)))


def test_legacy_pytorch_inception_equals_clean_fid_without_downloading(images_dir, tmp_path, monkeypatch):
    from cleanfid import features, inception_pytorch
    from cleanfid.fid import get_folder_features
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = inception_pytorch._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # random, as fid_inception_v3 shapes it
    for name, block in [("Mixed_5b", inception_pytorch.FIDInceptionA(192, 32)), ("Mixed_5c", inception_pytorch.FIDInceptionA(256, 64)),
                        ("Mixed_5d", inception_pytorch.FIDInceptionA(288, 64)), ("Mixed_6b", inception_pytorch.FIDInceptionC(768, 128)),
                        ("Mixed_6c", inception_pytorch.FIDInceptionC(768, 160)), ("Mixed_6d", inception_pytorch.FIDInceptionC(768, 160)),
                        ("Mixed_6e", inception_pytorch.FIDInceptionC(768, 192)), ("Mixed_7b", inception_pytorch.FIDInceptionE_1(1280)),
                        ("Mixed_7c", inception_pytorch.FIDInceptionE_2(2048))]:
        setattr(net, name, block)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp_path / "pt_inception.safetensors"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    with monkeypatch.context() as patch:
        patch.setattr(inception_pytorch, "load_state_dict_from_url", lambda *args, **kwargs: state)
        reference_model = features.feature_extractor("pytorch_inception", device=torch.device("cpu"), use_dataparallel=False)
    reference = get_folder_features(str(images_dir), model=reference_model, num_workers=0, batch_size=5,
                                    device=torch.device("cpu"), mode="legacy_pytorch", verbose=False)
    monkeypatch.setattr(inception_pytorch, "load_state_dict_from_url", no_download)
    extractor = d.load_features("inception", mode="legacy_pytorch", weights=tmp_path / "pt_inception.safetensors")
    np.testing.assert_allclose(d.folder_features(images_dir, extractor, batch_size=2), reference, rtol=1e-5, atol=1e-6)
    assert inception_pytorch.load_state_dict_from_url is no_download  # restored after construction
    # pytorch-fid's .pth is a pickle: refused without allow_pickle
    torch.save(state, tmp_path / d.PT_INCEPTION_FILE)
    with pytest.raises(UserError, match="pickle"):
        d.load_features("inception", mode="legacy_pytorch", weights=tmp_path)


def test_missing_inception_weights_name_the_file(monkeypatch):
    for mode, file in [("clean", d.INCEPTION_FILE), ("legacy_pytorch", d.PT_INCEPTION_FILE)]:
        with pytest.raises(UserError, match=file) as err:
            d.load_features("inception", mode=mode)
        assert "\n" not in str(err.value) and "https://" in str(err.value)


# ----------------------------------------------------------------------------- LPIPS, DISTS, SSIM

ARCHS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def pair():
    return np.asarray(toy(1)), np.asarray(toy(2))


def as_unit_tensor(pixels):
    return torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize("net", list(ARCHS))
def test_lpips_equals_the_lpips_package(net, tmp_path, monkeypatch):
    import lpips as lpips_package
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    backbone = getattr(torchvision.models, ARCHS[net])(weights=None)
    file = tmp_path / f"{ARCHS[net]}.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in backbone.features.state_dict().items()}, str(file))
    ours = metrics.load_lpips(net, file)
    # the reference: the package's own "pretrained" path, handed our random backbone by torchvision
    monkeypatch.setattr(lpips_package.pretrained_networks.tv, ARCHS[net], lambda pretrained=True, **kwargs: backbone)
    reference = lpips_package.LPIPS(net=net, verbose=False)
    a, b = pair()
    with torch.no_grad():
        expected = float(reference(as_unit_tensor(a), as_unit_tensor(b), normalize=True))
    assert metrics.lpips(ours, a, b) == pytest.approx(expected, rel=1e-6) and expected > 0


def test_dists_equals_dists_pytorch(tmp_path, monkeypatch):
    from pathlib import Path

    import DISTS_pytorch
    from DISTS_pytorch import DISTS_pt
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    torch.manual_seed(0)
    backbone = vgg16(weights=None)
    file = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in backbone.features.state_dict().items()}, str(file))
    ours = metrics.load_dists(file)
    monkeypatch.setattr(DISTS_pt.models, "vgg16", lambda pretrained=True, **kwargs: backbone)
    reference = DISTS_pt.DISTS(load_weights=False)
    shipped = torch.load(Path(DISTS_pytorch.__file__).parent / "weights.pt", weights_only=True)
    reference.alpha.data, reference.beta.data = shipped["alpha"], shipped["beta"]
    a, b = pair()
    expected = float(reference(as_unit_tensor(a), as_unit_tensor(b)))
    assert metrics.dists(ours, a, b) == pytest.approx(expected, rel=1e-6) and expected > 0
    assert abs(metrics.dists(ours, a, a)) < 1e-4  # float32 and the c1, c2 constants: not exactly 0


def test_dists_and_lpips_need_local_weights():
    with pytest.raises(UserError, match="vgg16.safetensors"):
        metrics.load_dists()
    with pytest.raises(UserError, match="alexnet.safetensors"):
        metrics.load_lpips("alex")
    with pytest.raises(UserError, match="unknown LPIPS network"):
        metrics.load_lpips("resnet")


def test_ssim_equals_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure

    rng = np.random.default_rng(0)
    a = np.asarray(toy(3))
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    x, y = (torch.from_numpy(v / 255.0).permute(2, 0, 1)[None] for v in (a, b))
    expected = float(structural_similarity_index_measure(y, x, data_range=1.0))
    assert metrics.ssim(b, a) == pytest.approx(expected, rel=1e-6, abs=1e-9) and expected < 0.9


# ----------------------------------------------------------------------------- CLIP score


def test_clip_score_equals_torchmetrics(clip_dir):  # noqa: F811 - the fixture
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    scorer = metrics.load_clip(clip_dir)
    images = [np.asarray(toy(i)) for i in range(4)]
    texts = ["a red circle on the left", "a blue square", "the right circle", "a square on the left"]
    class TensorFeatures(CLIPModel):
        """transformers 5 returns the projected embeddings as `.pooler_output` of an output object;
        torchmetrics 1.9 expects the bare tensor transformers 4 returned."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    def load():  # torchmetrics' own loading for openai/* names, pointed at the local folder
        return TensorFeatures.from_pretrained(str(clip_dir)), CLIPProcessor.from_pretrained(str(clip_dir))

    reference = CLIPScore(model_name_or_path=load)
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    for image, tensor, text in zip(images, tensors, texts):
        single = CLIPScore(model_name_or_path=load)
        single.update(tensor, text)
        assert metrics.clip_score(scorer, image, text) == pytest.approx(float(single.compute()), abs=1e-5)
    reference.update(tensors, texts)
    mean, per_image = metrics.clip_score_mean(scorer, images, texts, batch_size=3)
    assert mean == pytest.approx(float(reference.compute()), abs=1e-5) and len(per_image) == 4


# ----------------------------------------------------------------------------- toyworld features and the commands


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    scenes = [toy(i) for i in range(40)]
    return (write_folder(root / "scenes", scenes), write_folder(root / "same", scenes),
            write_folder(root / "noise", [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(40)]))


def test_toyworld_features_separate_scenes_from_noise(toy_folders):
    scenes, same, noise = toy_folders
    extractor = d.load_features("toyworld")
    a, b, n = (d.folder_features(f, extractor, batch_size=16) for f in toy_folders)
    assert a.shape == (40, 128) and np.array_equal(a, b)
    assert np.array_equal(a[:7], extractor.features([toy(i) for i in range(7)], batch_size=7))  # batch size free
    big = d.fid(a, n)
    assert big > 100 and abs(d.fid(a, b)) < 1e-6 * big  # sqrtm of a rank-deficient covariance leaves noise
    # other sizes are resized to 64 px with PIL bicubic first
    large = toy(0).resize((96, 80), Image.BICUBIC)
    assert np.array_equal(extractor.features([large]), extractor.features([large.resize((64, 64), Image.BICUBIC)]))


def test_cli_fid_kid_and_ref_stats_with_toyworld_features(toy_folders, capsys):
    scenes, same, noise = toy_folders
    assert main(["evaluate", "fid", str(scenes), str(noise), "--features", "toyworld", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["fid"] and out["fid"] == pytest.approx(d.fid(
        *(d.folder_features(f, d.load_features("toyworld")) for f in (scenes, noise))), rel=1e-9)
    assert main(["evaluate", "kid", str(scenes), str(noise), "--features", "toyworld", "--json"]) == 0
    kid = json.loads(capsys.readouterr().out)
    assert list(kid) == ["kid"] and kid["kid"] > 0

    assert main(["evaluate", "ref-stats", "noise", str(noise), "--features", "toyworld"]) == 0
    assert "saved" in capsys.readouterr().out
    stats = list((d.ref_stats_path("noise", d.load_features("toyworld"))).parent.glob("*.npz"))
    assert [p.name for p in stats] == ["noise_toyworld.npz"]
    assert main(["evaluate", "fid", str(scenes), "--ref-stats", "noise", "--features", "toyworld", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(out["fid"], rel=1e-9)
    assert main(["evaluate", "kid", str(scenes), "--ref-stats", "noise", "--features", "toyworld", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kid"] == pytest.approx(kid["kid"], rel=1e-9)


def test_cli_pairwise_and_clip_score(toy_folders, tmp_path, capsys):
    scenes, same, noise = toy_folders
    assert main(["evaluate", "ssim", str(scenes), str(same), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ssim"] == pytest.approx(1.0) and len(out["per_image"]) == 40
    assert main(["evaluate", "ssim", str(scenes), str(noise), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ssim"] < 0.5

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({f"{i:03d}": "a red circle" for i in range(40)}))
    assert main(["evaluate", "clip-score", str(scenes), "--prompts", str(prompts), "--features", "toyworld", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["clip_score"] <= 100 and len(out["per_image"]) == 40
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle\n" * 40)
    assert main(["evaluate", "clip-score", str(scenes), "--prompts", str(lines), "--features", "toyworld", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clip_score"] == pytest.approx(out["clip_score"], rel=1e-9)


@pytest.mark.parametrize("problem", ["missing-folder", "empty-folder", "unknown-features", "no-weights", "unknown-mode",
                                     "no-second-set", "unpaired", "size-mismatch", "corrupt", "no-ref-stats", "prompt-count"])
def test_cli_errors_are_one_line(problem, toy_folders, tmp_path, capsys):
    scenes, same, noise = toy_folders
    argv = {
        "missing-folder": ["fid", str(tmp_path / "nope"), str(scenes), "--features", "toyworld"],
        "empty-folder": ["fid", str(tmp_path / "empty"), str(scenes), "--features", "toyworld"],
        "unknown-features": ["fid", str(scenes), str(noise), "--features", "resnet"],
        "no-weights": ["fid", str(scenes), str(noise)],
        "unknown-mode": ["kid", str(scenes), str(noise), "--mode", "fast"],
        "no-second-set": ["fid", str(scenes)],
        "unpaired": ["ssim", str(scenes), str(write_folder(tmp_path / "few", [toy(0)]))],
        "size-mismatch": ["ssim", str(write_folder(tmp_path / "x", [toy(0)])),
                          str(write_folder(tmp_path / "y", [toy(0).resize((32, 32))]))],
        "corrupt": ["fid", str(scenes), str(tmp_path / "bad"), "--features", "toyworld"],
        "no-ref-stats": ["fid", str(scenes), "--ref-stats", "never-made", "--features", "toyworld"],
        "prompt-count": ["clip-score", str(scenes), "--prompts", str(tmp_path / "p.txt"), "--features", "toyworld"],
    }[problem]
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.txt").write_text("one prompt\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atelier: error: ") and len(err.strip().splitlines()) == 1
    if problem == "corrupt":
        assert "broken.png" in err
    if problem == "no-weights":
        assert d.INCEPTION_FILE in err


@pytest.mark.parametrize("command", ["fid", "kid", "clip-score", "lpips", "dists", "ssim", "ref-stats"])
def test_every_metric_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", command, "--help"])
    assert exit_.value.code == 0 and "usage: atelier evaluate " + command in capsys.readouterr().out

