"""StreamEngine: StreamDiffusion's pipeline on any loaded SD 1.x / 2.x / SDXL / Turbo / LCM pipeline.

One UNet call per frame covers every denoising stage ("stream batch"): the new frame enters at the
first stage while the frames before it move one stage on. On top of StreamDiffusion it fixes what
its users keep reporting: every setting updates live without re-preparing (prompt and negative
prompt with A1111 weights, blending, guidance, delta, seed, strength / t_index list, CFG type, the
reference image and its scale); the buffer is filled from the first frame itself, so no brown
warm-up frames reach the user; residual CFG keeps each frame's residual noise with that frame, as
reference="frame" keeps each frame's image embedding.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from atelier.core import vae as vae_calls
from atelier.errors import UserError
from atelier.stream import image_prompt
from atelier.stream import settings as spec
from atelier.stream.frames import FrameKind, from_tensor, to_tensor
from atelier.stream.settings import CFG_TYPES, MAX_PROMPT_CHARS, MAX_STAGES  # noqa: F401 (their old home)
from atelier.stream.similarity import SimilarityFilter
from atelier.stream.stream_math import (
    next_residual_noise,
    renoise,
    stage_coefficients,
    strength_to_t_indices,
    x0_and_eps,
    x0_from_eps,
)

_EMBED_CACHE_SIZE = 32
_SCHEDULE_KEYS = ("seed", "num_inference_steps", "t_index_list")
_PROMPT_KEYS = ("prompt", "negative_prompt", "blend_prompt", "blend")
_FILTER_KEYS = ("similarity_filter", "similarity_threshold")


def default_settings(pipe) -> dict:
    """Live settings a new stream starts from. Turbo and LCM models: two stages over the last 70 % of
    a 50-step schedule (on toyworld-turbo one stage follows an edited prompt in 26 % of toy-world edit
    cases, two in 78 %, three in 93 %: benchmarks/stream.py --edit-grid); multi-step models: four
    stages over the last 60 %."""
    from atelier.models.families import detect_family

    family = detect_family(pipe)
    few_step = family.is_turbo or family.is_lcm
    steps = 50
    strength = 0.7 if few_step else 0.6
    stages = 2 if few_step else 4
    return {
        "prompt": "",
        "negative_prompt": "",
        "blend_prompt": "",
        "blend": 0.0,
        "guidance_scale": 1.2,
        "delta": 1.0,
        "cfg_type": "none",
        "seed": 2,
        "num_inference_steps": steps,
        "strength": strength,
        "t_index_list": strength_to_t_indices(strength, steps, stages),
        "similarity_filter": False,
        "similarity_threshold": 0.98,
        "reference": None,
        "ip_scale": 1.0,
    }


class StreamEngine:
    """engine = StreamEngine(pipe, t_index_list=[15, 32]); engine.prepare("a prompt"); out = engine(frame)

    t_index_list: denoising stages as indices into a `num_inference_steps` schedule of the model's
      own scheduler (default: from the model family, see `default_settings`).
    cfg_type: "none"; "full" (a negative-prompt pass per stage); "self" (RCFG: the residual noise is
      the negative); "initialize" (RCFG with one real negative pass at the first stage).
    frame_buffer_size: frames per call. use_denoising_batch: one UNet call for all stages.
    similarity_filter / similarity_threshold / max_skip_frames: StreamDiffusion's frame skipping.
    vae: a replacement autoencoder, e.g. a tiny one (AutoencoderTiny, a folder, a folder exported by
      `atelier export`, a hub id, or "toyworld-taesd"), sharing the model's latent space.
    vae_encoder: a replacement for the encoder alone (the same kinds): frames are encoded by it and
      decoded by `vae` (default the model's VAE). A tiny autoencoder's encoder regresses the VAE's
      latents closely; its decoder is where it loses image quality (benchmarks/speed.py).
    ip_adapter / ip_image_encoder: an IP-Adapter source to load into the pipeline (as
      atelier.image_prompts.load_ip_adapter takes it) for the `reference` setting; without one the
      adapter already loaded in the pipeline is used. reference: an image (embedded once per image),
      "frame" (each input frame is its own image prompt: one image-encoder call per frame) or None;
      ip_scale: its scale (0: the text-only stream, bit for bit).
    """

    def __init__(
        self,
        pipe,
        t_index_list: list[int] | None = None,
        cfg_type: str = "none",
        frame_buffer_size: int = 1,
        use_denoising_batch: bool = True,
        width: int | None = None,
        height: int | None = None,
        similarity_filter: bool = False,
        similarity_threshold: float = 0.98,
        max_skip_frames: int = 10,
        vae=None,
        vae_encoder=None,
        ip_adapter=None,
        ip_image_encoder=None,
    ):
        from atelier.core.facts import check_size, native_size, size_step
        from atelier.core.denoiser import Denoiser
        from atelier.prompts.conditioning import is_sdxl_pipeline

        if not isinstance(frame_buffer_size, int) or not 1 <= frame_buffer_size <= MAX_STAGES:
            raise UserError(f"frame_buffer_size must be a whole number from 1 to {MAX_STAGES}, got {frame_buffer_size!r}")
        self.pipe = pipe
        self.unet = pipe.unet
        if ip_adapter is not None:
            image_prompt.load_adapter(pipe, ip_adapter, image_encoder=ip_image_encoder)
        self.vae = _autoencoder(vae, pipe) if vae is not None else pipe.vae
        self.vae_encoder = _autoencoder(vae_encoder, pipe) if vae_encoder is not None else self.vae
        self.tiny_vae = vae_calls.is_tiny(self.vae)  # frames come out of a tiny decoder
        self.frame_buffer_size = frame_buffer_size
        self.use_denoising_batch = use_denoising_batch
        self.width = width or native_size(pipe)
        self.height = height or native_size(pipe)
        check_size(self.width, self.height, size_step(pipe))
        scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        self.latent_shape = (self.unet.config.in_channels, self.height // scale, self.width // scale)
        self.device = getattr(pipe, "_execution_device", None) or self.unet.device
        self.dtype = self.unet.dtype
        self.sdxl = is_sdxl_pipeline(pipe)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        # A private scheduler: sessions sharing one pipeline must not move each other's timesteps.
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.is_lcm_scheduler = type(self.scheduler).__name__ == "LCMScheduler"

        given = dict(cfg_type=cfg_type, similarity_filter=similarity_filter, similarity_threshold=similarity_threshold)
        if t_index_list is not None:
            given["t_index_list"] = t_index_list
        self._settings = self._validated(default_settings(pipe), given)
        self._max_skip_frames = max_skip_frames
        self._text = Denoiser(pipe, cache_size=_EMBED_CACHE_SIZE)  # prompt encoding, cached
        self._buffer = None  # (latents, residuals, frame image embeddings or None) of the frames in flight, stages 1..n-1
        self._reference_embeds = None
        self._prepared = False
        self._last_output = None
        self._last_settings = None
        self.profile = False
        self.timings = {"vae_encode": 0.0, "image_encode": 0.0, "unet": 0.0, "vae_decode": 0.0}
        self.stats = {"frames": 0, "skipped": 0}

    # ------------------------------------------------------------------ settings

    @classmethod
    def settings_schema(cls, pipe) -> dict:
        """What each setting accepts, with this model's defaults: the contract of `update()`."""
        from atelier.core.facts import native_size

        size = native_size(pipe)
        return spec.schema({**default_settings(pipe), "width": size, "height": size, "frame_buffer_size": 1,
                            "ip_adapter": image_prompt.loaded_adapters(pipe.unet) is not None})

    def settings(self) -> dict:
        out = dict(self._settings)
        out.update(width=self.width, height=self.height, frame_buffer_size=self.frame_buffer_size,
                   reference=spec.shown_reference(out["reference"]))
        return out

    @property
    def adapters(self):
        """The IPAdapters loaded in the pipeline (shared with every engine on it), or None."""
        return image_prompt.loaded_adapters(self.unet)

    def _validated(self, current: dict, changes: dict) -> dict:
        """`current` with `changes` applied, or a UserError naming the first bad value."""
        new = spec.apply(current, changes)
        steps = new["num_inference_steps"]
        if "t_index_list" not in changes and ("strength" in changes or "num_inference_steps" in changes):
            # the same share of a new schedule, or a new share of this one
            new["t_index_list"] = strength_to_t_indices(new["strength"], steps, len(current["t_index_list"]))
            changes = {**changes, "strength": new["strength"]}
        indices = new["t_index_list"]
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise UserError(f"t_index_list must increase strictly, got {indices}")
        if indices[-1] >= steps:
            raise UserError(f"t_index_list {indices} reaches past the {steps}-step schedule (num_inference_steps)")
        if "strength" not in changes or "t_index_list" in changes:
            new["strength"] = round(1.0 - indices[0] / steps, 4)
        if changes.get("reference") is not None:
            image_prompt.check_adapters(self.adapters)
        return new

    def update(self, /, **changes) -> dict:
        """Change live settings; nothing changes when any value is bad or a prompt does not encode.
        Returns the new settings."""
        if not changes:
            return self.settings()
        new = self._validated(self._settings, changes)
        if self._prepared:
            old = self._settings
            state = {}  # everything is computed before anything is replaced
            if any(old[k] != new[k] for k in _SCHEDULE_KEYS):
                state.update(self._schedule_state(new))
            if any(old[k] != new[k] for k in _PROMPT_KEYS):
                state.update(self._embedding_state(new))
            if any(old[k] != new[k] for k in _FILTER_KEYS):
                state["_filter"] = self._new_filter(new)
            if spec.shown_reference(old["reference"]) != spec.shown_reference(new["reference"]):
                state.update(self._reference_state(new))
            vars(self).update(state)
        self._settings = new
        return self.settings()

    def prepare(self, prompt: str = "", negative_prompt: str = "", num_inference_steps: int | None = None,
                guidance_scale: float | None = None, delta: float | None = None, seed: int | None = None,
                strength: float | None = None, **more) -> None:
        """Set the prompt and everything else, encode it, draw the fixed noise, empty the buffer."""
        given = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, delta=delta, seed=seed, strength=strength, **more)
        changes = {k: v for k, v in given.items() if v is not None}
        new = self._validated(self._settings, changes)
        state = {**self._schedule_state(new), **self._embedding_state(new), **self._reference_state(new),
                 "_filter": self._new_filter(new)}
        vars(self).update(state)
        self._settings = new
        self._prepared = True

    # ------------------------------------------------------------------ preparation

    def _schedule_state(self, s: dict) -> dict:
        """The stages' timesteps, coefficients and fixed noise for settings `s` (assigned by the caller)."""
        try:
            self.scheduler.set_timesteps(s["num_inference_steps"], device="cpu")
        except ValueError as exc:
            raise UserError(f"num_inference_steps {s['num_inference_steps']}: {exc}") from None
        schedule = self.scheduler.timesteps
        if s["t_index_list"][-1] >= len(schedule):
            raise UserError(f"t_index_list {s['t_index_list']} reaches past the {len(schedule)}-step schedule")
        timesteps = [int(round(float(schedule[i]))) for i in s["t_index_list"]]
        alpha, beta = stage_coefficients(self.scheduler.alphas_cumprod, timesteps)
        state = {"timesteps": timesteps, "_alpha": alpha.to(self.device, self.dtype),
                 "_beta": beta.to(self.device, self.dtype), "_t": torch.tensor(timesteps, device=self.device)}
        if self.is_lcm_scheduler:
            scalings = [self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps]
            state["_c_skip"] = torch.tensor([c[0] for c in scalings], device=self.device, dtype=self.dtype)
            state["_c_out"] = torch.tensor([c[1] for c in scalings], device=self.device, dtype=self.dtype)
        generator = torch.Generator("cpu").manual_seed(s["seed"])
        shape = (len(timesteps) * self.frame_buffer_size, *self.latent_shape)
        state["_noise"] = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        state["_buffer"] = None  # the frames in flight were made on the old schedule
        return state

    def _embedding_state(self, s: dict) -> dict:
        """The prompt embeddings for settings `s`; a prompt that does not encode raises here."""
        positive, pooled = self._text.encode(s["prompt"])
        if s["blend_prompt"] and s["blend"] > 0:
            other, other_pooled = self._text.encode(s["blend_prompt"])
            tokens = max(positive.shape[0], other.shape[0])
            positive = torch.lerp(self._text.pad(positive, tokens), self._text.pad(other, tokens), s["blend"])
            if pooled is not None:
                pooled = torch.lerp(pooled, other_pooled, s["blend"])
        negative, negative_pooled = self._text.encode(s["negative_prompt"], negative=True)
        tokens = max(positive.shape[0], negative.shape[0])
        state = {
            "_cond": self._text.pad(positive, tokens).to(self.device, self.dtype),
            "_uncond": self._text.pad(negative, tokens).to(self.device, self.dtype),
            "_cond_pooled": None if pooled is None else pooled.to(self.device, self.dtype),
            "_uncond_pooled": None if negative_pooled is None else negative_pooled.to(self.device, self.dtype),
        }
        if self.sdxl:
            state["_time_ids"] = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]],
                                              device=self.device, dtype=self.dtype)
        return state

    def _reference_state(self, s: dict) -> dict:
        """The embedding of an image reference (cached by the adapters: each image is embedded once)."""
        if s["reference"] is None or s["reference"] == spec.FRAME_REFERENCE:
            return {"_reference_embeds": None}
        embeds = image_prompt.reference_embeds(self.adapters, s["reference"])
        return {"_reference_embeds": embeds.to(self.device, self.dtype)}

    def _frame_embeds(self, pixels: torch.Tensor):
        """(frames, 1, ...) image embeddings of the input frames when they are the reference, else None."""
        if self._settings["reference"] != spec.FRAME_REFERENCE or self.adapters is None:
            return None
        with self._timed("image_encode"):
            images = from_tensor(pixels, FrameKind("pil_list", True))
            return image_prompt.frame_embeds(self.adapters, images).to(self.device, self.dtype)

    def _new_filter(self, s: dict):
        if not s["similarity_filter"]:
            return None
        return SimilarityFilter(s["similarity_threshold"], self._max_skip_frames, seed=s["seed"])

    # ------------------------------------------------------------------ model calls

    @contextmanager
    def _timed(self, name: str):
        if not self.profile:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] += time.perf_counter() - start

    def _unet(self, latents, stages, conditional: torch.Tensor, frame_embeds=None) -> torch.Tensor:
        """The UNet on a batch whose items sit at `stages`; `conditional` says which item gets the prompt
        (True) or the negative prompt (False); `frame_embeds` each item's image embedding when the
        input frames are the reference (else the reference image's, or none, applies to all)."""
        hidden = torch.where(conditional[:, None, None], self._cond, self._uncond)
        added = {}
        if self.sdxl:
            pooled = torch.where(conditional[:, None], self._cond_pooled, self._uncond_pooled)
            added = {"text_embeds": pooled, "time_ids": self._time_ids.expand(len(latents), -1)}
        adapters = self.adapters
        if adapters is not None:
            s = self._settings
            embeds = frame_embeds if s["reference"] == spec.FRAME_REFERENCE else self._reference_embeds
            added["image_embeds"] = image_prompt.unet_image_embeds(adapters, s["reference"], s["ip_scale"],
                                                                   len(latents), embeds)
        kwargs = {"added_cond_kwargs": added} if added else {}
        with self._timed("unet"):
            return self.unet(latents, self._t[stages], encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]

    def _denoise(self, x_t: torch.Tensor, stages: torch.Tensor, residual: torch.Tensor, frame_embeds=None):
        """One stage for every item: (x0, eps, residual) where eps is the guided noise and residual is
        the virtual negative each item actually used (initialize replaces stage 0's with the real one)."""
        s = self._settings
        alpha, beta = self._alpha[stages].view(-1, 1, 1, 1), self._beta[stages].view(-1, 1, 1, 1)
        cfg = s["cfg_type"] if s["guidance_scale"] > 1.0 else "none"
        g = s["guidance_scale"]
        yes = torch.ones(len(x_t), dtype=torch.bool, device=self.device)
        embeds = frame_embeds
        if cfg == "full":
            if frame_embeds is not None:
                embeds = torch.cat([frame_embeds, frame_embeds])
            out = self._unet(torch.cat([x_t, x_t]), torch.cat([stages, stages]), torch.cat([~yes, yes]), embeds)
            x0_u, eps_u = x0_and_eps(out[: len(x_t)], x_t, alpha, beta, self.prediction_type)
            x0_c, eps_c = x0_and_eps(out[len(x_t):], x_t, alpha, beta, self.prediction_type)
        else:
            first = (stages == 0).nonzero().flatten() if cfg == "initialize" else stages[:0]
            items = torch.cat([x_t[first], x_t])
            if frame_embeds is not None:
                embeds = torch.cat([frame_embeds[first], frame_embeds])
            out = self._unet(items, torch.cat([stages[first], stages]), torch.cat([~yes[first], yes]), embeds)
            x0_c, eps_c = x0_and_eps(out[len(first):], x_t, alpha, beta, self.prediction_type)
            if cfg == "none":
                x0, eps = self._boundary(x0_c, x_t, stages), eps_c
                return x0, eps, residual
            residual = residual.clone()
            if len(first):
                _, residual[first] = x0_and_eps(out[: len(first)], x_t[first], alpha[first], beta[first], self.prediction_type)
            eps_u = s["delta"] * residual
            x0_u = x0_from_eps(x_t, eps_u, alpha, beta)
        eps = eps_u + g * (eps_c - eps_u)
        x0 = x0_u + g * (x0_c - x0_u)  # the same guidance, in x0 space (better conditioned at high noise)
        return self._boundary(x0, x_t, stages), eps, residual

    def _boundary(self, x0, x_t, stages):
        if not self.is_lcm_scheduler:
            return x0
        return self._c_out[stages].view(-1, 1, 1, 1) * x0 + self._c_skip[stages].view(-1, 1, 1, 1) * x_t

    def _next(self, x0, eps, residual, stages):
        """Move items from `stages` to the stage after: their x_t and residual noise there."""
        frames = self.frame_buffer_size
        nxt = stages + 1
        offsets = torch.arange(len(stages), device=self.device) % frames
        noise = self._noise[nxt * frames + offsets]
        a, b = self._alpha[stages].view(-1, 1, 1, 1), self._beta[stages].view(-1, 1, 1, 1)
        a2, b2 = self._alpha[nxt].view(-1, 1, 1, 1), self._beta[nxt].view(-1, 1, 1, 1)
        return renoise(x0, noise, a2, b2), next_residual_noise(residual, eps, noise, a, b, a2, b2)

    def _stream_step(self, x_t: torch.Tensor, frame_embeds=None) -> torch.Tensor:
        """Enter frames at stage 0 (x_t there, `frame_embeds` their image embeddings when they are the
        reference); return the clean latents of the frames that leave."""
        frames, stages = self.frame_buffer_size, len(self.timesteps)
        residual = self._noise[:frames]
        if not self.use_denoising_batch or stages == 1 or self._buffer is None:
            # Frame by frame. Also the warm-up: the buffer is filled with this frame at every later
            # stage, as if the stream had been showing it all along — no garbage frames.
            fill = []
            stage = torch.zeros(frames, dtype=torch.long, device=self.device)
            for i in range(stages):
                x0, eps, residual = self._denoise(x_t, stage, residual, frame_embeds)
                if i + 1 < stages:
                    x_t, residual = self._next(x0, eps, residual, stage)
                    stage = stage + 1
                    fill.append((x_t, residual))
            if self.use_denoising_batch and stages > 1:
                self._buffer = (torch.cat([f[0] for f in fill]), torch.cat([f[1] for f in fill]),
                                _repeat_rows(frame_embeds, stages - 1))
            return x0
        buffer_x, buffer_r, buffer_e = self._buffer
        if frame_embeds is not None:
            if buffer_e is None:  # the frames in flight entered before the input became the reference
                buffer_e = _repeat_rows(frame_embeds, stages - 1)
            frame_embeds = torch.cat([frame_embeds, buffer_e])
        stage = torch.arange(stages, device=self.device).repeat_interleave(frames)
        x0, eps, residual = self._denoise(torch.cat([x_t, buffer_x]), stage, torch.cat([residual, buffer_r]), frame_embeds)
        self._buffer = (*self._next(x0[:-frames], eps[:-frames], residual[:-frames], stage[:-frames]),
                        None if frame_embeds is None else frame_embeds[:-frames])
        return x0[-frames:]

    # ------------------------------------------------------------------ frames

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with self._timed("vae_encode"):
            return vae_calls.encode(self.vae_encoder, images.to(self.device), self.dtype)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self._timed("vae_decode"):
            return vae_calls.decode(self.vae, latents)

    @torch.no_grad()
    def __call__(self, image=None):
        """img2img on `image` (a frame or `frame_buffer_size` frames); txt2img when `image` is None."""
        if not self._prepared:
            raise UserError("call prepare(prompt, ...) before sending frames")
        frames = self.frame_buffer_size
        if image is None:
            return self.txt2img()
        pixels, kind = to_tensor(image, self.width, self.height)
        if len(pixels) != frames:
            raise UserError(f"this stream takes {frames} frame(s) per call, got {len(pixels)}")
        # The filter remembers every frame it lets through; after a reset it has none, so it skips nothing.
        if self._filter is not None and self._filter.should_skip(pixels) and self._last_output is not None:
            self.stats["skipped"] += 1
            return from_tensor(self._last_output, kind)
        frame_embeds = self._frame_embeds(pixels)
        latents = self._encode_images(pixels)
        x_t = renoise(latents, self._noise[:frames], self._alpha[0], self._beta[0])
        out = self._decode_latents(self._stream_step(x_t, frame_embeds)).float().cpu()
        return self._finish(out, kind)

    @torch.no_grad()
    def txt2img(self, batch_size: int | None = None):
        """Images from the fixed noise alone (stage 0 starts from pure noise)."""
        if not self._prepared:
            raise UserError("call prepare(prompt, ...) before generating")
        if self._settings["reference"] == spec.FRAME_REFERENCE and self.adapters is not None:
            raise UserError('reference="frame" takes the image prompt from input frames; txt2img has none')
        x_t = self._noise[: self.frame_buffer_size]
        out = self._decode_latents(self._stream_step(x_t)).float().cpu()
        return self._finish(out, FrameKind("pil_list" if self.frame_buffer_size > 1 else "pil", self.frame_buffer_size > 1))

    def _finish(self, images: torch.Tensor, kind):
        self._last_output = images
        self._last_settings = dict(self._settings)
        self.stats["frames"] += 1
        return from_tensor(images, kind)

    def reset(self) -> None:
        """Forget the frames in flight (the next frame warms the buffer up again)."""
        self._buffer = None
        self._last_output = None
        if getattr(self, "_filter", None) is not None:
            self._filter.reset()

    def infotext(self) -> str:
        """A1111 "parameters" text for the last frame returned."""
        from atelier.core.infotext import format_parameters
        from atelier.core.facts import model_name as _model_name

        s = self._last_settings or self._settings
        cfg = s["cfg_type"] if s["guidance_scale"] > 1.0 else "none"
        fields = {
            "Steps": len(s["t_index_list"]),
            "Sampler": "LCM" if self.is_lcm_scheduler else "Stream",
            "CFG scale": s["guidance_scale"] if cfg != "none" else 1,
            "Seed": s["seed"],
            "Size": f"{self.width}x{self.height}",
            "Model": _model_name(self.pipe),
            "Denoising strength": s["strength"],
            "Stream t_index": "[" + " ".join(map(str, s["t_index_list"])) + f"] of {s['num_inference_steps']}",
            "RCFG": cfg if cfg in ("self", "initialize") else None,
            "RCFG delta": s["delta"] if cfg in ("self", "initialize") else None,
            "Prompt blend": f"{s['blend']}: {s['blend_prompt']}" if s["blend_prompt"] and s["blend"] > 0 else None,
            **image_prompt.reference_fields(self.adapters, s["reference"], s["ip_scale"]),
        }
        return format_parameters(s["prompt"], s["negative_prompt"], {k: v for k, v in fields.items() if v is not None})


def _autoencoder(source, pipe):
    """A loaded autoencoder as it is; a source (name, folder, hub id) loaded as a tiny one on the UNet's device."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from atelier.models import load_tiny_autoencoder

    return load_tiny_autoencoder(source, device=pipe.unet.device, dtype=pipe.unet.dtype)


def _repeat_rows(embeds, times: int):
    """`embeds` (frames, ...) for `times` stages in a row, as the buffer lays frames out; None stays None."""
    return None if embeds is None else embeds.repeat(times, *[1] * (embeds.ndim - 1))
