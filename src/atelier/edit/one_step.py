"""One-step editing with a learned inversion network (SwiftEdit, Nguyen et al., CVPR 2025).

    inversion   eps_hat = F(x0, c_src): the inverter, a UNet initialised from the one-step generator's
                own, reads the clean latent (at timestep 999) and returns the noise from which the
                one-step generator G re-creates it: G(eps_hat, c_src) ~ x0 (`atelier train inverter`)
    mask        SwiftEdit's self-guided mask: |F(x0, c_edit) - F(x0, c_src)| averaged over channels,
                smoothed, normalised to [0, 1]; with mask_from "both" (the default) multiplied by the
                inverter's cross-attention to the phrases that hold the changed words (masks.phrase_positions),
                which keeps the mask on the object a partial caption names ("make the red circle blue"),
                then thresholded (EditSettings.mask_threshold; with mask_regions, cut to its strongest
                connected regions)
    release     inside the mask the inverted noise moves away from the inversion under the edit prompt,
                eps_src - release * (eps_edit - eps_src): what the inverter added to hold the source's words
                against the edit prompt is taken out (only when the edit replaces or deletes source words)
    edit        one generator call on that noise through an attention processor that rescales
                cross-attention by the mask (SwiftEdit's ARaM): inside the mask the edit prompt's attention
                output times `edit_scale`, outside it the edit prompt's (SwiftEdit; outside_prompt "source":
                the source prompt's) times `keep_scale`
    image       SwiftEdit's image branch, when an IP-Adapter is at hand (`image_branch`): the source
    branch      image itself is the image prompt of G; in the mid and up blocks its attention output
                is weighed by `ip_edit_scale` inside the mask (0.2: the edit may leave the source's
                look) and `ip_keep_scale` outside (1), in the down blocks by the adapter's own scale
    paste back  outside the pixel mask the source pixels are kept, as in the other methods

`Denoiser`s share the pipeline's prompt encoding; `with_unet` swaps in another UNet (the inverter,
the teacher) for the same text encoder and scheduler.
"""

from __future__ import annotations

import contextlib
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


def generate(gen_den, noise: torch.Tensor, hidden: torch.Tensor, pooled=None, image_embeds=None) -> torch.Tensor:
    """x0 = G(noise, c): the one-step generator's clean-latent prediction from noise at t = 999
    (`image_embeds`: the image prompt of a generator with IP-Adapters, see Denoiser.output)."""
    return gen_den.x0_eps(noise, GENERATOR_TIMESTEP, hidden, pooled, image_embeds)[0]


def noise_difference_mask(eps_src: torch.Tensor, eps_edit: torch.Tensor) -> torch.Tensor:
    """Soft (h, w) map in [0, 1]: where the inverter's noise depends on the prompt."""
    diff = (eps_edit - eps_src).abs().float().mean(1, keepdim=True)  # (1, 1, h, w)
    diff = F.avg_pool2d(diff, 3, 1, 1)[0, 0]
    diff = diff - diff.min()
    return diff / diff.max().clamp(min=1e-8)


def phrase_attention(store, tokenizer, source: str, target: str) -> torch.Tensor | None:
    """Soft (h, w) map in [0, 1]: the inverter's cross-attention to the source prompt's phrase that
    changes (batch item 0), or for a pure addition to the target's new phrase (item 1); None when no
    content word changes."""
    from atelier.edit.masks import normalised, phrase_positions

    source_positions, target_positions = phrase_positions(tokenizer, source, target)
    if source_positions:
        return normalised(store.token_map(0, source_positions))
    if target_positions:
        return normalised(store.token_map(1, target_positions))
    return None


def released(eps_src: torch.Tensor, eps_edit: torch.Tensor, mask: torch.Tensor, release: float) -> torch.Tensor:
    """The inverted noise with, inside the mask, what holds the source against the edit prompt taken out."""
    return eps_src - release * mask * (eps_edit - eps_src)


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


# ---------------------------------------------------------------- the image branch's adapter

IMAGE_BRANCH_MODES = ("auto", "on", "off")
ADAPTER_FILE = "ip-adapter.safetensors"  # a trained image branch, beside the inverter's weights


