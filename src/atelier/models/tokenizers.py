"""Write CLIP-style BPE tokenizer files (vocab.json + merges.txt) that `transformers.CLIPTokenizer`
loads, without downloading anything.

`write_word_tokenizer` makes a tiny vocabulary in which each listed word is one token (the toy world
and the tiny test pipelines use it); every other word still tokenizes, into characters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_merges(word: str) -> list[tuple[str, str]]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = symbols[0]
    for sym in symbols[1:]:
        merges.append((current, sym))
        current = current + sym
    return merges


def write_word_tokenizer(words, out_dir, *, model_max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write a CLIPTokenizer folder where each of `words` is a single token.

    Merges of longer words come first so that a short word's first merge can never split a longer
    word differently; the result is checked with the real CLIPTokenizer before returning.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w.lower() for w in words if w.strip()}, key=lambda w: (-len(w), w))
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in words:
        for pair in _word_merges(w):
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    known = set(vocab_list)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = _write_clip_files(out, vocab, merges, model_max_length, pad_token)
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"word tokenizer: these words do not come out as one token: {split[:10]}")
    return out


# CLIP's BPE file holds a header line, then 262,144 merges of which CLIP uses the first
# 49152 - 256 - 2 = 48,894 (OpenAI's simple_tokenizer.py: `merges[1:49152-256-2+1]`).
CLIP_MERGE_COUNT = 49152 - 256 - 2
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def open_clip_bpe_path() -> Path:
    """Locate open_clip's bundled `bpe_simple_vocab_16e6.txt.gz` without importing open_clip
    (its import pulls in torchvision)."""
    import importlib.util

    from atelier.errors import UserError

    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    raise UserError(
        f"the CLIP vocabulary file {CLIP_BPE_FILE} was not found: it ships with open_clip; "
        "install it with `pip install --no-deps open_clip_torch` or pass bpe_path"
    )


def write_clip_tokenizer(out_dir, bpe_path=None, *, model_max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write the real 49,408-token CLIP tokenizer (the one SD 1.x/2.x/XL use) as a CLIPTokenizer folder.

    The vocabulary is built the way CLIP's own simple_tokenizer does: the 256 byte symbols, the same
    symbols with "</w>", one entry per merge, then <|startoftext|> and <|endoftext|>.
    `pad_token="!"` gives the tokenizer of SD 2.x and SDXL's second text encoder.
    """
    import gzip

    from atelier.errors import UserError

    bpe = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    if not bpe.is_file():
        raise UserError(f"CLIP vocabulary file not found: {bpe}")
    with gzip.open(bpe, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1]]
    if len(merges) != CLIP_MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise UserError(f"{bpe} does not look like CLIP's BPE merges file")

    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if pad_token not in vocab:
        raise UserError(f"pad token {pad_token!r} is not in the CLIP vocabulary")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _write_clip_files(out, vocab, merges, model_max_length, pad_token)
    if len(tok) != len(vocab_list):
        raise RuntimeError(f"CLIP tokenizer: expected {len(vocab_list)} tokens, loaded {len(tok)}")
    return out


def _write_clip_files(out: Path, vocab: dict, merges: list, model_max_length: int, pad_token: str):
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) and load it back."""
    from transformers import CLIPTokenizer

    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}, indent=2),
        encoding="utf-8",
    )
    return CLIPTokenizer.from_pretrained(os.fspath(out))
