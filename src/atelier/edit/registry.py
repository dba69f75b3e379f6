"""`METHODS`: each edit method as a plain function `edit(pipe, image, source, target, seed) -> image`,
for runners such as `atelier evaluate pie-bench`. One Editor per pipeline is kept."""

from __future__ import annotations

import weakref

from atelier.edit.methods import METHOD_NAMES, Editor, EditSettings

_editors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _editor(pipe) -> Editor:
    if pipe not in _editors:
        _editors[pipe] = Editor(pipe)
    return _editors[pipe]


def _method(name: str):
    def edit(pipe, image, source_prompt: str, target_prompt: str, seed: int = 0):
        return _editor(pipe).edit(image, source_prompt, target_prompt, EditSettings(method=name, seed=seed)).image

    edit.__name__ = f"edit_{name}"
    return edit


METHODS = {name: _method(name) for name in ("auto", *METHOD_NAMES)}  # includes "one-step" (SwiftEdit)
