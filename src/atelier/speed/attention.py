"""Attention backends through diffusers' attention dispatcher (`diffusers.models.attention_dispatch`).

The default is PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, "native"). The
UNets of SD 1.x/2.x/SDXL keep the older `Attention` processors, which call SDPA directly, so
`ModelMixin.set_attention_backend` alone does not reach them: `set_attention` puts a processor on
each of their plain SDPA layers that runs the same computation through `dispatch_attention_fn` with
the chosen backend (IP-Adapter, PAG and editing processors are left as they are).
"""

from __future__ import annotations

import torch

from atelier.core.attention import cross_attention
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
    """AttnProcessor2_0's computation (atelier.core.attention.cross_attention: norms, reshapes,
    output projection, residual) with the attention itself done by diffusers' dispatcher."""

    def __init__(self, backend: str):
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.backend = AttentionBackendName(backend)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                               lambda query, context, mask, batch: self.attend(attn, query, context, mask, batch))

    def attend(self, attn, query, context, attention_mask, batch: int) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        heads = attn.heads
        # the dispatcher takes (batch, sequence, heads, head_dim); `query` comes as (batch * heads, sequence, head_dim)
        query = query.view(batch, heads, -1, query.shape[-1]).transpose(1, 2)
        key, value = (proj(context).view(batch, context.shape[1], heads, -1) for proj in (attn.to_k, attn.to_v))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if mask is not None:
            mask = mask.view(batch, heads, -1, mask.shape[-1])
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, scale=attn.scale, backend=self.backend)
        return out.reshape(batch, -1, heads * query.shape[-1]).to(query.dtype)


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
