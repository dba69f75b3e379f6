"""Changing what a UNet's cross-attention does, through diffusers attention processors (no forked
UNet): `CrossAttentionHook` swaps a processor onto every cross-attention layer (attn2) for the
length of a call and puts the old ones back; `cross_attention` is diffusers' AttnProcessor with
the attention step itself left to the caller."""

from __future__ import annotations

import torch


class CrossAttentionHook:
    """Base for objects that install `self.processor()` on every attn2 of a UNet, then remove it."""

    _saved = None

    def processor(self):
        raise NotImplementedError

    def install(self, unet) -> None:
        self._saved = dict(unet.attn_processors)
        unet.set_attn_processor({name: (self.processor() if name.endswith("attn2.processor") else proc)
                                 for name, proc in self._saved.items()})

    def remove(self, unet) -> None:
        if self._saved is not None:
            unet.set_attn_processor(self._saved)
            self._saved = None


def attend(attn, query: torch.Tensor, context: torch.Tensor, attention_mask, batch: int):
    """(attention probabilities (B*heads, Q, K), output (B, Q, C)) of one attention with explicit
    softmax, so that the probabilities exist; `query` is already split into heads."""
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    probs = attn.get_attention_scores(query, key, mask)
    return probs, attn.batch_to_head_dim(torch.bmm(probs, value))


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
