"""Speed: one optimisation layer for every mode (generate, img2img, edit, stream/serve, training).

    from atelier.speed import SpeedOptions, apply_speed
    applied = apply_speed(pipe, SpeedOptions(quantize="int8wo", compile="regional"))

Building blocks for benchmarks: quantize_module, model_bytes, compile_unet, warm_up, set_attention,
attention_backends, apply_cpu_numerics. See docs/speed.md.
"""

from atelier._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "SpeedOptions": "atelier.speed.options",
    "apply_speed": "atelier.speed.options",
    "describe": "atelier.speed.options",
    "speed_info": "atelier.speed.info",
    "apply_cpu_numerics": "atelier.speed.numerics",
    "denormals_flushed": "atelier.speed.numerics",
    "QUANTIZE_MODES": "atelier.speed.quantize",
    "quantize_module": "atelier.speed.quantize",
    "model_bytes": "atelier.speed.quantize",
    "linear_layers": "atelier.speed.quantize",
    "save_quantized": "atelier.speed.quantize",
    "load_quantized": "atelier.speed.quantize",
    "fp8_supported": "atelier.speed.quantize",
    "COMPILE_MODES": "atelier.speed.compile",
    "compile_unet": "atelier.speed.compile",
    "warm_up": "atelier.speed.compile",
    "attention_backends": "atelier.speed.attention",
    "set_attention": "atelier.speed.attention",
})
