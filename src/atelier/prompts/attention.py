"""A1111 attention syntax: `(x)`, `((x))`, `[x]`, `(x:1.3)`, escapes and `BREAK`.

Written here because no library parses this dialect; the behaviour follows AUTOMATIC1111's
`parse_prompt_attention` (modules/prompt_parser.py), including its handling of unbalanced brackets:
an unclosed `(` or `[` applies to everything after it, a stray `)` or `]` is plain text. Brackets
nested deeper than `MAX_NESTING` are a UserError (a weight of 1.1 ** 600 means nothing).
"""

from __future__ import annotations

import re

from atelier.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0
MAX_NESTING = 100  # brackets open at once; also the limit of the prompt-editing parser (schedule.py)

# One lexical token of the attention syntax per match, tried in this order.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash: the literal character
  | \\                      # any other backslash: dropped
  | \(                      # open emphasis
  | \[                      # open de-emphasis
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # explicit weight closing a round bracket
  | \)                      # close emphasis
  | \]                      # close de-emphasis
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def is_break(piece) -> bool:
    return piece[0] == BREAK and piece[1] == BREAK_WEIGHT


def _weight(text: str, literal: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"bad attention weight {text!r} in {literal!r}") from None


def parse_attention(text: str) -> list[list]:
    """Split an A1111 prompt into `[text, weight]` pieces; `BREAK` becomes `["BREAK", -1]`.

    >>> parse_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    Neighbours of equal weight are merged. One deliberate difference from A1111: a `BREAK` inside
    brackets is still a chunk break (A1111 multiplies its -1 marker and then encodes the word "break"
    with a negative weight).
    """
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not is_break(piece):
                piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([" and len(open_round) + len(open_square) >= MAX_NESTING:
            raise UserError(f"the prompt nests brackets more than {MAX_NESTING} deep (at character {match.start() + 1}); "
                            r"write a literal bracket as \( or \[")
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight(weight, token))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    pieces.append([BREAK, BREAK_WEIGHT])
                pieces.append([part, 1.0])

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not pieces:
        return [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        last = merged[-1]
        if piece[1] == last[1] and not is_break(piece) and not is_break(last):
            last[0] += piece[0]
        else:
            merged.append(piece)
    return merged
