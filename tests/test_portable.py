"""Model folders atelier writes load in plain diffusers, on transformers 5.x and 4.x, with the same pixels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from atelier.models import BUILTIN_DIR
from atelier.models.save import check_tokenizer_files, make_portable, save_model_folder
from atelier.testing import tiny_pipeline

HERE = Path(__file__).resolve().parent
PIPELINES = ("toyworld", "toyworld-turbo")
# .ci/run installs transformers 4.x (with the newest diffusers that still runs on it) here.
TRANSFORMERS4 = Path(os.environ.get("ATELIER_TRANSFORMERS4", Path(sys.prefix) / "transformers4"))


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_text_encoder_keys_and_dtype(name):
    folder = BUILTIN_DIR / name
    with safe_open(os.fspath(folder / "text_encoder" / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert config.get("dtype") == "float32" and "torch_dtype" not in config


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_tokenizer_has_slow_files_with_same_ids(name):
    from transformers import CLIPTokenizerFast

    folder = BUILTIN_DIR / name / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert json.loads((folder / "vocab.json").read_text()) == CLIPTokenizerFast.from_pretrained(folder).get_vocab()
    check_tokenizer_files(folder)  # the BPE of vocab.json + merges.txt tokenizes like tokenizer.json


def test_plain_float32_load_of_toyworld_runs():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(BUILTIN_DIR / "toyworld")
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_save_model_folder_is_portable_and_keeps_the_model(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = tiny_pipeline("sdxl")
    before = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    out = save_model_folder(pipe, tmp_path / "model", files={"atelier.json": "{}"})
    assert pipe.unet.dtype == torch.float32  # restored after the fp16 save
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        with safe_open(os.fspath(out / sub / "model.safetensors"), framework="pt") as handle:
            assert all(k.startswith(("text_model.", "text_projection.")) for k in handle.keys())
            assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
        assert cls.from_pretrained(out / sub).dtype == torch.float32
    loaded = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2").state_dict()
    for key, value in before.items():
        torch.testing.assert_close(loaded[key], value.half().float())
    for sub in ("tokenizer", "tokenizer_2"):
        assert (out / sub / "vocab.json").is_file() and (out / sub / "merges.txt").is_file()
    assert (out / "atelier.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    assert make_portable(out) == []  # idempotent


def _run_plain(out, specs, transformers4=False):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if transformers4:
        env["PYTHONPATH"] = os.fspath(TRANSFORMERS4)
    proc = subprocess.run([sys.executable, os.fspath(HERE / "portable_load.py"), os.fspath(out), *specs],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_plain_diffusers_on_transformers4_gives_the_same_outputs(tmp_path):
    if not (TRANSFORMERS4 / "transformers").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"no transformers 4.x install at {TRANSFORMERS4} (.ci/run installs it)")
        pytest.skip(f"no transformers 4.x install at {TRANSFORMERS4}")
    trained = tmp_path / "trained-sdxl"
    save_model_folder(tiny_pipeline("sdxl"), trained)  # what trainers write
    specs = [f"pipeline={BUILTIN_DIR / n}" for n in PIPELINES] + [
        f"taesd={BUILTIN_DIR / 'toyworld-taesd'}", f"unet={BUILTIN_DIR / 'toyworld-inverter'}", f"sdxl={trained}",
    ]
    new = _run_plain(tmp_path / "t5.npz", specs)
    old = _run_plain(tmp_path / "t4.npz", specs, transformers4=True)
    assert new.pop("versions")[0].startswith("5.") and old.pop("versions")[0].startswith("4.")
    assert sorted(new) == sorted(old)
    for key in new:
        np.testing.assert_allclose(old[key], new[key], atol=1e-4, rtol=0, err_msg=key)


ATELIER_ON_TRANSFORMERS4 = """
import sys, numpy as np, torch
from atelier.models import load_pipeline, load_tiny_autoencoder
from atelier.models.loader import BUILTIN_DIR, _load_folder
raw = _load_folder(BUILTIN_DIR / "toyworld", dtype=torch.bfloat16, allow_pickle=False, safety_checker=True)
dtypes = {n: str(m.dtype) for n, m in raw.components.items() if isinstance(m, torch.nn.Module)}
assert set(dtypes.values()) == {"torch.bfloat16"}, dtypes
assert load_tiny_autoencoder("toyworld-taesd", dtype="bf16").dtype == torch.bfloat16
pipe = load_pipeline("toyworld")
image = pipe("a small red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[1], image)
"""


@pytest.mark.slow
def test_atelier_itself_on_transformers4_loads_toyworld_in_the_requested_dtype(tmp_path):
    """The oldest stack the package accepts: transformers 4.x needs huggingface_hub < 1, so diffusers < 0.40,
    which ignores `dtype=` (atelier.models.dtype_kwargs spells it `torch_dtype=` there)."""
    import atelier
    from atelier.models import load_pipeline

    if not (TRANSFORMERS4 / "transformers").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"no transformers 4.x install at {TRANSFORMERS4} (.ci/run installs it)")
        pytest.skip(f"no transformers 4.x install at {TRANSFORMERS4}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.fspath(TRANSFORMERS4), os.fspath(Path(atelier.__file__).parents[1])])}
    out = tmp_path / "image.npy"
    proc = subprocess.run([sys.executable, "-c", ATELIER_ON_TRANSFORMERS4, os.fspath(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_pipeline("toyworld")
    image = pipe("a small red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(np.load(out), image, atol=1e-4, rtol=0)
