"""Package namespaces that import their modules on first use, so that `atelier --help` (which
imports every command's package) does not pay for torch and diffusers."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """`(__getattr__, __all__)` for a package whose `name` lives in module `exports[name]`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__, sorted(exports)
