"""What this machine offers: `atelier speed info`."""

from __future__ import annotations

import importlib.util

import torch

from atelier.speed.attention import attention_backends
from atelier.speed.numerics import denormals_flushed
from atelier.speed.quantize import QUANTIZE_MODES, fp8_supported


def _version(package: str) -> str | None:
    if importlib.util.find_spec(package.split(".")[0]) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"optimum": "optimum-quanto"}.get(package.split(".")[0], package))
    except PackageNotFoundError:
        return "installed"


def speed_info(device=None, dtype=None) -> dict:
    """Device, dtype, attention backends, quantization backends, denormal flushing and threads."""
    from atelier.models import pick_device_dtype

    device, dtype = pick_device_dtype(device, dtype)
    backends = attention_backends(device)
    gpu = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = {"name": torch.cuda.get_device_name(device), "capability": f"sm{major}{minor}"}
    fp8 = fp8_supported(device)
    quanto, torchao = _version("optimum.quanto"), _version("torchao")
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "gpu": gpu,
        "torch": torch.__version__,
        "attention_backends": sorted(n for n, why in backends.items() if why is None),
        "attention_unavailable": {n: why for n, why in sorted(backends.items()) if why is not None},
        "quantization": {
            "optimum-quanto": quanto,
            "torchao": torchao,
            "fp8_capable": fp8 is None,
            "modes": {mode: _mode_status(mode, quanto, torchao, fp8) for mode in QUANTIZE_MODES},
        },
        "flush_denormal": denormals_flushed(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }


def _mode_status(mode: str, quanto, torchao, fp8_reason) -> str:
    from atelier.speed.quantize import backend_for

    backend = backend_for(mode)
    if mode == "fp8" and fp8_reason:
        return f"unavailable: {fp8_reason}"
    installed = {"quanto": quanto, "torchao": torchao}[backend]
    return f"{backend}" if installed else f"unavailable: pip install {'optimum-quanto' if backend == 'quanto' else 'torchao'}"
