"""Generation parameters of ComfyUI images, read from the API-format graph ComfyUI stores in a PNG
`prompt` text chunk (the `workflow` chunk beside it is the editor's layout), and given back in
A1111's infotext form so that `atelier info` prints them and `generate --from` redoes them.

The graph maps node ids to `{"class_type": ..., "inputs": {...}}`; an input is a value or a link
`[node id, output index]`. The sampler node (KSampler or KSamplerAdvanced) gives seed, steps, CFG,
sampler and scheduler; its `positive` / `negative` links lead to the CLIPTextEncode prompts (and
their `clip` link to CLIPSetLastLayer, A1111's clip skip), `model` to the checkpoint loader and
`latent_image` to EmptyLatentImage for the size. What the graph does that a plain txt2img run does
not (LoRAs, ControlNets, a second sampler, ...) is listed in `problems`: the fields are still shown,
but the image cannot be made again from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from atelier.core.infotext import format_parameters
from atelier.errors import UserError

PROMPT_KEY = "prompt"  # the PNG text chunk with the API-format graph
WORKFLOW_KEY = "workflow"
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
CHECKPOINT_LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader", "unCLIPCheckpointLoader")
TEXT_ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")


@dataclass
class ComfyParameters:
    text: str  # A1111 infotext
    problems: list[str] = field(default_factory=list)  # why the graph is more than a plain txt2img run


class _Graph:
    def __init__(self, nodes: dict, source: str):
        self.nodes = nodes
        self.source = source
        self.problems: list[str] = []

    def node(self, link) -> tuple[str, dict] | None:
        if isinstance(link, list) and link and str(link[0]) in self.nodes:
            node = self.nodes[str(link[0])]
            if isinstance(node, dict) and isinstance(node.get("inputs", {}), dict):
                return str(link[0]), node
        return None

    def value(self, raw, names: tuple[str, ...]):
        """An input's value, following links to primitive nodes (a seed or text widget turned input)."""
        for _ in range(len(self.nodes) + 1):
            found = self.node(raw)
            if found is None:
                return raw
            inputs = found[1].get("inputs", {})
            raw = next((inputs[n] for n in names if n in inputs), None)
        return None

    def note(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


def comfyui_parameters(image, *, source: str = "the image") -> ComfyParameters | None:
    """The generation parameters of an opened ComfyUI image, or None when it has no ComfyUI graph."""
    raw = image.info.get(PROMPT_KEY)
    if raw is None:
        if image.info.get(WORKFLOW_KEY) is not None:
            raise UserError(
                f"{source} has only ComfyUI's editor workflow, not the API-format `prompt` graph atelier reads"
            )
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        nodes = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{source}: its ComfyUI `prompt` chunk is not valid JSON") from None
    if not isinstance(nodes, dict):
        raise UserError(f"{source}: its ComfyUI `prompt` chunk is not a node graph")
    graph = _Graph({str(k): v for k, v in nodes.items()}, source)
    node_id, sampler = _sampler_node(graph)
    return _parameters(graph, node_id, sampler)


def _sampler_node(graph: _Graph) -> tuple[str, dict]:
    samplers = sorted(
        ((nid, n) for nid, n in graph.nodes.items() if isinstance(n, dict) and n.get("class_type") in SAMPLER_NODES),
        key=lambda item: (not _is_empty_latent(graph, item[1]), _id_key(item[0])),
    )
    if not samplers:
        kinds = sorted({str(n.get("class_type")) for n in graph.nodes.values() if isinstance(n, dict)})
        raise UserError(f"{graph.source}: its ComfyUI graph has no KSampler node (nodes: {', '.join(kinds)})")
    if len(samplers) > 1:
        graph.note(f"the graph has {len(samplers)} sampler nodes (a second pass or a refiner); "
                   f"only the first pass (node {samplers[0][0]}) is read")
    return samplers[0]


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _is_empty_latent(graph: _Graph, sampler: dict) -> bool:
    found = graph.node(sampler["inputs"].get("latent_image"))
    return found is not None and found[1].get("class_type") == "EmptyLatentImage"


def _parameters(graph: _Graph, node_id: str, sampler: dict) -> ComfyParameters:
    inputs = sampler["inputs"]
    advanced = sampler["class_type"] == "KSamplerAdvanced"
    seed = graph.value(inputs.get("noise_seed" if advanced else "seed"), ("seed", "noise_seed", "value", "int"))
    steps = graph.value(inputs.get("steps"), ("steps", "value", "int"))
    cfg = graph.value(inputs.get("cfg"), ("cfg", "value", "float"))
    sampler_name = graph.value(inputs.get("sampler_name"), ("sampler_name", "value"))
    scheduler = graph.value(inputs.get("scheduler"), ("scheduler", "value"))
    denoise = graph.value(inputs.get("denoise", 1.0), ("denoise", "value", "float"))
    if advanced:
        if inputs.get("add_noise", "enable") != "enable":
            graph.note("KSamplerAdvanced adds no noise (add_noise: disable)")
        start, end = inputs.get("start_at_step", 0), inputs.get("end_at_step", 10000)
        if start != 0 or (isinstance(end, int) and isinstance(steps, int) and end < steps):
            graph.note(f"KSamplerAdvanced runs only steps {start} to {end} of {steps}")

    positive, clip_skip = _prompt(graph, inputs.get("positive"), "positive")
    negative, _ = _prompt(graph, inputs.get("negative"), "negative")
    width, height = _size(graph, inputs.get("latent_image"))
    sampler_field, schedule_field = _sampler_fields(graph, sampler_name, scheduler)
    fields = {
        "Steps": steps,
        "Sampler": sampler_field,
        "Schedule type": schedule_field,
        "CFG scale": _number(cfg),
        "Seed": seed,
        "Size": f"{width}x{height}" if width and height else None,
        "Model": _checkpoint(graph, inputs.get("model")),
        "Denoising strength": _number(denoise) if denoise not in (1, 1.0, None) else None,
        "Clip skip": clip_skip if clip_skip and clip_skip > 1 else None,
    }
    return ComfyParameters(format_parameters(positive or "", negative or "", fields), graph.problems)


def _number(x):
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _sampler_fields(graph: _Graph, sampler_name, scheduler) -> tuple:
    from atelier.samplers import a1111_fields

    if not isinstance(sampler_name, str):
        graph.note("the sampler name is missing")
        return None, None
    if scheduler == "beta":
        graph.note("ComfyUI's beta scheduler (Beta quantiles on the timestep index) has no diffusers "
                   "equivalent; A1111's Beta is a different schedule")
        return sampler_name, scheduler
    try:
        return a1111_fields(sampler_name, scheduler if isinstance(scheduler, str) else None)
    except UserError as exc:
        graph.note(str(exc))
        return sampler_name, scheduler


def _prompt(graph: _Graph, link, which: str) -> tuple[str | None, int | None]:
    """The text of the prompt at the end of a conditioning link, and the clip skip it was encoded with."""
    found = graph.node(link)
    for _ in range(len(graph.nodes)):
        if found is None:
            graph.note(f"the {which} prompt is not connected to a text encoder")
            return None, None
        nid, node = found
        kind, inputs = node.get("class_type"), node["inputs"]
        if kind in TEXT_ENCODERS:
            break
        if "conditioning" in inputs:  # ControlNet, area, timestep and other conditioning edits
            graph.note(f"the {which} prompt passes through {kind} (node {nid})")
            found = graph.node(inputs["conditioning"])
            continue
        graph.note(f"the {which} conditioning comes from {kind} (node {nid}), not a text encoder")
        return None, None
    if kind == "CLIPTextEncodeSDXL":
        text_g = graph.value(inputs.get("text_g"), ("text", "string", "value"))
        text_l = graph.value(inputs.get("text_l"), ("text", "string", "value"))
        if text_l not in (None, "", text_g):
            graph.note(f"the {which} prompt has different text_g and text_l (node {nid}); text_g is shown")
        text = text_g
    else:
        text = graph.value(inputs.get("text"), ("text", "string", "value"))
    return (text if isinstance(text, str) else None), _clip_skip(graph, inputs.get("clip"))


def _upstream(graph: _Graph, link, via: str):
    """The nodes met walking up from `link`, each time through its `via` input (cycles end it)."""
    found, seen = graph.node(link), set()
    while found is not None and found[0] not in seen:
        seen.add(found[0])
        yield found
        link = found[1]["inputs"].get(via)
        found = graph.node(link) if link is not None else None


def _clip_skip(graph: _Graph, link) -> int | None:
    for _, node in _upstream(graph, link, "clip"):  # LoRA loaders pass the clip on; the model path reports them
        kind, inputs = node.get("class_type"), node["inputs"]
        if kind == "CLIPSetLastLayer":
            layer = graph.value(inputs.get("stop_at_clip_layer"), ("value", "int"))
            return -layer if isinstance(layer, int) and layer < 0 else None
        if kind in CHECKPOINT_LOADERS:
            return None
    return None


def _checkpoint(graph: _Graph, link) -> str | None:
    for nid, node in _upstream(graph, link, "model"):
        kind, inputs = node.get("class_type"), node["inputs"]
        if kind in CHECKPOINT_LOADERS:
            name = graph.value(inputs.get("ckpt_name"), ("ckpt_name", "value"))
            return PurePosixPath(str(name).replace("\\", "/")).stem if name else None
        if "model" not in inputs:
            graph.note(f"the model comes from {kind} (node {nid}), not a checkpoint loader")
            return None
        extra = inputs.get("lora_name")
        graph.note(f"the model passes through {kind} (node {nid}{f': {extra}' if extra else ''})")
    graph.note("the sampler's model is not connected to a checkpoint loader")
    return None


def _size(graph: _Graph, link) -> tuple[int | None, int | None]:
    found = graph.node(link)
    if found is None:
        graph.note("the sampler's latent image is not connected")
        return None, None
    nid, node = found
    if node.get("class_type") != "EmptyLatentImage":
        graph.note(f"the latent image comes from {node.get('class_type')} (node {nid}), not EmptyLatentImage "
                   "(img2img or a second pass)")
        return None, None
    inputs = node["inputs"]
    width = graph.value(inputs.get("width"), ("width", "value", "int"))
    height = graph.value(inputs.get("height"), ("height", "value", "int"))
    batch = graph.value(inputs.get("batch_size", 1), ("batch_size", "value", "int"))
    if isinstance(batch, int) and batch > 1:
        graph.note(f"the image is one of a batch of {batch} that ComfyUI draws from one seed")
    return width, height
