"""Running `atelier` commands in-process from tests (pytest's capsys captures their output)."""

from __future__ import annotations


def run(argv, capsys) -> tuple[int, str, str]:
    """`atelier ARGV` (items turned to str): its exit code, stdout and stderr."""
    from atelier.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> bool:
    """A user error as atelier reports one: exit code 2 and one `atelier: error:` line, no traceback."""
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("atelier: error: ") and "Traceback" not in err
