"""The `atelier` command. Each capability package contributes its sub-commands through a
`register(subparsers)` function in its own `cli` module; this file only wires them up and
turns `UserError` into one clear line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from atelier.errors import UserError

# Packages whose `cli.register(subparsers)` adds sub-commands, in --help order.
COMMAND_MODULES = [
    "atelier.edit.cli",
    "atelier.evaluate.cli",
    "atelier.generate.cli",
    "atelier.models.cli",
    "atelier.prompts.cli",
    "atelier.samplers.cli",
    "atelier.server.cli",
    "atelier.toyworld.cli",
    "atelier.train.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Diffusion generation and editing: samplers, A1111 prompts, toy-world models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package not built yet must not break the rest
            if exc.name and exc.name.startswith("atelier"):
                continue
            raise
        module.register(sub)
    return parser


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    # Library chatter (torchvision fallbacks, config deprecations) is not the user's business on the
    # command line; set these variables to "warning" or "info" to see it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
