"""Load a Stable Diffusion pipeline from whatever the user has: a diffusers folder, an A1111/ComfyUI
single-file checkpoint, a Hugging Face hub id (online or from the local HF cache), or a built-in
toy model. diffusers does the loading; this module decides *how*, refuses what is unsafe (pickles
unless asked), and turns every failure into one clear `UserError` line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from atelier.core.io import atomic_dir
from atelier.errors import UserError
from atelier.models.families import FAMILIES, ModelFamily, detect_family, read_defaults_file
from atelier.models.lora_files import PEFT_PREFIX, diffusers_dora_from_kohya, is_kohya_keys
from atelier.models.singlefile import inspect_checkpoint, modelspec_summary
from atelier.models.tokenizers import open_clip_bpe_path, write_clip_tokenizer

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "weights"
BUILTIN_MODELS = {
    "toyworld": "toy-world text-to-image model (64x64), trained by `atelier train toyworld`",
    "toyworld-turbo": "few-step distilled toy-world model, trained by `atelier train toyworld`",
}
# Built-in parts that are not pipelines: where each is used.
BUILTIN_COMPONENTS = {
    "toyworld-taesd": "tiny autoencoder for the stream (serve --tiny-vae, StreamEngine(vae=...))",
    "toyworld-inverter": "one-step editing's learned inverter (edit --method one-step)",
    "toyworld-ip": "IP-Adapter of toyworld (--ip-image; used without --ip-adapter)",
    "toyworld-turbo-ip": "IP-Adapter of toyworld-turbo: toyworld-ip continued on the turbo",
    "toyworld-clip": "the toy world's CLIP: image encoder of toyworld-ip, features for evaluate",
    "toyworld-tryon": "virtual try-on model (atelier tryon)",
}
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_HELP = (
    "pickle files can run arbitrary code when loaded, so atelier loads only .safetensors by default; "
    "if you trust the file, pass allow_pickle=True (CLI: --allow-pickle), or convert it to .safetensors"
)


# ----------------------------------------------------------------------------- devices


_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "full": torch.float32,
}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32")
    return _DTYPES[key]


def dtype_kwargs(dtype) -> dict:
    """The dtype argument of diffusers' `from_pretrained` / `from_single_file`, spelled as the installed
    diffusers takes it: `dtype=` from 0.40 (which deprecates `torch_dtype=`), `torch_dtype=` before
    (which ignores `dtype=` and would silently load float32)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype": dtype}


def pick_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device to run on and its dtype: CUDA -> fp16, MPS -> fp16, CPU -> fp32 unless asked
    otherwise. Accepts strings ("cuda:1", "mps", "cpu", "auto"; "fp16", "bf16", "fp32")."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} requested but CUDA is not available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("device mps requested but Apple MPS is not available")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {device}: use cpu, cuda, cuda:N or mps")

    requested = parse_dtype(dtype)
    if requested is None:
        return device, torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if requested == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"bf16 requested but {torch.cuda.get_device_name(device)} does not support it: use fp16")
    if requested == torch.float16 and device.type == "cpu":
        raise UserError("fp16 is not supported for CPU inference: use fp32 (or bf16)")
    return device, requested


# ----------------------------------------------------------------------------- sources


def atelier_cache_dir() -> Path:
    """Where atelier keeps files it generates (`$ATELIER_CACHE`, else ~/.cache/atelier)."""
    root = os.environ.get("ATELIER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "atelier"
    )
    return Path(root)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if flag is not None:
        return flag.upper() in constants.ENV_VARS_TRUE_VALUES
    return constants.is_offline_mode()


def list_builtin_models() -> list[dict]:
    """Built-in model names, their folders and whether they have been trained yet."""
    names = dict(BUILTIN_MODELS)
    if BUILTIN_DIR.is_dir():
        for folder in sorted(BUILTIN_DIR.iterdir()):
            if (folder / "model_index.json").is_file():
                names.setdefault(folder.name, "built-in model")
    return [
        {
            "name": name,
            "description": description,
            "path": str(BUILTIN_DIR / name),
            "trained": (BUILTIN_DIR / name / "model_index.json").is_file(),
        }
        for name, description in names.items()
    ]


