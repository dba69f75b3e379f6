"""Split a weighted prompt into CLIP-sized chunks of tokens, the way A1111 does.

Each chunk holds `model_max_length - 2` prompt tokens (75 for CLIP) between BOS and EOS, padded
with EOS; prompts longer than that get more chunks, which are encoded one by one and concatenated.
`BREAK` closes the current chunk early. When a chunk overflows and a comma sits within the last
`comma_backtrack` tokens, the words after that comma move to the next chunk
(A1111's "comma_padding_backtrack", default 20) so a phrase is not cut in half.

Hand-written: the chunking rule is A1111's (modules/sd_hijack_clip.py `tokenize_line`), not a library's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atelier.errors import UserError
from atelier.prompts.attention import is_break, parse_attention

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
DEFAULT_COMMA_BACKTRACK = 20
_MAX_SEQUENCE = 1024  # no CLIP-like text encoder is longer; guards against "unlimited" tokenizers


@dataclass
class PromptChunk:
    """`tokens` and their `weights`, BOS and EOS included: `chunk_length + 2` of each."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def check_emphasis(emphasis: str) -> str:
    if emphasis not in EMPHASIS_MODES:
        raise UserError(f"unknown emphasis mode {emphasis!r}; choose one of: {', '.join(EMPHASIS_MODES)}")
    return emphasis


def weighted_pieces(text: str, emphasis: str = "Original") -> list[list]:
    """`[text, weight]` pieces; with emphasis "None" the brackets are plain text and BREAK is a word."""
    if check_emphasis(emphasis) == "None":
        return [[text, 1.0]]
    return parse_attention(text)


def chunk_length_of(tokenizer) -> int:
    length = int(tokenizer.model_max_length)
    if not 3 <= length <= _MAX_SEQUENCE:
        raise UserError(f"tokenizer model_max_length {length} is not a CLIP-style text length")
    return length - 2


def empty_chunk(chunk_length: int, bos: int, eos: int) -> PromptChunk:
    """The chunk of an empty prompt: BOS, then EOS to the end."""
    return PromptChunk([bos] + [eos] * (chunk_length + 1), [1.0] * (chunk_length + 2))


def build_chunks(
    pieces: list[tuple[list[int], float] | None],
    *,
    chunk_length: int,
    bos: int,
    eos: int,
    comma: int | None,
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """Chunks from tokenized pieces: `(token_ids, weight)`, or None for a BREAK."""
    chunks: list[PromptChunk] = []
    current = PromptChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal current, last_comma
        missing = chunk_length - len(current.tokens)
        tokens = [bos] + current.tokens + [eos] * missing + [eos]
        weights = [1.0] + current.weights + [1.0] * missing + [1.0]
        chunks.append(PromptChunk(tokens, weights))
        current = PromptChunk()
        last_comma = -1

    for piece in pieces:
        if piece is None:
            close_chunk()
            continue
        ids, weight = piece
        for token in ids:
            if token == comma:
                last_comma = len(current.tokens)
            elif (
                comma_backtrack
                and len(current.tokens) == chunk_length
                and last_comma != -1
                and len(current.tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved = PromptChunk(current.tokens[cut:], current.weights[cut:])
                current.tokens, current.weights = current.tokens[:cut], current.weights[:cut]
                close_chunk()
                current = moved
            if len(current.tokens) == chunk_length:
                close_chunk()
            current.tokens.append(token)
            current.weights.append(weight)

    if current.tokens or not chunks:
        close_chunk()
    return chunks


def tokenize_chunks(
    text: str,
    tokenizer,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
    convert_text=None,
) -> list[PromptChunk]:
    """The chunks of one prompt text for one tokenizer.

    `convert_text(text, tokenizer)` may rewrite each piece before tokenizing (diffusers' pipelines
    pass `maybe_convert_prompt`, which expands multi-vector textual-inversion tokens).
    """
    pieces = weighted_pieces(text, emphasis)
    texts = [p[0] for p in pieces if not is_break(p)]
    if convert_text is not None:
        texts = [convert_text(t, tokenizer) for t in texts]
    ids = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    tokenized = [None if is_break(p) else (list(next(ids)), float(p[1])) for p in pieces]
    return build_chunks(
        tokenized,
        chunk_length=chunk_length_of(tokenizer),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        comma=tokenizer.get_vocab().get(",</w>"),
        comma_backtrack=comma_backtrack,
    )
