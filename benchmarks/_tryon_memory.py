"""Real-size memory of try-on training (issue 16), for the try-on benchmark to call.

One training step (forward + backward + AdamW step) of the full-size SD 1.5-inpainting UNet
architecture: diffusers' `UNet2DConditionModel` from atelier's bundled SD 1.5 config with
`in_channels=9` (noisy latent + masked-person latent + mask), random weights, fp32, batch 1, at
256×192 pixels: latent 32×24, which CatVTON concatenates with the garment's along the width, so the
UNet sees 32×48. Cross-attention gets a dummy `encoder_hidden_states` of zeros (1, 1, 768) (CatVTON
drops the text branch; the cost of one key is nil).

Configurations: `attention` (only the self-attention `attn1` modules train, CatVTON's 49.57 M
parameters) or `full` fine-tuning, each with and without gradient checkpointing. Each runs in its own
process, as benchmarks/lora.py's memory part does, so the process's peak RSS (`ru_maxrss`) is this
configuration's alone:

    from _tryon_memory import measure, measure_all
    row = measure("attention", checkpointing=True, threads=1)
    # {"mode", "gradient_checkpointing", "trainable", "total_params", "weights_gb", "peak_gb",
    #  "seconds_per_step", "latent", "unet_input"}

    python benchmarks/_tryon_memory.py --mode full --gradient-checkpointing   # one configuration, JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("attention", "full")
HEIGHT, WIDTH = 256, 192  # pixels of the person (and of the garment)
VAE_FACTOR = 8
CROSS_ATTENTION_DIM = 768


def sd15_inpainting_unet(overrides: dict | None = None):
    """SD 1.5's UNet with the inpainting model's 9 input channels, random weights, fp32 (`overrides`:
    config changes, for a small stand-in in tests)."""
    from importlib import resources

    import diffusers
    import torch

    config = json.loads(resources.files("atelier.models.configs").joinpath("sd1.json").read_text())["unet"]
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel.from_config({**config, "in_channels": 9, **(overrides or {})})


def trainable_parameters(unet, mode: str) -> list:
    """Set requires_grad for `mode` and return the trainable parameters: `attention` trains every
    parameter of the self-attention modules (`...attn1.*`, as CatVTON's `get_trainable_module(unet,
    "attention")`), `full` trains everything."""
    if mode not in MODES:
        raise ValueError(f"mode is one of {MODES}, not {mode!r}")
    for name, param in unet.named_parameters():
        param.requires_grad_(mode == "full" or ".attn1." in name)
    return [p for p in unet.parameters() if p.requires_grad]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(mode: str, checkpointing: bool, threads: int = 1, steps: int = 1, overrides: dict | None = None) -> dict:
    """In this process: build the UNet, run `steps` training steps, report the figures."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    unet = sd15_inpainting_unet(overrides)
    params = trainable_parameters(unet, mode)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    loaded = peak_rss_bytes()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    h, w = HEIGHT // VAE_FACTOR, WIDTH // VAE_FACTOR
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 9, h, 2 * w, generator=generator)  # person | garment along the width
    target = torch.randn(1, 4, h, 2 * w, generator=generator)
    context = torch.zeros(1, 1, CROSS_ATTENTION_DIM)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample
        loss = F.mse_loss(out, target)
        loss.backward()
        if any(p.grad is None for p in params):
            raise RuntimeError("some trainable parameters got no gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"mode": mode, "gradient_checkpointing": checkpointing, "threads": threads,
            "trainable": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in unet.parameters()),
            "weights_gb": loaded / 2**30, "peak_gb": peak_rss_bytes() / 2**30,
            "seconds_per_step": times[-1], "first_step_seconds": times[0], "steps": steps,
            "latent": [h, w], "unet_input": [1, 9, h, 2 * w], "loss": float(loss)}


def measure(mode: str, checkpointing: bool, threads: int = 1, steps: int = 1, timeout: float | None = None) -> dict:
    """One configuration in its own process (this file run as a script): its `child` figures."""
    if mode not in MODES:
        raise ValueError(f"mode is one of {MODES}, not {mode!r}")
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--threads", str(threads), "--steps", str(steps)]
    cmd += ["--gradient-checkpointing"] if checkpointing else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"try-on memory run {mode} (checkpointing {checkpointing}) failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_all(threads: int = 1, modes=MODES, steps: int = 1, timeout: float | None = None) -> list[dict]:
    """Every mode without and with gradient checkpointing, one process after another."""
    return [measure(mode, ckpt, threads, steps, timeout) for mode in modes for ckpt in (False, True)]


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'trained':<10} {'gradient ckpt':>13} {'trainable M':>12} {'s/step':>8} {'weights GB':>11} {'peak GB':>8}",
             "-" * 68]
    for r in rows:
        lines.append(f"{r['mode']:<10} {'on' if r['gradient_checkpointing'] else 'off':>13} {r['trainable'] / 1e6:12.2f} "
                     f"{r['seconds_per_step']:8.1f} {r['weights_gb']:11.2f} {r['peak_gb']:8.2f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    args = p.parse_args(argv)
    print(json.dumps(child(args.mode, args.gradient_checkpointing, args.threads, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