def list_builtin_components() -> list[dict]:
    """The built-in parts that are not pipelines (BUILTIN_COMPONENTS) that this install has."""
    return [{"name": name, "description": description, "path": str(BUILTIN_DIR / name)}
            for name, description in BUILTIN_COMPONENTS.items() if (BUILTIN_DIR / name).is_dir()]


def _builtin_names() -> set[str]:
    return {m["name"] for m in list_builtin_models()}


def _looks_like_path(text: str) -> bool:
    """Hub ids are exactly "org/name"; anything else with path syntax is meant as a path."""
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(SINGLE_FILE_SUFFIXES + (".json",))
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repo (refs/main), or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=os.fspath(hf_cache_dir()))
    return Path(found).parent if isinstance(found, str) else None


def _not_cached(repo_id: str) -> UserError:
    return UserError(
        f"model '{repo_id}' is not in the Hugging Face cache ({hf_cache_dir()}) and downloads are off "
        "(HF_HUB_OFFLINE): download it once with network access, or pass a local folder or .safetensors file"
    )


def classify_source(source) -> tuple[str, object]:
    """("folder" | "file" | "builtin" | "hub", Path or repo id) for what the user named."""
    if isinstance(source, Path) or (isinstance(source, str) and os.path.exists(os.path.expanduser(source))):
        path = Path(os.path.expanduser(os.fspath(source)))
        if not path.exists():
            raise UserError(f"no such file or folder: {path}")
        return ("folder" if path.is_dir() else "file"), path
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"model must be a path, a built-in name or a hub id, not {source!r}")
    text = source.strip()
    if text in _builtin_names():
        return "builtin", text
    if _HUB_ID.match(text) and not text.lower().endswith(SINGLE_FILE_SUFFIXES):
        return "hub", text
    if _looks_like_path(text):
        raise UserError(f"no such file or folder: {text}")
    names = ", ".join(sorted(_builtin_names()))
    raise UserError(
        f"unknown model '{text}': not a file or folder, not a built-in model ({names}), "
        "and not a hub id of the form org/name"
    )


def resolve_model_path(source) -> Path:
    """The folder (or file) behind a model name: a path as is, a built-in name's folder, or a hub
    id's cached snapshot folder. UserError when there is none."""
    kind, value = classify_source(source)
    if kind in ("folder", "file"):
        return value
    if kind == "builtin":
        folder = BUILTIN_DIR / value
        if not (folder / "model_index.json").is_file():
            raise UserError(f"built-in model '{value}' is not trained yet: run `atelier train toyworld`")
        return folder
    snapshot = _hub_snapshot(value)
    if snapshot is None:
        if hub_offline():
            raise _not_cached(value)
        raise UserError(f"model '{value}' is not in the Hugging Face cache ({hf_cache_dir()}) yet; load it once to download it")
    return snapshot


# ----------------------------------------------------------------------------- bundled configs


def clip_bpe_path() -> Path | None:
    """CLIP's BPE merges file, shipped inside the open_clip package (None when it is absent)."""
    try:
        return open_clip_bpe_path()
    except UserError:
        return None


def _write_bundled_tokenizer(out_dir: Path, pad_token: str) -> None:
    """The real CLIP tokenizer (atelier.models.tokenizers.write_clip_tokenizer), or a clear error."""
    bpe = clip_bpe_path()
    if bpe is None:
        raise UserError(
            "the CLIP tokenizer files (vocab.json, merges.txt) are missing and cannot be downloaded: pass "
            "config=<a local diffusers folder of the base model, with tokenizer/ inside> (for example a "
            "downloaded stable-diffusion-v1-5 folder), or install open_clip_torch (pip install --no-deps "
            "open_clip_torch), whose CLIP merges file atelier turns into the tokenizer"
        )
    write_clip_tokenizer(out_dir, bpe, pad_token=pad_token)


