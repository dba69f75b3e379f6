"""Per-step text conditioning for diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.

`build_conditioning` turns A1111 prompts (weights, BREAK, long prompts, prompt editing,
alternation) into embeddings: every distinct scheduled text is encoded once, and
`embeds_at(step)` gives what the UNet should see at that step. Pass step 0's embeddings to the
pipeline and let `step_callback(pipe)` swap them while sampling:

    cond = build_conditioning(pipe, "a [cat:dog:0.5]", "blurry", steps=30)
    image = pipe(num_inference_steps=30, **cond.pipeline_kwargs(pipe)).images[0]

Positive and negative prompts (and all prompts of a batch) are padded to the same number of
chunks with the empty prompt's embedding, as A1111's "Pad prompt/negative prompt" option does
(A1111's default instead runs the two through the UNet separately, which diffusers cannot).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from atelier.errors import UserError
from atelier.prompts.chunks import DEFAULT_COMMA_BACKTRACK, check_emphasis, tokenize_chunks
from atelier.prompts.encode import TextEncoderSlot, encode_chunks, run_text_encoder, chunk_input_ids
from atelier.prompts.schedule import prompt_schedule, text_at_step

_AND = re.compile(r"\bAND\b")


def is_sdxl_pipeline(pipe) -> bool:
    return "text_encoder_2" in getattr(pipe, "components", {}) or hasattr(pipe, "text_encoder_2")


def encoder_slots(pipe, clip_skip: int | None = None) -> list[TextEncoderSlot]:
    """The pipeline's text encoders, read at A1111 Clip skip `clip_skip` (None: the model's default)."""
    if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 1):
        raise UserError(f"clip skip must be a whole number >= 1 (1 = last layer), got {clip_skip!r}")
    if is_sdxl_pipeline(pipe):
        skip = clip_skip or 2
        pairs = [(pipe.tokenizer, pipe.text_encoder, False), (pipe.tokenizer_2, pipe.text_encoder_2, True)]
        slots = [TextEncoderSlot(t, e, skip, final_norm=False, pooled=p) for t, e, p in pairs if e is not None]
    else:
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise UserError("this pipeline has no CLIP text encoder and tokenizer to encode prompts with")
        slots = [TextEncoderSlot(pipe.tokenizer, pipe.text_encoder, clip_skip or 1, final_norm=True)]
    if len({s.chunk_length for s in slots}) != 1:
        raise UserError("the pipeline's tokenizers disagree on model_max_length")
    return slots


@dataclass
class PromptEncoding:
    """One prompt over all steps: its distinct scheduled texts and which one each step uses."""

    texts: list[str]
    hidden: torch.Tensor  # (len(texts), tokens, channels)
    pooled: torch.Tensor | None  # (len(texts), projection) for SDXL
    step_text: list[int]  # index into texts for every step


def _check_prompt(prompt) -> str:
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be text, got {type(prompt).__name__}")
    if _AND.search(prompt):
        raise UserError("AND (composable prompts) is not supported; use BREAK or prompt editing instead")
    return prompt


def encode_prompt(
    slots: list[TextEncoderSlot],
    prompt: str,
    steps: int,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
    convert_text=None,
    zero_if_empty: bool = False,
) -> PromptEncoding:
    """Encode every distinct text of `prompt`'s schedule once, with all text encoders."""
    schedule = prompt_schedule(prompt, steps)
    entry_texts = [text for _, text in schedule]
    texts = list(dict.fromkeys(entry_texts))
    step_text = [texts.index(text_at_step(schedule, i)) for i in range(steps)]
    length = slots[0].chunk_length + 2

    if zero_if_empty and texts == [""]:  # SDXL's empty negative prompt: zeros, as A1111 and diffusers do
        channels = sum(s.text_encoder.config.hidden_size for s in slots)
        pooled_slot = next((s for s in slots if s.pooled), None)
        like = dict(dtype=slots[0].text_encoder.dtype, device=slots[0].text_encoder.device)
        pooled = None if pooled_slot is None else torch.zeros(1, pooled_slot.text_encoder.config.projection_dim, **like)
        return PromptEncoding(texts, torch.zeros(1, length, channels, **like), pooled, step_text)

    # A1111 encodes the texts of a schedule in one batch, one entry per schedule line.
    counts = [entry_texts.count(t) for t in texts]
    chunked = [
        [tokenize_chunks(t, s.tokenizer, emphasis=emphasis, comma_backtrack=comma_backtrack, convert_text=convert_text) for t in texts]
        for s in slots
    ]
    chunk_count = max(len(chunks) for per_slot in chunked for chunks in per_slot)
    hiddens, pooled = [], None
    for slot, per_text in zip(slots, chunked):
        hidden, slot_pooled = encode_chunks(slot, per_text, counts=counts, emphasis=emphasis, chunk_count=chunk_count)
        hiddens.append(hidden)
        pooled = slot_pooled if slot_pooled is not None else pooled
    hidden = torch.cat(hiddens, dim=-1)
    hidden = hidden.reshape(len(texts), chunk_count * length, hidden.shape[-1])
    return PromptEncoding(texts, hidden, pooled, step_text)


