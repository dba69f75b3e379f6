"""`atelier train lora` on tiny SD 1.x (epsilon), SD 2.x (v-prediction) and SDXL components: the loss
weighting against its closed form, exact resume after a kill, a LoRA that plain diffusers loads and that
changes the image, pivotal tuning (only the new rows train, and only for their share of the steps), prior
preservation's class images (generated, reused, resumed), caption shuffling under cached latents, kohya's
buckets, and refusals in one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from atelier.cli import build_parser
from atelier.errors import UserError
from atelier.models import apply_lora
from atelier.testing import save_tiny_pipeline, tiny_pipeline
from atelier.testing.cli import one_error_line, run
from atelier.train import lora as lora_mod
from atelier.train import weighting
from atelier.train.checkpoint import read_state
from atelier.train.dreambooth_data import (DreamBoothData, Item, LatentCache, batch_index, make_bucket_resolutions,
                                           place, select_bucket, shuffle_caption, time_ids)
from atelier.train.lora import WEIGHT_NAME, LoraTrainConfig, train_lora


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {family: str(save_tiny_pipeline(tiny_pipeline(family), folder / family)) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Four images (not square); two captioned with the identifier, two falling back to --instance_prompt."""
    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        if k < 2:
            (folder / f"{k}.txt").write_text("a red TOK, large, at the top")
    return folder


def _cfg(tmp_path, model, data, **kw) -> LoraTrainConfig:
    settings = dict(pretrained_model_name_or_path=model, instance_data_dir=str(data), instance_prompt="a photo of TOK",
                    output_dir=str(tmp_path / "out"), train_batch_size=2, max_train_steps=4, checkpointing_steps=2,
                    learning_rate=1e-2, text_encoder_lr=1e-2, threads=1)
    return LoraTrainConfig(**{**settings, **kw})


def _image(pipe, prompt="a red circle", seed=0):
    return pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


# ---------------------------------------------------------------- the math

def test_min_snr_weights_are_the_papers_for_each_prediction_type():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    snr = weighting.snr_of(scheduler.alphas_cumprod, t)
    torch.testing.assert_close(snr, compute_snr(scheduler, t))
    gamma = 5.0
    eps = weighting.min_snr_weight(snr, gamma, "epsilon")
    v = weighting.min_snr_weight(snr, gamma, "v_prediction")
    torch.testing.assert_close(eps, torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    # both are the same weighting of the x0 error: ||eps err||² = SNR ||x0 err||², ||v err||² = (SNR+1) ||x0 err||²
    torch.testing.assert_close(eps * snr, v * (snr + 1))
    assert v[0] < 1 and eps[-1] == 1  # not the scripts' min(SNR,γ)/SNR + 1 for v (never below 1)
    assert weighting.min_snr_weight(torch.tensor([0.0]), gamma, "epsilon").item() == 1.0  # zero-terminal SNR


def test_edm_style_loss_of_an_epsilon_model_is_its_epsilon_loss():
    from atelier.core.prediction import denoised_from_sigma

    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 1.0, 14.0]).view(-1, 1, 1, 1)
    x = x0 + sigma * eps
    denoised = denoised_from_sigma(eps_hat, x, sigma, "epsilon")
    edm = weighting.weighted_mse(denoised, x0, weighting.edm_loss_weight(sigma))
    torch.testing.assert_close(edm, weighting.weighted_mse(eps_hat, eps))
    # the VP model's own input: x / sqrt(sigma² + 1) = alpha x0 + beta eps
    alpha = 1 / (sigma**2 + 1).sqrt()
    torch.testing.assert_close(x * weighting.edm_input_scale(sigma), alpha * x0 + (1 - alpha**2).sqrt() * eps)


# ---------------------------------------------------------------- data