def bundled_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def bundled_config_dir(name: str) -> Path:
    """Materialize a bundled config (model_index.json, component configs, tokenizers; no weights)
    as a diffusers folder in atelier's cache, for `from_single_file(config=...)`."""
    source = CONFIGS_DIR / f"{name}.json"
    if not source.is_file():
        raise UserError(f"no bundled config '{name}': choose from {', '.join(bundled_config_names())} or pass a folder")
    bundle = json.loads(source.read_text(encoding="utf-8"))
    target = atelier_cache_dir() / "configs" / name
    stamp = json.dumps(bundle, sort_keys=True)
    if (target / ".bundle.json").is_file() and (target / ".bundle.json").read_text(encoding="utf-8") == stamp:
        return target
    with atomic_dir(target) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(bundle["model_index"], indent=2), encoding="utf-8")
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if component in bundle:
                (tmp / component).mkdir()
                (tmp / component / "config.json").write_text(json.dumps(bundle[component], indent=2), encoding="utf-8")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(bundle["scheduler"], indent=2), encoding="utf-8")
        for component in ("tokenizer", "tokenizer_2"):
            if component in bundle:
                _write_bundled_tokenizer(tmp / component, bundle[component]["pad_token"])
        if "atelier" in bundle:
            (tmp / "atelier.json").write_text(json.dumps(bundle["atelier"], indent=2), encoding="utf-8")
        (tmp / ".bundle.json").write_text(stamp, encoding="utf-8")
    return target


# ----------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _load_errors() -> tuple[type[BaseException], ...]:
    """What diffusers' loaders raise on a bad model: the usual kinds, safetensors' own error for a
    damaged or non-safetensors weight file, and single-file loading's missing-component error."""
    from safetensors import SafetensorError

    try:
        from diffusers.loaders.single_file_utils import SingleFileComponentError
    except ImportError:  # older diffusers
        SingleFileComponentError = ValueError
    return (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError, SingleFileComponentError)


def _unreadable_weights(root: Path) -> UserError | None:
    """A UserError naming the first .safetensors file under `root` that is damaged, if any."""
    from safetensors import safe_open

    for path in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
            return UserError(f"{path} is damaged or not a safetensors file ({_first_line(exc)}): download or save it again")
    return None


def _read_model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        hint = ""
        singles = sorted(p.name for p in folder.glob("*") if p.suffix in SINGLE_FILE_SUFFIXES)
        if singles:
            hint = f"; to load a single-file checkpoint, pass the file itself (e.g. {folder / singles[0]})"
        raise UserError(f"{folder} is not a diffusers model folder (no model_index.json){hint}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise UserError(f"{path} is not a diffusers model index (no _class_name)")
    return index


def _check_folder_weights(folder: Path, index: dict, allow_pickle: bool) -> None:
    """Every weighted component must have safetensors weights unless pickles are allowed."""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [p.name for p in sub.iterdir()]
        has_safetensors = any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files)
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
        if pickles and not has_safetensors and not allow_pickle:
            raise UserError(f"{sub} has only pickle weights ({pickles[0]}): {_PICKLE_HELP}")


def _safety_kwargs(index: dict, safety_checker: bool) -> dict:
    """Remove the safety checker the supported way: pass None and requires_safety_checker=False."""
    if safety_checker or "safety_checker" not in index:
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


def _load_folder(folder: Path, *, dtype, allow_pickle: bool, safety_checker: bool):
    from diffusers import DiffusionPipeline

    index = _read_model_index(folder)
    _check_folder_weights(folder, index, allow_pickle)
    try:
        return DiffusionPipeline.from_pretrained(
            os.fspath(folder),
            **dtype_kwargs(dtype),
            use_safetensors=None if allow_pickle else True,
            local_files_only=True,
            **_safety_kwargs(index, safety_checker),
        )
    except _load_errors() as exc:
        raise _unreadable_weights(folder) or UserError(f"cannot load the diffusers folder {folder}: {_first_line(exc)}") from None


