"""atelier.core: prediction conversions, VAE calls honouring force_upcast, the attention scaffold
(SDPA against explicit softmax, query grids of odd latents, processors restored), image output
formats and atomic writes that follow the umask."""

import os
import stat
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.core import vae as vae_calls
from atelier.core.attention import AttentionHook, attend, attend_sdpa, cross_attention, grid_shape
from atelier.core.images import read_parameters, save_image
from atelier.core.io import (TEMP_SUFFIX, atomic_dir, atomic_open, check_writable, current_umask,
                             remove_stale_temporaries)
from atelier.core.prediction import PREDICTION_TYPES, denoised_from_sigma, model_target, renoise, x0_and_eps
from atelier.errors import UserError
from atelier.testing.tiny import tiny_components

# ---------------------------------------------------------------------------- prediction


def _forward_process(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    abar = torch.tensor([0.999, 0.5, 0.004]).view(-1, 1, 1, 1)  # nearly clean, halfway, nearly noise
    return x0, eps, abar.sqrt(), (1 - abar).sqrt()


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_and_eps_inverts_model_target(prediction_type):
    x0, eps, alpha, beta = _forward_process()
    x_t = renoise(x0, eps, alpha, beta)
    target = model_target(x0, eps, alpha, beta, prediction_type)
    got_x0, got_eps = x0_and_eps(target, x_t, alpha, beta, prediction_type)
    torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_denoised_from_sigma_agrees_with_x0_and_eps(prediction_type):
    x0, eps, alpha, beta = _forward_process(1)
    x_t = renoise(x0, eps, alpha, beta)
    output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))  # any model output
    expected = x0_and_eps(output, x_t, alpha, beta, prediction_type)[0]
    # k-diffusion scaling: x = x_t / alpha, sigma = beta / alpha
    torch.testing.assert_close(denoised_from_sigma(output, x_t / alpha, beta / alpha, prediction_type), expected,
                               atol=1e-3, rtol=1e-4)


def test_unknown_prediction_type_is_refused():
    x0, eps, alpha, beta = _forward_process()
    for call in (lambda: x0_and_eps(x0, x0, alpha, beta, "flow"), lambda: model_target(x0, eps, alpha, beta, "flow"),
                 lambda: denoised_from_sigma(x0, x0, beta / alpha, "flow")):
        with pytest.raises(ValueError, match="prediction_type"):
            call()


# ---------------------------------------------------------------------------- VAE


@contextmanager
def _input_dtypes(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def test_vae_with_force_upcast_runs_in_float32():
    vae = tiny_components("sdxl")["vae"]
    assert vae.config.force_upcast
    vae = vae.to(torch.float16)
    pixels = torch.rand(1, 3, 16, 24) * 2 - 1
    with _input_dtypes(vae.encoder) as encoder_in, _input_dtypes(vae.decoder) as decoder_in:
        latents = vae_calls.encode(vae, pixels, torch.float16)
        decoded = vae_calls.decode(vae, latents)
    assert encoder_in == [torch.float32] and decoder_in == [torch.float32]
    assert latents.dtype == torch.float16 and latents.shape == (1, 4, 8, 12)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


@torch.no_grad()
def test_vae_without_force_upcast_keeps_its_dtype():
    vae = tiny_components("sd1")["vae"]
    assert not vae.config.force_upcast
    vae = vae.to(torch.float16)
    with _input_dtypes(vae.encoder) as encoder_in:
        latents = vae_calls.encode(vae, torch.zeros(1, 3, 16, 16))
    assert encoder_in == [torch.float16] and latents.dtype == torch.float16
    assert not vae_calls.needs_upcast(vae) and vae.dtype == torch.float16


# ---------------------------------------------------------------------------- attention


def _attention(seed=0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_attend_sdpa_equals_attend(masked):
    attn = _attention()
    g = torch.Generator().manual_seed(3)
    hidden, context = torch.randn(2, 15, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    mask = None
    if masked:  # a padding mask as diffusers passes it: (B, K) with 0 for kept tokens, -inf-ish for dropped
        mask = torch.zeros(2, 1, 7)
        mask[1, :, 5:] = -10000.0
    query = attn.head_to_batch_dim(attn.to_q(hidden))
    probs, out = attend(attn, query, context, mask, 2)
    assert probs.shape == (2 * 2, 15, 7)
    torch.testing.assert_close(attend_sdpa(attn, query, context, mask, 2), out, atol=1e-5, rtol=1e-5)


class _Recorder(AttentionHook):
    """Records the query tokens of every cross-attention call; attends with SDPA."""

    def __init__(self):
        self.tokens = []

    def processor(self):
        def call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
            def inner(query, context, mask, batch):
                self.tokens.append(query.shape[1])
                return attend_sdpa(attn, query, context, mask, batch)

            return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, inner)

        return call


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sdxl"])  # cross-attention at the latent's own size; one level below
@pytest.mark.parametrize("latent_hw", [(13, 7), (5, 9), (8, 3)])
def test_grid_shape_is_the_unet_grid_for_odd_latents(family, latent_hw):
    unet = tiny_components(family)["unet"]
    shapes = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: shapes.add(tuple(args[0].shape[-2:])))
             for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}} if family == "sdxl" else {}
    recorder = _Recorder()
    try:
        with recorder.installed(unet):
            out = unet(torch.randn(1, 4, *latent_hw), 10, encoder_hidden_states=torch.randn(1, 5, unet.config.cross_attention_dim),
                       **kwargs).sample
    finally:
        for h in hooks:
            h.remove()
    assert out.shape[-2:] == latent_hw and recorder.tokens and shapes
    assert {grid_shape(latent_hw, tokens) for tokens in recorder.tokens} == shapes


