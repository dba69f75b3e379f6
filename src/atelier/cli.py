"""The `atelier` command. Each capability package contributes its sub-commands through a
`register(subparsers)` function in its own `cli` module; this file wires them up, turns
`UserError` into one clear line and exit code 2, silences libraries under `--quiet`, and has the
output-path checks every command makes before doing any work."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from atelier.errors import UserError

# Packages whose `cli.register(subparsers)` adds sub-commands, in --help order.
COMMAND_MODULES = [
    "atelier.bench.cli",
    "atelier.edit.cli",
    "atelier.evaluate.cli",
    "atelier.generate.cli",
    "atelier.models.cli",
    "atelier.prompts.cli",
    "atelier.runtime.cli",
    "atelier.samplers.cli",
    "atelier.server.cli",
    "atelier.speed.cli",
    "atelier.toyworld.cli",
    "atelier.train.cli",
    "atelier.tryon.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Diffusion generation and editing: samplers, A1111 prompts, toy-world models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)  # a broken import is a bug: let it show
    return parser


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where there is no default to show
    (None) or the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _writable_folder(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written in it (permissions, read-only file
    systems and full quotas all show here, before any work)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write to {folder}: {exc.strerror or exc}") from None


def check_output_file(path, what: str = "--out") -> Path:
    """Refuse an output file that cannot be written (a folder, or in a folder that cannot be written)."""
    raw, path = str(path), Path(path)
    if path.is_dir() or raw.endswith(("/", os.sep)):
        raise UserError(f"{what} is a folder: {raw}; give a file name")
    _writable_folder(path.parent, what)
    return path


def check_output_folder(path, what: str = "--outdir") -> Path:
    """Refuse an output folder that is a file or cannot be written; create it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} is not a folder: {path}")
    _writable_folder(path, what)
    return path


@contextmanager
def _quiet(enabled: bool):
    """Under --quiet: no library warnings (Python warnings and diffusers / transformers logging below
    errors) and no progress bars; errors still show."""
    if not enabled:
        yield
        return
    for name in ("diffusers.utils.logging", "transformers.utils.logging", "huggingface_hub.utils.logging"):
        try:
            logging = importlib.import_module(name)
        except ImportError:
            continue
        logging.set_verbosity_error()
        if hasattr(logging, "disable_progress_bar"):
            logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    # Library chatter (torchvision fallbacks, config deprecations) is not the user's business on the
    # command line; set these variables to "warning" or "info" to see it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # diffusers imports torchao (atelier.speed's int8dq / fp8 backend) whenever it is installed, and
    # torchao's import makes torch warn about Enum registrations on every model load
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _quiet(bool(getattr(args, "quiet", False))):
            result = args.func(args)
    except UserError as exc:
        print(f"atelier: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atelier: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
