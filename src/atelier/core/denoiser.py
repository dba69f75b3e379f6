"""A pipeline's UNet as a function of (x_t, t, prompt): A1111 prompt encoding (cached), SD 1.x /
2.x / SDXL conditioning, the model output turned into (x0, eps) whatever its prediction type, and
the VAE (honouring `force_upcast`). Editing, streaming and training are written against this, not
against a pipeline class."""

from __future__ import annotations

from collections import OrderedDict

import torch

from atelier.core import vae as vae_calls
from atelier.core.prediction import x0_and_eps


class Denoiser:
    def __init__(self, pipe, cache_size: int = 64):
        from atelier.prompts.conditioning import encoder_slots, is_sdxl_pipeline

        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.slots = encoder_slots(pipe)
        self.sdxl = is_sdxl_pipeline(pipe)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
        self.device = getattr(pipe, "_execution_device", None) or self.unet.device
        self.dtype = self.unet.dtype
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._empty = None

    # ------------------------------------------------------------ prompts

    def encode(self, text: str, negative: bool = False):
        """(hidden (L, C), pooled (P,) or None) for one prompt, A1111 syntax, cached."""
        from atelier.prompts.conditioning import embedding_token_expander, encode_prompt

        key = (text, negative)
        if key not in self._cache:
            with torch.no_grad():
                enc = encode_prompt(self.slots, text, 1, zero_if_empty=negative and self.sdxl,
                                    convert_text=embedding_token_expander(self.pipe))
            i = enc.step_text[0]
            self._cache[key] = (enc.hidden[i].to(self.device, self.dtype),
                                None if enc.pooled is None else enc.pooled[i].to(self.device, self.dtype))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def pad(self, hidden: torch.Tensor, tokens: int) -> torch.Tensor:
        from atelier.prompts.conditioning import empty_prompt_hidden

        if hidden.shape[0] == tokens:
            return hidden
        if self._empty is None:
            with torch.no_grad():
                self._empty = empty_prompt_hidden(self.slots).to(self.device, self.dtype)
        return torch.cat([hidden, self._empty.repeat((tokens - hidden.shape[0]) // self._empty.shape[0], 1)])

    def conditioning(self, prompts: list[str], negative: list[bool] | None = None):
        """Stacked (hidden (B, L, C), pooled (B, P) or None), padded to a common length."""
        negative = negative or [False] * len(prompts)
        encoded = [self.encode(p, n) for p, n in zip(prompts, negative)]
        tokens = max(h.shape[0] for h, _ in encoded)
        hidden = torch.stack([self.pad(h, tokens) for h, _ in encoded])
        pooled = torch.stack([p for _, p in encoded]) if self.sdxl else None
        return hidden, pooled

    # ------------------------------------------------------------ the model

    def coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) shaped (B, 1, 1, 1); t < 0 means the clean image."""
        t = torch.as_tensor(t).reshape(-1).long().cpu()
        abar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        return (abar.sqrt().float().view(-1, 1, 1, 1).to(self.device, self.dtype),
                (1 - abar).sqrt().float().view(-1, 1, 1, 1).to(self.device, self.dtype))

    def output(self, x_t: torch.Tensor, t, hidden: torch.Tensor, pooled=None, image_embeds=None) -> torch.Tensor:
        """The UNet's raw output. `image_embeds`: one tensor per loaded IP-Adapter, (B, ...) each, for
        a UNet with IP-Adapter layers (diffusers' `added_cond_kwargs["image_embeds"]`)."""
        batch = len(x_t)
        t = torch.as_tensor(t, device=self.device).reshape(-1).expand(batch)
        added = {}
        if self.sdxl:
            h, w = (s * self.pipe.vae_scale_factor for s in x_t.shape[-2:])
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device, dtype=self.dtype).expand(batch, -1)
            added.update(text_embeds=pooled, time_ids=time_ids)
        if image_embeds is not None:
            added["image_embeds"] = list(image_embeds)
        kwargs = {"added_cond_kwargs": added} if added else {}
        return self.unet(x_t, t, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]

    def x0_eps(self, x_t: torch.Tensor, t, hidden: torch.Tensor, pooled=None, image_embeds=None):
        """Predicted clean latent and noise for every item of a batch (all at timestep t)."""
        alpha, beta = self.coefficients(t)
        out = self.output(x_t, t, hidden, pooled, image_embeds)
        return x0_and_eps(out, x_t, alpha, beta, self.prediction_type)

    # ------------------------------------------------------------ pixels

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latents."""
        return vae_calls.encode(self.vae, image.to(self.device), self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_calls.decode(self.vae, latents).float().clamp(-1, 1)