def _single_file_family(path: Path, allow_pickle: bool):
    """(family, metadata) of a checkpoint file, refusing pickles unless allowed."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{path.name} is a pickle checkpoint: {_PICKLE_HELP}")
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        from atelier.models.singlefile import family_from_keys

        try:
            keys = load_single_file_checkpoint(os.fspath(path), local_files_only=True).keys()
        except Exception as exc:  # torch.load raises many kinds on a bad file
            raise UserError(f"cannot read {path} as a checkpoint ({_first_line(exc)})") from None
        return family_from_keys(keys), {}
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: not a model file (expected .safetensors, or a diffusers folder)")
    info = inspect_checkpoint(path)
    return info.family, info.metadata


def _config_for_single_file(path: Path, family: str | None, metadata: dict, config) -> Path:
    if config is not None:
        if isinstance(config, str) and not os.path.exists(os.path.expanduser(config)) and "/" not in config and os.sep not in config:
            return bundled_config_dir(config)
        folder = Path(os.path.expanduser(os.fspath(config)))
        if not folder.is_dir():
            raise UserError(f"config must be a local diffusers folder or one of {', '.join(bundled_config_names())}; {folder} is not a folder")
        _read_model_index(folder)
        return folder
    if family is None:
        raise UserError(f"{path.name} is not a Stable Diffusion 1.x/2.x/XL checkpoint (unrecognized keys)")
    if family == "sd2":
        spec = modelspec_summary(metadata)
        text = " ".join(str(v) for v in spec.values()).lower()
        if "768-v" in text or spec.get("prediction_type") in ("v", "v_prediction"):
            return bundled_config_dir("sd2")
        if "512" in spec.get("architecture", "") or spec.get("prediction_type") == "epsilon":
            return bundled_config_dir("sd2-base")
        raise UserError(
            f"{path.name} is an SD 2.x checkpoint, and SD 2.x comes as 768-v (v-prediction) or 512-base "
            "(epsilon) with nothing in the file to tell which: pass config='sd2' (2.0-v/2.1), "
            "config='sd2-base' or config='sd-turbo', or a diffusers folder of the base model"
        )
    return bundled_config_dir(family)


def _family_of_config(folder: Path) -> str:
    index = _read_model_index(folder)
    if "XL" in index["_class_name"] or "text_encoder_2" in index:
        return "sdxl"
    te = folder / "text_encoder" / "config.json"
    if te.is_file():
        return "sd2" if json.loads(te.read_text(encoding="utf-8")).get("hidden_act") == "gelu" else "sd1"
    return "sd1"


def _load_single_file(path: Path, *, config, dtype, allow_pickle: bool, safety_checker: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family, metadata = _single_file_family(path, allow_pickle)
    config_dir = _config_for_single_file(path, family, metadata, config)
    config_family = _family_of_config(config_dir)
    if family is not None and family != config_family:
        raise UserError(f"{path.name} holds an {family} model but the config {config_dir} is for {config_family}")
    cls = StableDiffusionXLPipeline if config_family == "sdxl" else StableDiffusionPipeline
    extra = {} if safety_checker or config_family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(
            os.fspath(path), config=os.fspath(config_dir), local_files_only=True, **dtype_kwargs(dtype), **extra
        )
    except _load_errors() as exc:
        if type(exc).__name__ == "SingleFileComponentError":
            raise UserError(
                f"{path.name} is not a complete {config_family} checkpoint: {_first_line(exc)} (a UNet-only, "
                "VAE-only or LoRA file cannot be loaded as a model: load the full checkpoint, and apply a LoRA with --lora)"
            ) from None
        raise UserError(f"cannot load {path.name} with the config {config_dir}: {_first_line(exc)}") from None
    return pipe, config_dir


def _load_hub(repo_id: str, *, dtype, allow_pickle: bool, safety_checker: bool):
    from diffusers import DiffusionPipeline

    snapshot = _hub_snapshot(repo_id)
    if hub_offline():
        if snapshot is None:
            raise _not_cached(repo_id)
        return _load_folder(snapshot, dtype=dtype, allow_pickle=allow_pickle, safety_checker=safety_checker), snapshot
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    # Before the first download the model index is unknown; SDXL pipelines ignore (and warn about)
    # the safety-checker arguments, SD 1.x/2.x pipelines use them.
    index = _read_model_index(snapshot) if snapshot is not None else {"safety_checker": None}
    kwargs = _safety_kwargs(index, safety_checker)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            repo_id,
            **dtype_kwargs(dtype),
            use_safetensors=None if allow_pickle else True,
            cache_dir=os.fspath(hf_cache_dir()),
            **kwargs,
        )
    except GatedRepoError:
        raise UserError(f"model '{repo_id}' is gated: accept its license on huggingface.co and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model '{repo_id}' on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, *_load_errors()) as exc:
        message = _first_line(exc)
        if "safetensors" in message.lower() and not allow_pickle:
            raise UserError(f"model '{repo_id}' has no safetensors weights for some component: {_PICKLE_HELP}") from None
        raise UserError(f"cannot load model '{repo_id}' from the hub: {message}") from None
    return pipe, _hub_snapshot(repo_id)


def ensure_sdpa(pipe) -> None:
    """Make every attention layer use PyTorch's scaled_dot_product_attention (AttnProcessor2_0).
    diffusers picks it by default on torch 2; this re-asserts it after loading."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is None or not hasattr(model, "attn_processors"):
            continue
        if not all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values()):
            model.set_attn_processor(AttnProcessor2_0())