def embedding_token_expander(pipe):
    """diffusers' `maybe_convert_prompt`, which spells a multi-vector embedding's name `name name_1 ...`,
    on lower-cased text: diffusers matches the names case-sensitively in the text but finds them in the
    tokenizer's lower-cased tokens, and CLIP tokenizers lower-case the text anyway."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    if convert is None:
        return None
    return lambda text, tokenizer: convert(text.lower(), tokenizer)


def empty_prompt_hidden(slots: list[TextEncoderSlot]) -> torch.Tensor:
    """The empty prompt's embedding `(L, C)`: what shorter conditionings are padded with."""
    parts = []
    for slot in slots:
        tok = slot.tokenizer
        hidden, _ = run_text_encoder(slot, chunk_input_ids([slot.empty_chunk()], tok.eos_token_id, tok.pad_token_id))
        parts.append(hidden[0])
    return torch.cat(parts, dim=-1)


def _pad_tokens(enc: PromptEncoding, tokens: int, empty: torch.Tensor) -> PromptEncoding:
    missing = tokens - enc.hidden.shape[1]
    if missing:
        repeats = missing // empty.shape[0]
        pad = empty.to(enc.hidden).repeat(repeats, 1).unsqueeze(0).expand(enc.hidden.shape[0], -1, -1)
        enc.hidden = torch.cat([enc.hidden, pad], dim=1)
    return enc


@dataclass
class StepConditioning:
    """Embeddings for every sampling step of one generation (a batch of prompts)."""

    steps: int
    positive: list[PromptEncoding]
    negative: list[PromptEncoding]
    sdxl: bool
    _cache: dict = field(default_factory=dict, repr=False)

    def _key(self, step: int) -> tuple:
        step = min(max(step, 0), self.steps - 1)
        return tuple(e.step_text[step] for e in self.positive) + tuple(e.step_text[step] for e in self.negative)

    @property
    def is_static(self) -> bool:
        """True when no step differs from step 0 (no prompt editing or alternation in effect)."""
        first = self._key(0)
        return all(self._key(i) == first for i in range(self.steps))

    @property
    def batch_size(self) -> int:
        return len(self.positive)

    def texts_at(self, step: int) -> tuple[list[str], list[str]]:
        """The prompt and negative prompt texts used at `step` (0-based), one per batch item."""
        key = self._key(step)
        n = len(self.positive)
        return ([e.texts[i] for e, i in zip(self.positive, key[:n])], [e.texts[i] for e, i in zip(self.negative, key[n:])])

    def embeds_at(self, step: int):
        """`(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`
        for 0-based `step`; the pooled ones are None for SD 1.x/2.x."""
        key = self._key(step)
        if key not in self._cache:
            n = len(self.positive)
            pos = [(e, i) for e, i in zip(self.positive, key[:n])]
            neg = [(e, i) for e, i in zip(self.negative, key[n:])]
            hidden = [torch.stack([e.hidden[i] for e, i in side]) for side in (pos, neg)]
            pooled = [torch.stack([e.pooled[i] for e, i in side]) if self.sdxl else None for side in (pos, neg)]
            self._cache[key] = (hidden[0], hidden[1], pooled[0], pooled[1])
        return self._cache[key]

    at = embeds_at  # short name used by atelier.generate

    @property
    def tensor_inputs(self) -> list[str]:
        """Names for `callback_on_step_end_tensor_inputs` that `step_callback` needs."""
        return ["prompt_embeds", "add_text_embeds"] if self.sdxl else ["prompt_embeds"]

    def step_callback(self, pipe) -> "PromptEditCallback":
        """A `callback_on_step_end` that swaps in each step's embeddings (it has `.tensor_inputs`)."""
        if is_sdxl_pipeline(pipe) != self.sdxl:
            raise UserError("this conditioning was built for a different kind of pipeline (SD vs SDXL)")
        supported = set(getattr(pipe, "_callback_tensor_inputs", self.tensor_inputs))
        missing = [name for name in self.tensor_inputs if name not in supported]
        if missing:
            raise UserError(f"{type(pipe).__name__} does not let a step callback replace {missing}")
        return PromptEditCallback(self)

    def pipeline_kwargs(self, pipe) -> dict:
        """Keyword arguments for the pipeline call: step 0's embeddings, plus the step callback when
        the prompt changes during sampling."""
        prompt, negative, pooled, negative_pooled = self.embeds_at(0)
        kwargs = {"prompt_embeds": prompt, "negative_prompt_embeds": negative}
        if self.sdxl:
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
        if not self.is_static:
            callback = self.step_callback(pipe)
            kwargs.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=list(callback.tensor_inputs))
        return kwargs


