"""One-step editing with a learned inversion network (SwiftEdit, Nguyen et al., CVPR 2025).

    inversion   eps_hat = F(x0, c_src): the inverter, a UNet initialised from the one-step generator's
                own, reads the clean latent (at timestep 999) and returns the noise from which the
                one-step generator G re-creates it: G(eps_hat, c_src) ~ x0 (`atelier train inverter`)
    mask        SwiftEdit's self-guided mask: |F(x0, c_edit) - F(x0, c_src)| averaged over channels,
                smoothed, normalised to [0, 1] and thresholded (EditSettings.mask_threshold)
    edit        one generator call on eps_hat with the edit prompt, through an attention processor
                that rescales cross-attention by the mask (SwiftEdit's ARaM, text-only: the toy models
                have no IP-Adapter image branch): inside the mask the edit prompt's attention output
                times `edit_scale`, outside it the source prompt's times `keep_scale`, so the
                background is regenerated from the description it was inverted with
    paste back  outside the pixel mask the source pixels are kept, as in the other methods

`Denoiser`s share the pipeline's prompt encoding; `with_unet` swaps in another UNet (the inverter,
the teacher) for the same text encoder and scheduler.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from atelier.core.attention import AttentionHook, attend_sdpa, cross_attention, grid_shape
from atelier.errors import UserError

INVERT_TIMESTEP = 999  # the inverter is conditioned like the generator's single step
GENERATOR_TIMESTEP = 999
BUILTIN_INVERTERS = {"toyworld-inverter": "toyworld-turbo"}  # name -> the generator it inverts


# ---------------------------------------------------------------- the two networks

def with_unet(den, unet, prediction_type: str | None = None):
    """A Denoiser over the same text encoder, VAE and schedule, calling another UNet."""
    other = copy.copy(den)
    other.unet = unet
    other.dtype = next(unet.parameters()).dtype
    if prediction_type is not None:
        other.prediction_type = prediction_type
    return other


def invert(inv_den, x0: torch.Tensor, hidden: torch.Tensor, pooled=None) -> torch.Tensor:
    """eps_hat = F(x0, c): the inverter UNet's raw output on the clean latent at t = 999."""
    return inv_den.output(x0.to(inv_den.dtype), INVERT_TIMESTEP, hidden.to(inv_den.dtype),
                          None if pooled is None else pooled.to(inv_den.dtype))


def generate(gen_den, noise: torch.Tensor, hidden: torch.Tensor, pooled=None) -> torch.Tensor:
    """x0 = G(noise, c): the one-step generator's clean-latent prediction from noise at t = 999."""
    return gen_den.x0_eps(noise, GENERATOR_TIMESTEP, hidden, pooled)[0]


def noise_difference_mask(eps_src: torch.Tensor, eps_edit: torch.Tensor) -> torch.Tensor:
    """Soft (h, w) map in [0, 1]: where the inverter's noise depends on the prompt."""
    diff = (eps_edit - eps_src).abs().float().mean(1, keepdim=True)  # (1, 1, h, w)
    diff = F.avg_pool2d(diff, 3, 1, 1)[0, 0]
    diff = diff - diff.min()
    return diff / diff.max().clamp(min=1e-8)


# ---------------------------------------------------------------- loading

def inverter_folder(source) -> Path:
    """The folder of an inverter: a built-in name or a diffusers UNet folder (config.json + weights)."""
    from atelier.models.loader import BUILTIN_DIR

    if isinstance(source, str) and source in BUILTIN_INVERTERS:
        folder = BUILTIN_DIR / source
        if not (folder / "config.json").is_file():
            raise UserError(f"built-in inverter '{source}' is not trained yet: run `atelier train inverter` "
                            "(see docs/inverter-training.md)")
        return folder
    folder = Path(str(source)).expanduser()
    if not folder.is_dir():
        raise UserError(f"inverter not found: {source} (give a folder written by `atelier train inverter`, "
                        f"or one of {', '.join(BUILTIN_INVERTERS)})")
    if (folder / "final" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "final"
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not an inverter folder (no config.json of a UNet2DConditionModel)")
    return folder


def load_inverter(source, *, device="cpu", dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    from atelier.models.loader import dtype_kwargs

    folder = inverter_folder(source)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, **dtype_kwargs(dtype))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"cannot load the inverter from {folder}: {str(exc).splitlines()[0]}") from None
    return unet.to(device, dtype).eval().requires_grad_(False)


def default_inverter(pipe) -> str:
    """The built-in inverter of a built-in generator; other models need one named explicitly."""
    from atelier.models.loader import BUILTIN_DIR

    source = str(getattr(pipe, "atelier_source", ""))
    for inverter, generator in BUILTIN_INVERTERS.items():
        if source in (generator, str(BUILTIN_DIR / generator)):
            return inverter
    raise UserError("the one-step method needs an inverter trained for this model: pass --inverter FOLDER "
                    "(train one with `atelier train inverter --pretrained_sb_generator MODEL`)")


