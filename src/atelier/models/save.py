"""Write model folders that load anywhere: in plain diffusers, on transformers 4.x and 5.x alike.

`save_pretrained` on the current stack writes folders that older readers misread:

* transformers 5 saves `CLIPTextModel` without its `text_model.` key prefix; transformers 4.x then
  finds none of its keys and silently keeps a randomly initialised text encoder.
* the tokenizer is saved as `tokenizer.json` only; transformers 4.x's `CLIPTokenizer` (the class
  the model index names) needs `vocab.json` and `merges.txt`.
* the text encoder's config records the dtype it was saved in (`"dtype": "float16"`); transformers
  5 loads it in that dtype by default, so a plain float32 load mixes fp16 and fp32 modules.

`make_portable(folder)` fixes all three in a saved folder without changing any weight value;
`save_model_folder(model, out)` is `save_pretrained` + `make_portable`, written atomically. Every
model folder atelier writes goes through it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from atelier.core.io import atomic_dir

CLIP_TEXT_MODEL_TYPES = ("clip_text_model",)
_TEXT_PREFIXES = ("text_model.", "text_projection.")
_LOAD_TIME_KEYS = ("is_local", "local_files_only")  # transformers 5 records how it was loaded, not what it is


@contextlib.contextmanager
def _cast(model, dtype):
    """Cast every module of `model` (a pipeline or one model) to `dtype`, restoring each one's own
    dtype afterwards."""
    if dtype is None:
        yield
        return
    components = getattr(model, "components", None)
    modules = [m for m in (components.values() if isinstance(components, dict) else [model]) if isinstance(m, torch.nn.Module)]
    before = []
    for module in modules:
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        before.append((module, floats[0] if floats else None))
        module.to(dtype)
    try:
        yield
    finally:
        for module, original in before:
            if original is not None:
                module.to(original)


def save_model_folder(model, out, *, dtype=torch.float16, files: dict[str, str | bytes] | None = None) -> Path:
    """Save a diffusers pipeline or model as a portable folder at `out`, atomically replacing it.

    dtype: the storage dtype of the weights (None keeps each module's own); the modules are
    restored afterwards. files: extra files written into the folder (text, e.g. atelier.json, or bytes).
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        with _cast(model, dtype):
            model.save_pretrained(tmp, safe_serialization=True)
        make_portable(tmp)
        for name, content in (files or {}).items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    return out


def make_portable(folder) -> list[str]:
    """Rewrite a saved diffusers folder (pipeline or single model) in place so that transformers 4.x
    and 5.x both load it, and load it in float32 by default. Returns what was changed."""
    folder = Path(folder)
    changed = []
    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        config = _read_json(sub / "config.json")
        if config is not None and _without_source_paths(config):
            _write_json(sub / "config.json", config)
            changed.append(f"{sub.name}/config.json: the folder it was loaded from, removed")
        if config is not None and config.get("model_type") in CLIP_TEXT_MODEL_TYPES:
            changed += _portable_text_encoder(sub, config)
        if (sub / "tokenizer.json").is_file():
            changed += _portable_tokenizer(sub)
    return changed


def _without_source_paths(config: dict) -> bool:
    """Drop `_name_or_path` (where the saved model was loaded from: a path of the machine that wrote
    it, meaningless elsewhere) from a config and its sub-configs; whether anything was dropped."""
    dropped = config.pop("_name_or_path", None) is not None
    for value in config.values():
        if isinstance(value, dict):
            dropped = _without_source_paths(value) or dropped
    return dropped


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prefixed(key: str) -> str:
    return key if key.startswith(_TEXT_PREFIXES) else "text_model." + key


def _portable_text_encoder(folder: Path, config: dict) -> list[str]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(os.fspath(path), framework="pt") as handle:
            keys = list(handle.keys())
            if all(k == _prefixed(k) for k in keys):
                continue
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {_prefixed(k): handle.get_tensor(k) for k in keys}
        save_file(tensors, os.fspath(path), metadata=metadata)
        changed.append(f"{path.relative_to(folder.parent)}: text_model. key prefix")
    index_path = folder / "model.safetensors.index.json"
    index = _read_json(index_path)
    if index is not None and any(k != _prefixed(k) for k in index.get("weight_map", {})):
        index["weight_map"] = {_prefixed(k): v for k, v in index["weight_map"].items()}
        _write_json(index_path, index)
    if config.get("dtype") not in (None, "float32") or config.get("torch_dtype") not in (None, "float32") or "dtype" not in config:
        config.pop("torch_dtype", None)
        config["dtype"] = "float32"  # what a load without an explicit dtype gives, as for diffusers' own models
        _write_json(folder / "config.json", config)
        changed.append(f"{folder.name}/config.json: dtype float32")
    return changed


def _portable_tokenizer(folder: Path) -> list[str]:
    """Write the BPE model's vocab.json + merges.txt beside tokenizer.json (with the `tokenizers`
    library, which reads and writes both formats), and check that both give the same ids."""
    from tokenizers import Tokenizer

    changed = []
    fast = Tokenizer.from_file(os.fspath(folder / "tokenizer.json"))
    if type(fast.model).__name__ != "BPE":
        return changed
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        fast.model.save(os.fspath(folder))
        changed.append(f"{folder.name}: vocab.json, merges.txt")
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
    if config is not None and any(k in config for k in _LOAD_TIME_KEYS):
        for key in _LOAD_TIME_KEYS:
            config.pop(key, None)
        _write_json(config_path, config)
        changed.append(f"{folder.name}/tokenizer_config.json: load-time keys removed")
    check_tokenizer_files(folder)
    return changed


def check_tokenizer_files(folder, texts=None) -> None:
    """Raise if the tokenizer built from vocab.json + merges.txt and the one in tokenizer.json tokenize
    `texts` (default: every whole word of the vocabulary, and sentences of them) differently."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    folder = Path(folder)
    fast = Tokenizer.from_file(os.fspath(folder / "tokenizer.json"))
    slow = Tokenizer.from_str(fast.to_str())
    model = json.loads(fast.to_str())["model"]
    slow.model = BPE.from_file(
        os.fspath(folder / "vocab.json"), os.fspath(folder / "merges.txt"),
        unk_token=model.get("unk_token"), end_of_word_suffix=model.get("end_of_word_suffix"),
        continuing_subword_prefix=model.get("continuing_subword_prefix"),
    )
    if texts is None:
        words = sorted(t.removesuffix("</w>") for t in fast.get_vocab() if t.endswith("</w>"))[:5000]
        texts = words + [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    for text in texts:
        if fast.encode(text).ids != slow.encode(text).ids:
            raise RuntimeError(f"{folder}: vocab.json/merges.txt tokenize {text!r} differently from tokenizer.json")
