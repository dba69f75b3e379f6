"""Atomic, pickle-free training checkpoints.

Module and optimizer state go to one safetensors file (tensors) plus the JSON skeleton of the
nested state (numbers, lists, the names of the tensors), so resuming never unpickles anything.
Written by hand because accelerate's save_state pickles the optimizer.

Writing a checkpoint keeps the one before it (`<name>.previous.safetensors`); a checkpoint that
cannot be read is set aside (`<name>.damaged`) and the previous one is loaded instead."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from atelier.core.io import atomic_open, remove_stale_temporaries
from atelier.errors import UserError


def _flatten(obj, prefix: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def previous_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_state(path: str | os.PathLike, state: dict, keep_previous: bool = True) -> None:
    """Save a nested dict of tensors / numbers / lists as one safetensors file, atomically; the
    nested structure rides in the file's metadata. The file it replaces becomes the previous one."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    data = save_bytes(tensors, metadata={"atelier_state": json.dumps(skeleton)})
    with atomic_open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the new file is whole before the old one steps aside
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))


def read_state(path: str | os.PathLike) -> dict:
    """The state in `path`; ValueError (with the reason) when the file is not a readable checkpoint."""
    try:
        with safe_open(path, framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["atelier_state"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _unflatten(skeleton, tensors)
    except Exception as exc:  # safetensors raises its own SafetensorError, others raise what they find
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(reason[:200]) from None


def load_state(path: str | os.PathLike, required=()) -> dict | None:
    """The state saved at `path`, or None when there is none. A damaged file (or one without the
    `required` keys) is renamed `<file>.damaged` and the previous checkpoint is used, with one line on
    stderr; UserError when no good checkpoint is left."""
    path = Path(path)
    return load_first_good([path, previous_path(path)], required)


def load_first_good(candidates, required=()) -> dict | None:
    """The state of the first readable file of `candidates` (newest first) that has the `required` keys;
    the damaged ones before it are renamed `<file>.damaged` (one line on stderr). None when there is no
    file; UserError when none of them is good."""
    candidates = [Path(p) for p in candidates if Path(p).is_file()]
    problems = []
    for candidate in candidates:
        try:
            state = read_state(candidate)
            missing = [key for key in required if not isinstance(state, dict) or key not in state]
            if missing:
                raise ValueError(f"no {', '.join(missing)} in it")
        except ValueError as exc:
            problems.append(f"{candidate} is damaged ({exc})")
            os.replace(candidate, candidate.with_name(candidate.name + ".damaged"))
            continue
        if problems:
            print(f"atelier: warning: {problems[0]}; resuming from the previous checkpoint {candidate}", file=sys.stderr)
        return state
    if problems:
        raise UserError(f"{'; '.join(problems)}; no good checkpoint is left: run again to start this stage afresh")
    return None


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files an interrupted atomic write (kill -9) left in `folder`:
    `.NAME.XXXX.tmp` (atelier.core.io.atomic_open) and the older `.NAME.safetensors.XXXX`."""
    folder = Path(folder)
    removed = remove_stale_temporaries(folder)
    if folder.is_dir():
        for p in folder.glob(".*.safetensors.*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
