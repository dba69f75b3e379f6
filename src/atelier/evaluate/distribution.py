"""Distribution metrics: FID and KID between two sets of images, computed by clean-fid's own code
(GaParmar/clean-fid, `cleanfid.fid`), on features from one of three extractors:

- `inception`: clean-fid's Inception protocol, its three modes exactly: `clean` (PIL bicubic resize to
  299 on float pixels, then NVIDIA's TorchScript Inception), `legacy_tensorflow` (the TorchScript
  model resizes inside, as TF-FID did) and `legacy_pytorch` (torch bilinear resize, pytorch-fid's
  ported Inception);
- `clip`: a transformers CLIP's projected image embeddings (openai/clip-vit-large-patch14 by default);
- `toyworld`: the shipped toy CLIP's projected image embeddings, for 64 px toy-world images; it needs
  no download, so the metrics run on a fresh machine.

Nothing is downloaded: weights come from `weights=` or the caches named in each loader's error.
Reference statistics (`save_ref_stats` / `load_ref_stats`) are .npz files under
`<atelier cache>/fid-stats/`, keyed by name and extractor.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from atelier.errors import UserError

FEATURES = ("inception", "clip", "toyworld")
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
INCEPTION_FILE = "inception-2015-12-05.pt"  # NVIDIA's TorchScript Inception, clean-fid's model
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port (a pickle), legacy_pytorch
PT_INCEPTION_SAFETENSORS = "pt_inception-2015-12-05.safetensors"  # the same tensors, converted
PT_INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PT_INCEPTION_FILE
CLIP_REPO = "openai/clip-vit-large-patch14"
TOYWORLD_CLIP = "toyworld-clip"
TOYWORLD_SIZE = 64


# ----------------------------------------------------------------------------- images


def image_files(folder) -> list[Path]:
    """The image files under `folder` (recursive, sorted), with the extensions clean-fid accepts."""
    from cleanfid.utils import EXTENSIONS

    folder = Path(os.path.expanduser(os.fspath(folder)))
    if not folder.is_dir():
        raise UserError(f"no such folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix[1:] in EXTENSIONS and p.suffix != ".npy")
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(sorted({e.lower() for e in EXTENSIONS} - {'npy'}))})")
    return files


def read_image(path) -> np.ndarray:
    """An HxWx3 uint8 array, as clean-fid reads files (`Image.open(path).convert("RGB")`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise UserError(f"cannot read image {path}: {exc}") from None


# ----------------------------------------------------------------------------- weights


def _cleanfid_dirs() -> list[Path]:
    """Where clean-fid itself keeps the Inception file: its download folder (`/tmp`, `./` on
    Windows, see cleanfid.features.feature_extractor) and its package folder."""
    import cleanfid

    return [Path("./" if platform.system() == "Windows" else "/tmp"), Path(cleanfid.__file__).parent]


def weight_search_dirs() -> list[Path]:
    from atelier.models.loader import atelier_cache_dir

    return [atelier_cache_dir(), *_cleanfid_dirs()]


def find_weights(name: str, given=None, *, hub: bool = False) -> Path:
    """`given` (the file, or a folder holding `name`), else `name` in the search folders (and in
    torchvision's hub cache with `hub`), else a UserError naming the file and where it comes from."""
    if given is not None:
        path = Path(os.path.expanduser(os.fspath(given)))
        path = path / name if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"no such weights file: {path}")
        return path
    dirs = weight_search_dirs() + ([Path(torch.hub.get_dir()) / "checkpoints"] if hub else [])
    for folder in dirs:
        if (folder / name).is_file():
            return folder / name
    url = INCEPTION_URL if name == INCEPTION_FILE else PT_INCEPTION_URL
    converted = f" (or as {PT_INCEPTION_SAFETENSORS})" if name == PT_INCEPTION_FILE else ""
    raise UserError(f"no {name}: download it from {url} and give --weights FILE, or put it in {dirs[0]}{converted}")


# ----------------------------------------------------------------------------- extractors


class InceptionFeatures:
    """clean-fid's Inception features (2048-d pool3) in one of its modes; `features` prepares each
    image as `cleanfid.utils.ResizeDataset` does and runs the model as `cleanfid.features` builds it."""

    def __init__(self, mode: str, model, device):
        from cleanfid.resize import build_resizer
        from torchvision.transforms import ToTensor

        self.name = f"inception-{mode}"
        self.mode, self.model, self.device = mode, model, torch.device(device)
        self.resize, self.to_tensor = build_resizer(mode), ToTensor()

    def _prepare(self, image) -> torch.Tensor:
        from atelier.evaluate.metrics import as_uint8

        resized = self.resize(as_uint8(image))
        # ResizeDataset: ToTensor scales uint8 to [0, 1], so it multiplies back; float32 passes through
        return self.to_tensor(resized) * 255 if resized.dtype == np.uint8 else self.to_tensor(resized)

    @torch.no_grad()
    def features(self, images, batch_size: int = 64) -> np.ndarray:
        tensors = [self._prepare(image) for image in images]
        rows: list = [None] * len(tensors)
        for start in range(0, len(tensors), batch_size):
            batch = range(start, min(start + batch_size, len(tensors)))
            # legacy_tensorflow keeps each image's own size: one size per forward pass
            for shape in dict.fromkeys(tensors[j].shape for j in batch):
                idx = [j for j in batch if tensors[j].shape == shape]
                feats = self.model(torch.stack([tensors[j] for j in idx]).to(self.device))
                for j, row in zip(idx, feats.double().cpu().numpy()):
                    rows[j] = row
        return np.stack(rows) if rows else np.empty((0, 2048))


