"""Atomic writes: a file or folder appears complete or not at all, with the permissions an ordinary
write would give it (the umask), never the private mode of a temporary file."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from atelier.errors import UserError

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public_mode(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o7777  # replacing a file keeps its mode
    except OSError:
        return default & ~current_umask()


def _new_mode(is_dir: bool) -> int:
    return (0o777 if is_dir else 0o666) & ~current_umask()


@contextmanager
def atomic_open(path, mode: str = "wb", **kwargs):
    """Write to a temporary file beside `path`, then move it into place with os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _public_mode(path, 0o666))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path, what: str = "output") -> Path:
    """Refuse, before any work, a file path that cannot be written: an existing folder, a path
    through a file, or a folder this process may not write to (the nearest one that exists)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {what} {path}: {folder} is not a folder")
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if not os.access(folder, os.W_OK | os.X_OK, **effective):
        raise UserError(f"cannot write {what} {path}: the folder {folder} is not writable")
    return path


def read_text(path, what: str = "file") -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); a missing, unreadable or non-UTF-8 file is
    a UserError of one line naming it as `what`."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} is a folder: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None


def parse_json(text: str, where, expected: type | None = None, shape: str = ""):
    """JSON text as Python objects; invalid JSON, or a top level that is not `expected`, is a UserError
    of one line naming `where` (a file, or file:line) and, with `shape`, what was expected."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if expected is not None and not isinstance(value, expected):
        raise UserError(f"{where}: expected {shape or expected.__name__}")
    return value


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` (a model folder that
    `save_pretrained` fills, say), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        for sub in [tmp, *tmp.rglob("*")]:  # mkdtemp and save_pretrained's temporaries are private
            sub.chmod(_new_mode(sub.is_dir()))
        if path.exists():
            old = path.with_name(f".{path.name}.old{TEMP_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder, name: str | None = None) -> list[Path]:
    """Delete temporaries left beside files in `folder` by a killed writer (of `name` only, if given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    removed = []
    for stale in folder.glob(pattern):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
