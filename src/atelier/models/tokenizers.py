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
    from transformers import CLIPTokenizer

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
    tok = CLIPTokenizer.from_pretrained(os.fspath(out))
    split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"word tokenizer: these words do not come out as one token: {split[:10]}")
    return out
