"""A1111-compatible prompts for diffusers pipelines (SD 1.x, SD 2.x, SDXL).

    expand_prompt      dynamicprompts variants {a|b} and wildcards __name__, seeded per image
    prompt_schedule    prompt editing [a:b:when] and alternation [a|b] per sampling step
    parse_attention    (emphasis), [de-emphasis], (word:1.3), escapes and BREAK
    build_conditioning chunked, weighted CLIP embeddings for every step, plus the diffusers
                       step callback that swaps them while sampling
"""

from atelier.prompts.attention import parse_attention
from atelier.prompts.chunks import EMPHASIS_MODES, PromptChunk, tokenize_chunks
from atelier.prompts.conditioning import PromptEditCallback, StepConditioning, build_conditioning
from atelier.prompts.encode import diffusers_clip_skip
from atelier.prompts.schedule import prompt_schedule, text_at_step, texts_per_step
from atelier.prompts.wildcards import expand_prompt, expand_prompts

__all__ = [
    "EMPHASIS_MODES",
    "PromptChunk",
    "PromptEditCallback",
    "StepConditioning",
    "build_conditioning",
    "diffusers_clip_skip",
    "expand_prompt",
    "expand_prompts",
    "parse_attention",
    "prompt_schedule",
    "text_at_step",
    "texts_per_step",
    "tokenize_chunks",
]
