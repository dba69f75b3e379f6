"""IP-Adapters on a loaded pipeline, through diffusers: `load_ip_adapter` puts the image projection
and `IPAdapterAttnProcessor2_0` into the UNet, `set_ip_adapter_scale` sets (per-block) scales,
`encode_image` embeds a reference, and the pipeline takes `ip_adapter_image_embeds` and
`IPAdapterMaskProcessor` masks. atelier finds the files, refuses what does not fit in one line, and
embeds each reference once (cached by its SHA-256).

    adapters = load_ip_adapter(pipe, "path/to/IP-Adapter", variant="plus")
    prompt = adapters.reference("ref.png", scale=0.6)
    generate(pipe, GenerationRequest("a cat", image_prompts=[prompt]))
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from atelier.errors import UserError
from atelier.image_prompts.references import ImagePrompt, check_scale, infotext_fields, open_reference
from atelier.image_prompts.sources import PICKLE_HELP, PICKLE_SUFFIXES, AdapterFiles, model_adapter, resolve_adapter

# What each kind of image projection reads from the CLIP vision model (as diffusers' pipelines choose:
# the projected image embedding for the plain adapter, the penultimate hidden states otherwise).
KINDS = {"base": "image embedding", "plus": "hidden states", "full": "hidden states"}
_WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    kind: str  # "base" | "plus" | "full"
    tokens: int  # image tokens the adapter adds to cross-attention
    files: AdapterFiles

    @property
    def hidden_states(self) -> bool:
        return self.kind != "base"


def read_adapter(path: Path, *, allow_pickle: bool = False) -> dict:
    """The h94 state dict {"image_proj": {...}, "ip_adapter": {...}} of an adapter file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"IP-Adapter {path.name} is a pickle file: {PICKLE_HELP}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many kinds on a bad file
            raise UserError(f"cannot read {path} as an IP-Adapter ({str(exc).splitlines()[0]})") from None
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            flat = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read {path} as an IP-Adapter ({exc})") from None
        state = grouped(flat)
    else:
        raise UserError(f"IP-Adapter {path.name}: expected a .safetensors file")
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise UserError(f"{path.name} is not an IP-Adapter (no image_proj and ip_adapter weights)")
    return state


def adapter_kind(state: dict, name: str) -> tuple[str, int]:
    """(kind, image tokens) from the image projection's keys, as diffusers' converter reads them."""
    proj = state["image_proj"]
    if "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.0.weight" in proj
                                                         and "proj.3.weight" not in proj):
        raise UserError(f"{name} is a FaceID adapter: it takes face-recognition embeddings (insightface), "
                        "which atelier does not compute; use a base or Plus adapter")
    if "proj.weight" in proj:
        return "base", 4
    if "proj.3.weight" in proj:
        return "full", 257
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus", int(proj["latents"].shape[1])
    raise UserError(f"{name}: unrecognized IP-Adapter image projection (keys {', '.join(sorted(proj)[:4])}, ...)")


def _input_width(state: dict, kind: str) -> int:
    proj = state["image_proj"]
    return int({"base": proj.get("proj.weight"), "plus": proj.get("proj_in.weight"),
                "full": proj.get("proj.0.weight")}[kind].shape[-1 if kind != "full" else 0])


def check_fits_unet(state: dict, unet, name: str) -> None:
    """The adapter's cross-attention weights must match this UNet's layers, one pair per attn2."""
    layers = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    ids = sorted(int(k.split(".")[0]) for k in state["ip_adapter"] if k.endswith("to_k_ip.weight"))
    width = int(state["ip_adapter"][f"{ids[0]}.to_k_ip.weight"].shape[1]) if ids else None
    model_width = int(unet.config.cross_attention_dim)
    if width != model_width:
        made_for = _WIDTH_FAMILIES.get(width, f"{width}-wide cross-attention")
        this = _WIDTH_FAMILIES.get(model_width, f"{model_width}-wide cross-attention")
        raise UserError(f"IP-Adapter {name} is made for {made_for} models; this model is {this}")
    if ids != [2 * k + 1 for k in range(len(layers))]:
        raise UserError(f"IP-Adapter {name} has weights for {len(ids)} cross-attention layers; this UNet has {len(layers)}")


