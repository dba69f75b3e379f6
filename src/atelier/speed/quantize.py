"""Weight quantization of the Linear layers of a UNet (or any module), through the libraries.

Modes and the backend each uses (backend="auto"):
  int8wo  int8 weights, float activations         optimum-quanto (qint8)                        CPU and CUDA
  int8dq  int8 weights, int8 dynamic activations   torchao (Int8DynamicActivationInt8WeightConfig) CPU and CUDA
  int4wo  int4 weights (groups of 128)             optimum-quanto (qint4)                        CPU and CUDA
  fp8     float8 weights and dynamic activations   torchao (Float8DynamicActivationFloat8WeightConfig) CUDA sm89+ only
int8dq goes to torchao because quanto's activation quantization is static (calibrated ranges), not
dynamic. backend="torchao" also serves int8wo (Int8WeightOnlyConfig), the path the field's
torch.compile numbers come from; torchao's int4wo needs kernels this CPU build lacks;
backend="quanto" also serves int8dq as static int8 activations calibrated by `calibrate` and fp8 as
qfloat8 weights. Only quanto-quantized models can be saved (`save_quantized`: safetensors + quanto's
quantization map; torchao's format is a pickle).

Only nn.Linear layers are quantized (the attention and feed-forward projections); convolutions,
norms and the modules named in `skip` stay in their dtype, as do LoRA layers.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import torch

from atelier.errors import UserError

QUANTIZE_MODES = ("int8wo", "int8dq", "int4wo", "fp8")
BACKENDS = ("auto", "quanto", "torchao")
DEFAULT_SKIP = ("conv_in", "conv_out", "time_embedding")
QMAP_FILE = "quanto_qmap.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def tensor_bytes(tensor) -> int:
    """Bytes a tensor really holds: quantized tensor subclasses (quanto, torchao) are summed over
    the plain tensors inside them (data, scales, zero points)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each shared tensor once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def parse_skip(text) -> tuple[str, ...]:
    """"conv_in,conv_out" or a list -> ("conv_in", "conv_out"); "" or "none" -> ()."""
    if text is None:
        return DEFAULT_SKIP
    items = text.split(",") if isinstance(text, str) else list(text)
    items = tuple(s.strip() for s in items if s and s.strip())
    return () if items in (("none",), ()) else items


def _skipped(name: str, patterns) -> bool:
    """A module is skipped when a pattern names it or one of its parents (fnmatch patterns allowed)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return "lora_" in name or any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def linear_layers(module: torch.nn.Module, skip=DEFAULT_SKIP) -> list[str]:
    """Names of the nn.Linear layers that quantization would change."""
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n and not _skipped(n, skip)]


def fp8_supported(device) -> str | None:
    """None when float8 matmuls run on `device`, else why not (one line)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"--quantize fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (RTX 40xx, L4, H100); this run is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"--quantize fp8 needs compute capability 8.9 or newer (RTX 40xx, L4, H100); "
                f"{torch.cuda.get_device_name(device)} is sm{major}{minor}: use int8wo or int8dq")
    return None


