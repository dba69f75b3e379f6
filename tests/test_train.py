"""`atelier train toyworld`: a miniature run that is killed mid-stage, resumes, and exports models the
loader reads with their defaults."""

import json

import pytest

from atelier.cli import main
from atelier.models import detect_family, load_pipeline
from atelier.train import toyworld as trainer

TINY = [
    "--vae-steps", "3", "--text-steps", "2", "--unet-steps", "4", "--turbo-steps", "2", "--taesd-steps", "2",
    "--clip-steps", "2", "--ip-steps", "2", "--set", "clip_batch=8", "--set", "ip_batch=2",
    "--set", "checkpoint_every=2", "--set", "eval_every=1000", "--set", "eval_images=3",
    "--set", "eval_scenes=4", "--set", "turbo_pairs=64", "--set", "vae_full_steps=1",
    "--set", "vae_batch=4", "--set", "text_batch=8", "--set", "unet_batch=4", "--set", "turbo_batch=4", "--set", "taesd_batch=4",
    "--set", "taesd_pool=64", "--set", "ip_turbo_steps=2",
    "--threads", "1",
]


def test_killed_run_resumes_and_exports_loadable_models(tmp_path, capsys, kill_after_checkpoint):
    out = tmp_path / "run"
    argv = ["train", "toyworld", "--out-dir", str(out), *TINY]

    kill_after_checkpoint(2, loop="unet")
    assert main(argv) == 130
    assert (out / "vae" / "done.json").is_file() and not (out / "unet" / "done.json").exists()
    assert (out / "unet" / "checkpoint.safetensors").is_file() and (out / "unet" / "loss.png").is_file()

    kill_after_checkpoint(None)
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "[unet] resumed at step 2" in printed.out + printed.err
    done = json.loads((out / "unet" / "done.json").read_text())
    assert done["steps"] == 4 and done["wall_time_s"] > 0
    state = trainer.load_state(out / "unet" / "checkpoint.safetensors")
    assert len(state["losses"]) == 4  # two steps before the kill, two after, none repeated

    toy = load_pipeline(out / "weights" / "toyworld")
    family = detect_family(toy)
    assert (family.sampler, family.steps, family.guidance_scale, family.is_turbo) == ("DPM++ 2M", 20, 3.0, False)
    turbo = load_pipeline(out / "weights" / "toyworld-turbo")
    family = detect_family(turbo)
    assert (family.sampler, family.steps, family.guidance_scale, family.is_turbo) == ("Euler", 1, 0.0, True)
    from atelier.models import load_tiny_autoencoder

    assert type(load_tiny_autoencoder(out / "weights" / "toyworld-taesd")).__name__ == "AutoencoderTiny"
    # a finished taesd stage exports again without its teacher: no toyworld-turbo in that weights folder
    assert main(["train", "toyworld", "--out-dir", str(out), *TINY, "--stages", "taesd",
                 "--weights-dir", str(tmp_path / "again")]) == 0
    assert type(load_tiny_autoencoder(tmp_path / "again" / "toyworld-taesd")).__name__ == "AutoencoderTiny"
    meta = json.loads((out / "weights" / "toyworld" / "atelier.json").read_text())
    assert meta["trained_with"]["unet_steps"] == 4 and "out_dir" not in meta["trained_with"]
    # the toy world's eyes: toyworld-clip, toyworld-ip for toyworld and toyworld-turbo-ip (continued from it
    # on the turbo, at the turbo's timesteps) for toyworld-turbo, each named by its model
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(out / "weights" / "toyworld-clip").config.vision_config.image_size == 64
    for name in ("toyworld", "toyworld-turbo"):
        assert (out / "weights" / f"{name}-ip" / "ip-adapter.safetensors").is_file()
        assert json.loads((out / "weights" / name / "atelier.json").read_text())["ip_adapter"] == f"{name}-ip"
    turbo_ip = json.loads((out / "weights" / "toyworld-turbo-ip" / "atelier.json").read_text())
    assert turbo_ip["trained_with"]["train_timesteps"] == [999, 749, 499, 249]
    assert turbo_ip["fine_tuned_from"]["base_model"].endswith("toyworld")


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"seed": 7, "unet_steps": 6000}))
    assert main(["train", "toyworld", "--out-dir", str(out), "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert "other settings (seed: 7 -> 0" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--set", "unet_lr"], "expected FIELD=VALUE"),
    (["--set", "unet_learning_rate=1"], "expected FIELD=VALUE"),
    (["--set", "unet_lr=fast"], "is not a valid float"),
    (["--stages", "vae,decoder"], "unknown stage(s) decoder"),
    (["--unet-steps", "0"], "--unet-steps must be a whole number at least 1, not 0"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["train", "toyworld", "--out-dir", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written for a rejected command


def test_show_config_prints_the_overridden_settings(tmp_path, capsys):
    assert main(["train", "toyworld", "--out-dir", str(tmp_path), "--set", "unet_lr=3e-4", "--unet-steps", "10",
                 "--show-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["unet_lr"] == 3e-4 and cfg["unet_steps"] == 10 and cfg["seed"] == 0