def _check_encoder_weights(folder: Path, allow_pickle: bool) -> None:
    files = [p.name for p in folder.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        if any(f.endswith(PICKLE_SUFFIXES) for f in files):
            if not allow_pickle:
                raise UserError(f"image encoder {folder} has only pickle weights: {PICKLE_HELP}")
        else:
            raise UserError(f"image encoder {folder} has no weights")


def load_image_encoder(folder: Path, *, device, dtype, allow_pickle: bool = False):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a transformers folder; the processor
    is the folder's own or, as diffusers' load_ip_adapter makes it, CLIP's at the encoder's size."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    _check_encoder_weights(folder, allow_pickle)
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            os.fspath(folder), dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load the image encoder {folder}: {str(exc).splitlines()[0]}") from None
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(os.fspath(folder))
    else:
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder.to(device).eval(), processor


def _same_encoder(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    read = lambda folder: json.loads((folder / "config.json").read_text(encoding="utf-8"))  # noqa: E731
    return read(a) == read(b)


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def load_ip_adapter(pipe, source=None, *, variant=None, weight_name=None, image_encoder=None,
                    allow_pickle: bool = False) -> "IPAdapters":
    """Load one adapter, or several at once (`source` a list; `variant` / `weight_name` a value or a
    list), into `pipe` with diffusers' `load_ip_adapter`, replacing any adapters loaded before.
    `source` is a path (h94 layout folder, folder, adapter file) or a hub id read from the HF cache;
    None means the model's own adapter (`toyworld-ip`, `toyworld-turbo-ip` for the built-in models), else
    h94/IP-Adapter from the cache. Returns the IPAdapters that make image prompts."""
    from atelier.models import detect_family

    if source is None:
        source = model_adapter(getattr(pipe, "name_or_path", None))
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    family = detect_family(pipe).family
    variants, names = _as_list(variant, len(sources)), _as_list(weight_name, len(sources))
    files = [resolve_adapter(s, family=family, variant=v, weight_name=w, image_encoder=image_encoder)
             for s, v, w in zip(sources, variants, names)]
    for other in files[1:]:
        if not _same_encoder(files[0].image_encoder, other.image_encoder):
            raise UserError(
                f"IP-Adapters {files[0].name} and {other.name} use different image encoders "
                f"({files[0].image_encoder}, {other.image_encoder}): load adapters of one encoder together"
            )
    encoder, processor = load_image_encoder(files[0].image_encoder, device=pipe.unet.device, dtype=pipe.unet.dtype,
                                            allow_pickle=allow_pickle)
    states, loaded = [], []
    for f in files:
        state = read_adapter(f.weights, allow_pickle=allow_pickle)
        kind, tokens = adapter_kind(state, f.name)
        check_fits_unet(state, pipe.unet, f.name)
        wanted = encoder.config.projection_dim if kind == "base" else encoder.config.hidden_size
        if _input_width(state, kind) != wanted:
            raise UserError(f"IP-Adapter {f.name} takes {_input_width(state, kind)}-wide {KINDS[kind]}s; the image "
                            f"encoder {f.image_encoder} gives {wanted}-wide ones: pass the encoder it was trained with")
        states.append(state)
        loaded.append(LoadedAdapter(f.name, kind, tokens, f))
    pipe.register_modules(image_encoder=encoder)
    if getattr(pipe, "feature_extractor", None) is None:
        pipe.register_modules(feature_extractor=processor)
    try:
        pipe.load_ip_adapter(states, subfolder=[""] * len(states), weight_name=[f.name for f in files],
                             image_encoder_folder=None)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load IP-Adapter {', '.join(f.name for f in files)}: {str(exc).splitlines()[0]}") from None
    adapters = IPAdapters(pipe, loaded, encoder, processor)
    pipe.atelier_ip_adapters = pipe.unet.atelier_ip_adapters = adapters  # the UNet: shared with from_pipe copies
    install_idle_hooks(pipe.unet, adapters)
    return adapters


def install_idle_hooks(unet, adapters: "IPAdapters") -> None:
    """A UNet holding adapters fails in diffusers when a call brings no image embeddings (an edit or
    any code written for plain text models). These hooks give such calls zeros at scale 0 — which the
    adapters' attention skips, so the result is the text-only one bit for bit — and put the scales
    back afterwards. Calls that bring embeddings (pipelines, the stream, image prompts) are untouched."""
    remove_idle_hooks(unet)
    saved: list = []

    def before(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        if "image_embeds" in added or getattr(module, "encoder_hid_proj", None) is None:
            return None
        sample = args[0] if args else kwargs["sample"]
        processors = ip_attention_processors(module)
        saved.append([(p, p.scale) for p in processors])
        for p in processors:
            p.scale = [0.0] * len(p.scale)
        zeros = [e.to(sample.device, sample.dtype) for e in adapters.zero_embeds(len(sample))]
        kwargs["added_cond_kwargs"] = {**added, "image_embeds": zeros}
        return args, kwargs

    def after(module, args, kwargs, output):
        if saved:
            for p, scale in saved.pop():
                p.scale = scale

    unet._atelier_idle_hooks = [unet.register_forward_pre_hook(before, with_kwargs=True),
                                unet.register_forward_hook(after, with_kwargs=True, always_call=True)]


def remove_idle_hooks(unet) -> None:
    for handle in getattr(unet, "_atelier_idle_hooks", ()):
        handle.remove()
    unet._atelier_idle_hooks = []


class IPAdapters:
    """The adapters loaded into one pipeline: makes image prompts, embeds references once, and turns a
    list of image prompts into the pipeline's (or a bare UNet call's) arguments."""

    def __init__(self, pipe, adapters: list[LoadedAdapter], encoder, processor, cache_size: int = 32):
        self.pipe = pipe
        self.adapters = adapters
        self.encoder = encoder
        self.processor = processor
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self.encoded = 0  # references embedded so far (cache misses)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def reference(self, image, *, adapter: int = 0, scale=1.0, mask=None) -> ImagePrompt:
        """An image prompt: `image` (path, bytes or PIL) for adapter number `adapter`."""
        if not 0 <= adapter < len(self.adapters):
            raise UserError(f"there is no IP-Adapter number {adapter}: {len(self.adapters)} loaded")
        picture, digest = open_reference(image)
        mask_image, mask_digest = open_reference(mask, "L") if mask is not None else (None, None)
        return ImagePrompt(picture, digest, adapter, check_scale(scale), mask_image, mask_digest, owner=self)

    # ------------------------------------------------------------ embeddings

    def embeddings(self, prompt: ImagePrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeddings of one reference, shaped (1, ...), computed once per
        (SHA-256, what the adapter reads) by the pipeline's own `encode_image`."""
        hidden = self.adapters[prompt.adapter].hidden_states
        key = (prompt.sha256, hidden)
        if key not in self._cache:
            self._cache[key] = self._encode(prompt.image, hidden)
            self.encoded += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _encode(self, images, hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeddings of a PIL image or a list of them, by the pipeline's `encode_image`."""
        pixels = self.processor(images, return_tensors="pt").pixel_values
        device = getattr(self.pipe, "_execution_device", None) or self.encoder.device
        with torch.no_grad():
            return self.pipe.encode_image(pixels, device, 1, hidden)

    def batch_embeds(self, images: list) -> list[torch.Tensor]:
        """The UNet's `image_embeds` when each row of a batch has its own image prompt (one PIL image per
        row, every loaded adapter): one (B, 1, ...) tensor per adapter, not cached (training batches)."""
        return [self._encode(list(images), a.hidden_states)[0][:, None] for a in self.adapters]

    def zero_embeds(self, batch: int = 1) -> list[torch.Tensor]:
        """Stand-in `image_embeds` (zeros, one (batch, 1, ...) tensor per adapter) for UNet calls that
        leave the adapters out (scale 0, or a processor that ignores the image tokens)."""
        config = self.encoder.config
        shape = lambda a: (batch, 1, 1, config.hidden_size) if a.hidden_states else (batch, 1, config.projection_dim)  # noqa: E731
        return [torch.zeros(shape(a), device=self.encoder.device, dtype=self.encoder.dtype) for a in self.adapters]

    def _groups(self, prompts: list[ImagePrompt]) -> list[list[ImagePrompt]]:
        groups = [[p for p in prompts if p.adapter == i] for i in range(len(self.adapters))]
        for adapter, group in zip(self.adapters, groups):
            if not group:
                raise UserError(f"IP-Adapter {adapter.name} is loaded but has no reference image: give it one, or "
                                "load only the adapters you use")
            if any(p.scale != group[0].scale for p in group):
                raise UserError(f"the reference images of IP-Adapter {adapter.name} must share one scale")
            if any(p.mask is None for p in group) and any(p.mask is not None for p in group):
                raise UserError(f"give a mask to every reference image of IP-Adapter {adapter.name}, or to none")
        return groups

    def set_scales(self, prompts: list[ImagePrompt]) -> None:
        """Each adapter's scale (a number, or per-block dicts) on the UNet, by set_ip_adapter_scale."""
        scales = [group[0].scale for group in self._groups(prompts)]
        for scale in scales:
            _check_blocks(scale, self.pipe.unet)
        try:
            self.pipe.set_ip_adapter_scale(scales)
        except (ValueError, KeyError) as exc:
            raise UserError(f"IP-Adapter scale {scales if len(scales) > 1 else scales[0]}: {exc}") from None

    def _stacked(self, group: list[ImagePrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.embeddings(p) for p in group]
        return torch.cat([pos for pos, _ in pairs])[None], torch.cat([neg for _, neg in pairs])[None]

    def pipeline_kwargs(self, prompts: list[ImagePrompt], *, guidance_scale: float, width: int, height: int) -> dict:
        """`ip_adapter_image_embeds` (and masks) for a diffusers pipeline call; sets the scales."""
        groups = self._groups(prompts)
        self.set_scales(prompts)
        cfg = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None  # the pipeline's own rule
        embeds = []
        for group in groups:
            pos, neg = self._stacked(group)
            embeds.append(torch.cat([neg, pos]) if cfg else pos)
        kwargs = {"ip_adapter_image_embeds": embeds}
        masks = self._masks(groups, width, height)
        if masks is not None:
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        return kwargs

    def _masks(self, groups, width: int, height: int):
        if not any(p.mask is not None for group in groups for p in group):
            return None
        from diffusers.image_processor import IPAdapterMaskProcessor

        processor = IPAdapterMaskProcessor()
        masks = []
        for group in groups:
            if group[0].mask is None:
                masks.append(None)
                continue
            m = processor.preprocess([p.mask for p in group], height=height, width=width)
            masks.append(m.reshape(1, m.shape[0], m.shape[2], m.shape[3]))
        return masks

    def unet_hook(self, prompts: list[ImagePrompt]):
        """For code that calls the UNet itself (editing, through the Denoiser): a forward pre-hook that
        gives every row of every call the references' embeddings. Returns the torch hook handle
        (`.remove()` it). Every branch of classifier-free guidance sees the reference alike, so it
        steers the result at its scale and is not amplified by the guidance."""
        groups = self._groups(prompts)
        if any(p.mask is not None for group in groups for p in group):
            raise UserError("IP-Adapter masks apply to pipeline calls (generate, img2img), not to edits")
        self.set_scales(prompts)
        embeds = [self._stacked(group)[0] for group in groups]

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            added = dict(kwargs.get("added_cond_kwargs") or {})
            if "image_embeds" not in added:
                added["image_embeds"] = [e.expand(len(sample), *e.shape[1:]).to(sample.dtype) for e in embeds]
                kwargs["added_cond_kwargs"] = added
            return args, kwargs

        return self.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)  # before the idle hook

    def idle_kwargs(self, *, guidance_scale: float) -> dict:
        """Arguments that leave every adapter out (scale 0; the UNet still wants embeddings)."""
        self.set_idle()
        cfg = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        return {"ip_adapter_image_embeds": [torch.cat([e, e]) if cfg else e for e in self.zero_embeds()]}

    def set_idle(self) -> None:
        """Every adapter at scale 0, which their attention skips: calls give the text-only result."""
        self.pipe.set_ip_adapter_scale([0.0] * len(self.adapters))

    def infotext_fields(self, prompts: list[ImagePrompt]) -> dict:
        return infotext_fields(self.names, prompts)

    def unload(self) -> None:
        """Take the adapters out of the UNet again (diffusers' unload_ip_adapter)."""
        remove_idle_hooks(self.pipe.unet)
        self.pipe.unload_ip_adapter()
        for owner in (self.pipe, self.pipe.unet):
            if getattr(owner, "atelier_ip_adapters", None) is self:
                owner.atelier_ip_adapters = None


def _check_blocks(scale, unet) -> None:
    """diffusers ignores per-block scales of blocks without attention (a typo silently turns the adapter
    off there); name the blocks that exist instead."""
    if not isinstance(scale, dict):
        return
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise UserError(f"IP-Adapter scale: unknown part {sorted(unknown)[0]!r}; use down, mid and up")
    for part in ("down", "up"):
        blocks = getattr(unet, f"{part}_blocks")
        valid = {f"block_{i}" for i, block in enumerate(blocks) if getattr(block, "attentions", None)}
        wrong = set(scale.get(part, {}) if isinstance(scale.get(part), dict) else ()) - valid
        if wrong:
            raise UserError(f"IP-Adapter scale: this UNet has no {part} {sorted(wrong)[0]} with attention; "
                            f"its {part} blocks with attention are {', '.join(sorted(valid))}")


def image_prompt_kwargs(pipeline, prompts, *, guidance_scale: float, width: int, height: int) -> dict:
    """The pipeline arguments of a request's image prompts, for atelier.generate. Without any, a
    pipeline whose UNet holds adapters runs them at scale 0 (the text-only image, bit for bit)."""
    if prompts:
        return _owner(prompts).pipeline_kwargs(prompts, guidance_scale=guidance_scale, width=width, height=height)
    adapters = getattr(pipeline.unet, "atelier_ip_adapters", None)
    if adapters is None or getattr(pipeline.unet, "encoder_hid_proj", None) is None:
        return {}
    return adapters.idle_kwargs(guidance_scale=guidance_scale)


def image_prompt_fields(prompts) -> dict:
    """The metadata fields of a request's image prompts ({} without any); for atelier.generate."""
    if not prompts:
        return {}
    return _owner(prompts).infotext_fields(prompts)


def _owner(prompts) -> IPAdapters:
    owners = {id(p.owner): p.owner for p in prompts}
    if None in owners.values() or len(owners) != 1:
        raise UserError("image prompts must all come from one IPAdapters: load the adapters together with "
                        "load_ip_adapter(pipe, [source, ...]) and make each with adapters.reference(...)")
    return next(iter(owners.values()))


# ---------------------------------------------------------------- h94 state dicts of a UNet's adapter

def ip_attention_processors(unet) -> list:
    """The UNet's IP-Adapter cross-attention processors, in the order h94 numbers them (1, 3, 5, ...)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    return [p for n, p in unet.attn_processors.items()
            if n.endswith("attn2.processor") and isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))]


# h94 image-projection key -> diffusers' key, per kind (diffusers converts only the other way)
_FULL_KEYS = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "proj.3": "norm"}


NEW_KINDS = ("base", "plus", "full")  # the adapters new_adapter_state makes, so the ones atelier trains

# the Plus resampler's block parts: diffusers' name -> tencent-ailab's (`layers.{i}.` before both)
_PLUS_KEYS = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
              "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}


def plus_projection_state(proj_state: dict) -> dict:
    """diffusers' `IPAdapterPlusImageProjection` state -> the Resampler's h94 keys (to_k and to_v
    joined into `to_kv`): the inverse of diffusers' `_convert_ip_adapter_image_proj_to_diffusers`."""
    out = {}
    for key, value in proj_state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, i, rest = key.split(".", 2)
        part, _, param = rest.rpartition(".")
        if part == "attn.to_v":
            continue
        if part == "attn.to_k":
            out[f"layers.{i}.0.to_kv.{param}"] = torch.cat([value, proj_state[f"layers.{i}.attn.to_v.{param}"]])
        else:
            out[f"layers.{i}.{_PLUS_KEYS[part]}.{param}"] = value
    return out


def adapter_state_dict(unet, index: int = 0) -> dict:
    """The h94 flat state dict (`image_proj.proj.weight`, `ip_adapter.1.to_k_ip.weight`, ...) of the
    base, Plus or full adapter number `index` loaded in `unet`: what `load_ip_adapter` reads back, and
    what the IP-Adapter repository's own code and ComfyUI read. diffusers has only the other direction."""
    from diffusers.models.embeddings import (ImageProjection, IPAdapterFullImageProjection,
                                             IPAdapterPlusImageProjection)

    proj = unet.encoder_hid_proj.image_projection_layers[index]
    if isinstance(proj, ImageProjection):
        state = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in proj.state_dict().items()}
    elif isinstance(proj, IPAdapterFullImageProjection):
        back = {v: k for k, v in _FULL_KEYS.items()}
        state = {f"image_proj.{back[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in proj.state_dict().items()}
    elif isinstance(proj, IPAdapterPlusImageProjection):
        state = {f"image_proj.{k}": v for k, v in plus_projection_state(proj.state_dict()).items()}
    else:
        raise UserError(f"writing {type(proj).__name__} adapters is not supported: only base, Plus and full IP-Adapters")
    for k, processor in enumerate(ip_attention_processors(unet)):
        state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = processor.to_k_ip[index].weight
        state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = processor.to_v_ip[index].weight
    return state


def new_adapter_state(unet, image_embed_dim: int, *, kind: str = "base", seed: int = 0, tokens: int = 16) -> dict:
    """A fresh adapter for `unet` as the IP-Adapter training scripts make one: the image projection newly
    initialised, every `to_k_ip` / `to_v_ip` a copy of its layer's `to_k` / `to_v`. `kind` "base"
    (`tutorial_train.py`): a Linear from the projected image embedding to 4 tokens and a LayerNorm;
    "plus" (`tutorial_train_plus.py`): the Resampler, `tokens` learnt queries attending over the
    encoder's penultimate hidden states in 4 blocks, as wide as the cross-attention with 64-wide heads
    (h94's SD 1.5 Plus: 768 wide, 12 heads, 16 tokens), built by diffusers' IPAdapterPlusImageProjection;
    "full" (h94's full-face architecture): every token of those hidden states through an MLP and a
    LayerNorm. `image_embed_dim` is the projected embedding's width for "base", the encoder's hidden size
    otherwise. Returns the {"image_proj": ..., "ip_adapter": ...} groups diffusers loads."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    if kind not in NEW_KINDS:
        raise UserError(f"unknown adapter kind {kind!r}: base, plus or full")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        cross = unet.config.cross_attention_dim
        norm = torch.nn.LayerNorm(cross)
        if kind == "base":
            proj = torch.nn.Linear(image_embed_dim, 4 * cross)
            image_proj = {"proj.weight": proj.weight.data, "proj.bias": proj.bias.data}
        elif kind == "plus":
            # diffusers reads the heads back as to_q rows / 64 and always builds 4 blocks
            resampler = IPAdapterPlusImageProjection(embed_dims=image_embed_dim, output_dims=cross, hidden_dims=cross,
                                                     depth=4, dim_head=64, heads=max(1, cross // 64),
                                                     num_queries=tokens)
            image_proj = plus_projection_state({k: v.detach().clone() for k, v in resampler.state_dict().items()})
        else:
            first, second = torch.nn.Linear(image_embed_dim, image_embed_dim), torch.nn.Linear(image_embed_dim, cross)
            image_proj = {"proj.0.weight": first.weight.data, "proj.0.bias": first.bias.data,
                          "proj.2.weight": second.weight.data, "proj.2.bias": second.bias.data}
    finally:
        torch.random.set_rng_state(generator_state)
    if kind != "plus":
        norm_key = "norm" if kind == "base" else "proj.3"
        image_proj.update({f"{norm_key}.weight": norm.weight.data, f"{norm_key}.bias": norm.bias.data})
    layers = {}
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for k, name in enumerate(names):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        layers[f"{2 * k + 1}.to_k_ip.weight"] = attention.to_k.weight.detach().clone().float()
        layers[f"{2 * k + 1}.to_v_ip.weight"] = attention.to_v.weight.detach().clone().float()
    return {"image_proj": image_proj, "ip_adapter": layers}


def grouped(flat: dict) -> dict:
    """h94 flat keys -> the {"image_proj": ..., "ip_adapter": ...} groups."""
    state = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in state:
            state[group][rest] = value
    return state
