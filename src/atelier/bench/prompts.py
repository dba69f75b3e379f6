"""Prompt sets for benchmark runs, read into `PromptItem(id, prompt, category)`.

Three formats, picked by extension (then by content for other extensions):
- MJHQ-30K's `meta_data.json` (`.json`): `{id: {"category": ..., "prompt": ...}}`; a folder holding
  a `meta_data.json` names it too;
- PartiPrompts-style TSV (`.tsv`): a header row with a `Prompt` column and optionally a `Category`
  column (other columns ignored); ids are the data rows' numbers, 1-based and zero-padded;
- a plain prompts file (anything else): one prompt per line, blank lines skipped; ids are the lines'
  numbers in the file, 1-based and zero-padded (so a prompt keeps its id when lines are added after it).

Ids become file names (`{id}_{seed}.png`), so they are limited to letters, digits, `.`, `_` and `-`.
A malformed file is a `UserError` of one line naming the file and the problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from atelier.core.io import parse_json, read_text
from atelier.errors import UserError

MJHQ_FILE = "meta_data.json"
FORMATS = ("mjhq", "tsv", "lines")
ID_WIDTH = 5  # zero padding of numbered ids: 00001
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    category: str | None = None


def prompts_path(path) -> Path:
    """The file a --prompts argument names: the file itself, or a folder's meta_data.json."""
    path = Path(path)
    if path.is_dir():
        if (path / MJHQ_FILE).is_file():
            return path / MJHQ_FILE
        raise UserError(f"prompts folder {path} has no {MJHQ_FILE}")
    return path


def prompt_format(path, text: str | None = None) -> str:
    """"mjhq", "tsv" or "lines": by extension, else by content (a JSON object, a tab-separated
    header with a Prompt column, or plain lines)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "mjhq"
    if suffix == ".tsv":
        return "tsv"
    if suffix in (".txt", ".prompts"):
        return "lines"
    text = _read_text(path) if text is None else text
    if text.lstrip().startswith("{"):
        return "mjhq"
    first = text.split("\n", 1)[0].rstrip("\r")
    if "\t" in first and "prompt" in (c.strip().lower() for c in first.split("\t")):
        return "tsv"
    return "lines"


def read_prompts(path) -> list[PromptItem]:
    """The prompt set at `path` (a file, or a folder holding MJHQ's meta_data.json), in file order."""
    path = prompts_path(path)
    text = _read_text(path)
    kind = prompt_format(path, text)
    items = {"mjhq": _read_mjhq, "tsv": _read_tsv, "lines": _read_lines}[kind](path, text)
    if not items:
        raise UserError(f"prompts file has no prompts: {path}")
    for item in items:
        if not _SAFE_ID.match(item.id):
            raise UserError(f"{path}: id {item.id!r} cannot be a file name (use letters, digits, '.', '_', '-')")
    return items


def _read_text(path) -> str:
    return read_text(path, "prompts file")


def _read_mjhq(path: Path, text: str) -> list[PromptItem]:
    table = parse_json(text, path, dict, 'a JSON object {id: {"prompt": ..., "category": ...}}')
    items = []
    for key, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise UserError(f"{path}: entry {key!r} has no \"prompt\" text")
        category = entry.get("category")
        if category is not None and not isinstance(category, str):
            raise UserError(f"{path}: entry {key!r} has a \"category\" that is not text")
        items.append(PromptItem(str(key), entry["prompt"], category))
    return items


def _number(n: int, total: int) -> str:
    return f"{n:0{max(ID_WIDTH, len(str(total)))}d}"


def _read_lines(path: Path, text: str) -> list[PromptItem]:
    lines = text.splitlines()
    return [PromptItem(_number(n, len(lines)), line.strip()) for n, line in enumerate(lines, 1) if line.strip()]


def _read_tsv(path: Path, text: str) -> list[PromptItem]:
    # Cells are literal (PartiPrompts' prompts hold quotes): split on tabs, no CSV quoting.
    rows = [line.rstrip("\r").split("\t") for line in text.split("\n")]
    while rows and rows[-1] == [""]:
        rows.pop()
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if "prompt" not in header:
        raise UserError(f"{path}: the TSV header has no Prompt column (found: {', '.join(rows[0])})")
    p_col = header.index("prompt")
    c_col = header.index("category") if "category" in header else None
    items = []
    for n, row in enumerate(rows[1:], 1):
        if row == [""]:
            continue
        if len(row) <= max(p_col, c_col or 0):
            raise UserError(f"{path}: line {n + 1} has {len(row)} column(s), fewer than the header's")
        prompt = row[p_col].strip()
        if not prompt:
            raise UserError(f"{path}: line {n + 1} has an empty Prompt")
        category = row[c_col].strip() or None if c_col is not None else None
        items.append(PromptItem(_number(n, len(rows) - 1), prompt, category))
    return items