def _batch_layout(pipe, current: torch.Tensor, batch: int) -> tuple[bool, int]:
    """(classifier-free guidance on?, images per prompt) from the tensor the pipeline holds."""
    cfg = bool(getattr(pipe, "do_classifier_free_guidance", current.shape[0] == 2 * batch))
    rows = current.shape[0] // (2 if cfg else 1)
    if rows % batch:
        raise RuntimeError(f"pipeline holds {current.shape[0]} conditioning rows, not a multiple of {batch} prompts")
    return cfg, rows // batch


def _layout(positive, negative, current: torch.Tensor, cfg: bool, per_prompt: int) -> torch.Tensor:
    rows = positive.repeat_interleave(per_prompt, dim=0)
    if cfg:
        rows = torch.cat([negative.repeat_interleave(per_prompt, dim=0), rows])
    return rows.to(device=current.device, dtype=current.dtype)


class PromptEditCallback:
    """diffusers `callback_on_step_end`: after step i, install the embeddings of step i + 1.

    With classifier-free guidance the pipeline holds `[negative, positive]` already concatenated
    (and each repeated `num_images_per_prompt` times); this rebuilds that layout. For second-order
    schedulers (Heun, DPM2) the pipeline's step index counts model calls: step = index // order.
    Works inside `diffusers.callbacks.MultiPipelineCallbacks`.
    """

    def __init__(self, conditioning: StepConditioning):
        self.conditioning = conditioning
        self.tensor_inputs = conditioning.tensor_inputs

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        cond = self.conditioning
        order = getattr(pipe.scheduler, "order", 1)
        now, upcoming = step_index // order, (step_index + 1) // order
        if upcoming >= cond.steps or cond._key(now) == cond._key(upcoming):
            return callback_kwargs
        prompt, negative, pooled, negative_pooled = cond.embeds_at(upcoming)
        current = callback_kwargs["prompt_embeds"]
        cfg, per_prompt = _batch_layout(pipe, current, cond.batch_size)
        callback_kwargs["prompt_embeds"] = _layout(prompt, negative, current, cfg, per_prompt)
        if cond.sdxl:
            callback_kwargs["add_text_embeds"] = _layout(pooled, negative_pooled, callback_kwargs["add_text_embeds"], cfg, per_prompt)
        return callback_kwargs


def _as_list(prompts, name: str) -> list:
    if prompts is None or isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UserError(f"no {name} given")
    return prompts


def build_conditioning(
    pipe,
    prompt,
    negative_prompt=None,
    steps: int = 1,
    *,
    clip_skip: int | None = None,
    emphasis: str = "Original",
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> StepConditioning:
    """Encode A1111 prompt(s) for `steps` sampling steps with `pipe`'s text encoder(s).

    `prompt` is a string or a list (one per image); `negative_prompt` a string (shared) or a list of
    the same length. `clip_skip` uses A1111's numbering (1 = last layer; default 1 for SD 1/2 and
    2 for SDXL, see `atelier.prompts.encode`). `emphasis`: "Original", "No norm", "Ignore" or "None".
    `comma_backtrack` (0 disables) is A1111's "comma_padding_backtrack".
    """
    check_emphasis(emphasis)
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a whole number >= 1, got {steps!r}")
    prompts = [_check_prompt(p) for p in _as_list(prompt, "prompt")]
    negatives = [_check_prompt(p) for p in _as_list(negative_prompt, "negative prompt")]
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")

    slots = encoder_slots(pipe, clip_skip)
    sdxl = is_sdxl_pipeline(pipe)
    zero_negative = sdxl and bool(getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True))
    options = dict(emphasis=emphasis, comma_backtrack=comma_backtrack, convert_text=embedding_token_expander(pipe))

    encoded: dict[tuple[str, bool], PromptEncoding] = {}

    def encode(text: str, negative: bool) -> PromptEncoding:
        key = (text, negative and zero_negative)
        if key not in encoded:
            encoded[key] = encode_prompt(slots, text, steps, zero_if_empty=key[1], **options)
        return encoded[key]

    positive = [encode(p, False) for p in prompts]
    negative = [encode(n, True) for n in negatives]
    tokens = max(e.hidden.shape[1] for e in encoded.values())
    if any(e.hidden.shape[1] != tokens for e in encoded.values()):
        empty = empty_prompt_hidden(slots)
        for enc in encoded.values():
            _pad_tokens(enc, tokens, empty)
    return StepConditioning(steps=steps, positive=positive, negative=negative, sdxl=sdxl)
