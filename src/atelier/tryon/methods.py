"""The two try-on methods, each the math of one paper in one short class over stock diffusers UNets;
garment information enters only through attention processors (no forked UNet files).

Both take the same inputs, in latent space: the noisy sample `x_t`, the person's inpainting mask `mask`
(B, 1, h, w; 1 = to be drawn), the latents of the masked person `masked` (B, 4, h, w) and a garment
condition from `condition(garment_latents)`. Classifier-free guidance drops the garment: its latents
are replaced by zeros (`drop` in training, the unconditional half of a guided batch in sampling).

CatVTON (Chong et al. 2024, arXiv 2407.15886): person and garment side by side on one canvas twice as
wide, denoised together by the inpainting UNet with no text and no image encoder: cross-attention is
skipped (CatVTON's SkipAttnProcessor), and the garment reaches the person through self-attention over
the whole canvas. Only self-attention trains ("attention-only", 49.57 M parameters of SD 1.5), or all.

OOTDiffusion (Xu et al. 2024, arXiv 2403.01779): a garment UNet (a copy of the base UNet) runs once at
t = 0 on the garment latents; its self-attention inputs are recorded, and each self-attention layer of
the try-on (inpainting) UNet attends over its own tokens and the garment's of the same layer
("outfitting fusion"). Text: a fixed prompt embedding (the base model's empty prompt).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atelier.core.attention import attend_sdpa, cross_attention
from atelier.tryon.inpaint_unet import unet_input

METHODS = ("catvton", "ootd")


# ---------------------------------------------------------------- attention processors

class SkipAttnProcessor(torch.nn.Module):
    """CatVTON's: the layer gives its input back unchanged (cross-attention without a text)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return hidden_states


class RecordSelfAttn:
    """Self-attention as usual, recording its input tokens under the layer's name (the garment UNet)."""

    def __init__(self, bank: dict, name: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.bank, self.name, self.inner = bank, name, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        self.bank[self.name] = hidden_states
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class FuseSelfAttn:
    """Self-attention whose keys and values also come from the garment tokens recorded at the same layer
    (OOTDiffusion's outfitting fusion): queries from the person, keys/values from [person | garment]."""

    def __init__(self, bank: dict, name: str):
        self.bank, self.name = bank, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        garment = self.bank[self.name].to(hidden_states.dtype)
        context = torch.cat([hidden_states, garment], dim=1)
        return cross_attention(attn, hidden_states, context, None, temb,
                               lambda q, c, m, b: attend_sdpa(attn, q, c, m, b))


def layer_processors(unet, layer: str, make) -> None:
    """Put `make(name)` on every `layer` ("attn1" / "attn2") of `unet`, keeping the others."""
    unet.set_attn_processor({name: make(name) if name.endswith(f"{layer}.processor") else proc
                             for name, proc in unet.attn_processors.items()})


def attention_parameters(unet) -> list[torch.nn.Parameter]:
    """The self-attention (attn1) parameters: CatVTON's "attention" trainable module."""
    return [p for name, module in unet.named_modules() if name.endswith("attn1") for p in module.parameters()]


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at the latents' size, as the inpainting pipelines and CatVTON make it."""
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest")


# ---------------------------------------------------------------- the methods

class CatVTON(torch.nn.Module):
    name = "catvton"

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        layer_processors(unet, "attn2", lambda name: SkipAttnProcessor())

    def noise_shape(self, person_shape) -> tuple:
        *rest, w = person_shape
        return (*rest, 2 * w)  # the canvas: [person | garment] along the width

    def person(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas[..., : canvas.shape[-1] // 2]

    def clean(self, person: torch.Tensor, garment: torch.Tensor) -> torch.Tensor:
        """The training target's clean canvas."""
        return torch.cat([person, garment], dim=-1)

    def condition(self, garment: torch.Tensor, drop=None) -> torch.Tensor:
        return garment if drop is None else torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(garment), garment)

    def forward(self, x_t, t, mask, masked, condition):
        mask_canvas = torch.cat([mask, torch.zeros_like(mask)], dim=-1)
        masked_canvas = torch.cat([masked, condition.to(masked.dtype)], dim=-1)
        dummy = x_t.new_zeros(len(x_t), 1, self.unet.config.cross_attention_dim)
        return self.unet(unet_input(x_t, mask_canvas, masked_canvas), t, encoder_hidden_states=dummy).sample

    def trainable(self, which: str, extra=()) -> list[torch.nn.Parameter]:
        """"attention": the self-attention parameters (and `extra`: a new conv_in); "all": every one."""
        if which == "all":
            return list(self.unet.parameters())
        return attention_parameters(self.unet) + [p for p in extra if p is not None]


class OOTD(torch.nn.Module):
    name = "ootd"

    def __init__(self, unet, garment_unet, text_embeds: torch.Tensor):
        super().__init__()
        self.unet, self.garment_unet = unet, garment_unet
        self.register_buffer("text_embeds", text_embeds, persistent=False)  # (1, tokens, width)
        self.bank: dict = {}
        layer_processors(garment_unet, "attn1", lambda name: RecordSelfAttn(self.bank, name))
        layer_processors(unet, "attn1", lambda name: FuseSelfAttn(self.bank, name))

    def noise_shape(self, person_shape) -> tuple:
        return tuple(person_shape)

    def person(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def clean(self, person: torch.Tensor, garment: torch.Tensor) -> torch.Tensor:
        return person

    def text(self, n: int, dtype) -> torch.Tensor:
        return self.text_embeds.to(dtype).expand(n, -1, -1)

    def condition(self, garment: torch.Tensor, drop=None) -> dict:
        """The garment UNet's self-attention inputs at t = 0, per layer (gradients flow when it trains)."""
        if drop is not None:
            garment = torch.where(drop.view(-1, 1, 1, 1), torch.zeros_like(garment), garment)
        self.bank.clear()
        zero = torch.zeros(len(garment), device=garment.device, dtype=torch.long)
        self.garment_unet(garment, zero, encoder_hidden_states=self.text(len(garment), garment.dtype))
        states = dict(self.bank)
        self.bank.clear()
        return states

    def forward(self, x_t, t, mask, masked, condition: dict):
        self.bank.clear()
        self.bank.update(condition)
        try:
            return self.unet(unet_input(x_t, mask, masked), t,
                             encoder_hidden_states=self.text(len(x_t), x_t.dtype)).sample
        finally:
            if not torch.is_grad_enabled():  # gradient checkpointing reads the bank again in backward
                self.bank.clear()

    def trainable(self, which: str, extra=(), freeze_garment_unet: bool = False) -> list[torch.nn.Parameter]:
        unets = [self.unet] + ([] if freeze_garment_unet else [self.garment_unet])
        if which == "all":
            return [p for u in unets for p in u.parameters()]
        return [p for u in unets for p in attention_parameters(u)] + [p for p in extra if p is not None]

