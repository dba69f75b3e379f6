"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the other sections as they are."""

from __future__ import annotations

from pathlib import Path


def write_section(path, title: str, body: str, command: str, notes: str = "") -> None:
    """Replace (or append) the `## title` section of a markdown results file, atomically."""
    file = Path(path)
    text = file.read_text(encoding="utf-8") if file.exists() else "# Benchmark results\n"
    section = f"## {title}\n\nCommand (repository root):\n\n    {command}\n\n"
    if notes:
        section += notes.strip() + "\n\n"
    section += f"```\n{body.rstrip()}\n```\n"
    parts = text.split("\n## ")
    kept = [parts[0].rstrip("\n") + "\n"] + [p.rstrip("\n") + "\n" for p in parts[1:] if not p.startswith(title + "\n")]
    out = "\n## ".join(kept).rstrip("\n") + "\n\n" + section
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(out, encoding="utf-8")
    tmp.replace(file)