def _record(pipe, source, folder: Path | None):
    pipe.atelier_source = str(source)
    pipe.atelier_defaults = read_defaults_file(folder) if folder is not None and folder.is_dir() else {}
    pipe.atelier_lcm_lora = False
    pipe.atelier_loras = []
    pipe.atelier_lora_paths = {}
    pipe.atelier_embeddings = []
    return pipe


def load_pipeline(
    source,
    *,
    device=None,
    dtype=None,
    allow_pickle: bool = False,
    safety_checker: bool = True,
    config=None,
    lora=None,
    lcm: bool | None = None,
):
    """Load a text-to-image pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline).

    source: a diffusers folder (with model_index.json); a single-file checkpoint (.safetensors,
      A1111/ComfyUI layout; pickles only with allow_pickle); a hub id "org/name" (online, or from the
      HF cache when HF_HUB_OFFLINE=1); or a built-in name ("toyworld", "toyworld-turbo").
    config: for single files only — a local diffusers folder of the matching base model, or a bundled
      config name (sd1, sd2, sd2-base, sd-turbo, sdxl, sdxl-turbo). Without it the family is read from
      the checkpoint's keys.
    safety_checker: False removes the model's safety checker (if it ships one).
    lora: a LoRA .safetensors path, or a list of paths or (path, scale) pairs, applied with
      `apply_lora`; lcm forces (True) or forbids (False) the LCM-LoRA scheduler switch.
    The model's family and defaults are available with `detect_family(pipe)`.
    """
    kind, value = classify_source(source)
    if kind in ("folder", "builtin") and (resolve_model_path(source) / "export.json").is_file():
        return _load_exported(source, resolve_model_path(source), device=device, dtype=dtype, config=config, lora=lora)
    device, dtype = pick_device_dtype(device, dtype)
    if config is not None and kind != "file":
        raise UserError("config= applies to single-file checkpoints only; folders and hub models carry their own")
    folder: Path | None
    if kind == "folder":
        folder = value
        pipe = _load_folder(value, dtype=dtype, allow_pickle=allow_pickle, safety_checker=safety_checker)
    elif kind == "builtin":
        folder = resolve_model_path(value)
        pipe = _load_folder(folder, dtype=dtype, allow_pickle=allow_pickle, safety_checker=safety_checker)
    elif kind == "file":
        pipe, folder = _load_single_file(
            value, config=config, dtype=dtype, allow_pickle=allow_pickle, safety_checker=safety_checker
        )
    else:
        pipe, folder = _load_hub(value, dtype=dtype, allow_pickle=allow_pickle, safety_checker=safety_checker)
    if not hasattr(pipe, "unet") or getattr(pipe, "text_encoder", None) is None:
        raise UserError(f"{source} is a {type(pipe).__name__}, not a Stable Diffusion text-to-image model")
    _record(pipe, source, folder)
    detect_family(pipe)  # fails clearly now on a model atelier cannot drive
    ensure_sdpa(pipe)
    _place(pipe.components.values(), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for path, scale in _lora_list(lora):
        apply_lora(pipe, path, scale, lcm=lcm, allow_pickle=allow_pickle)
    return pipe


def _load_exported(source, folder: Path, *, device, dtype, config, lora):
    """An exported folder (`atelier export`): its runtimes run on the CPU in float32, with no LoRA."""
    from atelier.runtime.modules import load_exported

    if device is not None and str(device) not in ("auto", "cpu"):
        raise UserError(f"{folder} is an exported model, which runs on the CPU only: leave out the device {device}")
    if parse_dtype(dtype) not in (None, torch.float32):
        raise UserError(f"{folder} is an exported model, which runs in float32 only: leave out the dtype {dtype}")
    if config is not None:
        raise UserError("config= applies to single-file checkpoints only; an exported folder carries its own")
    if lora:
        raise UserError(f"{folder} is an exported model, whose weights are compiled: export the model with the LoRA applied instead")
    pipe = _record(load_exported(folder), source, folder)
    detect_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _place(modules, device, dtype) -> None:
    """Every module on `device` in `dtype`, whatever the loader did with the dtype it was given."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to(device)
            if module.dtype != dtype:
                module.to(dtype)


def _lora_list(lora) -> list[tuple[object, float]]:
    """`lora=` as [(path, scale), ...]: accepts one path, or a list of paths and (path, scale) pairs."""
    if lora is None:
        return []
    if isinstance(lora, (str, Path)):
        lora = [lora]
    return [(item[0], float(item[1])) if isinstance(item, (tuple, list)) else (item, 1.0) for item in lora]


# ----------------------------------------------------------------------------- LoRA


def is_lcm_lora(path, metadata: dict | None = None) -> bool:
    """LCM-LoRA detection: the file's metadata mentions LCM / latent consistency, or its file name
    (or the hub repo folder it sits in) carries an `lcm` word, as in `lcm-lora-sdv1-5`. The weights
    themselves look like any other LoRA, so pass lcm=True to `apply_lora` when neither says so."""
    marker = re.compile(r"(^|[^a-z])lcm([^a-z]|$)|latent[ _-]?consistency")
    for key, value in (metadata or {}).items():
        if marker.search(f"{key} {value}".lower()):
            return True
    path = Path(path)
    names = [path.stem] + [p.name for p in path.parents[:3]]
    return any(marker.search(n.lower()) for n in names)


def load_lora_adapter(pipe, path, *, adapter_name: str | None = None, allow_pickle: bool = False) -> str:
    """Load a LoRA file (.safetensors; kohya/A1111 with or without DoRA, diffusers, or peft's
    `adapter_model.safetensors` with its `adapter_config.json` beside it) into `pipe` as a new adapter
    with diffusers' PEFT backend, without changing which adapters are active. Its file is recorded in
    `pipe.atelier_lora_paths` (adapter name -> path). Returns the adapter name."""
    path, keys = _lora_file(path, allow_pickle)
    paths = getattr(pipe, "atelier_lora_paths", None)
    if paths is None:
        paths = pipe.atelier_lora_paths = {}
    taken = set(paths) | {n for names in _adapters(pipe).values() for n in names}
    base = adapter_name or re.sub(r"\W+", "_", path.stem).strip("_") or "lora"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    try:
        if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
            _load_peft_adapter(pipe, path, keys, name)
        elif is_kohya_keys(keys) and any(k.endswith(".dora_scale") for k in keys):
            from safetensors.torch import load_file

            pipe.load_lora_weights(diffusers_dora_from_kohya(load_file(os.fspath(path)), pipe.unet.config), adapter_name=name)
        else:
            pipe.load_lora_weights(os.fspath(path.parent), weight_name=path.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        raise UserError(f"cannot apply LoRA {path.name} to this {detect_family(pipe).family} model: {_first_line(exc)}") from None
    if not any(name in names for names in _adapters(pipe).values()):
        raise UserError(f"LoRA {path.name} matched no layer of this {detect_family(pipe).family} model: is it a LoRA for another model?")
    paths[name] = path
    activate_loras(pipe, getattr(pipe, "atelier_loras", None) or [])  # loading activated the new adapter alone
    return name


def apply_lora(pipe, path, scale: float = 1.0, *, lcm: bool | None = None, adapter_name: str | None = None,
               allow_pickle: bool = False):
    """Load a LoRA file (see `load_lora_adapter`) and activate it at `scale` next to those already
    applied (`pipe.atelier_loras`: [(adapter name, scale)]). For an LCM-LoRA (detected, or lcm=True)
    the scheduler becomes an LCMScheduler built on the model's scheduler config.
    Returns the adapter name."""
    from diffusers import LCMScheduler

    name = load_lora_adapter(pipe, path, adapter_name=adapter_name, allow_pickle=allow_pickle)
    path = pipe.atelier_lora_paths[name]
    loras = getattr(pipe, "atelier_loras", None)
    if loras is None:
        loras = pipe.atelier_loras = []
    loras.append((name, float(scale)))
    activate_loras(pipe, loras)
    metadata = inspect_checkpoint(path).metadata if path.suffix.lower() == ".safetensors" else {}
    use_lcm = is_lcm_lora(path, metadata) if lcm is None else lcm
    if use_lcm:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.atelier_lcm_lora = True
    return name


def _lora_file(path, allow_pickle: bool) -> tuple[Path, list[str]]:
    """The LoRA file's path and tensor names, refusing what atelier does not load."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise UserError(f"no such LoRA file: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"LoRA {path.name} is a pickle file: {_PICKLE_HELP}")
        return path, []
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA {path.name}: expected a .safetensors file")
    return path, inspect_checkpoint(path).keys


def _adapters(pipe) -> dict:
    try:
        return pipe.get_list_adapters()
    except ValueError:  # no PEFT backend
        return {}


def activate_loras(pipe, active) -> None:
    """Make exactly these adapters active: [(adapter name, weight)], the weight a number or a
    (text encoder, UNet) pair as in A1111's `<lora:name:te:unet>`. An empty list switches LoRAs off."""
    if not active:
        if _adapters(pipe):
            pipe.disable_lora()
        return
    present = _adapters(pipe)
    weights = []
    for name, weight in active:
        if isinstance(weight, (tuple, list)):
            text, unet = (float(w) for w in weight)
            weight = {c: (unet if c == "unet" else text) for c, names in present.items() if name in names}
        weights.append(weight)
    pipe.enable_lora()
    pipe.set_adapters([n for n, _ in active], adapter_weights=weights)


_UNET_MODULES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")


def _load_peft_adapter(pipe, path: Path, keys: list[str], name: str) -> None:
    """A UNet LoRA as `peft`'s `save_pretrained` writes it (`adapter_model.safetensors`, keys under
    `base_model.model.`, its LoraConfig in `adapter_config.json`): loaded through diffusers with that
    config, so lora_alpha, rank patterns and DoRA apply as trained."""
    from safetensors.torch import load_file

    modules = {k[len(PEFT_PREFIX):] for k in keys}
    if not all(m.startswith(_UNET_MODULES) for m in modules):
        raise UserError(
            f"LoRA {path.name} is a peft adapter for something other than a UNet (e.g. {sorted(modules)[0]}); "
            "atelier loads peft adapters of the UNet, and text-encoder LoRAs in diffusers or kohya format"
        )
    config_path = path.parent / "adapter_config.json"
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{config_path} is not valid JSON: {exc}") from None
    state = {"unet." + k[len(PEFT_PREFIX):]: v for k, v in load_file(os.fspath(path)).items()}
    metadata = {f"unet.{k}": v for k, v in config.items()} if isinstance(config, dict) else None
    pipe.unet.load_lora_adapter(state, prefix="unet", adapter_name=name, metadata=metadata)


# ----------------------------------------------------------------------------- tiny autoencoders

TINY_AUTOENCODERS = {"toyworld-taesd": "TAESD-style tiny autoencoder for the toy-world models"}


def resolve_tiny_autoencoder(source, *, download: bool = True) -> Path | str:
    """The folder of a tiny autoencoder source (a built-in name, a folder, or a hub id in the HF
    cache), or the hub id itself when it is to be downloaded (`download` and online)."""
    if isinstance(source, str) and source in TINY_AUTOENCODERS:
        folder = BUILTIN_DIR / source
        if not (folder / "config.json").is_file():
            raise UserError(f"built-in tiny autoencoder '{source}' is not trained yet: run `atelier train toyworld --stages taesd`")
        return folder
    if isinstance(source, (str, Path)) and os.path.isdir(os.path.expanduser(os.fspath(source))):
        return Path(os.path.expanduser(os.fspath(source)))
    if isinstance(source, str) and _HUB_ID.match(source):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json", cache_dir=os.fspath(hf_cache_dir()))
        if isinstance(found, str):
            return Path(found).parent
        if hub_offline() or not download:
            raise _not_cached(source)
        return source
    raise UserError(f"tiny autoencoder {source!r}: not a folder, a hub id or one of {', '.join(TINY_AUTOENCODERS)}")


def is_tiny_autoencoder_source(source) -> bool:
    """Whether `source` is a tiny autoencoder: a built-in one, or a folder or cached hub id whose
    config.json is an AutoencoderTiny's (an exported one's too). Never downloads."""
    try:
        folder = resolve_tiny_autoencoder(source, download=False)
    except UserError:
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "AutoencoderTiny"


def load_tiny_autoencoder(source, *, device=None, dtype=None, download: bool = True):
    """An AutoencoderTiny (TAESD, madebyollin/taesd or taesdxl) from a folder, a hub id (online unless
    `download` is False, or cached) or the built-in "toyworld-taesd": StreamDiffusion's fast VAE for
    the stream. A folder written by `atelier export` gives its ExportedTinyVAE (CPU, float32 only)."""
    from diffusers import AutoencoderTiny

    folder = resolve_tiny_autoencoder(source, download=download)
    if isinstance(folder, Path) and (folder / "export.json").is_file():
        tiny = _load_exported_tiny(folder, device, dtype)
    else:
        device, dtype = pick_device_dtype(device, dtype)
        if isinstance(folder, Path) and not any(p.name.endswith(".safetensors") for p in folder.iterdir()):
            raise UserError(f"{folder} has no .safetensors weights for a tiny autoencoder")
        try:
            tiny = AutoencoderTiny.from_pretrained(folder, use_safetensors=True, **dtype_kwargs(dtype))
        except _load_errors() as exc:
            damaged = _unreadable_weights(folder) if isinstance(folder, Path) else None
            raise damaged or UserError(f"cannot load a tiny autoencoder from {folder}: {_first_line(exc)}") from None
        _place([tiny], device, dtype)
    tiny.atelier_source = str(source)
    return tiny.eval()


def _load_exported_tiny(folder: Path, device, dtype):
    """An exported tiny autoencoder: on the CPU in float32, whatever the default device; asking for
    another device or dtype is refused in one line (ExportedModule.to)."""
    from atelier.runtime.modules import load_exported_tiny_autoencoder

    tiny = load_exported_tiny_autoencoder(folder)
    tiny.to(device="cpu" if device is None or str(device) == "auto" else device, dtype=parse_dtype(dtype) or torch.float32)
    return tiny


# ----------------------------------------------------------------------------- img2img


def to_img2img(pipe):
    """The image-to-image pipeline sharing `pipe`'s components (no copies)."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    for attr in ("atelier_source", "atelier_defaults", "atelier_lcm_lora", "atelier_loras", "atelier_lora_paths",
                 "atelier_prompt_loras", "atelier_embeddings"):
        if hasattr(pipe, attr):
            setattr(img2img, attr, getattr(pipe, attr))
    return img2img


__all__ = [
    "BUILTIN_DIR",
    "FAMILIES",
    "activate_loras",
    "apply_lora",
    "bundled_config_dir",
    "bundled_config_names",
    "classify_source",
    "dtype_kwargs",
    "ensure_sdpa",
    "is_lcm_lora",
    "list_builtin_models",
    "load_lora_adapter",
    "load_pipeline",
    "load_tiny_autoencoder",
    "resolve_tiny_autoencoder",
    "is_tiny_autoencoder_source",
    "pick_device_dtype",
    "resolve_model_path",
    "to_img2img",
    "clip_bpe_path",
]
