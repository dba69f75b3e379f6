"""A1111-compatible prompts for diffusers pipelines (SD 1.x, SD 2.x, SDXL).

    expand_prompt      dynamicprompts variants {a|b} and wildcards __name__, seeded per image
    prompt_schedule    prompt editing [a:b:when] and alternation [a|b] per sampling step
    parse_attention    (emphasis), [de-emphasis], (word:1.3), escapes and BREAK
    build_conditioning chunked, weighted CLIP embeddings for every step, plus the diffusers
                       step callback that swaps them while sampling
    extract_lora_tags  A1111's <lora:name:weight> tags, cut out of the prompt text

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "EMPHASIS_MODES": "atelier.prompts.chunks",
    "PromptChunk": "atelier.prompts.chunks",
    "PromptEditCallback": "atelier.prompts.conditioning",
    "StepConditioning": "atelier.prompts.conditioning",
    "build_conditioning": "atelier.prompts.conditioning",
    "diffusers_clip_skip": "atelier.prompts.encode",
    "expand_prompt": "atelier.prompts.wildcards",
    "extract_lora_tags": "atelier.prompts.extra_networks",
    "LoraTag": "atelier.prompts.extra_networks",
    "lora_tag": "atelier.prompts.extra_networks",
    "mentions_word": "atelier.prompts.extra_networks",
    "expand_prompts": "atelier.prompts.wildcards",
    "parse_attention": "atelier.prompts.attention",
    "prompt_schedule": "atelier.prompts.schedule",
    "text_at_step": "atelier.prompts.schedule",
    "texts_per_step": "atelier.prompts.schedule",
    "tokenize_chunks": "atelier.prompts.chunks",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