def _inception(mode: str, weights, device, allow_pickle: bool) -> InceptionFeatures:
    if mode in ("clean", "legacy_tensorflow"):
        from cleanfid.inception_torchscript import InceptionV3W

        path = find_weights(INCEPTION_FILE, weights)
        if path.name != INCEPTION_FILE:  # InceptionV3W takes a folder and opens this name in it
            raise UserError(f"clean-fid reads the Inception from a file named {INCEPTION_FILE}, not {path.name}")
        # NVIDIA's file is TorchScript (code + tensors in a zip, run by torch.jit), not a pickle of
        # arbitrary classes; clean-fid defines its protocol by this very file
        try:
            model = InceptionV3W(os.fspath(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
        except Exception as exc:  # noqa: BLE001 - torch.jit.load's errors for a wrong file vary
            raise UserError(f"cannot load {path} as clean-fid's TorchScript Inception: {str(exc).strip().splitlines()[0]}") from None
        model = model.eval().to(device)
        return InceptionFeatures(mode, model, device)
    return InceptionFeatures(mode, _pytorch_inception(weights, allow_pickle).eval().to(device), device)


def _pytorch_inception(weights, allow_pickle: bool):
    """clean-fid's `legacy_pytorch` model: `InceptionV3(output_blocks=[3], resize_input=False)` applied
    to x / 255 (cleanfid.features.feature_extractor). Its constructor fetches pytorch-fid's weights
    through `load_state_dict_from_url`; that function is replaced, during construction, by a reader of
    the local file (.safetensors, or the .pth pickle with allow_pickle)."""
    from cleanfid import inception_pytorch

    from atelier.evaluate.metrics import read_tensors

    from atelier.models.loader import atelier_cache_dir

    cached = atelier_cache_dir() / PT_INCEPTION_SAFETENSORS
    if weights is not None and Path(os.fspath(weights)).suffix == ".safetensors":
        path = Path(os.path.expanduser(os.fspath(weights)))
    elif weights is None and cached.is_file():
        path = cached
    else:
        path = find_weights(PT_INCEPTION_FILE, weights, hub=True)
    state = read_tensors(path, allow_pickle=allow_pickle)
    original = inception_pytorch.load_state_dict_from_url
    inception_pytorch.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        net = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False)
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit pytorch-fid's Inception: {str(exc).splitlines()[-1].strip()}") from None
    finally:
        inception_pytorch.load_state_dict_from_url = original

    class LegacyPytorch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x / 255)[0].squeeze(-1).squeeze(-1)

    return LegacyPytorch()


class ClipFeatures:
    """Projected CLIP image embeddings (`CLIPModel.get_image_features`), each image prepared by the
    model folder's CLIP image processor (shorter side to the model's size, bicubic, centre crop, CLIP
    mean/std); `size` first resizes every other-sized image to size x size with PIL bicubic."""

    def __init__(self, name: str, scorer, size: int | None = None, *, unit_scale: bool = False):
        self.name, self.scorer, self.size, self.unit_scale = name, scorer, size, unit_scale

    def _prepare(self, image):
        from PIL import Image

        from atelier.evaluate.metrics import as_uint8

        pixels = as_uint8(image)
        if self.size and pixels.shape[:2] != (self.size, self.size):
            pixels = np.asarray(Image.fromarray(pixels).resize((self.size, self.size), Image.BICUBIC))
        return pixels

    def features(self, images, batch_size: int = 64) -> np.ndarray:
        from atelier.evaluate.metrics import clip_image_embeddings

        chunks = [clip_image_embeddings(self.scorer, [self._prepare(im) for im in images[i:i + batch_size]])
                  for i in range(0, len(images), batch_size)]
        feats = torch.cat(chunks).double().cpu().numpy() if chunks else np.empty((0, 0))
        if self.unit_scale and len(feats):
            # on the sphere of radius sqrt(d): KID's kernel (x.y/d + 1)^3 then sees the cosine, as it
            # sees values of order 1 on Inception features (raw toy embeddings, norm ~34 in 128-d,
            # put it at ~9 and the estimate's variance swamps it)
            feats = feats / np.linalg.norm(feats, axis=1, keepdims=True) * np.sqrt(feats.shape[1])
        return feats


