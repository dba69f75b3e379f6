"""The shared training loop (atelier.train.loop) under every trainer: models on the accelerator's
device in the right dtype, options checked before any work, damaged checkpoints and stale temporary
files survived."""

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from atelier.cli import main
from atelier.errors import UserError
from atelier.train import toyworld as toy
from atelier.train.checkpoint import load_state, previous_path, save_state
from atelier.train.inverter import InverterConfig, train_inverter
from atelier.train.loop import TrainLoop

TINY_TOY = dict(vae_steps=2, text_steps=2, unet_steps=2, turbo_steps=2, taesd_steps=2, checkpoint_every=1,
                eval_every=1000, eval_images=2, eval_scenes=2, turbo_pairs=64, vae_batch=2, text_batch=4,
                unet_batch=2, turbo_batch=4, taesd_batch=2, taesd_pool=64, threads=1)


def _inverter(tmp_path, **kw) -> InverterConfig:
    settings = dict(output_dir=str(tmp_path / "inv"), train_batch_size=2, max_train_steps=2, checkpointing_steps=1,
                    validation_steps=100, validation_images=2)
    return InverterConfig(**{**settings, **kw})


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: start and leave it clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------------- devices


class _Stop(Exception):
    pass


class DeviceWatch(TorchFunctionMode):
    """Every torch call that mixes a tensor on `meta` (the pretend accelerator) with one elsewhere.
    Meta tensors have no values: .item() / float() / .cpu() on them answer placeholders so that a
    whole step (forward, backward, optimizer) runs."""

    MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_,
             torch._has_compatible_shallow_copy_type}  # what module.to() asks on the way

    def __init__(self):
        super().__init__()
        self.mixed, self.meta_calls = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_meta = [t for t in tensors if t.device.type == "meta"]
        if on_meta:
            self.meta_calls += 1
            if func in (torch.Tensor.item, torch.Tensor.__float__):
                return 0.5
            if func is torch.Tensor.__bool__:
                return True
            if func is torch.Tensor.cpu:
                return torch.zeros(args[0].shape, dtype=args[0].dtype)
            others = [t for t in tensors if t.device.type != "meta" and t.dim() > 0]
            if others and func not in self.MOVES:
                self.mixed.append(f"{getattr(func, '__name__', func)}: {others[0].device} {tuple(others[0].shape)}")
        return func(*args, **kwargs)