def test_caption_shuffle_keeps_the_first_tokens_and_buckets_follow_kohya():
    import random

    rng = random.Random(0)
    orders = {shuffle_caption("TOK, red, large, top, shiny", 1, rng) for _ in range(30)}
    assert len(orders) > 5 and all(o.startswith("TOK, ") and sorted(o.split(", ")) == sorted("TOK, red, large, top, shiny".split(", "))
                                   for o in orders)
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets and (256, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    # 3:2 goes to the nearest ratio, 640x384 (5:3), scaled to cover it (640x427) before the crop
    assert select_bucket(1200, 800, buckets) == ((640, 384), (640, 427))
    assert select_bucket(800, 1200, buckets) == ((384, 640), (427, 640))
    assert select_bucket(512, 512, buckets) == ((512, 512), (512, 512))
    # SDXL time ids: original (h, w), crop (top, left), target (h, w); a flip measures the crop from the right
    item = Item(path=None, caption="", size=(30, 20), bucket=(16, 16), resized=(24, 16), crop=(0, 3))
    assert time_ids(item, (16, 16), False) == [20, 30, 0, 3, 16, 16]
    assert time_ids(item, (16, 16), True) == [20, 30, 0, 5, 16, 16]


def test_processes_read_disjoint_batches_and_cached_latents_keep_captions_shuffling(tmp_path):
    items = [Item(path=tmp_path / f"{k}.png", caption="TOK, a, b, c, d") for k in range(8)]
    for item in items:
        Image.fromarray(np.full((8, 8, 3), 10 * int(item.path.stem), np.uint8)).save(item.path)
    place(items, None, 8, center_crop=True, seed=0)
    data = DreamBoothData(items, batch_size=2, seed=0, random_flip=True, shuffle=True, keep_tokens=1)
    assert data.batches_per_epoch == 4
    # two processes, accumulation 2: one epoch's four batches, each read by one process
    seen = [data.epoch_batches(0)[batch_index(0, m, 2, r, 2)] for m in range(2) for r in range(2)]
    assert sorted(i for b in seen for i in b) == list(range(8))
    encoded = []
    cache = LatentCache(lambda x: (encoded.append(1), x.mean(dim=1, keepdim=True))[1])
    captions = []
    for k in range(16):  # four epochs
        batch = data.batch(k)
        for item, flip in zip(batch.items, batch.flips):
            cache(item, batch.bucket, flip)
        captions += [(str(i.path), c) for i, c in zip(batch.items, batch.captions)]
    assert len(encoded) <= 16  # each image once per flip, however many steps
    per_image = {}
    for path, caption in captions:
        per_image.setdefault(path, set()).add(caption)
    assert all(len(c) > 1 for c in per_image.values()) and all(c.startswith("TOK, ") for _, c in captions)


# ---------------------------------------------------------------- training

def test_sd1_lora_resumes_exactly_after_a_kill_and_loads_in_plain_diffusers(tmp_path, models, instance_dir,
                                                                             capsys, kill_after_checkpoint):
    from diffusers import StableDiffusionPipeline

    straight = train_lora(_cfg(tmp_path / "a", models["sd1"], instance_dir, checkpoints_total_limit=1))
    kill_after_checkpoint(2)
    with pytest.raises(KeyboardInterrupt):
        train_lora(_cfg(tmp_path / "b", models["sd1"], instance_dir))
    kill_after_checkpoint(None)
    capsys.readouterr()
    resumed = train_lora(_cfg(tmp_path / "b", models["sd1"], instance_dir))
    assert "resumed at step 2" in capsys.readouterr().err
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    assert read_state(b / "checkpoint-4" / "training_state.safetensors")["losses"] == \
        read_state(a / "checkpoint-4" / "training_state.safetensors")["losses"]
    for key, value in load_file(a / WEIGHT_NAME).items():
        torch.testing.assert_close(load_file(b / WEIGHT_NAME)[key], value, rtol=0, atol=0)
    assert straight["steps"] == resumed["steps"] == 4
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-4"]  # --checkpoints_total_limit 1
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("loss.png", "README.md", "settings.json", "done.json"):
        assert (a / name).is_file()
    assert json.loads((a / "settings.json").read_text())["options"]["resolution"] == 16  # the model's own size

    # plain diffusers loads it, and it changes the image
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(a), weight_name=WEIGHT_NAME)
    assert np.abs(_image(pipe) - before).max() > 1e-3
    assert train_lora(_cfg(tmp_path / "a", models["sd1"], instance_dir))["resumed_done"]


