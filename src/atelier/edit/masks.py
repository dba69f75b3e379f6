"""Where an edit should happen, estimated by the model itself.

    noise difference   DiffEdit (Couairon et al., ICLR 2023): |eps(x_t, target) - eps(x_t, source)|
                       averaged over noise draws; high where the two prompts disagree
    cross-attention    Prompt-to-Prompt's LocalBlend: attention of the changed words' tokens, read
                       through an attention processor (no forked UNet)
Both are soft maps in [0, 1] at latent resolution; `binary_mask` thresholds and dilates them.
"""

from __future__ import annotations

import contextlib
import difflib

import numpy as np
import torch
import torch.nn.functional as F

from atelier.core.attention import AttentionHook, attend, attend_sdpa, cross_attention, grid_shape

FUNCTION_WORDS = {"a", "an", "the", "and", "at", "in", "on", "of", "with", ",", "."}


class CrossAttentionStore(AttentionHook):
    """Sums cross-attention probabilities per batch item and token, over layers and calls, at the
    layers `levels` below a latent of `latent_hw` (level 1: half its size, 2: a quarter, ...)."""

    def __init__(self, latent_hw: tuple[int, int], levels: tuple[int, ...] = (1, 2)):
        self.latent_hw = tuple(latent_hw)
        self.grids = set()
        for level in levels:
            h, w = self.latent_hw
            for _ in range(level):
                h, w = (h + 1) // 2, (w + 1) // 2
            self.grids.add((h, w))
        self.maps: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> (B, h * w, tokens)

    def processor(self):
        return _StoringProcessor(self)

    def grid(self, tokens: int) -> tuple[int, int] | None:
        """The recorded grid with `tokens` query positions, or None for a layer that is not recorded."""
        try:
            grid = grid_shape(self.latent_hw, tokens)
        except ValueError:
            return None
        return grid if grid in self.grids else None

    def record(self, probs: torch.Tensor, batch: int) -> None:
        grid = self.grid(probs.shape[1])
        if grid is None:
            return
        per_item = probs.reshape(batch, -1, *probs.shape[1:]).mean(1).float()
        self.maps[grid] = self.maps.get(grid, 0) + per_item.detach()

    def token_map(self, item: int, positions: list[int]) -> torch.Tensor:
        """(h, w) mean attention of `positions` for batch item `item` at latent size, upsampled from
        every recorded grid and averaged."""
        out = torch.zeros(self.latent_hw)
        for (gh, gw), m in self.maps.items():
            grid = m[item][:, positions].mean(-1).reshape(1, 1, gh, gw)
            out += F.interpolate(grid, size=self.latent_hw, mode="bilinear", align_corners=False)[0, 0].cpu()
        return out / max(1, len(self.maps))


class _StoringProcessor:
    """diffusers' AttnProcessor, recording the cross-attention probabilities of the recorded grids
    (explicit softmax there; SDPA at the other layers, whose probabilities are not needed)."""

    def __init__(self, store: CrossAttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        def inner(query, context, mask, batch):
            if encoder_hidden_states is None or self.store.grid(query.shape[1]) is None:
                return attend_sdpa(attn, query, context, mask, batch)
            probs, out = attend(attn, query, context, mask, batch)
            self.store.record(probs, batch)
            return out

        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, inner)


def changed_token_positions(tokenizer, source: str, target: str) -> tuple[list[int], list[int]]:
    """Token positions (BOS = 0) of the words that differ: in the source prompt (replaced or
    deleted) and in the target prompt (replaced or inserted); function words are left out."""
    ids_s = tokenizer(source, truncation=True).input_ids
    ids_t = tokenizer(target, truncation=True).input_ids
    skip = _token_ids(tokenizer, FUNCTION_WORDS)
    src, tgt = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ids_s, ids_t, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            src += [i for i in range(i1, i2) if ids_s[i] not in skip]
        if op in ("replace", "insert"):
            tgt += [j for j in range(j1, j2) if ids_t[j] not in skip]
    return src, tgt


PHRASE_BREAKS = {",", ";", ".", "and"}


