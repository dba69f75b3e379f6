"""A1111 prompt editing and alternation: which prompt text applies at which sampling step.

    [a:b:when]   a until `when`, then b
    [a:when]     nothing until `when`, then a          (add after)
    [a::when]    a until `when`, then nothing          (remove after)
    [a|b|c]      a, b, c, a, ... cycling every step    (alternation)

`when` with a decimal point is a fraction of the steps ("0.25", ".5"); without one it is a step
number ("10"), as in current A1111. Forms nest, and `(x:1.2)` / `[x]` emphasis is kept as text for
`parse_attention` to read later. A prompt that does not parse (a stray `|`, a lone trailing `\\`)
is used as it is, for every step, like A1111 does. Brackets nested deeper than `MAX_NESTING` are a
UserError rather than a Python recursion error.

A hand-written recursive-descent parser (no library parses this dialect) that reproduces what
AUTOMATIC1111's lark grammar in modules/prompt_parser.py accepts: inside brackets only well-formed
constructs are allowed, at the top level a bracket or colon that does not start one is plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atelier.errors import UserError
from atelier.prompts.attention import MAX_NESTING

# Text with no syntax: anything but brackets, colon and bar, where a backslash escapes one character.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# lark's SIGNED_NUMBER, optionally surrounded by whitespace, closing a scheduled bracket.
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


@dataclass
class Scheduled:
    before: list | None  # None when the "before" part is absent: [x:when]
    after: list
    when: str  # the number as written; resolved against the step count later


@dataclass
class Alternate:
    options: list[list]


class _Fail(Exception):
    """This bracket does not open a well-formed construct."""


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.depth = 0  # brackets open around the group being parsed

    def sequence(self, pos: int) -> tuple[list, int]:
        """Plain text and well-formed bracket groups, as far as they go."""
        items: list = []
        while pos < len(self.text):
            plain = _PLAIN.match(self.text, pos)
            if plain:
                items.append(plain.group(0))
                pos = plain.end()
                continue
            if self.text[pos] not in "([":
                break
            try:
                group, pos = self.group(pos)
            except _Fail:
                break
            items.extend(group)
        return items, pos

    def expect(self, pos: int, char: str) -> int:
        if pos < len(self.text) and self.text[pos] == char:
            return pos + 1
        raise _Fail

    def group(self, pos: int) -> tuple[list, int]:
        """A bracket construct starting at `pos`, as a list of items (emphasis stays text)."""
        if self.depth >= MAX_NESTING:
            raise UserError(f"the prompt nests brackets more than {MAX_NESTING} deep (at character {pos + 1}); "
                            r"write a literal bracket as \( or \[")
        self.depth += 1
        try:
            return self._group(pos)
        finally:
            self.depth -= 1

    def _group(self, pos: int) -> tuple[list, int]:
        if self.text[pos] == "(":
            first, pos = self.sequence(pos + 1)
            if pos < len(self.text) and self.text[pos] == ":":
                second, pos = self.sequence(pos + 1)
                return ["(", *first, ":", *second, ")"], self.expect(pos, ")")
            return ["(", *first, ")"], self.expect(pos, ")")

        first, pos = self.sequence(pos + 1)
        nxt = self.text[pos] if pos < len(self.text) else ""
        if nxt == "]":
            return ["[", *first, "]"], pos + 1
        if nxt == "|":
            options = [first]
            while pos < len(self.text) and self.text[pos] == "|":
                option, pos = self.sequence(pos + 1)
                options.append(option)
            return [Alternate(options)], self.expect(pos, "]")
        if nxt == ":":
            when = _WHEN.match(self.text, pos + 1)
            if when:  # [after:when]
                return [Scheduled(None, first, when.group(1))], when.end()
            second, pos = self.sequence(pos + 1)
            pos = self.expect(pos, ":")
            when = _WHEN.match(self.text, pos)
            if when:  # [before:after:when]
                return [Scheduled(first, second, when.group(1))], when.end()
        raise _Fail

    def prompt(self) -> list | None:
        """The whole prompt, or None when it does not parse."""
        items: list = []
        pos = 0
        while pos < len(self.text):
            part, pos = self.sequence(pos)
            items.extend(part)
            if pos < len(self.text):
                if self.text[pos] not in "[]():":
                    return None  # a bar outside alternation, or a lone trailing backslash
                items.append(self.text[pos])  # a bracket that opens nothing is text
                pos += 1
        return items


def _resolve_when(when: str, steps: int) -> int:
    value = float(when)
    if "." in when:
        value *= steps
    return min(steps, int(value))


def _walk(items, visit) -> None:
    for item in items:
        if isinstance(item, Scheduled):
            visit(item)
            _walk(item.before or [], visit)
            _walk(item.after, visit)
        elif isinstance(item, Alternate):
            visit(item)
            for option in item.options:
                _walk(option, visit)


def _render(items, step: int, steps: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Scheduled):
            if step <= _resolve_when(item.when, steps):
                out.append(_render(item.before or [], step, steps))
            else:
                out.append(_render(item.after, step, steps))
        else:
            out.append(_render(item.options[(step - 1) % len(item.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """`[(end_step, text), ...]`: `text` applies to sampling steps up to and including `end_step`.

    The same result as A1111's `get_learned_conditioning_prompt_schedules([prompt], steps)[0]`:

    >>> prompt_schedule("a [b:c:3] d", 10)
    [(3, 'a b d'), (10, 'a c d')]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    items = _Parser(prompt).prompt()
    if items is None:
        return [(steps, prompt)]
    ends = {steps}

    def collect(node) -> None:
        if isinstance(node, Scheduled):
            end = _resolve_when(node.when, steps)
            if end >= 1:
                ends.add(end)
        else:
            ends.update(range(1, steps + 1))

    _walk(items, collect)
    return [(end, _render(items, end, steps)) for end in sorted(ends)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text used at 0-based sampling `step`, picked the way A1111's sampler does: the first entry
    whose end step is >= step. So `[a:b:3]` gives `a` for steps 0-3, and an alternation `[a|b]`
    gives a, a, b, a, b, ... (A1111 counts steps from 0 but its schedule from 1)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


def texts_per_step(prompt: str, steps: int) -> list[str]:
    """The prompt text for each of `steps` sampling steps."""
    schedule = prompt_schedule(prompt, steps)
    return [text_at_step(schedule, i) for i in range(steps)]