def test_sd2_pivotal_tuning_trains_only_the_new_rows_for_their_share_of_the_steps(tmp_path, models, instance_dir,
                                                                                 monkeypatch):
    captured = {}
    real_export = lora_mod.export

    def export(pipe, trainee, *args, **kwargs):
        captured["embeddings"] = trainee.text_encoders[0].get_input_embeddings().weight.detach().clone()
        captured["ids"] = trainee.tokens.ids[0]
        return real_export(pipe, trainee, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "export", export)
    cfg = _cfg(tmp_path, models["sd2"], instance_dir, train_text_encoder_ti=True, snr_gamma=5.0,
               train_text_encoder_ti_frac=0.5, validation_prompt="a TOK", validation_steps=2, num_validation_images=2)
    summary = train_lora(cfg)
    out = tmp_path / "out"
    base = tiny_pipeline("sd2").text_encoder.get_input_embeddings().weight.detach()
    trained, ids = captured["embeddings"], captured["ids"]
    assert ids == [len(base), len(base) + 1]  # <s0><s1> appended to the vocabulary
    torch.testing.assert_close(trained[: len(base)], base, rtol=0, atol=0)  # every old row as it was
    emb = load_file(out / "out_emb.safetensors")  # {output_dir name}_emb, inside output_dir
    assert list(emb) == ["clip_l"] and emb["clip_l"].shape == (2, base.shape[1])
    torch.testing.assert_close(emb["clip_l"], trained[ids].float())
    at_pivot = read_state(out / "checkpoint-2" / "training_state.safetensors")["lora"]["tokens.0"]
    torch.testing.assert_close(emb["clip_l"], at_pivot, rtol=0, atol=0)  # frozen after half the steps
    # each checkpoint folder is usable as it stands: its LoRA and the embeddings of that step beside it
    at_checkpoint = load_file(out / "checkpoint-2" / "out_emb.safetensors")
    torch.testing.assert_close(at_checkpoint["clip_l"], at_pivot, rtol=0, atol=0)
    assert (out / "checkpoint-2" / WEIGHT_NAME).is_file()
    assert json.loads((out / "settings.json").read_text())["tokens"] == {"TOK": "<s0><s1>"}
    card = (out / "README.md").read_text()
    assert "<s0><s1>" in card and "out_emb" in card and "<lora:out:1>" in card and "embedding:out_emb" in card
    assert summary["embeddings_file"].endswith("out_emb.safetensors")
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step_000002.png", "step_000004.png"]


def test_ti_warmup_trains_the_new_tokens_alone_then_the_lora(tmp_path, models, instance_dir):
    train_lora(_cfg(tmp_path, models["sd1"], instance_dir, train_text_encoder_ti=True, ti_warmup_steps=2,
                    train_text_encoder_ti_frac=1.0, initializer_concept="red"))
    out = tmp_path / "out"
    pipe = tiny_pipeline("sd1")
    red = pipe.text_encoder.get_input_embeddings().weight.detach()[pipe.tokenizer("red", add_special_tokens=False).input_ids]
    warm, final = (read_state(out / f"checkpoint-{k}" / "training_state.safetensors")["lora"] for k in (2, 4))
    ups = [k for k in warm if "lora_B" in k]
    assert ups and all(torch.count_nonzero(warm[k]) == 0 for k in ups)  # the LoRA has not moved (B starts at zero)
    assert any(torch.count_nonzero(final[k]) > 0 for k in ups)  # and trains after the warm-up
    assert (warm["tokens.0"] - red[:1]).abs().max() > 1e-3  # the new rows trained during the warm-up (from "red")
    assert not torch.equal(warm["tokens.0"], final["tokens.0"])  # and go on training (frac 1.0)
    assert json.loads((out / "settings.json").read_text())["options"]["ti_warmup_steps"] == 2
    with pytest.raises(UserError, match=r"--ti_warmup_steps 3 is more than the new tokens' share of the steps \(2 of 4"):
        train_lora(_cfg(tmp_path / "b", models["sd1"], instance_dir, train_text_encoder_ti=True, ti_warmup_steps=3))


