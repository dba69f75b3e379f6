"""Model loading: diffusers folders, single-file checkpoints, hub ids and built-in models.

    pipe = load_pipeline("path/to/model.safetensors")        # or a folder, "org/name", "toyworld"
    info = detect_family(pipe)                                # family, prediction type, defaults
"""

from atelier.models.families import FAMILIES, ModelFamily, detect_family, detect_family_from_folder
from atelier.models.loader import (
    BUILTIN_DIR,
    apply_lora,
    bundled_config_dir,
    bundled_config_names,
    clip_bpe_path,
    ensure_sdpa,
    is_lcm_lora,
    list_builtin_models,
    load_pipeline,
    load_tiny_autoencoder,
    pick_device_dtype,
    resolve_model_path,
    to_img2img,
)
from atelier.models.save import make_portable, save_model_folder
from atelier.models.singlefile import inspect_checkpoint, original_state_dict, save_single_file

__all__ = [
    "BUILTIN_DIR",
    "FAMILIES",
    "ModelFamily",
    "apply_lora",
    "bundled_config_dir",
    "bundled_config_names",
    "clip_bpe_path",
    "detect_family",
    "detect_family_from_folder",
    "ensure_sdpa",
    "inspect_checkpoint",
    "is_lcm_lora",
    "list_builtin_models",
    "load_pipeline",
    "make_portable",
    "load_tiny_autoencoder",
    "original_state_dict",
    "pick_device_dtype",
    "resolve_model_path",
    "save_model_folder",
    "save_single_file",
    "to_img2img",
]
