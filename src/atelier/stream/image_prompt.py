"""The stream's image prompt: a reference image (or each input frame) steering every UNet call of
the stream batch through the IP-Adapter loaded in the pipeline (atelier.image_prompts, diffusers'
IPAdapterAttnProcessor2_0 reading `added_cond_kwargs["image_embeds"]`).

As `IPAdapters.unet_hook` does for editing, every row of a call gets the reference's positive
embedding, the negative rows of classifier-free guidance too: the reference steers at its scale and
is not amplified by the guidance. Without a reference the adapters get zeros at scale 0, which their
attention skips: the text-only stream, bit for bit. The adapters and their scales live on the UNet,
which engines share, so each call sets the scale it needs.
"""

from __future__ import annotations

import torch

from atelier.errors import UserError
from atelier.image_prompts.references import ImagePrompt, format_scale, infotext_fields
from atelier.stream.settings import FRAME_REFERENCE

NO_ADAPTER = ("a reference image needs an IP-Adapter loaded in the pipeline: StreamEngine(pipe, ip_adapter=SOURCE), "
              "or load_ip_adapter(pipe, SOURCE) first (atelier serve --ip-adapter SOURCE)")


def loaded_adapters(unet):
    """The IPAdapters loaded into this UNet (atelier.image_prompts.load_ip_adapter), or None."""
    adapters = getattr(unet, "atelier_ip_adapters", None)
    return adapters if adapters is not None and getattr(unet, "encoder_hid_proj", None) is not None else None


def load_adapter(pipe, source, *, image_encoder=None, allow_pickle: bool = False):
    """Load an IP-Adapter into `pipe` for its streams (replacing any loaded before); see load_ip_adapter."""
    from atelier.image_prompts import load_ip_adapter

    return load_ip_adapter(pipe, source, image_encoder=image_encoder, allow_pickle=allow_pickle)


def check_adapters(adapters) -> None:
    """A reference needs exactly one loaded adapter (the stream has one reference slot)."""
    if adapters is None:
        raise UserError(NO_ADAPTER)
    if len(adapters.adapters) != 1:
        raise UserError(f"the stream takes one IP-Adapter; {len(adapters.adapters)} are loaded "
                        f"({', '.join(adapters.names)}): load only the one to use")


def reference_embeds(adapters, prompt: ImagePrompt) -> torch.Tensor:
    """(1, 1, ...): a reference's positive embedding, from the adapters' cache (embedded once)."""
    return adapters.embeddings(prompt)[0][None]


def frame_embeds(adapters, images) -> torch.Tensor:
    """(frames, 1, ...): the input frames' positive embeddings, one image-encoder call for them, not cached."""
    return adapters.batch_embeds(images)[0]


def unet_image_embeds(adapters, reference, scale: float, rows: int, embeds) -> list[torch.Tensor]:
    """`added_cond_kwargs["image_embeds"]` for a UNet call on `rows` items, with the adapters' scales set:
    `embeds` (rows or 1, 1, ...) at `scale` when there is a reference, zeros at scale 0 otherwise."""
    if reference is None or embeds is None:
        adapters.set_idle()
        return adapters.zero_embeds(rows)
    adapters.set_scales([ImagePrompt(None, "", scale=scale)])
    return [embeds.expand(rows, *embeds.shape[1:])]


def set_adapter_scale(unet, scale: float) -> None:
    """Every adapter loaded in `unet` at `scale`, for code that reads the adapters' own scale (the
    one-step editor's image branch) on a UNet whose scale the streams keep changing."""
    adapters = loaded_adapters(unet)
    if adapters is not None:
        adapters.set_scales([ImagePrompt(None, "", adapter=i, scale=scale) for i in range(len(adapters.adapters))])


def reference_fields(adapters, reference, scale: float) -> dict:
    """The infotext fields of the stream's reference, as atelier generate records them."""
    if reference is None or adapters is None:
        return {}
    if reference == FRAME_REFERENCE:
        return {"IP-Adapter": adapters.names[0], "IP-Adapter image": "input frame", "IP-Adapter scale": format_scale(scale)}
    return infotext_fields(adapters.names[:1], [ImagePrompt(None, reference.sha256, scale=scale)])