def test_sdxl_lora_of_the_unet_and_both_text_encoders_loads_in_diffusers(tmp_path, models, instance_dir):
    from diffusers import StableDiffusionXLPipeline

    train_lora(_cfg(tmp_path, models["sdxl"], instance_dir, train_text_encoder=True, max_train_steps=2,
                    random_flip=True, noise_offset=0.05))
    out = tmp_path / "out"
    keys = load_file(out / WEIGHT_NAME)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(out), weight_name=WEIGHT_NAME)
    trained = _image(pipe)
    assert np.abs(trained - before).max() > 1e-3
    # the A1111 / ComfyUI copy beside it: kohya keys with SDXL's original block names, the same LoRA
    kohya = load_file(out / "out.safetensors")
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya) and not any("down_blocks" in k for k in kohya)
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    apply_lora(pipe, out / "out.safetensors")
    np.testing.assert_allclose(_image(pipe), trained, atol=1e-4)


def test_sdxl_pivotal_tuning_writes_clip_l_and_clip_g(tmp_path, models, instance_dir):
    train_lora(_cfg(tmp_path, models["sdxl"], instance_dir, train_text_encoder_ti=True, max_train_steps=1,
                    num_new_tokens_per_abstraction=3, cache_latents=True, shuffle_caption=True))
    emb = load_file(tmp_path / "out" / "out_emb.safetensors")
    assert emb["clip_l"].shape == (3, 32) and emb["clip_g"].shape == (3, 64)  # the two encoders' widths


def test_dora_on_chosen_blocks_with_ema_edm_style_and_buckets(tmp_path, models, instance_dir):
    from diffusers import StableDiffusionPipeline

    train_lora(_cfg(tmp_path, models["sd1"], instance_dir, use_dora=True, rank=2, lora_alpha=4,
                    lora_unet_blocks="unet.down_blocks.0.attentions.0", use_ema=True, do_edm_style_training=True,
                    enable_bucket=True, lora_dropout=0.1, max_train_steps=2))
    keys = load_file(tmp_path / "out" / WEIGHT_NAME)
    assert keys and all(k.startswith("unet.down_blocks.0.attentions.0.") for k in keys)
    assert any("magnitude" in k for k in keys)  # DoRA
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=WEIGHT_NAME)
    config = pipe.unet.peft_config[next(iter(pipe.unet.peft_config))]
    assert config.use_dora and config.r == 2 and config.lora_alpha == 4  # the metadata went with the file


