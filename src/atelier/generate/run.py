"""Run a `GenerationRequest` through a diffusers pipeline: txt2img or img2img, any named sampler,
CFG with guidance rescale, perturbed-attention guidance, A1111 prompts with prompt editing, and
per-image seeds (and, with `GenerationRequest.per_image`, per-image prompts).

Image k is drawn from its own `torch.Generator` seeded with seed + k: diffusers takes a list of
generators and uses generator k for everything random about image k (initial noise, the VAE's
latent sample in img2img, ancestral and SDE noise), so image k comes out the same whatever the batch
size. The generators live on the CPU, as A1111's "RNG: CPU" does, so a seed gives the same noise on
any device. Brownian-tree SDE samplers draw from their own trees; they get one tree per image,
seeded the same way.

A request with a hires fix (`atelier.generate.hires`) runs each image twice: txt2img at the base
size, then img2img on the upscaled result, from fresh generators with the same seeds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch

from atelier.errors import UserError
from atelier.core.infotext import format_parameters
from atelier.generate.hires import upscale_image, upscale_latents
from atelier.generate.networks import PromptNetworks
from atelier.generate.request import GenerationRequest, resolve_request
from atelier.image_prompts.adapters import image_prompt_fields, image_prompt_kwargs

# Where perturbed-attention guidance perturbs self-attention: the UNet's middle block, as in the
# PAG paper's SD setup and diffusers' default.
PAG_LAYERS = ["mid"]


@dataclass
class GeneratedImage:
    image: object  # PIL.Image.Image
    seed: int
    prompt: str  # after wildcard expansion
    negative_prompt: str
    parameters: str  # A1111 infotext, ready for the PNG "parameters" chunk
    fields: dict = field(default_factory=dict)  # the infotext's key/value line, in order
    nsfw: bool = False  # flagged (and blacked out) by the pipeline's safety checker


def generate(pipe, request: GenerationRequest, *, progress: bool = True) -> list[GeneratedImage]:
    """Generate `request.n_images` images with `pipe` (a diffusers SD, SD2 or SDXL pipeline)."""
    from atelier.samplers import a1111_fields, make_scheduler

    request = resolve_request(pipe, request)
    seeds, templates = request.seeds(), request.prompts()
    prompts, negatives = _expand_wildcards(request, templates, seeds)
    networks = PromptNetworks(pipe, request)
    texts, loras = zip(*[networks.split(p) for p in prompts])  # <lora:…> tags cut out of the encoded text
    networks.load_embeddings([*texts, *negatives])
    scheduler = make_scheduler(request.sampler, pipe.scheduler.config, schedule=request.schedule)
    sampler_name, schedule_type = a1111_fields(request.sampler, request.schedule, base_config=pipe.scheduler.config)
    working = _working_pipeline(pipe, scheduler, img2img=request.is_img2img, pag=request.pag_scale > 0)
    steps = sampling_steps(request)
    init_image = _init_image(request)
    hires = _HiresPass(pipe, request) if request.hires is not None else None

    results: list[GeneratedImage] = []
    lengths = _token_lengths(pipe, texts, negatives, steps, request)
    try:
        for chunk in _chunks(list(zip(lengths, loras)), request.batch_size):  # one call: one set of LoRAs
            networks.activate(loras[chunk[0]])
            _progress_bar(working, chunk, request.n_images, progress)
            chunk_texts, chunk_negatives = [texts[k] for k in chunk], [negatives[k] for k in chunk]
            chunk_seeds = [seeds[k] for k in chunk]
            images, flags = _run_chunk(
                working, request, chunk_texts, chunk_negatives, chunk_seeds, steps,
                image=None if init_image is None else [init_image] * len(chunk),
                output_type="latent" if hires is not None and hires.fix.is_latent else "pil",
            )
            if hires is not None:
                _progress_bar(hires.pipeline, chunk, request.n_images, progress, "hires ")
                images, more_flags = hires(images, chunk_texts, chunk_negatives, chunk_seeds)
                flags = [a or b for a, b in zip(flags, more_flags)]
            for k, image, nsfw in zip(chunk, images, flags):
                prompt = networks.recorded(prompts[k])  # as A1111 keeps it: with the <lora:…> tags
                fields = infotext_fields(request, seeds[k], sampler_name, schedule_type, prompt, negatives[k],
                                         template=networks.recorded(templates[k]),
                                         networks=networks.fields(prompts[k], texts[k], negatives[k]))
                results.append(
                    GeneratedImage(
                        image=image,
                        seed=seeds[k],
                        prompt=prompt,
                        negative_prompt=negatives[k],
                        parameters=format_parameters(prompt, negatives[k], fields),
                        fields=fields,
                        nsfw=nsfw,
                    )
                )
    finally:
        networks.restore()
    return results


class _HiresPass:
    """The second pass of A1111's hires fix: upscale the first pass's latents or pixels, then img2img
    them at the hires strength, on a pipeline with a scheduler of its own."""

    def __init__(self, pipe, request: GenerationRequest):
        from atelier.core.facts import size_step
        from atelier.samplers import make_scheduler

        self.fix = request.hires
        self.factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        self.target = self.fix.target(request.width, request.height, size_step(pipe), self.factor)
        self.steps, total, strength = self.fix.schedule(request.steps, request.strength)
        self.request = replace(request, steps=total, strength=strength)
        scheduler = make_scheduler(request.sampler, pipe.scheduler.config, schedule=request.schedule)
        self.pipeline = _working_pipeline(pipe, scheduler, img2img=True, pag=request.pag_scale > 0)

    def __call__(self, first, prompts, negatives, seeds):
        if self.fix.is_latent:
            image = upscale_latents(first, self.target, self.fix.upscaler, self.factor)
        else:
            image = [upscale_image(im.convert("RGB"), self.target, self.fix.upscaler, self.factor) for im in first]
        return _run_chunk(self.pipeline, self.request, prompts, negatives, seeds, self.steps, image=image)


def _progress_bar(pipeline, chunk: list[int], total: int, enabled: bool, label: str = "") -> None:
    """diffusers' own tqdm bar, labelled with the images being made."""
    if not enabled:
        pipeline.set_progress_bar_config(disable=True)
        return
    first, last = chunk[0] + 1, chunk[-1] + 1
    desc = label + (f"image {first}/{total}" if first == last else f"images {first}-{last}/{total}")
    pipeline.set_progress_bar_config(disable=False, desc=desc, leave=False)