def check_inverter_fits(inverter, pipe) -> None:
    cfg, ucfg = inverter.config, pipe.unet.config
    if cfg.in_channels != ucfg.in_channels or cfg.cross_attention_dim != ucfg.cross_attention_dim:
        raise UserError(f"this inverter (in_channels {cfg.in_channels}, cross_attention_dim {cfg.cross_attention_dim}) "
                        f"does not fit the model (in_channels {ucfg.in_channels}, cross_attention_dim "
                        f"{ucfg.cross_attention_dim}): train one for it")


# ---------------------------------------------------------------- attention rescaling

class MaskedPromptAttention(AttentionHook):
    """Cross-attention by region: the edit prompt inside the mask (output times `edit_scale`), the
    source prompt outside it (times `keep_scale`). Installed on every attn2 of the generator for
    one call, like masks.CrossAttentionStore; self-attention is left alone."""

    def __init__(self, mask: torch.Tensor, source_hidden: torch.Tensor, edit_scale: float = 1.0, keep_scale: float = 1.0):
        self.mask = mask.float()  # (h, w), latent resolution, values in [0, 1]
        self.source_hidden = source_hidden  # (1 or B, L, C)
        self.edit_scale, self.keep_scale = edit_scale, keep_scale

    def processor(self):
        return _MaskedProcessor(self)

    def grid_mask(self, tokens: int, dtype, device) -> torch.Tensor:
        """The mask at a query grid of `tokens` positions, shaped (1, tokens, 1)."""
        gh, gw = grid_shape(tuple(self.mask.shape), tokens)
        # max-pooled: a coarse cell that touches the edit is edited wholly (an averaged mask would blend
        # the two prompts' attention there, e.g. red and yellow into orange); paste-back keeps the rest
        m = F.adaptive_max_pool2d(self.mask[None, None], (gh, gw)) if (gh, gw) != tuple(self.mask.shape) else self.mask[None, None]
        return m.reshape(1, gh * gw, 1).to(device, dtype)


class _MaskedProcessor:
    def __init__(self, owner: MaskedPromptAttention):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        owner = self.owner

        def inner(query, edit_context, mask, batch):
            source_context = owner.source_hidden.to(edit_context).expand(batch, -1, -1)
            if attn.norm_cross:
                source_context = attn.norm_encoder_hidden_states(source_context)
            out_edit = attend_sdpa(attn, query, edit_context, mask, batch)
            out_source = attend_sdpa(attn, query, source_context, None, batch)
            m = owner.grid_mask(out_edit.shape[1], out_edit.dtype, out_edit.device)
            return m * owner.edit_scale * out_edit + (1 - m) * owner.keep_scale * out_source

        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, inner)


# ---------------------------------------------------------------- the edit

class OneStepEditor:
    """An inverter bound to an Editor's Denoiser (the generator)."""

    def __init__(self, den, inverter):
        check_inverter_fits(inverter, den.pipe)
        self.den = den
        self.inv = with_unet(den, inverter)

    @torch.no_grad()
    def reconstruct(self, x0: torch.Tensor, prompt: str) -> torch.Tensor:
        """G(F(x0, c), c): the inversion round trip, in latents."""
        hidden, pooled = self.den.conditioning([prompt] * len(x0))
        return generate(self.den, invert(self.inv, x0, hidden, pooled).to(self.den.dtype), hidden, pooled)

    @torch.no_grad()
    def edit_latents(self, x0: torch.Tensor, source: str, target: str, s) -> tuple[torch.Tensor, torch.Tensor | None]:
        from atelier.edit.masks import binary_mask

        hidden, pooled = self.den.conditioning([source, target])
        eps = invert(self.inv, x0.expand(2, -1, -1, -1), hidden, pooled).to(self.den.dtype)
        eps_src = eps[:1]
        tgt_hidden, tgt_pooled = hidden[1:], None if pooled is None else pooled[1:]
        if s.mask_from == "none":
            return generate(self.den, eps_src, tgt_hidden, tgt_pooled), None
        soft = noise_difference_mask(eps_src, eps[1:])
        mask = binary_mask(soft, s.mask_threshold, s.mask_dilate).to(x0.device, x0.dtype)
        rescale = MaskedPromptAttention(mask, hidden[:1], edit_scale=s.edit_scale, keep_scale=s.keep_scale)
        with rescale.installed(self.den.unet):
            x = generate(self.den, eps_src, tgt_hidden, tgt_pooled)
        return x, mask
