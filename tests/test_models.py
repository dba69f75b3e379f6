"""atelier.models: loading through every path (folder, single file, built-in name, hub cache),
family detection, LoRA / LCM-LoRA, pickle refusal, safety checker removal, devices, img2img."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import atelier.models.loader as loader
from atelier.errors import UserError
from atelier.models import (
    apply_lora,
    bundled_config_dir,
    detect_family,
    detect_family_from_folder,
    ensure_sdpa,
    inspect_checkpoint,
    list_builtin_models,
    load_pipeline,
    original_state_dict,
    pick_device_dtype,
    resolve_model_path,
    to_img2img,
)
from atelier.testing import save_single_file, save_tiny_pipeline, tiny_components, tiny_pipeline

FAMILIES = ["sd1", "sd2", "sdxl", "turbo", "sdxl-turbo"]
PROMPT = "a large red circle at the top left"


def generate(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0]


def weights(pipe):
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])
    return {f"{n}.{k}": v for n in names for k, v in getattr(pipe, n).state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path_factory.getbasetemp() / "atelier-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-cache"))


@pytest.fixture(scope="module")
def tiny():
    """Each tiny pipeline, its 2-step reference image, and where it was saved (folder, single file)."""
    return {}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def built(tiny, store, family):
    if family not in tiny:
        pipe = tiny_pipeline(family)
        folder = save_tiny_pipeline(pipe, store / family)
        single = save_single_file(pipe, store / f"{family}.safetensors")
        tiny[family] = {"pipe": pipe, "image": generate(pipe), "folder": folder, "file": single}
    return tiny[family]


# ----------------------------------------------------------------------------- loading paths


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_round_trip(tiny, store, family):
    ref = built(tiny, store, family)
    pipe = load_pipeline(ref["folder"])
    assert type(pipe) is type(ref["pipe"])
    assert_same_weights(pipe, ref["pipe"])
    assert type(pipe.scheduler) is type(ref["pipe"].scheduler)
    np.testing.assert_allclose(generate(pipe), ref["image"], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_with_local_config_round_trip(tiny, store, family):
    ref = built(tiny, store, family)
    pipe = load_pipeline(ref["file"], config=ref["folder"])
    assert type(pipe) is type(ref["pipe"])
    assert_same_weights(pipe, ref["pipe"])
    np.testing.assert_allclose(generate(pipe), ref["image"], atol=1e-6)
    assert detect_family(pipe) == detect_family(ref["pipe"])


def test_single_file_uses_original_a1111_key_layout(tiny, store):
    sd1 = inspect_checkpoint(built(tiny, store, "sd1")["file"])
    sd2 = inspect_checkpoint(built(tiny, store, "sd2")["file"])
    sdxl = inspect_checkpoint(built(tiny, store, "sdxl")["file"])
    assert (sd1.family, sd2.family, sdxl.family) == ("sd1", "sd2", "sdxl")
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",  # attention in the first level (SD 1.x)
        "model.diffusion_model.input_blocks.2.0.op.weight",  # downsampler (1 layer per block)
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of a level without attention
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.conv1.weight",
        "first_stage_model.decoder.up.1.block.0.conv1.weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
    ]:
        assert key in sd1.keys, key
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd2.keys
    assert "cond_stage_model.model.positional_embedding" in sd2.keys
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl.keys
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sdxl.keys  # 2 layers per block, as SDXL
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sdxl.keys  # upsampler after attention
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl.keys
    assert "conditioner.embedders.1.model.text_projection" in sdxl.keys
    # the original VAE attention is a 1x1 convolution; OpenCLIP's projection is stored transposed
    state = original_state_dict(built(tiny, store, "sdxl")["pipe"])
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    te2 = built(tiny, store, "sdxl")["pipe"].text_encoder_2
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], te2.text_projection.weight.T)


def test_builtin_name_loads_from_builtin_dir_and_reads_atelier_json(tiny, store, tmp_path, monkeypatch):
    ref = built(tiny, store, "sd1")
    shutil.copytree(ref["folder"], tmp_path / "toyworld")
    (tmp_path / "toyworld" / "atelier.json").write_text(json.dumps({"sampler": "Euler a", "steps": 12, "guidance_scale": 3.5}))
    monkeypatch.setattr(loader, "BUILTIN_DIR", tmp_path)

    assert resolve_model_path("toyworld") == tmp_path / "toyworld"
    status = {m["name"]: m["trained"] for m in list_builtin_models()}
    assert status == {"toyworld": True, "toyworld-turbo": False}

    pipe = load_pipeline("toyworld")
    assert_same_weights(pipe, ref["pipe"])
    np.testing.assert_allclose(generate(pipe), ref["image"], atol=1e-6)
    info = detect_family(pipe)
    assert (info.family, info.sampler, info.steps, info.guidance_scale) == ("sd1", "Euler a", 12, 3.5)
    assert detect_family_from_folder(tmp_path / "toyworld") == info

    with pytest.raises(UserError, match=r"built-in model 'toyworld-turbo' is not trained yet: run `atelier train toyworld`"):
        load_pipeline("toyworld-turbo")
    with pytest.raises(UserError, match="unknown model 'toyworld-xl'"):
        load_pipeline("toyworld-xl")


def make_hf_cache(root, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache entry in the library's layout: models--org--name/{refs,snapshots}."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision


def test_hub_id_loads_from_hf_cache_offline(tiny, store, tmp_path, monkeypatch):
    ref = built(tiny, store, "turbo")
    snapshot = make_hf_cache(tmp_path / "hub", "tiny-org/tiny-turbo", ref["folder"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    assert resolve_model_path("tiny-org/tiny-turbo") == snapshot
    pipe = load_pipeline("tiny-org/tiny-turbo")
    assert_same_weights(pipe, ref["pipe"])
    np.testing.assert_allclose(generate(pipe), ref["image"], atol=1e-6)
    assert detect_family(pipe).is_turbo

    with pytest.raises(UserError, match=r"model 'stabilityai/sd-turbo' is not in the Hugging Face cache") as err:
        load_pipeline("stabilityai/sd-turbo")
    assert str(tmp_path / "hub") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        resolve_model_path("stabilityai/sd-turbo")


# ----------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    "family, expected",
    [
        ("sd1", ("sd1", "epsilon", False, False, "DPM++ 2M Karras", 25, 7.0)),
        ("sd2", ("sd2", "v_prediction", False, False, "DPM++ 2M Karras", 25, 7.0)),
        ("sdxl", ("sdxl", "epsilon", False, False, "DPM++ 2M Karras", 30, 5.0)),
        ("turbo", ("sd2", "epsilon", True, False, "Euler", 1, 0.0)),
        ("sdxl-turbo", ("sdxl", "epsilon", True, False, "Euler a", 1, 0.0)),
    ],
)
def test_detect_family(tiny, store, family, expected):
    ref = built(tiny, store, family)
    info = detect_family(ref["pipe"])
    assert (info.family, info.prediction_type, info.is_turbo, info.is_lcm, info.sampler, info.steps, info.guidance_scale) == expected
    assert info.resolution == 16  # sample_size 8 x VAE factor 2
    assert detect_family_from_folder(ref["folder"]) == info


def test_turbo_rule_needs_more_than_trailing_spacing(tiny, store, tmp_path):
    ref = built(tiny, store, "turbo")
    folder = shutil.copytree(ref["folder"], tmp_path / "zero-snr")
    sched = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text())
    sched.write_text(json.dumps({**config, "rescale_betas_zero_snr": True}))
    assert not detect_family_from_folder(folder).is_turbo  # zero-terminal-SNR models use trailing too
    sched.write_text(json.dumps(config))
    (folder / "atelier.json").write_text(json.dumps({"turbo": False}))
    assert not detect_family_from_folder(folder).is_turbo  # the model's own file decides
    (folder / "atelier.json").unlink()
    sched.write_text(json.dumps({**config, "timestep_spacing": "leading"}))
    assert not detect_family_from_folder(folder).is_turbo
    (folder / "README.md").write_text("SD 2.1 base. For 1-step sampling see SD-Turbo (adversarial diffusion distillation).")
    info = detect_family_from_folder(folder)
    assert not info.is_turbo and (info.steps, info.guidance_scale) == (25, 7.0)  # a model card never decides
    assert not detect_family(load_pipeline(folder)).is_turbo


# ----------------------------------------------------------------------------- bundled configs


needs_clip_bpe = pytest.mark.skipif(loader.clip_bpe_path() is None, reason="open_clip's CLIP merges file is not installed")


@needs_clip_bpe
@pytest.mark.parametrize(
    "name, unet_params, text_params",
    [
        ("sd1", 859_520_964, [123_060_480]),
        ("sd2", 865_910_724, [340_387_840]),
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),
    ],
)
def test_bundled_configs_describe_the_real_models(name, unet_params, text_params):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = bundled_config_dir(name)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if (folder / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == text_params
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_single_file_without_tokenizer_source_says_what_is_missing(tiny, store, monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "clip_bpe_path", lambda: None)
    monkeypatch.setenv("ATELIER_CACHE", str(tmp_path / "empty-cache"))  # no bundled config materialized yet
    with pytest.raises(UserError, match=r"CLIP tokenizer files \(vocab.json, merges.txt\) are missing.*config=<a local diffusers folder") as err:
        load_pipeline(built(tiny, store, "sd1")["file"])  # no config: needs the bundled sd1 config
    assert "\n" not in str(err.value)


@needs_clip_bpe
def test_single_file_against_wrong_or_ambiguous_config(tiny, store):
    sd1, sd2, sdxl = (built(tiny, store, f) for f in ("sd1", "sd2", "sdxl"))
    with pytest.raises(UserError, match=r"cannot load sd1.safetensors with the config"):
        load_pipeline(sd1["file"])  # tiny weights against the full-size SD 1.5 config
    with pytest.raises(UserError, match=r"SD 2.x checkpoint.*config='sd2'.*config='sd2-base'"):
        load_pipeline(sd2["file"])
    with pytest.raises(UserError, match=r"holds an sdxl model but the config .* is for sd1"):
        load_pipeline(sdxl["file"], config=sd1["folder"])
    with pytest.raises(UserError, match=r"no bundled config 'sd3'"):
        load_pipeline(sd1["file"], config="sd3")


# ----------------------------------------------------------------------------- safety


def test_pickles_are_refused_unless_allowed(tiny, store, tmp_path):
    ref = built(tiny, store, "sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state_dict(ref["pipe"])}, ckpt)
    with pytest.raises(UserError, match=r"pickle.*can run arbitrary code.*allow_pickle=True \(CLI: --allow-pickle\)"):
        load_pipeline(ckpt, config=ref["folder"])
    pipe = load_pipeline(ckpt, config=ref["folder"], allow_pickle=True)
    assert_same_weights(pipe, ref["pipe"])

    bin_folder = tmp_path / "bin-folder"
    ref["pipe"].save_pretrained(bin_folder, safe_serialization=False)
    with pytest.raises(UserError, match=r"unet has only pickle weights .*--allow-pickle"):
        load_pipeline(bin_folder)
    assert_same_weights(load_pipeline(bin_folder, allow_pickle=True), ref["pipe"])


def test_safety_checker_kept_or_removed(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = save_tiny_pipeline(tiny_pipeline("sd1", safety_checker=True), tmp_path / "with-checker")
    index_before = (folder / "model_index.json").read_bytes()

    kept = load_pipeline(folder)
    assert isinstance(kept.safety_checker, StableDiffusionSafetyChecker)
    assert kept.feature_extractor is not None and kept.config.requires_safety_checker

    removed = load_pipeline(folder, safety_checker=False)
    assert removed.safety_checker is None
    assert removed.config.requires_safety_checker is False
    assert generate(removed).shape == (16, 16, 3)
    assert (folder / "model_index.json").read_bytes() == index_before  # nothing edited on disk


# ----------------------------------------------------------------------------- bad input


def test_bad_sources_give_one_line_user_errors(tiny, store, tmp_path):
    ref = built(tiny, store, "sd1")
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ref["file"].read_bytes()[: ref["file"].stat().st_size // 2])
    cases = [
        (tmp_path / "missing", "no such file or folder"),
        ("./missing/model.safetensors", "no such file or folder"),
        (tmp_path / "empty", r"not a diffusers model folder \(no model_index.json\)"),
        (corrupt, "cannot read .*corrupt.safetensors"),
        (truncated, "truncated.safetensors"),
        ("not a model", "unknown model 'not a model'"),
        ("", "model must be a path"),
    ]
    for source, message in cases:
        with pytest.raises(UserError, match=message) as err:
            load_pipeline(source, config=ref["folder"] if str(source).endswith(".safetensors") else None)
        assert "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="config= applies to single-file checkpoints only"):
        load_pipeline(ref["folder"], config="sd1")


# ----------------------------------------------------------------------------- devices, attention, img2img


def test_pick_device_dtype(monkeypatch):
    assert pick_device_dtype() == (torch.device("cpu"), torch.float32) or torch.cuda.is_available()
    assert pick_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert pick_device_dtype("cpu", torch.float32) == (torch.device("cpu"), torch.float32)
    for device, dtype, message in [
        ("cpu", "fp16", "fp16 is not supported for CPU"),
        ("cpu", "int8", "unknown dtype 'int8'"),
        ("tpu", None, "unknown device|unsupported device"),
    ]:
        with pytest.raises(UserError, match=message):
            pick_device_dtype(device, dtype)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    assert pick_device_dtype() == (torch.device("cuda"), torch.float16)
    assert pick_device_dtype("cuda:1", "fp32") == (torch.device("cuda:1"), torch.float32)
    with pytest.raises(UserError, match="only 2 CUDA device"):
        pick_device_dtype("cuda:2")
    with pytest.raises(UserError, match="Old GPU does not support it"):
        pick_device_dtype("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_device_dtype("cuda", "bfloat16") == (torch.device("cuda"), torch.bfloat16)


def test_cuda_unavailable_is_a_user_error(tiny, store):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA is not available"):
        load_pipeline(built(tiny, store, "sd1")["folder"], device="cuda")


def test_attention_uses_pytorch_sdpa(tiny, store):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = load_pipeline(built(tiny, store, "sdxl")["folder"])
    for model in (pipe.unet, pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    pipe.unet.set_attn_processor(AttnProcessor())
    ensure_sdpa(pipe)
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_img2img_shares_components(tiny, store):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    for family, cls in (("sd1", StableDiffusionImg2ImgPipeline), ("sdxl", StableDiffusionXLImg2ImgPipeline)):
        pipe = load_pipeline(built(tiny, store, family)["folder"])
        img2img = to_img2img(pipe)
        assert isinstance(img2img, cls)
        assert img2img.unet is pipe.unet and img2img.vae is pipe.vae and img2img.scheduler is pipe.scheduler
        assert detect_family(img2img) == detect_family(pipe)
        source = np.full((16, 16, 3), 0.5, dtype=np.float32)
        out = img2img(PROMPT, image=source, strength=0.5, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
        assert out.images[0].shape == (16, 16, 3)


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A tiny LoRA trained-by-nobody: random (non-zero) LoRA weights on the tiny SD1 UNet, made with
    peft and saved with diffusers' save_lora_weights, under an ordinary and an LCM-LoRA file name."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_components("sd1")["unet"]
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(unet)
    folder = tmp_path_factory.mktemp("loras")
    for name in ("style_lora.safetensors", "lcm-lora-tiny-sd1.safetensors"):
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=name)
    return folder / "style_lora.safetensors", folder / "lcm-lora-tiny-sd1.safetensors"


def test_lora_changes_the_model_by_its_scale(tiny, store, lora_files):
    style, _ = lora_files
    ref = built(tiny, store, "sd1")
    pipe = load_pipeline(ref["folder"])
    apply_lora(pipe, style, scale=0.0)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and not detect_family(pipe).is_lcm
    np.testing.assert_allclose(generate(pipe), ref["image"], atol=1e-6)  # scale 0 = base model
    full = load_pipeline(ref["folder"], lora=[(style, 1.0)])
    assert np.abs(generate(full) - ref["image"]).max() > 1e-3


def test_lcm_lora_switches_to_lcm_scheduler(tiny, store, lora_files):
    from diffusers import LCMScheduler

    style, lcm_named = lora_files
    ref = built(tiny, store, "sd1")
    pipe = load_pipeline(ref["folder"], lora=lcm_named)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.beta_schedule == ref["pipe"].scheduler.config.beta_schedule
    info = detect_family(pipe)
    assert (info.is_lcm, info.sampler, info.steps, info.guidance_scale) == (True, "LCM", 4, 1.5)
    assert generate(pipe, num_inference_steps=4, guidance_scale=1.0).shape == (16, 16, 3)

    flagged = load_pipeline(ref["folder"], lora=style, lcm=True)
    assert isinstance(flagged.scheduler, LCMScheduler)
    not_lcm = load_pipeline(ref["folder"], lora=lcm_named, lcm=False)
    assert not isinstance(not_lcm.scheduler, LCMScheduler)


def test_bad_lora_files(tiny, store, lora_files, tmp_path):
    pipe = load_pipeline(built(tiny, store, "sdxl")["folder"])
    with pytest.raises(UserError, match="no such LoRA file"):
        apply_lora(pipe, tmp_path / "nope.safetensors")
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"whatever")
    with pytest.raises(UserError, match="pickle"):
        apply_lora(pipe, pickle)


def test_peft_adapter_model_loads_with_its_config(tiny, store, tmp_path):
    """What `peft`'s save_pretrained writes (adapter_model.safetensors + adapter_config.json, lora_alpha
    != r) loads as a LoRA and gives the peft model's own output."""
    from peft import LoraConfig, get_peft_model

    ref = built(tiny, store, "sd1")
    torch.manual_seed(5)
    peft_unet = get_peft_model(tiny_components("sd1")["unet"], LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft_unet.save_pretrained(tmp_path / "adapter")
    pipe = load_pipeline(ref["folder"], lora=tmp_path / "adapter" / "adapter_model.safetensors")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_unet(x, 10, encoder_hidden_states=context).sample
        got = pipe.unet(x, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected)
    assert np.abs(generate(pipe) - ref["image"]).max() > 1e-3


def test_loras_that_fit_nothing_are_one_line_errors(tiny, store, tmp_path):
    from safetensors.torch import save_file

    pipe = load_pipeline(built(tiny, store, "sd1")["folder"])
    text_adapter = tmp_path / "text" / "adapter_model.safetensors"
    text_adapter.parent.mkdir()
    save_file({"base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, text_adapter)
    with pytest.raises(UserError, match="peft adapter for something other than a UNet"):
        apply_lora(pipe, text_adapter)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, unrelated)
    with pytest.raises(UserError) as err:
        apply_lora(pipe, unrelated)
    assert "\n" not in str(err.value)


def test_incomplete_single_file_is_one_line_error(tiny, store, tmp_path):
    from safetensors.torch import load_file, save_file

    ref = built(tiny, store, "sd1")
    unet_and_vae = {k: v for k, v in load_file(ref["file"]).items() if not k.startswith("cond_stage_model.")}
    save_file(unet_and_vae, tmp_path / "no-text-encoder.safetensors")
    with pytest.raises(UserError, match="not a complete sd1 checkpoint") as err:
        load_pipeline(tmp_path / "no-text-encoder.safetensors", config=ref["folder"])
    assert "\n" not in str(err.value)


def test_damaged_weight_files_are_named_in_one_line(tiny, store, tmp_path):
    from atelier.models import load_tiny_autoencoder

    ref = built(tiny, store, "sd1")
    for component, name in (("text_encoder", "model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors")):
        folder = shutil.copytree(ref["folder"], tmp_path / component)
        (folder / component / name).write_bytes(b"<html>rate limited</html>" * 8)
        with pytest.raises(UserError, match=f"{component}/{name} is damaged or not a safetensors file") as err:
            load_pipeline(folder)
        assert "\n" not in str(err.value)
    taesd = shutil.copytree(loader.BUILTIN_DIR / "toyworld-taesd", tmp_path / "taesd")
    weights_file = taesd / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:2000])
    with pytest.raises(UserError, match="is damaged or not a safetensors file"):
        load_tiny_autoencoder(taesd)


def test_every_component_gets_the_requested_device_and_dtype(tiny, store):
    from atelier.models import load_tiny_autoencoder

    for family in ("sd1", "sdxl"):
        pipe = load_pipeline(built(tiny, store, family)["folder"], device="cpu", dtype="bf16")
        modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        assert {m.dtype for m in modules.values()} == {torch.bfloat16}, {n: m.dtype for n, m in modules.items()}
        assert {p.device.type for m in modules.values() for p in m.parameters()} == {"cpu"}
    tiny_ae = load_tiny_autoencoder("toyworld-taesd", device="cpu", dtype="bf16")
    assert {p.dtype for p in tiny_ae.parameters()} == {torch.bfloat16}


def test_dtype_kwargs_spell_what_the_installed_diffusers_takes(monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "0.39.0")
    assert loader.dtype_kwargs(torch.float16) == {"torch_dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "0.40.0.dev0")
    assert loader.dtype_kwargs(torch.float16) == {"dtype": torch.float16}
