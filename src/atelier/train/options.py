"""Checks of training settings: a bad number (nan, inf, 0, a negative) is one UserError naming the
option, raised before any work is done; a resumed run whose settings differ is refused the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path

from atelier.errors import UserError

# diffusers' get_scheduler names (train.loop.lr_schedule)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# train lora --prior_loss_target: the class images' noise (DreamBooth) or the frozen base model's prediction
PRIOR_TARGETS = ("images", "base_model")


def check_number(flag: str, value, *, integer: bool = False, minimum=None, above=None, maximum=None, below=None) -> None:
    """`flag` is how the user spelt the option (`--max_train_steps`, `checkpoint_every`)."""
    bounds = [f"at least {minimum}" if minimum is not None else "", f"above {above}" if above is not None else "",
              f"at most {maximum}" if maximum is not None else "", f"below {below}" if below is not None else ""]
    wanted = ("a whole number" if integer else "a finite number") + "".join(
        f" {'and ' if i else ''}{b}" for i, b in enumerate(b for b in bounds if b))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (math.isfinite(value) and value == int(value))
    if ok:
        ok = math.isfinite(value) and not (
            (minimum is not None and value < minimum) or (above is not None and value <= above)
            or (maximum is not None and value > maximum) or (below is not None and value >= below))
    if not ok:
        raise UserError(f"{flag} must be {wanted}, not {value!r}")


def check_all(flag_of, values: dict, rules: dict) -> None:
    """Check every `name: {rule}` of `rules` against `values[name]` (skipping None, an unset option)."""
    for name, rule in rules.items():
        if values.get(name) is not None:
            check_number(flag_of(name), values[name], **rule)


def check_same_settings(path, settings: dict, free, *, flag_of=lambda name: name, out_flag: str = "--output_dir") -> None:
    """Refuse to continue a run whose settings file `path` records other values for settings outside `free`
    (those that do not change what is learnt), in one line naming up to four of them."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON: remove it or use another {out_flag}") from None
    old = old.get("options", old)
    changed = [k for k, v in settings.items() if k not in free and k in old and old[k] != v]
    if changed:
        diffs = ", ".join(f"{flag_of(k)}: {old[k]} -> {settings[k]}" for k in changed[:4])
        raise UserError(f"{path.parent} holds a run with other settings ({diffs}); resume with the same options or "
                        f"use another {out_flag}")