def test_dora_on_attention_and_convolutions_loads_whole_and_draws(tmp_path, models, instance_dir):
    """peft's key names throughout: a file that renamed only the attention layers to diffusers' old
    lora.down/lora.up was read as peft's, and those layers were left unloaded (on the meta device)."""
    from diffusers import StableDiffusionPipeline

    train_lora(_cfg(tmp_path, models["sd1"], instance_dir, use_dora=True, lora_layers="to_q,to_v,conv1,conv2",
                    max_train_steps=2))
    keys = load_file(tmp_path / "out" / WEIGHT_NAME)
    assert any(".to_q.lora_A." in k for k in keys) and any(".conv1.lora_A." in k for k in keys)
    assert not any(".lora.down." in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name=WEIGHT_NAME)
    assert not any(p.device.type == "meta" for p in pipe.unet.parameters())
    after = _image(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4


def test_an_edm_model_trains_with_its_schedulers_preconditioning_and_refuses_snr_gamma(tmp_path, instance_dir):
    from diffusers import EDMEulerScheduler

    from atelier.errors import UserError

    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = EDMEulerScheduler()  # as Playground v2.5 ships
    model = str(save_tiny_pipeline(pipe, tmp_path / "edm"))
    with pytest.raises(UserError, match="--snr_gamma does not apply to this EDM model"):
        train_lora(_cfg(tmp_path, model, instance_dir, snr_gamma=5.0))
    with pytest.raises(UserError, match="--train_timesteps does not apply to this EDM model"):
        train_lora(_cfg(tmp_path, model, instance_dir, train_timesteps="999"))
    summary = train_lora(_cfg(tmp_path, model, instance_dir, max_train_steps=2))
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_prior_preservation_generates_missing_class_images_reuses_them_and_resumes(tmp_path, models, instance_dir,
                                                                                   monkeypatch):
    import atelier.core.images as images
    import atelier.generate.metadata  # noqa: F401  bound to the real save_png before it is patched here, as the
    # generate CLI imports it by name: first imported under the patch, it would keep the dying one for later tests

    classes = tmp_path / "classes"
    classes.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(classes / "mine.png")  # one of the user's own
    real_save, calls = images.save_png, []

    def dies_after_one(image, path, parameters, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # killed while generating the second
        calls.append(path)
        return real_save(image, path, parameters, *args, **kwargs)

    monkeypatch.setattr(images, "save_png", dies_after_one)
    cfg = _cfg(tmp_path, models["sd1"], instance_dir, with_prior_preservation=True, class_data_dir=str(classes),
               class_prompt="a photo of a dog", num_class_images=3, max_train_steps=1, prior_loss_weight=0.5)
    with pytest.raises(KeyboardInterrupt):
        train_lora(cfg)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "mine.png"]  # nothing half-written
    monkeypatch.setattr(images, "save_png", real_save)
    first = (classes / "class-00000.png").stat().st_mtime_ns
    summary = train_lora(cfg)
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "class-00001.png", "mine.png"]
    assert (classes / "class-00000.png").stat().st_mtime_ns == first  # reused, not redone
    from atelier.core.infotext import parse_parameters

    params = parse_parameters(Image.open(classes / "class-00001.png").text["parameters"])
    assert params["Prompt"] == "a photo of a dog" and params["Seed"] == "1"  # A1111 metadata, seed + k
    assert summary["steps"] == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("class images were regenerated")

    monkeypatch.setattr(images, "save_png", no_generation)
    train_lora(replace_output(cfg, tmp_path / "again"))  # enough images: none generated


def test_captioned_class_images_train_on_their_own_captions(tmp_path, models, instance_dir, monkeypatch):
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(classes / f"{i}.png")
        (classes / f"{i}.txt").write_text(caption)
    seen = []
    real_tokenize = lora_mod.tokenize

    def tokenize(tokenizer, captions):
        seen.extend(captions)
        return real_tokenize(tokenizer, captions)

    monkeypatch.setattr(lora_mod, "tokenize", tokenize)
    cfg = _cfg(tmp_path, models["sd1"], instance_dir, with_prior_preservation=True, class_data_dir=str(classes),
               num_class_images=2, max_train_steps=2)
    assert train_lora(cfg)["steps"] == 2  # no --class_prompt needed: every class image has a caption
    assert {"a red circle", "a blue square"} & set(seen)
    (classes / "1.txt").unlink()
    with pytest.raises(UserError) as err:
        train_lora(replace_output(cfg, tmp_path / "again"))
    assert "1.png has no caption" in str(err.value)


def test_a_distilled_base_trains_at_its_sampling_timesteps(tmp_path, models, instance_dir, monkeypatch):
    """--train_timesteps 999,749,499,249: every instance and class sample's timestep is one of the list
    (a Turbo model is only run there), and settings.json records it."""
    seen = []
    real = weighting.training_timesteps

    def recording(*args, **kwargs):
        t = real(*args, **kwargs)
        seen.extend(int(v) for v in t)
        return t

    monkeypatch.setattr(weighting, "training_timesteps", recording)
    cfg = _cfg(tmp_path, models["sd1"], instance_dir, train_timesteps="999,749,499,249", max_train_steps=3)
    train_lora(cfg)
    assert len(seen) == 6 and set(seen) <= {999, 749, 499, 249}
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["options"]["train_timesteps"] == [999, 749, 499, 249]


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_off_is_the_base_model_and_leaves_training_as_it_was(use_dora):
    from peft import LoraConfig

    pipe = tiny_pipeline("sd1")
    ids = [lora_mod.tokenize(pipe.tokenizer, ["a red circle", "a blue square"])]
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    bare = lora_mod.LoraTrainee(pipe.unet, [pipe.text_encoder], sdxl=False, te_lora=False, tokens=None)
    with torch.no_grad():
        base = bare(x, t, ids)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=use_dora, init_lora_weights=False,
                                     target_modules=targets))  # random B: the adapter changes the output
    lora_mod.add_text_encoder_lora(pipe.text_encoder, LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                                 target_modules=lora_mod.TEXT_TARGETS))
    trainee = lora_mod.LoraTrainee(pipe.unet, [pipe.text_encoder], sdxl=False, te_lora=True, tokens=None)
    next(p for p in pipe.text_encoder.parameters() if p.requires_grad).requires_grad_(False)  # as after the pivot
    flags = [p.requires_grad for p in trainee.parameters()]
    with torch.no_grad():
        adapted = trainee(x, t, ids)
        with lora_mod.adapters_off(trainee):
            off = trainee(x, t, ids)
        again = trainee(x, t, ids)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert [p.requires_grad for p in trainee.parameters()] == flags


