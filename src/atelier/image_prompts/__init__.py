"""Image prompts: IP-Adapters (base and Plus, h94 layout, folders, files, the hub cache) through
diffusers, references embedded once and recorded by SHA-256.

    adapters = load_ip_adapter(pipe, "~/IP-Adapter", variant="plus")   # or [source, source] for two
    prompt = adapters.reference("ref.png", scale=0.6)                  # or an InstantStyle dict
    generate(pipe, GenerationRequest("a cat", image_prompts=[prompt]))

Names are imported on first use, so that `atelier --help` does not pay for torch and diffusers.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "IPAdapters": "atelier.image_prompts.adapters",
    "LoadedAdapter": "atelier.image_prompts.adapters",
    "load_ip_adapter": "atelier.image_prompts.adapters",
    "read_adapter": "atelier.image_prompts.adapters",
    "image_prompt_kwargs": "atelier.image_prompts.adapters",
    "image_prompt_fields": "atelier.image_prompts.adapters",
    "AdapterFiles": "atelier.image_prompts.sources",
    "resolve_adapter": "atelier.image_prompts.sources",
    "H94_FILES": "atelier.image_prompts.sources",
    "ImagePrompt": "atelier.image_prompts.references",
    "recorded_image_prompts": "atelier.image_prompts.references",
    "sha256_of": "atelier.image_prompts.references",
    "parse_scale": "atelier.image_prompts.references",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
