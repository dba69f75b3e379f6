"""`atelier prompt`: show how an A1111 prompt is read, without loading a model.

Prints the prompt after wildcard/variant expansion, its schedule (prompt editing and alternation),
the weighted pieces of each scheduled text and, with the CLIP tokenizer, how many 75-token chunks
each one takes.
"""

from __future__ import annotations

import argparse

from atelier.cli import HelpWithDefaults
from atelier.errors import UserError
from atelier.prompts.chunks import EMPHASIS_MODES


def register(subparsers) -> None:
    cmd = subparsers.add_parser(
        "prompt",
        help="show how an A1111 prompt is parsed: wildcards, schedule, weights, chunks",
        description=(
            "Expand {variants} and __wildcards__ (seeded like image 0 of a run with --seed), then show the "
            "prompt's schedule over --steps ([from:to:when] editing, [a|b] alternation), each scheduled "
            "text's (weighted:1.2) pieces and, with --tokenizer or --clip, its CLIP tokens per chunk."
        ),
        formatter_class=HelpWithDefaults,
    )
    cmd.add_argument("prompt", metavar="PROMPT", help="the prompt, in A1111 syntax")
    cmd.add_argument("--steps", type=int, default=20, help="sampling steps the schedule is laid over")
    cmd.add_argument("--seed", type=int, default=0, help="seed for variants and wildcards")
    cmd.add_argument("--wildcards", metavar="DIR", help="folder of NAME.txt wildcard files (__NAME__)")
    tokens = cmd.add_mutually_exclusive_group()
    tokens.add_argument("--tokenizer", metavar="DIR", help="a CLIPTokenizer folder to count tokens with")
    tokens.add_argument("--clip", action="store_true",
                        help="count tokens with the real CLIP tokenizer (built from open_clip's vocabulary file)")
    cmd.add_argument("--emphasis", default="Original", choices=EMPHASIS_MODES,
                     help="how (weights) apply: A1111's emphasis modes")
    cmd.add_argument("--comma-backtrack", type=int, default=20, help="A1111's comma padding backtrack (0: off)")
    cmd.add_argument("--json", action="store_true", help="print the analysis as JSON")
    cmd.set_defaults(func=run_prompt)


def _load_tokenizer(args):
    if not (args.tokenizer or args.clip):
        return None
    from transformers import CLIPTokenizer

    if args.clip:
        import tempfile

        from atelier.models.tokenizers import write_clip_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp)))
    try:
        return CLIPTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a CLIP tokenizer from {args.tokenizer}: {exc}") from None


def analyse(prompt: str, steps: int, *, seed: int = 0, wildcard_dir=None, tokenizer=None,
            emphasis: str = "Original", comma_backtrack: int = 20) -> dict:
    """What `atelier prompt` prints, as a dict."""
    from atelier.prompts.chunks import tokenize_chunks, weighted_pieces
    from atelier.prompts.schedule import prompt_schedule
    from atelier.prompts.wildcards import expand_prompt

    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    expanded = expand_prompt(prompt, seed, wildcard_dir)
    entries = []
    chunk_length = None
    for end, text in prompt_schedule(expanded, steps):
        entry = {"until_step": end, "text": text, "pieces": weighted_pieces(text, emphasis)}
        if tokenizer is not None:
            chunks = tokenize_chunks(text, tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack)
            eos, chunk_length = tokenizer.eos_token_id, len(chunks[0].tokens) - 2
            entry["chunk_tokens"] = [sum(1 for t in c.tokens[1:-1] if t != eos) for c in chunks]
        entries.append(entry)
    return {"prompt": prompt, "expanded": expanded, "steps": steps, "chunk_length": chunk_length,
            "schedule": entries}


def run_prompt(args) -> int:
    result = analyse(
        args.prompt, args.steps, seed=args.seed, wildcard_dir=args.wildcards, tokenizer=_load_tokenizer(args),
        emphasis=args.emphasis, comma_backtrack=args.comma_backtrack,
    )
    if args.json:
        from atelier.cli import print_json

        print_json(result)
        return 0
    if result["expanded"] != result["prompt"]:
        print(f"expanded: {result['expanded']}")
    start = 0
    for entry in result["schedule"]:
        last = min(entry["until_step"], result["steps"] - 1)
        if start > last:
            continue
        span = f"step {start}" if start == last else f"steps {start}-{last}"
        print(f"{span}: {entry['text']}")
        pieces = ", ".join("BREAK" if w == -1 else f"{t!r}x{w:.3g}" for t, w in entry["pieces"])
        print(f"  weights: {pieces}")
        if "chunk_tokens" in entry:
            print(f"  chunks: {len(entry['chunk_tokens'])} "
                  f"(tokens {', '.join(map(str, entry['chunk_tokens']))} of {result['chunk_length']})")
        start = last + 1
    return 0