@pytest.mark.parametrize("target, edm_style", [("images", False), ("base_model", False), ("base_model", True)])
def test_prior_loss_target(target, edm_style, tmp_path, models, instance_dir, monkeypatch):
    """--prior_loss_target base_model: the class rows are pulled toward the frozen base model's prediction, so
    the prior loss is zero until the adapter changes the model (and the instance loss is untouched);
    'images' (DreamBooth's) pulls them toward the noise, which no model predicts exactly."""
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square"]):
        Image.fromarray(np.full((16, 16, 3), 60 * i + 30, np.uint8)).save(classes / f"{i}.png")
        (classes / f"{i}.txt").write_text(caption)
    losses = []
    real = weighting.weighted_mse
    monkeypatch.setattr(weighting, "weighted_mse", lambda *a, **k: (losses.append(float(real(*a, **k).detach())), real(*a, **k))[1])
    cfg = _cfg(tmp_path, models["sd2"], instance_dir, with_prior_preservation=True, class_data_dir=str(classes),
               num_class_images=2, max_train_steps=3, prior_loss_target=target, do_edm_style_training=edm_style)
    train_lora(cfg)
    instance, prior = losses[0::2], losses[1::2]
    assert len(prior) == 3 and all(v > 0 for v in instance)
    if target == "base_model":
        assert prior[0] < 1e-10 and prior[1] > 1e-8 and prior[2] > 1e-8  # the LoRA starts as the identity, then drifts
    else:
        assert min(prior) > 1e-3
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["options"]["prior_loss_target"] == target


def replace_output(cfg, folder):
    from dataclasses import replace

    return replace(cfg, output_dir=str(folder))


