"""Textual-inversion embeddings (and the token embeddings of pivotal tuning): the files, and loading
them into a pipeline.

Files are written as safetensors with one entry per text encoder: `clip_l` (the first: CLIP ViT-L,
or SD 2's OpenCLIP ViT-H) and, for SDXL, `clip_g` (the second). That is what diffusers' advanced
DreamBooth scripts write and what ComfyUI and A1111 read for SDXL; for SD 1.x/2.x a file holding only
`clip_l` is a single-tensor file, which A1111 and ComfyUI both accept. Reading takes every common
format: `clip_l`/`clip_g`, A1111's `string_to_param` (its .pt files, pickles: only with allow_pickle),
`emb_params` (kohya's .safetensors), and diffusers' `learned_embeds` ({token: vectors}).

Loading is diffusers' `load_textual_inversion`; a multi-vector embedding becomes N tokens
(`name`, `name_1`, ...) that diffusers' `maybe_convert_prompt` expands, which atelier's prompt
encoder calls. A1111 names an embedding after its file, and so does atelier by default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from atelier.errors import UserError
from atelier.models.loader import _PICKLE_HELP, PICKLE_SUFFIXES

FIRST, SECOND = "clip_l", "clip_g"
_KEYS_OF = {"text_encoder": FIRST, "text_encoder_2": SECOND, FIRST: FIRST, SECOND: SECOND, "clip_h": FIRST}


def _vectors(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise UserError(f"{what} is not a tensor of embedding vectors")
    value = value.detach()
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise UserError(f"{what} has shape {tuple(value.shape)}; expected (vectors, width)")
    return value


def save_embedding_file(path, embeddings: dict) -> Path:
    """Write embedding vectors as safetensors: {"clip_l": (n, width)[, "clip_g": (n, width_2)]}.
    Keys may also be the pipeline's component names ("text_encoder", "text_encoder_2")."""
    from safetensors.torch import save

    from atelier.core.io import atomic_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"embeddings are written as .safetensors, not {path.suffix or 'no suffix'}: {path}")
    tensors = {}
    for key, value in embeddings.items():
        if key not in _KEYS_OF:
            raise UserError(f"embedding key {key!r}: use clip_l (first text encoder) and clip_g (SDXL's second)")
        tensors[_KEYS_OF[key]] = _vectors(value, f"embedding {key}").to("cpu").contiguous()
    if FIRST not in tensors:
        raise UserError("an embedding file needs clip_l, the first text encoder's vectors")
    if len({t.shape[0] for t in tensors.values()}) != 1:
        raise UserError("clip_l and clip_g must have the same number of vectors")
    with atomic_open(path, "wb") as f:
        f.write(save(tensors, {"format": "pt"}))
    return path


def _load(path: Path, allow_pickle: bool):
    from atelier.models.singlefile import _first_line

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(path))
        except Exception as exc:  # safetensors' own error type, OSError
            raise UserError(f"cannot read the embedding {path}: {_first_line(exc)}") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"embedding {path.name} is a pickle file: {_PICKLE_HELP}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # A1111's files hold more than tensors (e.g. a ParameterDict)
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise UserError(f"cannot read the embedding {path}: {_first_line(exc)}") from None
    raise UserError(f"embedding {path.name}: expected a .safetensors file (or, with --allow-pickle, .pt/.bin)")


def read_embedding_file(path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file, {"clip_l": (n, width)} and for SDXL files also "clip_g"."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise UserError(f"no such embedding file: {path}")
    data = _load(path, allow_pickle)
    what = f"embedding {path.name}"
    if not isinstance(data, dict) or not data:
        raise UserError(f"{what} is not a textual-inversion embedding")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{what} holds {len(params) if isinstance(params, dict) else 'no'} embeddings; expected one")
        return {FIRST: _vectors(next(iter(params.values())), what)}
    if FIRST in data or SECOND in data or "clip_h" in data:
        out = {_KEYS_OF[k]: _vectors(v, f"{what} ({k})") for k, v in data.items() if k in _KEYS_OF}
        if FIRST in out and SECOND in out and out[FIRST].shape[0] != out[SECOND].shape[0]:
            raise UserError(f"{what}: clip_l has {out[FIRST].shape[0]} vectors but clip_g {out[SECOND].shape[0]}")
        return out
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # kohya's emb_params, diffusers' {token: vectors}
        return {FIRST: _vectors(next(iter(tensors.values())), what)}
    keys = ", ".join(sorted(map(str, data))[:6])
    raise UserError(f"{what} is not a textual-inversion embedding in a format atelier knows (keys: {keys})")


def _encoders(pipe) -> list[tuple[str, object, object]]:
    pairs = [(FIRST, pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((SECOND, pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def apply_embedding(pipe, path, token: str | None = None, *, allow_pickle: bool = False) -> str:
    """Add the embedding in `path` to `pipe`'s tokenizer(s) and text encoder(s) under `token` (default:
    the file name without its suffix, as A1111 names embeddings): SDXL files put clip_l in the first
    encoder and clip_g in the second. Recorded in `pipe.atelier_embeddings` as (token, path); applying
    the same file under the same token again does nothing. Returns the token."""
    path = Path(os.path.expanduser(os.fspath(path)))
    token = path.stem if token is None else token
    if not token or token != token.strip() or any(c.isspace() for c in token):
        raise UserError(f"embedding token {token!r}: use one word without spaces")
    applied = getattr(pipe, "atelier_embeddings", None)
    if applied is None:
        applied = pipe.atelier_embeddings = []
    for other, other_path in applied:
        if other == token:
            if Path(other_path).resolve() == path.resolve():
                return token
            raise UserError(f"embedding token {token!r} is already taken by {other_path}; give this one another token")
    vectors = read_embedding_file(path, allow_pickle=allow_pickle)
    encoders = _encoders(pipe)
    for key, _, encoder in encoders:
        width = encoder.get_input_embeddings().weight.shape[-1]
        if key not in vectors:
            have = " and ".join(vectors)
            raise UserError(f"embedding {path.name} has {have} vectors only, but this model's "
                            f"{'second' if key == SECOND else 'first'} text encoder needs {key}: is it for another model?")
        if vectors[key].shape[1] != width:
            raise UserError(f"embedding {path.name} has {key} vectors of width {vectors[key].shape[1]} but this model's "
                            f"text encoder takes {width}: is it for another model?")
    if SECOND in vectors and len(encoders) == 1:
        raise UserError(f"embedding {path.name} is for SDXL (it has clip_g vectors) but this model has one text encoder")
    for key, tokenizer, encoder in encoders:
        # CLIP tokenizers lower-case the text (atelier's prompt encoder too, before diffusers expands
        # multi-vector names), so a name is found whatever its case only when added in lower case
        added = token.lower() if tokenizer.tokenize(token) == tokenizer.tokenize(token.lower()) else token
        if added in tokenizer.get_vocab():
            raise UserError(f"embedding token {token!r} is already a token of this model's tokenizer; give the embedding another token")
        try:
            pipe.load_textual_inversion(vectors[key], token=added, tokenizer=tokenizer, text_encoder=encoder)
        except ValueError as exc:
            raise UserError(f"cannot add embedding {path.name} as {token!r}: {str(exc).splitlines()[0]}") from None
    applied.append((token, path))
    return token
