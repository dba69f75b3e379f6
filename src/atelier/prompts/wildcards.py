"""Wildcards and variants through dynamicprompts, expanded before A1111 parsing.

`{red|green|blue}` picks one option, `{2$$a|b|c}` picks two; `__color__` picks a line of
`color.txt` in the wildcard folder (sub-folders: `__animals/cats__`). Braces are dynamicprompts'
default variant syntax, so they never clash with A1111's square-bracket alternation `[a|b]`,
which dynamicprompts leaves alone. Image i of a batch is expanded with seed + i, so a
(prompt, seed) pair always gives the same images.

Text without `{` or `__` is returned untouched (dynamicprompts would otherwise strip `# ...`
comments and reject characters such as `%` that mean something in its own syntax).
"""

from __future__ import annotations

from pathlib import Path

from atelier.errors import UserError


def _strict_manager(wildcard_dir):
    from dynamicprompts.wildcards import WildcardManager

    class StrictWildcardManager(WildcardManager):
        """A wildcard that matches no file is an error, not left in the prompt as `__name__`."""

        def get_values(self, wildcard):
            values = super().get_values(wildcard)
            if len(values) == 0:
                name = self.to_wildcard(str(wildcard))
                if self.path is None:
                    raise UserError(f"the prompt uses wildcard {name} but no wildcard folder was given")
                raise UserError(f"wildcard {name} not found: no {str(wildcard).strip('_')}.txt in {self.path}")
            return values

    if wildcard_dir is None:
        return StrictWildcardManager()
    folder = Path(wildcard_dir)
    if not folder.is_dir():
        raise UserError(f"wildcard folder not found: {folder}")
    return StrictWildcardManager(folder)


def has_dynamic_syntax(text: str) -> bool:
    return "{" in text or "__" in text


def _expand(text: str, seed: int, manager) -> str:
    from dynamicprompts.generators import RandomPromptGenerator

    generator = RandomPromptGenerator(wildcard_manager=manager, seed=int(seed))
    try:
        results = generator.generate(text, 1)
    except UserError:
        raise
    except Exception as exc:  # dynamicprompts' parser raises pyparsing errors
        raise UserError(f"cannot expand variants/wildcards in prompt {text!r}: {exc}") from None
    return results[0] if results else ""


def expand_prompt(text: str, seed: int, wildcard_dir=None) -> str:
    """Expand variants and wildcards in `text` with a dynamicprompts generator seeded by `seed`."""
    if not has_dynamic_syntax(text):
        return text
    return _expand(text, seed, _strict_manager(wildcard_dir))


def expand_prompts(text: str, seed: int, count: int, wildcard_dir=None) -> list[str]:
    """The prompts of `count` images: image i is expanded with seed + i."""
    if not has_dynamic_syntax(text):
        return [text] * count
    manager = _strict_manager(wildcard_dir)
    return [_expand(text, seed + i, manager) for i in range(count)]