def clip_folder(weights=None) -> Path:
    """`weights`, else openai/clip-vit-large-patch14 in the Hugging Face cache."""
    if weights is not None:
        return Path(os.path.expanduser(os.fspath(weights)))
    from atelier.evaluate.pie_bench import cached_hub_folder

    folder = cached_hub_folder(CLIP_REPO)
    if folder is None:
        raise UserError(f"no CLIP weights: give --weights FOLDER (a transformers CLIP model) or cache {CLIP_REPO}")
    return folder


def toyworld_clip_folder() -> Path:
    from atelier.models.loader import BUILTIN_DIR

    return BUILTIN_DIR / TOYWORLD_CLIP


def load_features(kind: str, *, mode: str = "clean", weights=None, device="cpu", allow_pickle: bool = False):
    """A feature extractor by name (FEATURES): an object with `.name` and `.features(images)`, which
    returns an (N, D) float64 array for a list of PIL images or HxWx3 uint8 arrays."""
    from atelier.evaluate.metrics import load_clip

    if kind not in FEATURES:
        raise UserError(f"unknown features {kind!r}; choose from {', '.join(FEATURES)}")
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if kind == "inception":
        return _inception(mode, weights, device, allow_pickle)
    if mode != "clean":
        raise UserError(f"--mode {mode} is clean-fid's Inception protocol; {kind} features have no modes")
    if kind == "clip":
        folder = clip_folder(weights)
        return ClipFeatures(f"clip-{folder.name}", load_clip(folder, allow_pickle=allow_pickle, device=device))
    folder = Path(weights) if weights is not None else toyworld_clip_folder()
    return ClipFeatures("toyworld", load_clip(folder, allow_pickle=allow_pickle, device=device), TOYWORLD_SIZE,
                        unit_scale=True)


def folder_features(folder, extractor, batch_size: int = 64) -> np.ndarray:
    """Features of every image under `folder` (see `image_files`), read `batch_size` at a time."""
    return files_features(image_files(folder), extractor, batch_size)


def files_features(files, extractor, batch_size: int = 64, progress=None) -> np.ndarray:
    """Features of the given image files in their order, read `batch_size` at a time;
    `progress(done, total)` after each batch."""
    chunks = []
    for i in range(0, len(files), batch_size):
        chunks.append(extractor.features([read_image(f) for f in files[i:i + batch_size]], batch_size))
        if progress is not None:
            progress(min(i + batch_size, len(files)), len(files))
    return np.concatenate(chunks)


# ----------------------------------------------------------------------------- FID and KID


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance as clean-fid takes them (`np.mean(axis=0)`, `np.cov(rowvar=False)`)."""
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images a side, got {len(feats)}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """clean-fid's `frechet_distance`."""
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance of the two feature sets, as clean-fid's `fid_from_feats`."""
    return fid_from_stats(*statistics(feats_a), *statistics(feats_b))


@contextmanager
def _numpy_seed(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kid(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """clean-fid's `kernel_distance` (unbiased MMD² with the cubic polynomial kernel, averaged over
    random subsets), its subsets drawn from numpy's global RNG seeded with `seed` (restored after)."""
    from cleanfid.fid import kernel_distance

    if min(len(feats_a), len(feats_b)) < 2:
        raise UserError(f"KID needs at least 2 images a side, got {len(feats_a)} and {len(feats_b)}")
    with _numpy_seed(seed):
        return float(kernel_distance(feats_a, feats_b, num_subsets=num_subsets, max_subset_size=max_subset_size))


# ----------------------------------------------------------------------------- reference statistics


def ref_stats_path(name: str, extractor) -> Path:
    from atelier.models.loader import atelier_cache_dir

    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"reference statistics name {name!r}: use a plain name (no slashes)")
    return atelier_cache_dir() / "fid-stats" / f"{name}_{extractor.name}.npz"


def save_ref_stats(name: str, feats: np.ndarray, extractor) -> Path:
    """Write mu, sigma (for FID) and the features (for KID) as .npz, atomically."""
    from atelier.core.io import atomic_open

    mu, sigma = statistics(feats)
    path = ref_stats_path(name, extractor)
    with atomic_open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, feats=feats)
    return path


def load_ref_stats(name: str, extractor) -> dict[str, np.ndarray]:
    path = ref_stats_path(name, extractor)
    if not path.is_file():
        raise UserError(f"no reference statistics {name!r} for {extractor.name} features ({path}); "
                        f"make them with `atelier evaluate ref-stats {name} FOLDER`")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in ("mu", "sigma", "feats")}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read reference statistics {path}: {exc}") from None