def backend_for(mode: str, backend: str = "auto") -> str:
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization mode {mode!r}: choose from {', '.join(QUANTIZE_MODES)}")
    if backend not in BACKENDS:
        raise UserError(f"unknown quantization backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torchao" if mode in ("int8dq", "fp8") else "quanto"
    if backend == "torchao" and mode == "int4wo":
        raise UserError("--quantize int4wo with torchao needs its CUDA/mslk int4 kernels; use the quanto backend")
    return backend


def _require(package: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"quantization needs {pip_name}: pip install {pip_name}") from None


def quantize_module(module: torch.nn.Module, mode: str, *, skip=DEFAULT_SKIP, backend: str = "auto",
                    device=None, calibrate=None) -> dict:
    """Quantize `module`'s Linear layers in place (but those under `skip`). `device`: where it runs
    (fp8 is refused below CUDA sm89). `calibrate`: for int8dq with quanto, an optional callable that
    runs the module on typical inputs to record activation ranges (without it the ranges
    stay at quanto's defaults and the error is large). Returns {"mode", "backend", "layers", "skipped", "bytes_before", "bytes_after"}."""
    backend = backend_for(mode, backend)
    if mode == "int8dq" and backend == "quanto" and calibrate is None:
        raise UserError("--quantize int8dq with quanto quantizes activations statically and needs calibration "
                        "(quantize_module(..., calibrate=fn)); the torchao backend (default) quantizes them dynamically")
    if mode == "fp8":
        reason = fp8_supported(device if device is not None else next(module.parameters()).device)
        if reason:
            raise UserError(reason)
    skip = parse_skip(skip)
    names = linear_layers(module, skip)
    if not names:
        raise UserError(f"--quantize {mode}: no Linear layer left to quantize (--quantize-skip {','.join(skip)})")
    before = model_bytes(module)
    if backend == "quanto":
        _quanto(module, mode, names, calibrate)
    else:
        _torchao(module, mode, set(names))
    # quanto's packed int4 weights fail under torch.inference_mode ("Cannot set version_counter for
    # inference tensor"): callers that use it (atelier.generate) run these under no_grad instead
    module.atelier_quantized = {"mode": mode, "backend": backend, "inference_mode": not (backend == "quanto" and mode == "int4wo")}
    return {"mode": mode, "backend": backend, "layers": len(names), "skipped": list(skip),
            "bytes_before": before, "bytes_after": model_bytes(module)}


def _quanto(module, mode: str, names: list[str], calibrate) -> None:
    quanto = _require("optimum.quanto", "optimum-quanto")
    weights = {"int8wo": quanto.qint8, "int8dq": quanto.qint8, "int4wo": quanto.qint4, "fp8": quanto.qfloat8}[mode]
    activations = quanto.qint8 if mode == "int8dq" else None
    quanto.quantize(module, weights=weights, activations=activations, include=names)
    if activations is not None and calibrate is not None:
        with torch.no_grad(), quanto.Calibration():
            calibrate()
    quanto.freeze(module)


def _torchao(module, mode: str, names: set[str]) -> None:
    _require("torchao", "torchao")
    from torchao.quantization import quantize_
    import torchao.quantization as ao

    config = {
        "int8wo": lambda: ao.Int8WeightOnlyConfig(),
        "int8dq": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
        "fp8": lambda: ao.Float8DynamicActivationFloat8WeightConfig(),
    }[mode]()
    by_module = {m: n for n, m in module.named_modules()}
    quantize_(module, config, filter_fn=lambda m, fqn=None: by_module.get(m) in names)


# --------------------------------------------------------------------------- save / load


def save_quantized(module, folder) -> Path:
    """Write a quanto-quantized diffusers model (e.g. a UNet) to `folder`: its config.json,
    the quantized weights as safetensors and quanto's quantization map. Load with `load_quantized`."""
    from safetensors.torch import save_file

    info = getattr(module, "atelier_quantized", None)
    if not info or info.get("backend") != "quanto":
        raise UserError("only a model quantized with the quanto backend can be saved (torchao's format is a pickle)")
    quanto = _require("optimum.quanto", "optimum-quanto")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module.save_config(folder)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, os.fspath(folder / WEIGHTS_FILE), metadata={"format": "pt", "atelier_quantize": info["mode"]})
    (folder / QMAP_FILE).write_text(json.dumps({"mode": info["mode"], "map": quanto.quantization_map(module)}, indent=1))
    return folder


def load_quantized(folder, model_class=None, *, device="cpu"):
    """The model `save_quantized` wrote, quantized again from its saved weights (no float copy is
    made). `model_class`: the diffusers class (default: read from config.json's `_class_name`)."""
    import diffusers
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / QMAP_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a quantized model folder (no {QMAP_FILE} / {WEIGHTS_FILE})")
    quanto = _require("optimum.quanto", "optimum-quanto")
    saved = json.loads((folder / QMAP_FILE).read_text())
    config = json.loads((folder / "config.json").read_text())
    cls = model_class or getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise UserError(f"{folder}/config.json names no diffusers model class")
    with torch.device("meta"):
        model = cls.from_config(config)
    quanto.requantize(model, load_file(os.fspath(folder / WEIGHTS_FILE)), saved["map"], device=torch.device(device))
    model.atelier_quantized = {"mode": saved["mode"], "backend": "quanto", "inference_mode": saved["mode"] != "int4wo"}
    return model.eval()