def infotext_fields(request, seed, sampler_name, schedule_type, prompt, negative, *, template=None,
                    networks=None) -> dict:
    """The `Key: value` line of A1111's infotext, in A1111's order (create_infotext), then ours.
    `template`: the image's prompt before wildcard expansion (default: the request's prompt);
    `networks`: its `Lora hashes` and `TI hashes` (`PromptNetworks.fields`)."""
    template = request.prompt if template is None else template
    fields = {
        "Steps": request.steps,
        "Sampler": sampler_name,
        "Schedule type": schedule_type,
        "CFG scale": _number(request.cfg_scale),
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": request.model_hash,
        "Model": request.model_name,
        "Denoising strength": _number(request.strength) if request.is_img2img or request.hires else None,
        "Clip skip": request.clip_skip if request.clip_skip and request.clip_skip > 1 else None,
        "RNG": "CPU",
        **_hires_fields(request.hires),
        **(networks or {}),
        "Emphasis": request.emphasis if request.emphasis != "Original" else None,
        # Names used by the A1111 CFG-rescale extension and by SD.Next's PAG.
        "CFG Rescale phi": _number(request.guidance_rescale) if request.guidance_rescale else None,
        "PAG scale": _number(request.pag_scale) if request.pag_scale else None,
        # As sd-dynamic-prompts records them when a wildcard or variant changed the prompt.
        "Template": template if prompt != template else None,
        "Negative Template": request.negative_prompt if negative != request.negative_prompt else None,
    }
    fields.update(image_prompt_fields(request.image_prompts))
    fields.update(request.extra_parameters)
    return {k: v for k, v in fields.items() if v is not None}


def _hires_fields(hires) -> dict:
    if hires is None:
        return {}
    return {
        "Hires upscale": None if hires.resizes else _number(hires.scale),
        "Hires resize": f"{hires.resize_x}x{hires.resize_y}" if hires.resizes else None,
        "Hires steps": hires.steps or None,
        "Hires upscaler": hires.upscaler,
    }


def _number(x: float):
    """7.0 -> 7 and 0.75 -> 0.75, as A1111 prints them."""
    x = float(x)
    return int(x) if x.is_integer() else round(x, 6)


def _expand_wildcards(request: GenerationRequest, templates: list[str],
                      seeds: list[int]) -> tuple[list[str], list[str]]:
    from atelier.prompts import expand_prompt

    prompts = [expand_prompt(t, s, wildcard_dir=request.wildcard_dir) for t, s in zip(templates, seeds)]
    negatives = [expand_prompt(request.negative_prompt, s, wildcard_dir=request.wildcard_dir) for s in seeds]
    return prompts, negatives


def _working_pipeline(pipe, scheduler, *, img2img: bool, pag: bool):
    """A pipeline sharing `pipe`'s modules, with our scheduler, of the right kind: txt2img or img2img,
    with or without PAG. `pipe` itself is left as it was."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    auto = AutoPipelineForImage2Image if img2img else AutoPipelineForText2Image
    kwargs = {"scheduler": scheduler, "enable_pag": pag}
    if pag:
        kwargs["pag_applied_layers"] = PAG_LAYERS
    try:
        return auto.from_pipe(pipe, **kwargs)
    except ValueError as exc:
        what = ("img2img" if img2img else "txt2img") + (" with PAG" if pag else "")
        raise UserError(f"{type(pipe).__name__} cannot run {what}: {exc}") from None


def sampling_steps(request: GenerationRequest) -> int:
    """Steps the sampler really runs: img2img skips the first (1 - strength) of the schedule, as
    diffusers' img2img `get_timesteps` does. The prompt-editing clock counts these."""
    if not request.is_img2img:
        return request.steps
    return min(int(request.steps * request.strength), request.steps)


