"""Encode chunked, weighted prompts with a CLIP text encoder, A1111-style.

Clip skip uses A1111's numbering: 1 is the last layer. How that maps onto diffusers' `clip_skip`:

* SD 1.x / 2.x: A1111 `n` takes hidden state `-n` through the final layer norm (n = 1: the
  encoder's normal output) = diffusers `clip_skip = n - 1` (None for n = 1).
  (For SD 2.x the diffusers text encoder already ends one layer early, as A1111's SD 2 does.)
* SDXL: both encoders' hidden state `-n` with no final layer norm; the default, n = 2 (penultimate),
  is what A1111 and diffusers both use for SDXL = diffusers `clip_skip = n - 2` (None for n = 2).
  diffusers applies its clip_skip to both encoders and so does atelier; A1111 only honours clip
  skip for SDXL's CLIP-L and only when its "sdxl_clip_l_skip" option is set.

Emphasis modes (A1111's names): "Original" multiplies each token's embedding by its weight and
then rescales the chunk so its mean is what it was; "No norm" only multiplies; "Ignore" parses
brackets but ignores the weights; "None" treats brackets as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atelier.errors import UserError
from atelier.prompts.chunks import PromptChunk, chunk_length_of, empty_chunk


def diffusers_clip_skip(clip_skip: int | None, *, sdxl: bool) -> int | None:
    """diffusers' `clip_skip` argument equivalent to A1111's Clip skip `clip_skip` (None = default)."""
    if clip_skip is None:
        return None
    offset = 2 if sdxl else 1
    return None if clip_skip == offset else clip_skip - offset


@dataclass
class TextEncoderSlot:
    """One tokenizer + text encoder pair and how its output is read."""

    tokenizer: object
    text_encoder: torch.nn.Module
    clip_skip: int  # A1111 numbering: 1 = last layer
    final_norm: bool  # SD 1/2 pass a skipped layer through the final layer norm, SDXL does not
    pooled: bool = False  # take the projected pooled output (SDXL's second encoder)

    def __post_init__(self):
        layers = self.text_encoder.config.num_hidden_layers
        if not 1 <= self.clip_skip <= layers:
            raise UserError(f"clip skip must be between 1 and {layers} for this text encoder, got {self.clip_skip}")
        length = chunk_length_of(self.tokenizer) + 2
        positions = getattr(self.text_encoder.config, "max_position_embeddings", length)
        if length > positions:
            raise UserError(f"tokenizer model_max_length {length} exceeds the text encoder's {positions} positions")

    @property
    def chunk_length(self) -> int:
        return chunk_length_of(self.tokenizer)

    def empty_chunk(self) -> PromptChunk:
        return empty_chunk(self.chunk_length, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)


def chunk_input_ids(chunks: list[PromptChunk], eos: int, pad: int | None) -> torch.Tensor:
    """Token ids for the encoder: everything after a chunk's first EOS becomes the pad token
    (SD 2.x and SDXL's second tokenizer pad with "!", id 0; SD 1.x pads with EOS)."""
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
    if pad is not None and pad != eos:
        is_eos = ids == eos
        after_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        ids = ids.masked_fill(after_first_eos, pad)
    return ids


def final_layer_norm(encoder) -> torch.nn.Module:
    """The encoder's final layer norm: transformers 5 keeps it on CLIPTextModel itself, older
    versions (and CLIPTextModelWithProjection) on `.text_model`."""
    norm = getattr(encoder, "final_layer_norm", None)
    return norm if norm is not None else encoder.text_model.final_layer_norm


@torch.no_grad()
def run_text_encoder(slot: TextEncoderSlot, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states `(n, L, C)` at the slot's clip-skip layer, and the pooled projection if asked."""
    encoder = slot.text_encoder
    out = encoder(input_ids.to(encoder.device), output_hidden_states=True)
    if slot.final_norm:
        if slot.clip_skip == 1:
            hidden = out.last_hidden_state
        else:
            hidden = final_layer_norm(encoder)(out.hidden_states[-slot.clip_skip])
    else:
        hidden = out.hidden_states[-slot.clip_skip]
    pooled = None
    if slot.pooled:
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise UserError("the second text encoder has no text projection (expected CLIPTextModelWithProjection)")
    return hidden, pooled


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Weight token embeddings. `z`: (B, K, L, C) for B prompt texts of K chunks; `weights`: (B, K, L).

    "Original" restores each chunk position's mean over the batch, as A1111 does for the texts of one
    prompt's schedule, which it encodes together; `counts` says how often each text appears there.
    """
    if mode in ("None", "Ignore"):
        return z
    w = weights.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    weighted = z.float() * w
    if mode == "Original":
        if counts is None:
            counts = torch.ones(z.shape[0])
        share = (counts.float() / counts.sum()).to(z.device).view(-1, 1)  # (B, 1)
        original_mean = (z.float().mean(dim=(2, 3)) * share).sum(dim=0)  # (K,)
        new_mean = (weighted.mean(dim=(2, 3)) * share).sum(dim=0)
        ratio = torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))  # 0/0 -> keep
        weighted = weighted * ratio.view(1, -1, 1, 1)
    return weighted.to(z.dtype)


def encode_chunks(
    slot: TextEncoderSlot,
    per_text: list[list[PromptChunk]],
    *,
    counts: list[int] | None = None,
    emphasis: str = "Original",
    chunk_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode the chunked texts of one prompt's schedule with one encoder.

    Returns hidden states `(B, K, L, C)` with emphasis applied (texts with fewer than K chunks are
    padded with empty chunks, encoded in the same batch, as A1111 does) and, for a pooled slot,
    `(B, P)`: each text's pooled output from its first chunk, never weighted.
    """
    k = max(chunk_count or 0, *(len(c) for c in per_text))
    flat = [chunk for chunks in per_text for chunk in chunks + [slot.empty_chunk()] * (k - len(chunks))]
    tok = slot.tokenizer
    hidden, pooled = run_text_encoder(slot, chunk_input_ids(flat, tok.eos_token_id, tok.pad_token_id))
    hidden = hidden.reshape(len(per_text), k, *hidden.shape[1:])
    weights = torch.tensor([c.weights for c in flat]).reshape(len(per_text), k, -1)
    count_tensor = torch.tensor(counts if counts is not None else [1] * len(per_text))
    hidden = apply_emphasis(hidden, weights, emphasis, count_tensor)
    if pooled is not None:
        pooled = pooled.reshape(len(per_text), k, -1)[:, 0]
    return hidden, pooled