@pytest.fixture
def meta_accelerator(monkeypatch):
    """accelerator.device reports `meta`, and the first checkpoint ends the run (after one full step)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    steps = []

    def stop(loop):
        steps.append((loop.name, loop.step))
        raise _Stop

    monkeypatch.setattr(TrainLoop, "save", stop)
    return steps


def _fresh_toy_models(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tokenizer = toy.make_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    vae = AutoencoderKL(**toy.VAE_CONFIG).eval().requires_grad_(False)
    te = toy.make_text_encoder(tokenizer, 0).eval().requires_grad_(False)
    unet = UNet2DConditionModel(**toy.UNET_CONFIG).eval().requires_grad_(False)
    return tokenizer, vae, te, unet


def test_every_toyworld_stage_runs_on_the_accelerator_device(tmp_path, meta_accelerator, fresh_accelerate):
    cfg = toy.ToyTrainConfig(out_dir=str(tmp_path / "run"), **TINY_TOY)
    tokenizer, vae, te, unet = _fresh_toy_models(tmp_path)
    stages = {
        "vae": lambda: toy.train_vae(cfg),
        "text": lambda: toy.train_text_encoder(cfg, tokenizer),
        "unet": lambda: toy.train_unet(cfg, vae, te, tokenizer),
        "turbo": lambda: toy.train_turbo(cfg, vae, te, tokenizer, unet),
        "taesd": lambda: toy.train_taesd(cfg, SimpleNamespace(vae=vae, unet=unet, text_encoder=te, tokenizer=tokenizer)),
    }
    for name, run in stages.items():
        watch = DeviceWatch()
        with watch, pytest.raises(_Stop):
            run()
        assert meta_accelerator[-1] == (name, 1)  # one whole step ran
        assert watch.meta_calls > 50, name
        assert not watch.mixed, f"{name}: {watch.mixed[:5]}"


def test_inverter_runs_on_the_accelerator_device(tmp_path, meta_accelerator, fresh_accelerate):
    for stage in (1, 2):
        watch = DeviceWatch()
        with watch, pytest.raises(_Stop):
            train_inverter(_inverter(tmp_path, stage=stage))
        assert meta_accelerator[-1] == (f"stage{stage}", 1)
        assert watch.meta_calls > 50
        assert not watch.mixed, f"stage {stage}: {watch.mixed[:5]}"


def _dtypes(module):
    return {p.dtype for p in module.parameters()}


def test_mixed_precision_frozen_models_in_the_weight_dtype_trained_in_fp32(tmp_path, monkeypatch, fresh_accelerate):
    """bf16 runs on a CPU: the inverter's frozen models are bf16 and the inverter fp32; a toy UNet step
    (stopped at its checkpoint) runs with its frozen models in bf16 and its loss is finite."""
    from atelier.train import inverter as inv_mod

    seen = {}
    real_models = inv_mod.Models

    def models_then_stop(*args, **kwargs):
        seen["m"] = real_models(*args, **kwargs)
        raise _Stop  # a bf16 inverter step takes ~40 s on this CPU: the toy UNet's step below stands for it

    monkeypatch.setattr(inv_mod, "Models", models_then_stop)
    with pytest.raises(_Stop):
        train_inverter(_inverter(tmp_path, mixed_precision="bf16", stage=2))
    m = seen["m"]
    for frozen in (m.gen.unet, m.teacher.unet, m.den.pipe.text_encoder, m.vae):
        assert _dtypes(frozen) == {torch.bfloat16}
    assert _dtypes(m.inverter) == {torch.float32}

    def stop(loop):
        assert all(torch.isfinite(torch.tensor(loop.losses))) and loop.step == 1
        raise _Stop

    monkeypatch.setattr(TrainLoop, "save", stop)
    cfg = toy.ToyTrainConfig(out_dir=str(tmp_path / "run"), mixed_precision="bf16", **{**TINY_TOY, "unet_batch": 1})
    tokenizer, vae, te, unet = _fresh_toy_models(tmp_path)
    real_source, frozen = toy.LatentSource, {}
    monkeypatch.setattr(toy, "LatentSource", lambda c, v, t, tok: real_source(c, frozen.setdefault("vae", v),
                                                                               frozen.setdefault("te", t), tok))
    with pytest.raises(_Stop):
        toy.train_unet(cfg, vae, te, tokenizer)
    assert _dtypes(frozen["vae"]) == _dtypes(frozen["te"]) == {torch.bfloat16}
    assert _dtypes(vae) == _dtypes(te) == {torch.float32}  # the caller's models (exported later) are untouched


def test_fp16_keeps_a_force_upcast_vae_in_fp32(tmp_path, monkeypatch, fresh_accelerate):
    from diffusers import AutoencoderKL

    loop = TrainLoop(tmp_path / "x", 1, checkpoint_every=1)
    monkeypatch.setattr(type(loop), "weight_dtype", property(lambda self: torch.float16))
    small = dict(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    assert _dtypes(loop.frozen(AutoencoderKL(**small, force_upcast=True))) == {torch.float32}
    assert _dtypes(loop.frozen(AutoencoderKL(**small, force_upcast=False))) == {torch.float16}
    assert _dtypes(loop.frozen(torch.nn.Linear(2, 2))) == {torch.float16}


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, words", [
    (["--set", "checkpoint_every=0"], "--set checkpoint_every must be a whole number at least 1, not 0"),
    (["--set", "eval_every=-5"], "--set eval_every must be a whole number at least 1, not -5"),
    (["--set", "unet_lr=nan"], "--set unet_lr must be a finite number above 0, not nan"),
    (["--set", "vae_lr=inf"], "--set vae_lr must be a finite number above 0, not inf"),
    (["--set", "text_lr=0"], "--set text_lr must be a finite number above 0, not 0.0"),
    (["--set", "caption_dropout=1.5"], "--set caption_dropout must be a finite number at least 0 and at most 1"),
    (["--set", "ema_decay=-inf"], "--set ema_decay must be a finite number at least 0 and below 1, not -inf"),
    (["--set", "turbo_pairs=-64"], "--set turbo_pairs must be a whole number at least 0"),
    (["--set", "n_objects_weights=[1, NaN, 1]"], "--set n_objects_weights must be a finite number"),
    (["--set", "n_objects_weights=[0, 0, 0]"], "must have a positive weight"),
    (["--set", "mixed_precision=fp8"], "must be no, fp16 or bf16"),
    (["--unet-steps", "-3"], "--unet-steps must be a whole number at least 1, not -3"),
    (["--threads", "0"], "--threads must be a whole number at least 1, not 0"),
    (["--seed", "-1"], "--seed must be a whole number at least 0, not -1"),
])
def test_toyworld_options_out_of_range_are_one_line(tmp_path, capsys, argv, words):
    assert main(["train", "toyworld", "--out-dir", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("atelier: error: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, words", [
    (["--learning_rate", "nan"], "--learning_rate must be a finite number above 0, not nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number above 0, not inf"),
    (["--learning_rate=-1e-4"], "--learning_rate must be a finite number above 0"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be a whole number at least 1, not 0"),
    (["--validation_steps", "-1"], "--validation_steps must be a whole number at least 1, not -1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a whole number at least 1"),
    (["--train_batch_size", "-2"], "--train_batch_size must be a whole number at least 1"),
    (["--regularizer_weight", "nan"], "--regularizer_weight must be a finite number at least 0, not nan"),
    (["--threads", "0"], "--threads must be a whole number at least 1, not 0"),
    (["--seed", "-7"], "--seed must be a whole number at least 0, not -7"),
    (["--resolution", "-64"], "--resolution must be a whole number at least 8"),
])
def test_inverter_options_out_of_range_are_one_line(tmp_path, capsys, argv, words):
    assert main(["train", "inverter", "--output_dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("atelier: error: ")
    assert not (tmp_path / "o").exists()


def test_library_callers_get_the_same_checks(tmp_path):
    with pytest.raises(UserError, match="checkpoint_every must be a whole number at least 1, not 0"):
        toy.train_all(toy.ToyTrainConfig(out_dir=str(tmp_path / "run"), checkpoint_every=0))
    with pytest.raises(UserError, match="--max_grad_norm must be a finite number at least 0, not nan"):
        train_inverter(_inverter(tmp_path, max_grad_norm=float("nan")))
    with pytest.raises(UserError, match="regularizer_t"):
        train_inverter(_inverter(tmp_path, regularizer_t=(900, 100)))
    assert not (tmp_path / "run").exists() and not (tmp_path / "inv").exists()


# ---------------------------------------------------------------------------- damaged checkpoints


def _tiny_loop(folder, total=4, every=2, **numbered):
    """A linear model on seeded data through the loop; its weights after `total` steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    loop = TrainLoop(folder, total, checkpoint_every=every, **numbered)
    (prepared,), _ = loop.prepare({"model": model}, torch.optim.SGD(model.parameters(), lr=0.1))

    def step(i, micro):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        return torch.nn.functional.mse_loss(prepared(x), y)

    loop.run(step)
    return loop, model.weight.detach().clone()


