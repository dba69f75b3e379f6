"""Generation metadata: A1111 infotext and PNG I/O live in `atelier.core` (re-exported here, where
generation's users look for them); this module adds A1111's file hashes (model, LoRA, embedding)."""

from __future__ import annotations

from pathlib import Path

from atelier.core.images import ImageTooLarge, open_image, read_parameters, save_png  # noqa: F401
from atelier.core.infotext import (  # noqa: F401
    NEGATIVE_PREFIX,
    PARAMETERS_KEY,
    format_parameters,
    image_parameters,
    parse_parameters,
    quote,
    unquote,
)
from atelier.core.io import atomic_open
from atelier.core.facts import MAX_IMAGE_SIDE  # noqa: F401


def model_hash(path, cache_file=None) -> str:
    """A1111's "Model hash" of a checkpoint file: the first 10 hex digits of its SHA-256."""
    return file_sha256(path, cache_file=cache_file)[:10]


def lora_hash(path, cache_file=None) -> str:
    """A1111's hash of a LoRA in `Lora hashes`: the first 12 hex digits of the SHA-256 of a
    .safetensors file's tensor data, its header left out (kohya's `sshs_model_hash`, Civitai's
    AutoV3), or of the whole file for other formats."""
    tensors_only = Path(path).suffix.lower() == ".safetensors"
    return file_sha256(path, safetensors_data=tensors_only, cache_file=cache_file)[:12]


def embedding_hash(path, cache_file=None) -> str:
    """A1111's hash of an embedding in `TI hashes`: the first 12 hex digits of the file's SHA-256."""
    return file_sha256(path, cache_file=cache_file)[:12]


def file_sha256(path, *, safetensors_data: bool = False, cache_file=None) -> str:
    """The SHA-256 of a file (with `safetensors_data`: of what follows its safetensors header).

    Hashing gigabytes takes seconds, so results are kept in a small JSON cache keyed by the file's
    path, size and modification time (A1111 keeps a cache.json the same way).
    """
    import hashlib
    import json as _json

    from atelier.models.loader import atelier_cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{'data' if safetensors_data else 'file'}-sha256|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = Path(cache_file) if cache_file else atelier_cache_dir() / "model_hashes.json"
    try:
        cache = _json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if safetensors_data:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            with atomic_open(cache_file, "w", encoding="utf-8") as f:
                _json.dump(cache, f, indent=1)
        except OSError:
            pass  # an unwritable cache only costs time
    return cache[key]