BUILTIN_PREFIX = "builtin:"  # a recorded path inside atelier's built-in weights, wherever atelier is installed


def recordable_path(path) -> str:
    """How an inverter's atelier.json names a file or folder it was trained with: one under atelier's
    built-in weights as "builtin:<its place there>" (it moves with the installation), others absolute."""
    from atelier.models.loader import BUILTIN_DIR

    path = Path(path).resolve()
    if path.is_relative_to(BUILTIN_DIR.resolve()):
        return BUILTIN_PREFIX + path.relative_to(BUILTIN_DIR.resolve()).as_posix()
    return str(path)


def recorded_path(value: str, folder) -> str:
    """A path as recordable_path wrote it, back on this machine: a relative one lies beside the inverter."""
    from atelier.models.loader import BUILTIN_DIR

    if value.startswith(BUILTIN_PREFIX):
        return str(BUILTIN_DIR / value[len(BUILTIN_PREFIX):])
    return value if Path(value).is_absolute() else str(Path(folder) / value)


def recorded_adapter(folder) -> dict | None:
    """The IP-Adapter an inverter was trained with (`ip_adapter` in its atelier.json): {"weights": file,
    "image_encoder": folder, "name", "trained"}, paths back on this machine (a trained adapter lies beside
    the inverter; see recordable_path)."""
    import json

    info = Path(folder) / "atelier.json"
    record = json.loads(info.read_text(encoding="utf-8")).get("ip_adapter") if info.is_file() else None
    if not record:
        return None
    record = {**record, "weights": recorded_path(record["weights"], folder)}
    if record.get("image_encoder"):
        record["image_encoder"] = recorded_path(record["image_encoder"], folder)
    return record


def ip_adapter_loaded(unet) -> bool:
    """Whether `unet` holds IP-Adapters (its calls then need image_embeds)."""
    return getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"


# ---------------------------------------------------------------- attention rescaling

class MaskedPromptAttention(AttentionHook):
    """Cross-attention by region (SwiftEdit's ARaM): the edit prompt inside the mask (output times
    `edit_scale`), `outside_hidden` outside it (times `keep_scale`). Installed on every attn2 of the
    generator for one call, like masks.CrossAttentionStore; self-attention is left alone.

    With `image_scales` = (ip_edit_scale, ip_keep_scale) on a UNet holding IP-Adapters, the image
    prompt's attention is added as the replaced IPAdapterAttnProcessor2_0 computes it (its own
    to_k_ip / to_v_ip): in the mid and up blocks times ip_edit_scale inside the mask and ip_keep_scale
    outside, in the down blocks times the adapter's own scale. Without `image_scales` the image tokens
    are left out (text only)."""

    def __init__(self, mask: torch.Tensor, outside_hidden: torch.Tensor, edit_scale: float = 1.0, keep_scale: float = 1.0,
                 image_scales: tuple[float, float] | None = None):
        self.mask = mask.float()  # (h, w), latent resolution, values in [0, 1]
        self.outside_hidden = outside_hidden  # (1 or B, L, C): the prompt outside the mask
        self.edit_scale, self.keep_scale = edit_scale, keep_scale
        self.image_scales = image_scales

    def processor(self):
        return _MaskedProcessor(self)

    def processor_for(self, name: str, original):
        if self.image_scales is None or not hasattr(original, "to_k_ip"):
            return _MaskedProcessor(self)
        return _MaskedProcessor(self, image_layer=original, down_block=name.startswith("down_blocks."))

    def grid_mask(self, tokens: int, dtype, device) -> torch.Tensor:
        """The mask at a query grid of `tokens` positions, shaped (1, tokens, 1)."""
        gh, gw = grid_shape(tuple(self.mask.shape), tokens)
        # max-pooled: a coarse cell that touches the edit is edited wholly (an averaged mask would blend
        # the two prompts' attention there, e.g. red and yellow into orange); paste-back keeps the rest
        m = F.adaptive_max_pool2d(self.mask[None, None], (gh, gw)) if (gh, gw) != tuple(self.mask.shape) else self.mask[None, None]
        return m.reshape(1, gh * gw, 1).to(device, dtype)