def test_checkpoints_keep_the_previous_one_and_resume_exactly(tmp_path):
    _, straight = _tiny_loop(tmp_path / "a", total=6)
    _tiny_loop(tmp_path / "b", total=4)
    ckpt = tmp_path / "b" / "checkpoint.safetensors"
    assert load_state(ckpt)["step"] == 4 and load_state(previous_path(ckpt))["step"] == 2
    loop, resumed = _tiny_loop(tmp_path / "b", total=6)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)
    assert len(loop.losses) == 6


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
    lambda p: p.write_bytes(b"\x00garbage" * 100),
    lambda p: p.write_bytes(b""),
])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    _, straight = _tiny_loop(tmp_path / "a", total=6)
    _tiny_loop(tmp_path / "b", total=4)
    ckpt = tmp_path / "b" / "checkpoint.safetensors"
    damage(ckpt)
    capsys.readouterr()
    loop, resumed = _tiny_loop(tmp_path / "b", total=6)
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "resuming from the previous checkpoint" in warning[0]
    assert "[b] resumed at step 2" in err
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)  # steps 3-6 redone from step 2
    assert (tmp_path / "b" / "checkpoint.safetensors.damaged").is_file()


def test_no_good_checkpoint_left_is_one_clear_error(tmp_path):
    _tiny_loop(tmp_path / "b", total=2, every=2)
    (tmp_path / "b" / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is damaged .*no good checkpoint is left"):
        _tiny_loop(tmp_path / "b", total=4)
    _, weights = _tiny_loop(tmp_path / "b", total=4)  # the damaged file was set aside: a fresh start
    _, straight = _tiny_loop(tmp_path / "c", total=4)
    torch.testing.assert_close(weights, straight, rtol=0, atol=0)


def test_damaged_toyworld_checkpoint_through_the_cli(tmp_path, capsys, kill_after_checkpoint):
    out = tmp_path / "run"
    argv = ["train", "toyworld", "--out-dir", str(out), "--stages", "vae", "--vae-steps", "3",
            "--set", "checkpoint_every=1", "--set", "vae_batch=2", "--set", "eval_every=1000",
            "--set", "eval_scenes=2", "--set", "vae_full_steps=1", "--threads", "1"]
    kill_after_checkpoint(2)
    assert main(argv) == 130
    kill_after_checkpoint(None)
    (out / "vae" / "checkpoint.safetensors").write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "checkpoint.safetensors is damaged" in err and "[vae] resumed at step 1" in err
    assert "Traceback" not in err and "SafetensorError" not in err


def test_numbered_checkpoints_keep_the_last_ones_and_resume_from_the_latest_good_or_a_chosen_one(tmp_path, capsys):
    _, straight = _tiny_loop(tmp_path / "a", total=6, every=1)
    _tiny_loop(tmp_path / "b", total=4, every=1, numbered=True, keep=2)
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    (tmp_path / "b" / "checkpoint-4" / "training_state.safetensors").write_bytes(b"\x00" * 10)  # damaged
    capsys.readouterr()
    loop, resumed = _tiny_loop(tmp_path / "b", total=6, every=1, numbered=True, keep=2)
    assert "resuming from the previous checkpoint" in capsys.readouterr().err and len(loop.losses) == 6
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)  # steps 4-6 redone from step 3
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    # an earlier checkpoint, by name; a missing one is one clear error
    loop, _ = _tiny_loop(tmp_path / "b", total=6, every=1, numbered=True, resume_from="checkpoint-5")
    assert "resumed at step 5" in capsys.readouterr().err
    with pytest.raises(UserError, match="--resume_from_checkpoint checkpoint-9: no training state there"):
        _tiny_loop(tmp_path / "b", total=6, every=1, numbered=True, resume_from="checkpoint-9")