def _token_lengths(pipe, prompts, negatives, steps, request) -> list[int]:
    """Each image's conditioning length in tokens (75-token chunks + BOS/EOS, A1111 style)."""
    from atelier.prompts import build_conditioning

    keys = list(zip(prompts, negatives))
    if len(set(keys)) == 1:
        return [0] * len(keys)  # one prompt for all: nothing to compare
    lengths: dict[tuple[str, str], int] = {}
    for key in keys:
        if key not in lengths:
            cond = build_conditioning(pipe, key[0], key[1], steps, clip_skip=request.clip_skip, emphasis=request.emphasis)
            lengths[key] = cond.embeds_at(0)[0].shape[1]
    return [lengths[key] for key in keys]


def _chunks(lengths: list, batch_size: int) -> list[list[int]]:
    """Consecutive image indices, at most `batch_size` per pipeline call.

    Prompts of one call are padded to the same length, and padding changes a prompt's embedding, so
    a call only takes images of equal length: image k stays the same whatever the batch size.
    (`lengths` may be any keys that must match within a call, such as (length, LoRAs) pairs.)
    """
    chunks: list[list[int]] = []
    for k, length in enumerate(lengths):
        if chunks and lengths[chunks[-1][0]] == length and len(chunks[-1]) < batch_size:
            chunks[-1].append(k)
        else:
            chunks.append([k])
    return chunks


def _init_image(request: GenerationRequest):
    if not request.is_img2img:
        return None
    from PIL import Image

    image = request.init_image.convert("RGB")
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height), Image.LANCZOS)
    return image


def _pag_aware(callback, batch: int):
    """Let a prompt-editing callback that knows the CFG layout ([negative, positive]) also drive a PAG
    pipeline, whose UNet batch is [negative, positive, positive] (diffusers'
    `_prepare_perturbed_attention_guidance`): it is shown the CFG part and the perturbed copy of the
    positive rows is appended to what it returns."""
    names = list(callback.tensor_inputs)

    def pag_callback(pipeline, step_index, timestep, kwargs):
        if not getattr(pipeline, "do_perturbed_attention_guidance", False):
            return callback(pipeline, step_index, timestep, kwargs)
        keep = 2 * batch if pipeline.do_classifier_free_guidance else batch
        view = {k: (v[:keep] if k in names else v) for k, v in kwargs.items()}
        out = callback(pipeline, step_index, timestep, view)
        for k in names:
            out[k] = torch.cat([out[k], out[k][-batch:]])
        return out

    pag_callback.tensor_inputs = names
    return pag_callback


def _run_chunk(pipeline, request: GenerationRequest, prompts, negatives, seeds, steps: int, *, image=None,
               output_type: str = "pil"):
    """One pipeline call: images with these prompts and seeds (one generator per image). `image`
    makes it img2img: one PIL image per seed, or a batch of latents."""
    from atelier.prompts import build_conditioning

    cond = build_conditioning(
        pipeline, prompts, negatives, steps, clip_skip=request.clip_skip, emphasis=request.emphasis
    )
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if hasattr(pipeline.scheduler, "noise_sampler_seed"):  # Brownian-tree SDE samplers
        pipeline.scheduler.noise_sampler_seed = list(seeds)
    device, dtype = pipeline._execution_device, pipeline.unet.dtype
    kwargs = {
        k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v
        for k, v in cond.pipeline_kwargs(pipeline).items()
    }
    if "callback_on_step_end" in kwargs:
        kwargs["callback_on_step_end"] = _pag_aware(kwargs["callback_on_step_end"], len(seeds))
    kwargs.update(
        num_inference_steps=request.steps,
        guidance_scale=request.cfg_scale,
        generator=generators,
        output_type=output_type,
    )
    if "guidance_rescale" in inspect.signature(pipeline.__call__).parameters:
        kwargs["guidance_rescale"] = request.guidance_rescale
    elif request.guidance_rescale:  # diffusers' SD 1.x / 2.x PAG img2img pipeline has no rescale
        raise UserError(f"{type(pipeline).__name__} has no CFG rescale; leave out the guidance rescale or PAG")
    if request.pag_scale > 0:
        kwargs["pag_scale"] = request.pag_scale
    kwargs.update(image_prompt_kwargs(pipeline, request.image_prompts, guidance_scale=request.cfg_scale,
                                      width=request.width, height=request.height))
    if image is not None:
        kwargs.update(image=image, strength=request.strength)
    else:
        kwargs.update(width=request.width, height=request.height)
    # quanto's int4 weights cannot be used under inference_mode (their views need version counters):
    # atelier.speed marks such a UNet
    inference = getattr(pipeline.unet, "atelier_quantized", {}).get("inference_mode", True)
    with torch.inference_mode() if inference else torch.no_grad():
        out = pipeline(**kwargs)
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(seeds)
    return out.images, [bool(f) for f in flags]