def phrase_positions(tokenizer, source: str, target: str) -> tuple[list[int], list[int]]:
    """Token positions (BOS = 0) of the phrases that hold a changed word, in the source and in the
    target prompt: a prompt splits into phrases at commas, semicolons, full stops and "and" (the way
    captions and A1111 prompts list things), and a phrase counts whole when any word of it changes, so
    "make the red circle blue" localises the circle through all of "a large red circle at the top left",
    not through "red" alone. Function words are left out."""
    changed = changed_token_positions(tokenizer, source, target)
    skip = _token_ids(tokenizer, FUNCTION_WORDS)
    breaks = _token_ids(tokenizer, PHRASE_BREAKS) - {tokenizer.unk_token_id}  # a word the vocabulary lacks is no break

    def phrases_holding(text: str, positions: list[int]) -> list[int]:
        ids = tokenizer(text, truncation=True).input_ids
        out, phrase = [], []
        for i in range(1, len(ids) + 1):  # BOS skipped; the EOS (or the end) closes the last phrase
            if i >= len(ids) - 1 or ids[i] in breaks:
                if set(phrase) & set(positions):
                    out += [j for j in phrase if ids[j] not in skip]
                phrase = []
                if i >= len(ids) - 1:
                    break
            else:
                phrase.append(i)
        return out

    return phrases_holding(source, changed[0]), phrases_holding(target, changed[1])


def _token_ids(tokenizer, words) -> set[int]:
    return {tokenizer.convert_tokens_to_ids(w) for w in words} | {tokenizer.convert_tokens_to_ids(w + "</w>") for w in words}


def normalised(soft: torch.Tensor) -> torch.Tensor:
    soft = soft - soft.min()
    return soft / soft.max().clamp(min=1e-8)


@torch.no_grad()
def estimate_masks(den, x0: torch.Tensor, source: str, target: str, *, t: int = 500, samples: int = 4,
                   seed: int = 0, attention: bool = True) -> dict[str, torch.Tensor]:
    """Soft (h, w) maps in [0, 1]: "noise" (DiffEdit) and, when asked, "attention" (the changed
    words' cross-attention: source words under the source prompt, target words under the target)."""
    hidden, pooled = den.conditioning([source, target])
    latent_hw = tuple(x0.shape[-2:])
    store = CrossAttentionStore(latent_hw) if attention else None
    generator = torch.Generator("cpu").manual_seed(seed)
    diff = torch.zeros(latent_hw)
    with store.installed(den.unet) if store is not None else contextlib.nullcontext():
        a, b = den.coefficients(t)
        for _ in range(samples):
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            x_t = (a * x0 + b * noise).expand(2, -1, -1, -1)
            _, eps = den.x0_eps(x_t, t, hidden, pooled)
            diff += (eps[1] - eps[0]).abs().mean(0).float().cpu()
    maps = {"noise": normalised(F.avg_pool2d(diff[None, None], 3, 1, 1)[0, 0])}
    if store is not None:
        src_pos, tgt_pos = changed_token_positions(den.pipe.tokenizer, source, target)
        parts = []
        if src_pos:
            parts.append(normalised(store.token_map(0, src_pos)))
        if tgt_pos:
            parts.append(normalised(store.token_map(1, tgt_pos)))
        maps["attention"] = torch.stack(parts).amax(0) if parts else torch.zeros(latent_hw)
    return maps


def binary_mask(soft: torch.Tensor, threshold: float, dilate: int = 1, regions: int = 0) -> torch.Tensor:
    """Threshold a soft map, keep its `regions` strongest connected regions (0: all), then grow it by
    `dilate` cells: (h, w) float in {0, 1}."""
    mask = soft >= threshold
    if regions:
        mask = strongest_regions(soft, mask, regions)
    mask = mask.float()[None, None]
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, 1, dilate)
    return mask[0, 0]


def strongest_regions(soft: torch.Tensor, mask: torch.Tensor, regions: int) -> torch.Tensor:
    """The `regions` connected regions (4-neighbourhood) of a boolean (h, w) mask whose soft values peak
    highest (ties: the larger first), the others cleared: an edit of one object is one region, and a
    second, weaker blob is the mask reacting to something else."""
    from scipy import ndimage

    labels, count = ndimage.label(mask.cpu().numpy())
    if count <= regions:
        return mask
    values = soft.detach().float().cpu().numpy()
    ranked = sorted(range(1, count + 1), key=lambda r: (values[labels == r].max(), (labels == r).sum()), reverse=True)
    return torch.from_numpy(np.isin(labels, ranked[:regions])).to(mask.device)


def pixel_mask(mask: torch.Tensor, height: int, width: int, feather: int = 1) -> torch.Tensor:
    """A latent-resolution mask at image size, edges softened over `feather` pixels."""
    up = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")
    if feather > 0:
        up = F.avg_pool2d(F.max_pool2d(up, 2 * feather + 1, 1, feather), 2 * feather + 1, 1, feather)
    return up[0, 0].clamp(0, 1)