def test_cached_latents_with_caption_shuffle_encode_each_image_once_and_captions_still_change(
        tmp_path, models, monkeypatch):
    import atelier.core.vae as vae_calls

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(data / "0.png")
    (data / "0.txt").write_text("TOK, red, large, top, shiny")
    encoded, captions = [], []
    real_encode, real_tokenize = vae_calls.encode, lora_mod.tokenize
    monkeypatch.setattr(vae_calls, "encode", lambda *a, **k: (encoded.append(1), real_encode(*a, **k))[1])
    monkeypatch.setattr(lora_mod, "tokenize", lambda tok, caps: (captions.extend(caps), real_tokenize(tok, caps))[1])
    train_lora(_cfg(tmp_path, models["sd1"], data, cache_latents=True, shuffle_caption=True, keep_tokens=1,
                    train_batch_size=1, max_train_steps=6, checkpointing_steps=100))
    assert len(encoded) == 1  # one image, no flips: encoded once for six steps
    assert len(captions) == 6 and len(set(captions)) > 1 and all(c.startswith("TOK, ") for c in captions)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("args, words", [
    (["--instance_data_dir", "{missing}"], "no such folder"),
    (["--instance_data_dir", "{empty}"], "holds no images"),
    ([], "--instance_data_dir is required"),
    (["--instance_data_dir", "{data}", "--instance_prompt", ""], "2.png has no caption (2.txt) and no --instance_prompt"),
    (["--instance_data_dir", "{data}", "--rank", "0"], "--rank must be a whole number at least 1"),
    (["--instance_data_dir", "{data}", "--learning_rate", "nan"], "--learning_rate must be"),
    (["--instance_data_dir", "{data}", "--train_text_encoder_ti_frac", "1.5"], "--train_text_encoder_ti_frac must be"),
    (["--instance_data_dir", "{data}", "--train_text_encoder", "--train_text_encoder_ti"], "not both"),
    (["--instance_data_dir", "{data}", "--ti_warmup_steps", "2"], "--ti_warmup_steps trains the new tokens alone first"),
    (["--instance_data_dir", "{data}", "--ti_warmup_steps", "-1", "--train_text_encoder_ti"], "--ti_warmup_steps must be"),
    (["--instance_data_dir", "{data}", "--with_prior_preservation"], "needs --class_data_dir"),
    (["--instance_data_dir", "{data}", "--prior_loss_target", "teacher"], "--prior_loss_target must be images or base_model"),
    (["--instance_data_dir", "{data}", "--snr_gamma", "5", "--do_edm_style_training"], "--snr_gamma does not apply"),
    (["--instance_data_dir", "{data}", "--optimizer", "prodigy"], "needs the prodigyopt package"),
    (["--instance_data_dir", "{data}", "--train_timesteps", "999,abc"], "not a comma-separated list of timesteps"),
    (["--instance_data_dir", "{data}", "--train_timesteps", "999", "--do_edm_style_training"],
     "--train_timesteps does not apply"),
])
def test_train_lora_refuses_in_one_line(args, words, tmp_path, instance_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as where it is not installed
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "nope", empty=tmp_path / "empty", data=instance_dir) for a in args]
    code, _, err = run(["train", "lora", "--output_dir", tmp_path / "out", "--threads", "1", "--instance_prompt", "a TOK",
                        *args], capsys)
    assert one_error_line(code, err) and words in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("args, words", [
    (["--use_blora"], "matched no layer of this UNet (its attention blocks are e.g. unet.down_blocks.0.attentions.0"),
    (["--lora_unet_blocks", "unet.up_blocks.7"], "matched no layer"),
    (["--lora_layers", "to_nothing"], "no Linear or Conv2d layer of this UNet is named so"),
])
def test_options_that_do_not_fit_the_model_are_refused_in_one_line(args, words, tmp_path, models, instance_dir, capsys):
    code, _, err = run(["train", "lora", "--output_dir", tmp_path / "out", "--threads", "1", "--instance_prompt", "a TOK",
                        "--instance_data_dir", instance_dir, "--pretrained_model_name_or_path", models["sd1"], *args],
                       capsys)
    errors = [line for line in err.splitlines() if line.startswith("atelier: error: ")]
    assert code == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == errors[0]  # after the model's loading bars, only the error


def test_boolean_options_are_flags_not_type_bool(capsys):
    parser = build_parser()
    base = ["train", "lora", "--instance_data_dir", "x"]
    args = parser.parse_args(base)
    assert args.prodigy_use_bias_correction is True and args.use_dora is False
    assert parser.parse_args([*base, "--no-prodigy_use_bias_correction", "--use_dora"]).prodigy_use_bias_correction is False
    with pytest.raises(SystemExit) as exc:  # `type=bool` would have read "False" as True
        parser.parse_args([*base, "--prodigy_use_bias_correction", "False"])
    assert exc.value.code == 2 and "unrecognized arguments: False" in capsys.readouterr().err


def test_prodigy_trains_and_json_output_is_only_json(tmp_path, models, instance_dir, capsys):
    """prodigyopt prints its settings when built; `--json` output must stay parseable for scripts."""
    code, out, _ = run(["train", "lora", "--output_dir", tmp_path / "out", "--threads", "1", "--instance_prompt", "a TOK",
                        "--instance_data_dir", instance_dir, "--pretrained_model_name_or_path", models["sd1"],
                        "--optimizer", "prodigy", "--learning_rate", "1.0", "--max_train_steps", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 2
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["options"]["optimizer"] == "prodigy"
