"""Attention backends through diffusers' attention dispatcher (`diffusers.models.attention_dispatch`).

The default is PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, "native"). The
UNets of SD 1.x/2.x/SDXL keep the older `Attention` processors, which call SDPA directly, so
`ModelMixin.set_attention_backend` alone does not reach them: `set_attention` puts a processor on
each of their plain SDPA layers that runs the same computation through `dispatch_attention_fn` with
the chosen backend (IP-Adapter, PAG and editing processors are left as they are).
"""

from __future__ import annotations

import torch

from atelier.errors import UserError

DEFAULT_BACKEND = "native"
# Backends whose kernels exist only on NVIDIA GPUs (the dispatcher checks packages, not devices).
_CUDA_ONLY = ("flash", "_flash", "sage", "_sage", "xformers", "_native_cudnn", "_native_efficient", "_native_flash", "aiter")


def attention_backends(device=None) -> dict[str, str | None]:
    """Every backend name of the installed diffusers -> None when usable on `device` here, else why not."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    device = torch.device(device or "cpu")
    found = {}
    for backend in AttentionBackendName:
        name = backend.value
        if name.endswith("_hub"):
            found[name] = "downloads its kernel from the Hugging Face Hub"
            continue
        try:
            _check_attention_backend_requirements(backend)
        except (RuntimeError, ImportError) as exc:
            found[name] = str(exc).split(". ")[0]
            continue
        if name.startswith(_CUDA_ONLY) and device.type != "cuda":
            found[name] = "needs a CUDA device"
        elif name in ("_native_npu", "_native_xla"):
            found[name] = "needs an NPU / XLA device"
        else:
            found[name] = None
    return found


def check_backend(name: str, device=None) -> str:
    backends = attention_backends(device)
    usable = sorted(n for n, why in backends.items() if why is None)
    if name not in backends:
        raise UserError(f"unknown attention backend {name!r}: usable here: {', '.join(usable)}")
    if backends[name] is not None:
        raise UserError(f"attention backend {name!r} is not usable here ({backends[name]}); usable: {', '.join(usable)}")
    return name


class DispatchAttnProcessor:
    """AttnProcessor2_0's computation with the attention itself done by diffusers' dispatcher."""

    def __init__(self, backend: str):
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.backend = AttentionBackendName(backend)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        # the dispatcher takes (batch, sequence, heads, head_dim)
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self.backend)
        hidden_states = hidden_states.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention(model, backend: str) -> int:
    """Run `model`'s plain SDPA attention layers through `backend` ("native": back to
    AttnProcessor2_0). Returns how many layers now use it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = next(model.parameters()).device
    check_backend(backend, device)
    plain = (AttnProcessor2_0, DispatchAttnProcessor)
    processors = model.attn_processors
    changed = {}
    for name, processor in processors.items():
        if type(processor) in plain:
            changed[name] = AttnProcessor2_0() if backend == DEFAULT_BACKEND else DispatchAttnProcessor(backend)
    if changed:
        model.set_attn_processor({**processors, **changed})
    return len(changed)
