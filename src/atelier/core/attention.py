"""Changing what a UNet's attention does, through diffusers attention processors (no forked UNet).

`AttentionHook` swaps `self.processor()` onto a UNet's cross-attention layers (attn2) for the
length of a `with hook.installed(unet):` block and puts the old processors back. `cross_attention`
is diffusers' AttnProcessor with the attention step itself left to the caller: `attend` when the
probabilities are needed (explicit softmax), `attend_sdpa` when only the output is (PyTorch SDPA,
which dispatches to fused kernels on GPUs).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class AttentionHook:
    """Base for objects that install `self.processor()` on a UNet's attention layers, then remove it."""

    layers = "attn2"  # cross-attention; "attn1" for self-attention, "all" for both
    _saved = None

    def processor(self):
        raise NotImplementedError

    def processor_for(self, name: str, original):
        """The processor to put at layer `name` in place of `original` (default: `self.processor()`);
        a hook that needs the replaced processor's own weights (an IP-Adapter's) overrides this."""
        return self.processor()

    def _wanted(self, name: str) -> bool:
        return self.layers == "all" or name.endswith(f"{self.layers}.processor")

    def install(self, unet) -> None:
        layers = attention_layers(unet)
        self._saved = {name: module.processor for name, module in layers}
        for name, module in layers:
            if self._wanted(name):
                module.set_processor(self.processor_for(name, module.processor))

    def remove(self, unet) -> None:
        if self._saved is not None:
            for name, module in attention_layers(unet):
                module.set_processor(self._saved[name])
            self._saved = None

    @contextmanager
    def installed(self, unet):
        self.install(unet)
        try:
            yield self
        finally:
            self.remove(unet)


CrossAttentionHook = AttentionHook


def attention_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every attention layer, named as diffusers' `attn_processors` names their
    processors; found once per UNet. Walking the module tree, as `attn_processors` and
    `set_attn_processor` each do on every call, cost more than a toy UNet's whole attention."""
    base = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: the module it wraps
    layers = base.__dict__.get("_atelier_attention_layers")
    if layers is None:
        base.attn_processors  # a UNet without attention processors to change (an exported one) refuses here
        layers = [(f"{name}.processor", module) for name, module in base.named_modules() if hasattr(module, "get_processor")]
        base.__dict__["_atelier_attention_layers"] = layers
    return layers


def attend(attn, query: torch.Tensor, context: torch.Tensor, attention_mask, batch: int):
    """(attention probabilities (B*heads, Q, K), output (B, Q, C)) of one attention with explicit
    softmax, so that the probabilities exist; `query` is already split into heads."""
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    probs = attn.get_attention_scores(query, key, mask)
    return probs, attn.batch_to_head_dim(torch.bmm(probs, value))


def attend_sdpa(attn, query: torch.Tensor, context: torch.Tensor, attention_mask, batch: int,
                to_k=None, to_v=None) -> torch.Tensor:
    """The output (B, Q, C) of the same attention as `attend`, through scaled_dot_product_attention;
    `to_k` / `to_v` replace the layer's own projections (an IP-Adapter's to_k_ip / to_v_ip)."""
    to_k, to_v = (to_k, to_v) if to_k is not None else (attn.to_k, attn.to_v)
    key = attn.head_to_batch_dim(to_k(context))
    value = attn.head_to_batch_dim(to_v(context))
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
    return attn.batch_to_head_dim(out)


def cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, inner):
    """diffusers' AttnProcessor around `inner(query, context, attention_mask, batch) -> (B, Q, C)`:
    the norms and reshapes before, the output projection, residual and rescale after."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    hidden_states = inner(query, context, attention_mask, batch)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def grid_shape(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (h, w) query grid of an attention layer with `tokens` positions over a latent of
    `latent_hw`: the UNet halves both sides per level (rounding up), so the aspect is the latent's."""
    h, w = latent_hw
    for level in range(8):
        gh, gw = h, w
        for _ in range(level):
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
        if gh * gw == tokens:
            return gh, gw
    raise ValueError(f"no UNet level of a {h}x{w} latent has {tokens} positions")