def test_grid_shape_by_hand():
    assert grid_shape((13, 9), 13 * 9) == (13, 9)
    assert grid_shape((13, 9), 7 * 5) == (7, 5)
    assert grid_shape((13, 9), 4 * 3) == (4, 3)
    assert grid_shape((12, 8), 3 * 2) == (3, 2)
    assert grid_shape((1, 1), 1) == (1, 1)
    with pytest.raises(ValueError, match="no UNet level"):
        grid_shape((13, 9), 50)


def test_installed_restores_processors_even_on_errors():
    unet = tiny_components("sd1")["unet"]
    before = dict(unet.attn_processors)

    class Marker(AttentionHook):
        layers = "attn1"

        def processor(self):
            return object.__new__(type("MarkerProcessor", (), {"__call__": lambda *a, **k: None}))

    hook = Marker()
    with pytest.raises(RuntimeError, match="inside"):
        with hook.installed(unet):
            now = unet.attn_processors
            assert {n for n, p in now.items() if type(p).__name__ == "MarkerProcessor"} == {n for n in now if "attn1" in n}
            raise RuntimeError("inside")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    hook.remove(unet)  # removing twice changes nothing
    assert all(unet.attn_processors[k] is before[k] for k in before)



def test_a_hook_finds_a_compiled_unets_layers_by_their_own_names():
    unet = tiny_components("sd1")["unet"]
    names = []

    class Names(AttentionHook):
        layers = "all"

        def processor_for(self, name, original):
            names.append(name)
            return original

    hook = Names()
    with hook.installed(torch.compile(unet)):  # the wrapper's own module names start with "_orig_mod."
        pass
    with hook.installed(unet):
        pass
    assert names == list(unet.attn_processors) * 2


# ---------------------------------------------------------------------------- images out


@pytest.mark.parametrize("name, fmt", [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.JPEG", "JPEG"), ("d.webp", "WEBP")])
def test_save_image_writes_the_format_its_extension_names(tmp_path, name, fmt):
    text = "a red circle, at: 1\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, Seed: 1, Edit source: ünïcode"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    save_image(image, tmp_path / name, text)
    with Image.open(tmp_path / name) as saved:
        assert saved.format == fmt and saved.size == (20, 12)
    assert read_parameters(tmp_path / name) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_save_image_refuses_unknown_extensions(tmp_path):
    for name in ("x.gif", "x", "x.png.bak"):
        with pytest.raises(UserError, match="extension"):
            save_image(Image.new("RGB", (8, 8)), tmp_path / name, "p")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- atomic writes


@contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_atomic_writes_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    with _umask(mask):
        assert current_umask() == mask
        with atomic_open(tmp_path / "f.bin") as f:
            f.write(b"data")
        with atomic_dir(tmp_path / "model") as folder:
            (folder / "sub").mkdir()
            (folder / "sub" / "w.bin").write_bytes(b"w")
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "model" / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "model" / "sub" / "w.bin").stat().st_mode) == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "model"]


def test_atomic_open_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    path.chmod(0o640)
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "never.txt", "w") as f:
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as folder:
        (folder / "a.json").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as folder:
            (folder / "b.json").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.json"]
    with atomic_dir(target) as folder:
        (folder / "c.json").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporaries, no old copy


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / "keep.png").write_bytes(b"k")
    (tmp_path / f".keep.png.x1{TEMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / f".other.bin.x2{TEMP_SUFFIX}").write_bytes(b"half")
    (tmp_path / f".model.x3{TEMP_SUFFIX}").mkdir()
    (tmp_path / f".model.x3{TEMP_SUFFIX}" / "w.bin").write_bytes(b"w")
    removed = remove_stale_temporaries(tmp_path, "keep.png")
    assert [p.name for p in removed] == [f".keep.png.x1{TEMP_SUFFIX}"]
    assert {p.name for p in remove_stale_temporaries(tmp_path)} == {f".other.bin.x2{TEMP_SUFFIX}", f".model.x3{TEMP_SUFFIX}"}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_check_writable(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    assert check_writable(tmp_path / "new" / "deeper" / "out.png") == tmp_path / "new" / "deeper" / "out.png"
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        check_writable(tmp_path / "file.txt" / "out.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder unwritable to it the way a read-only mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == os.fspath(locked) else real(p, mode, **kw))
    with pytest.raises(UserError, match="not writable"):
        check_writable(locked / "out.png")