def test_stale_temp_files_of_a_killed_write_are_removed_on_start(tmp_path):
    folder = tmp_path / "b"
    _tiny_loop(folder, total=2)
    # kill -9 during a checkpoint write leaves atomic_open's temporary file behind (0 bytes), and the
    # older writer left `.checkpoint.safetensors.XXXX`
    stale = [folder / ".checkpoint.safetensors.k3j2_x.tmp", folder / ".checkpoint.safetensors.abc123",
             folder / ".loss.png.q1w2.tmp"]
    for p in stale:
        p.write_bytes(b"")
    keep = folder / "notes.txt"
    keep.write_text("mine")
    _tiny_loop(folder, total=2)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_save_state_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    import atelier.train.checkpoint as ck

    path = tmp_path / "c.safetensors"
    save_state(path, {"step": 1, "w": torch.ones(2)})

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"step": 2, "w": torch.zeros(2)})
    assert load_state(path)["step"] == 1 and not previous_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temporary file left


# ---------------------------------------------------------------------------- the tiny autoencoder's data


def test_the_tiny_decoder_learns_the_vaes_images_of_encoded_and_denoised_latents(tmp_path, monkeypatch):
    cfg = toy.ToyTrainConfig(out_dir=str(tmp_path / "run"), **TINY_TOY)
    tokenizer, vae, te, unet = _fresh_toy_models(tmp_path)
    teacher = SimpleNamespace(vae=vae, unet=unet, text_encoder=te, tokenizer=tokenizer)
    pool = toy.decoder_pool(cfg, teacher, tmp_path / "pool.safetensors", 64)
    half = toy.TAESD_CHUNK // 2
    assert pool["x"].dtype == torch.uint8 and pool["x"].shape == (64, 3, 64, 64)
    scale = vae.config.scaling_factor
    with torch.no_grad():
        means = vae.encode(pool["x"].float() / 127.5 - 1).latent_dist.mean * scale
        images = vae.decode(pool["z_dec"] / scale).sample.clamp(-1, 1)
    assert torch.allclose(pool["z_enc"], means, atol=1e-4)
    assert torch.equal(pool["z_dec"][:half], pool["z_enc"][:half])  # encoded scenes
    assert (pool["z_dec"][half:] - pool["z_enc"][half:]).abs().mean() > 0.01  # the turbo model's denoised latents
    assert torch.allclose(pool["target"].float(), images, atol=2e-3)  # the VAE's images, in fp16

    def no_more_work(*args, **kwargs):
        raise AssertionError("the saved pool is read back, not made again")

    monkeypatch.setattr(unet, "forward", no_more_work)
    again = toy.decoder_pool(cfg, teacher, tmp_path / "pool.safetensors", 64)
    assert all(torch.equal(again[k], pool[k]) for k in pool)


def test_the_taesd_stage_says_when_there_is_no_turbo_model_to_distil_from(tmp_path, capsys):
    from atelier.testing.cli import one_error_line, run

    code, _, err = run(["train", "toyworld", "--stages", "taesd", "--out-dir", tmp_path / "run",
                        "--weights-dir", tmp_path / "empty"], capsys)
    assert one_error_line(code, err) and "toyworld-turbo" in err