class _MaskedProcessor:
    def __init__(self, owner: MaskedPromptAttention, image_layer=None, down_block: bool = False):
        self.owner = owner
        self.image_layer = image_layer  # the IPAdapterAttnProcessor2_0 this replaces: to_k_ip, to_v_ip, scale
        self.down_block = down_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        owner = self.owner
        image_tokens = None
        if isinstance(encoder_hidden_states, tuple):  # with IP-Adapters: (text, [image tokens of each adapter])
            encoder_hidden_states, image_tokens = encoder_hidden_states

        def inner(query, edit_context, mask, batch):
            outside_context = owner.outside_hidden.to(edit_context).expand(batch, -1, -1)
            if attn.norm_cross:
                outside_context = attn.norm_encoder_hidden_states(outside_context)
            out_edit = attend_sdpa(attn, query, edit_context, mask, batch)
            out_outside = attend_sdpa(attn, query, outside_context, None, batch)
            m = owner.grid_mask(out_edit.shape[1], out_edit.dtype, out_edit.device)
            out = m * owner.edit_scale * out_edit + (1 - m) * owner.keep_scale * out_outside
            if self.image_layer is not None and image_tokens is not None:
                out = out + self.image_attention(attn, query, image_tokens, m, batch)
            return out

        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, inner)

    def image_attention(self, attn, query, image_tokens, m, batch):
        """The image prompts' attention outputs, each weighed: by the adapter's scale in a down block,
        elsewhere by ip_edit_scale inside the mask and ip_keep_scale outside."""
        layer, (edit, keep) = self.image_layer, self.owner.image_scales
        total = 0
        for tokens, to_k, to_v, scale in zip(image_tokens, layer.to_k_ip, layer.to_v_ip, layer.scale):
            tokens = tokens.reshape(batch, -1, tokens.shape[-1])  # (B, references x tokens, C)
            out = attend_sdpa(attn, query, tokens, None, batch, to_k=to_k, to_v=to_v)
            total = total + (scale if self.down_block else m * edit + (1 - m) * keep) * out
        return total


# ---------------------------------------------------------------- the edit

