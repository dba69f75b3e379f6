"""Model loading: diffusers folders, single-file checkpoints, hub ids and built-in models.

    pipe = load_pipeline("path/to/model.safetensors")        # or a folder, "org/name", "toyworld"
    info = detect_family(pipe)                                # family, prediction type, defaults
    apply_lora(pipe, "style.safetensors", 0.8)                # kohya/A1111, diffusers or peft LoRA files
    apply_embedding(pipe, "easynegative.safetensors")          # textual inversion, token = file name
    save_kohya_copy("pytorch_lora_weights.safetensors", "style.safetensors", "sdxl")  # for A1111/ComfyUI
"""

from atelier.models.embeddings import apply_embedding, read_embedding_file, save_embedding_file
from atelier.models.families import FAMILIES, ModelFamily, detect_family, detect_family_from_folder
from atelier.models.loader import (
    BUILTIN_DIR,
    activate_loras,
    apply_lora,
    bundled_config_dir,
    bundled_config_names,
    clip_bpe_path,
    ensure_sdpa,
    is_lcm_lora,
    is_tiny_autoencoder_source,
    list_builtin_models,
    load_lora_adapter,
    load_pipeline,
    load_tiny_autoencoder,
    pick_device_dtype,
    resolve_model_path,
    resolve_tiny_autoencoder,
    to_img2img,
)
from atelier.models.lora_files import kohya_state_dict, save_kohya_copy
from atelier.models.save import make_portable, save_model_folder
from atelier.models.singlefile import inspect_checkpoint, original_state_dict, save_single_file

__all__ = [
    "BUILTIN_DIR",
    "FAMILIES",
    "ModelFamily",
    "activate_loras",
    "apply_embedding",
    "apply_lora",
    "bundled_config_dir",
    "bundled_config_names",
    "clip_bpe_path",
    "detect_family",
    "detect_family_from_folder",
    "ensure_sdpa",
    "inspect_checkpoint",
    "is_lcm_lora",
    "is_tiny_autoencoder_source",
    "kohya_state_dict",
    "list_builtin_models",
    "load_lora_adapter",
    "load_pipeline",
    "make_portable",
    "load_tiny_autoencoder",
    "original_state_dict",
    "pick_device_dtype",
    "read_embedding_file",
    "resolve_model_path",
    "resolve_tiny_autoencoder",
    "save_embedding_file",
    "save_kohya_copy",
    "save_model_folder",
    "save_single_file",
    "to_img2img",
]
