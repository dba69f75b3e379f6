"""benchmarks/RESULTS.md is written only by the benchmark scripts: each owns one section, delimited by
HTML comment markers, and rewrites it (atomically) with the command line that produced it."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from atelier.core.io import atomic_open

REPO = Path(__file__).resolve().parents[1]
# Environment variables that change what a benchmark measures; shown in front of the command.
MEASURED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")


def _begin(key: str) -> str:
    return f"<!-- begin {key} -->"


def _end(key: str) -> str:
    return f"<!-- end {key} -->"


def _relative(arg: str) -> str:
    """An absolute path inside the repository as a path relative to its root (also in --opt=PATH)."""
    prefix, sep, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    path = Path(value).resolve()
    if not path.is_relative_to(REPO):
        raise ValueError(f"{value} is outside the repository; a command in RESULTS.md must not name paths of this machine")
    return prefix + sep + str(path.relative_to(REPO))


def command_line(script: str, argv=None, environ=None) -> str:
    """The command that reproduces this run from the repository root: measured environment variables,
    `python benchmarks/<script>` and the arguments as given, with repository paths made relative."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    env = [f"{k}={shlex.quote(environ[k])}" for k in MEASURED_ENV if k in environ]
    script = Path(script).resolve().relative_to(REPO)
    return " ".join([*env, "python", str(script), *(shlex.quote(_relative(a)) for a in argv)])


def check_command(script: str, argv=None) -> None:
    """Fail before the benchmark runs, not after, when its command could not go into RESULTS.md."""
    try:
        command_line(script, argv)
    except ValueError as e:
        raise SystemExit(f"{Path(script).name}: error: {e}") from None


def section_text(key: str, title: str, body: str, command: str, notes: str = "") -> str:
    out = f"{_begin(key)}\n## {title}\n\nCommand (repository root):\n\n    {command}\n\n"
    if notes.strip():
        out += notes.strip() + "\n\n"
    return out + f"```\n{body.rstrip()}\n```\n{_end(key)}\n"


def replace_section(text: str, key: str, section: str) -> str:
    """`text` with the section `key` replaced in place, or appended when it has none yet."""
    pattern = re.compile(re.escape(_begin(key)) + r"\n.*?" + re.escape(_end(key)) + r"\n?", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + "\n\n" + section


def write_section(path, key: str, title: str, body: str, command: str, notes: str = "") -> None:
    """Rewrite one benchmark's section of a results file atomically, leaving the others as they are."""
    file = Path(path)
    text = file.read_text(encoding="utf-8") if file.exists() else "# Benchmark results\n"
    out = replace_section(text, key, section_text(key, title, body, command, notes))
    with atomic_open(file, "w", encoding="utf-8") as f:
        f.write(out)