class OneStepEditor:
    """An inverter bound to an Editor's Denoiser (the generator), with the IP-Adapter it was trained
    with, if any (`adapter`: recorded_adapter's dict)."""

    def __init__(self, den, inverter, adapter: dict | None = None):
        check_inverter_fits(inverter, den.pipe)
        self.den = den
        self.inv = with_unet(den, inverter)
        self.adapter = adapter
        self._loaded = None  # the IPAdapters this editor loaded into the pipeline

    # ------------------------------------------------------------ the image branch

    def image_branch(self, mode: str = "auto"):
        """The IPAdapters of the image branch, or None (text only). "off": none. Otherwise, in order:
        adapters the caller loaded into the pipeline (`load_ip_adapter`, CLI --ip-adapter), the adapter
        the inverter was trained with (loaded now), and with "on" only the model's own adapter
        (`load_ip_adapter(pipe, None)`); "auto" stays text only when neither of the first two is there."""
        if mode not in IMAGE_BRANCH_MODES:
            raise UserError(f"image_branch must be one of {', '.join(IMAGE_BRANCH_MODES)}, not {mode!r}")
        if mode == "off":
            return None
        held = getattr(self.den.unet, "atelier_ip_adapters", None)
        if held is not None and (held is self._loaded or not getattr(held, "image_branch_only", False)):
            return held
        if self.adapter is not None:
            return self._load(self.adapter["weights"], self.adapter.get("image_encoder"))
        return self._load(None, None) if mode == "on" else None

    def _load(self, weights, image_encoder):
        from atelier.image_prompts.adapters import load_ip_adapter

        try:
            adapters = load_ip_adapter(self.den.pipe, weights, image_encoder=image_encoder)
        except UserError as exc:
            if weights is None:
                raise UserError(f"the image branch needs an IP-Adapter for this model: {exc}") from None
            raise UserError(f"the inverter was trained with the IP-Adapter {weights}: {exc}") from None
        adapters.image_branch_only = True  # loaded here: another inverter's own adapter may replace it
        self._loaded = adapters
        return adapters

    def image_embeds(self, adapters, image=None, batch: int = 1):
        """The generator's `image_embeds`: `image` (PIL) as every adapter's image prompt; zeros when the
        pipeline holds adapters that this call leaves out (the UNet wants them); None without adapters."""
        if adapters is not None and image is not None:
            embeds = []
            for index in range(len(adapters.adapters)):
                positive = adapters.embeddings(adapters.reference(image, adapter=index))[0][None]  # (1, 1, ...)
                embeds.append(positive.expand(batch, *positive.shape[1:]))
            return embeds
        if not ip_adapter_loaded(self.den.unet):
            return None
        held = adapters or getattr(self.den.unet, "atelier_ip_adapters", None)
        if held is None:
            raise UserError("the generator holds IP-Adapters that atelier did not load: unload them "
                            "(pipe.unload_ip_adapter()) or load them with atelier.image_prompts.load_ip_adapter")
        return [e.to(self.den.device, self.den.dtype) for e in held.zero_embeds(batch)]

    # ------------------------------------------------------------ inversion and edit

    @torch.no_grad()
    def reconstruct(self, x0: torch.Tensor, prompt: str, image=None, adapters=None) -> torch.Tensor:
        """G(F(x0, c), c): the inversion round trip, in latents (with `adapters`, `image` (PIL, the source
        of x0) as the generator's image prompt, at the adapter's scale)."""
        hidden, pooled = self.den.conditioning([prompt] * len(x0))
        embeds = self.image_embeds(adapters, image, len(x0))
        return generate(self.den, invert(self.inv, x0, hidden, pooled).to(self.den.dtype), hidden, pooled, embeds)

    @torch.no_grad()
    def edit_latents(self, x0: torch.Tensor, source: str, target: str, s, image=None,
                     adapters=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The edited latents and the latent mask (None with mask_from "none"). With `adapters` (the image
        branch, see `image_branch`), `image` (PIL, the source) is the image prompt, weighed by ARaM."""
        from atelier.edit.masks import CrossAttentionStore, binary_mask, changed_token_positions, normalised

        hidden, pooled = self.den.conditioning([source, target])
        # the inverter's cross-attention at half the latent's size: the finest grid it attends at
        store = CrossAttentionStore(tuple(x0.shape[-2:]), levels=(1,)) if s.mask_from == "both" else None
        with store.installed(self.inv.unet) if store is not None else contextlib.nullcontext():
            eps = invert(self.inv, x0.expand(2, -1, -1, -1), hidden, pooled).to(self.den.dtype)
        eps_src, eps_edit = eps[:1], eps[1:]
        tgt_hidden, tgt_pooled = hidden[1:], None if pooled is None else pooled[1:]
        embeds = self.image_embeds(adapters, image)
        if s.mask_from == "none" and embeds is None:
            return generate(self.den, eps_src, tgt_hidden, tgt_pooled), None
        if s.mask_from == "none":  # the whole image is the edit region
            mask = torch.ones(x0.shape[-2:], device=x0.device, dtype=x0.dtype)
        else:
            soft = noise_difference_mask(eps_src, eps_edit)
            attention = phrase_attention(store, self.den.pipe.tokenizer, source, target) if store is not None else None
            if attention is not None:
                soft = normalised(soft * attention.to(soft))
            mask = binary_mask(soft, s.mask_threshold, s.mask_dilate, s.mask_regions).to(x0.device, x0.dtype)
        noise = eps_src
        if s.noise_release and s.mask_from != "none" and changed_token_positions(self.den.pipe.tokenizer, source, target)[0]:
            noise = released(eps_src, eps_edit, mask, s.noise_release)
        image_scales = (s.ip_edit_scale, s.ip_keep_scale) if adapters is not None else None
        outside = hidden[1:] if s.outside_prompt == "target" else hidden[:1]
        rescale = MaskedPromptAttention(mask, outside, edit_scale=s.edit_scale, keep_scale=s.keep_scale,
                                        image_scales=image_scales)
        with rescale.installed(self.den.unet):
            x = generate(self.den, noise, tgt_hidden, tgt_pooled, embeds)
        return x, None if s.mask_from == "none" else mask
