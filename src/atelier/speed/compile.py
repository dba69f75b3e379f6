"""torch.compile of the UNet: regional by default (the repeated transformer blocks, diffusers'
`compile_repeated_blocks`: most of the speed-up for a fraction of the compile time), or the whole
UNet. Compilation happens on the first call; `warm_up` makes that call and times it."""

from __future__ import annotations

import time

import torch

from atelier.errors import UserError

COMPILE_MODES = ("off", "regional", "full")
# torch.compile's `mode`: "reduce-overhead" records CUDA graphs, "max-autotune" autotunes kernels (and
# uses CUDA graphs too); both need a CUDA GPU.
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_compile_mode(compile_mode: str, device) -> None:
    """UserError (one line) for a torch.compile mode unknown, or needing CUDA on a non-CUDA `device`."""
    if compile_mode not in TORCH_COMPILE_MODES:
        raise UserError(f"unknown --compile-mode {compile_mode!r}: choose from {', '.join(TORCH_COMPILE_MODES)}")
    kind = torch.device(device).type
    if compile_mode != "default" and kind != "cuda":
        raise UserError(f"--compile-mode {compile_mode} uses CUDA graphs and needs a CUDA GPU; "
                        f"on this {kind} use the default mode")


def compile_unet(unet, mode: str = "regional", *, dynamic: bool | None = None, fullgraph: bool = False,
                 backend: str | None = None, compile_mode: str = "default") -> dict:
    """Compile `unet` in place (the same object stays in the pipeline; its state-dict keys do not
    change: no `_orig_mod.` wrapper). `dynamic=True` for callers whose batch size varies (the stream);
    `backend`: torch.compile's ("inductor" by default; tests use "aot_eager"); `compile_mode`:
    torch.compile's `mode` ("reduce-overhead": CUDA graphs). Returns {"compile": mode, "blocks": n
    compiled modules, "dynamic", "backend", "mode"}."""
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}: choose from {', '.join(COMPILE_MODES)}")
    if compile_mode not in TORCH_COMPILE_MODES:
        raise UserError(f"unknown torch.compile mode {compile_mode!r}: choose from {', '.join(TORCH_COMPILE_MODES)}")
    if mode == "off":
        return {"compile": "off"}
    kwargs = {"dynamic": dynamic, "fullgraph": fullgraph}
    if backend:
        kwargs["backend"] = backend
    if compile_mode != "default":
        kwargs["mode"] = compile_mode
    if mode == "full":
        unet.compile(**kwargs)
        blocks = 1
    else:
        names = tuple(getattr(unet, "_repeated_blocks", ()) or ())
        if names:
            unet.compile_repeated_blocks(**kwargs)
        else:  # a model diffusers has no regions for: its transformer blocks, by class name
            names = ("BasicTransformerBlock",)
            for module in unet.modules():
                if type(module).__name__ in names:
                    module.compile(**kwargs)
        blocks = sum(type(m).__name__ in names for m in unet.modules())
        if not blocks:
            raise UserError(f"--compile regional: {type(unet).__name__} has no transformer blocks; use --compile full")
    return {"compile": mode, "blocks": blocks, "dynamic": dynamic, "backend": backend or "inductor", "mode": compile_mode}


def uncompile(module) -> None:
    """Undo `compile_unet` (and `Module.compile`) on `module` and its submodules, in place: eager again."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None


def plain_copy(module):
    """A deep copy of `module` that runs eagerly. (A deep copy of a compiled module would keep the
    compiled call of the original, bound to the original's weights.)"""
    import copy

    clone = copy.deepcopy(module)
    uncompile(clone)
    return clone


def dummy_unet_inputs(unet, batch: int = 2, size: int | None = None) -> dict:
    """Inputs of the shapes a pipeline passes its UNet (SDXL's added conditions included)."""
    config = unet.config
    param = next(unet.parameters())
    device, dtype = param.device, (param.dtype if param.is_floating_point() else torch.float32)
    side = size or config.sample_size
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = {
        "sample": torch.randn(batch, config.in_channels, side, side, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, 77, cross, device=device, dtype=dtype),
    }
    if config.addition_embed_type == "text_time":
        time_dim = config.addition_time_embed_dim
        text_dim = config.projection_class_embeddings_input_dim - 6 * time_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}
    return inputs


def warm_up(unet, batch: int = 2, size: int | None = None, *, inference_mode: bool = False) -> float:
    """Call `unet` once (compiling what is to be compiled); seconds it took. `inference_mode`: as
    the caller will run it (atelier's generation runs under inference_mode, the stream under no_grad)."""
    inputs = dummy_unet_inputs(unet, batch, size)
    start = time.perf_counter()
    with torch.inference_mode() if inference_mode else torch.no_grad():
        unet(**inputs)
    return time.perf_counter() - start
