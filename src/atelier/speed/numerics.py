"""CPU numerics: flushing denormal floats to zero, and the number of torch threads.

Diffusion UNets on CPU spend most of their time on denormals (tiny floats the CPU handles in
microcode) unless they are flushed: a call of the toy UNet on random latents took 650 ms with
denormals and 26 ms with `torch.set_flush_denormal(True)` on the 2-core machine atelier is built on.
Flushing changes values below ~1e-38 only, far below fp32 noise of a denoising step.
"""

from __future__ import annotations

import os

import torch

from atelier.errors import UserError


def check_threads(threads) -> int:
    most = (os.cpu_count() or 1) * 4
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise UserError(f"--threads must be a whole number from 1 to {most}, got {threads!r}")
    return threads


def apply_cpu_numerics(device=None, *, flush_denormal: bool = True, threads: int | None = None) -> dict:
    """Flush denormals for a CPU run (`device` None or "cpu"; a GPU run is left alone, as its
    kernels flush anyway) and set torch's thread count when `threads` is given.
    Returns what is in force: {"flush_denormal": bool, "threads": int}."""
    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    on_cpu = device is None or torch.device(device).type == "cpu"
    flushed = False
    if on_cpu:
        # False on CPUs without the SSE3/ARM flag for it; then nothing changes
        flushed = bool(torch.set_flush_denormal(bool(flush_denormal))) and bool(flush_denormal)
    return {"flush_denormal": flushed, "threads": torch.get_num_threads()}


def denormals_flushed() -> bool:
    """Whether denormals are being flushed now (a float32 denormal multiplied by 1 comes out as 0)."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    return bool((tiny * 1.0).item() == 0.0)
