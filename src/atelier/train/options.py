"""Checks of training settings: a bad number (nan, inf, 0, a negative) is one UserError naming the
option, raised before any work is done."""

from __future__ import annotations

import math

from atelier.errors import UserError


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
