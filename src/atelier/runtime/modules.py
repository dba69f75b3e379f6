"""Exported graphs run by OpenVINO or ONNX Runtime on the CPU, behind thin torch modules that look
to diffusers and atelier like the UNet, VAE and CLIP text encoders they replace: the same `config`,
`dtype`, `device` and call signatures, the same output types. Anything that needs the PyTorch
layers themselves (attention processors, LoRA, ControlNet residuals, IP-Adapter image embeddings)
is refused with one line instead of being silently ignored.

The runtimes are imported when a graph is compiled, never before."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from atelier.errors import UserError

FORMATS = {"openvino": "openvino", "onnx": "onnxruntime"}  # format -> the package that runs it
SUFFIXES = {"openvino": ".xml", "onnx": ".onnx"}
EXPORT_FILE = "export.json"  # marks an exported model folder and says how it was exported
TINY_VAE = "tiny_vae"  # the component (and its kind) of an exported tiny autoencoder, whose folder is its own
PRECISIONS = ("fp32", "auto")  # OpenVINO inference precision: exact, or the CPU's fastest (bf16 where it has it)


def import_runtime(fmt: str):
    """The runtime module of `fmt`, or a one-line UserError saying what to install."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    import importlib

    try:
        return importlib.import_module(FORMATS[fmt])
    except ImportError:
        raise UserError(
            f"the {fmt} format needs the {FORMATS[fmt]} package, which is not installed: "
            f"pip install {FORMATS[fmt]} (or pip install -e '.[cpu-fast]')"
        ) from None


def refuse(what: str) -> UserError:
    return UserError(
        f"{what} needs the PyTorch model's layers, and this is an exported (OpenVINO / ONNX) model: "
        "use the original model for it"
    )


# ---------------------------------------------------------------------------------- graphs


def _exported_name(port) -> str:
    """The name atelier gave a port at export (the one that is not a number); its only name otherwise."""
    names = sorted(port.get_names())
    return next((n for n in names if not n.isdigit()), names[0])


class CompiledGraph:
    """One exported graph compiled for the CPU: numpy arrays in by input name, out by output name.

    A graph exported with a static batch runs any batch, in pieces of its size (the last piece
    padded with copies of its last item); other static dimensions must match."""

    def __init__(self, path: Path, fmt: str, *, threads: int | None = None, precision: str = "fp32"):
        self.path, self.format = Path(path), fmt
        runtime = import_runtime(fmt)
        threads = threads or torch.get_num_threads()
        if fmt == "onnx":
            options = runtime.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            self._session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = {i.name: [d if isinstance(d, int) else None for d in i.shape] for i in self._session.get_inputs()}
            self.outputs = [o.name for o in self._session.get_outputs()]
        else:
            config = {"INFERENCE_NUM_THREADS": threads}
            if precision == "fp32":
                config["INFERENCE_PRECISION_HINT"] = "f32"
            core = runtime.Core()
            model = core.read_model(str(path))
            # names as exported: compiling may merge a port's tensor with folded ones and give it
            # several names (a static timestep became {"50", "55", "timestep", "timesteps"})
            names = [_exported_name(port) for port in model.inputs]
            self._compiled = core.compile_model(model, "CPU", config)
            self._requests = threading.local()
            self.inputs = {
                name: [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                for name, port in zip(names, self._compiled.inputs)
            }
            self.outputs = [_exported_name(port) for port in model.outputs]
        first = next(iter(self.inputs.values()))
        self.batch = first[0] if first else None

    def _check(self, arrays: dict[str, np.ndarray]) -> None:
        for name, shape in self.inputs.items():
            got = arrays[name].shape
            fixed = [(i, want) for i, want in enumerate(shape) if want is not None and i > 0]
            if len(got) != len(shape) or any(got[i] != want for i, want in fixed):
                wanted = "x".join("?" if d is None else str(d) for d in shape[1:])
                raise UserError(
                    f"{self.path.parent.name}: this model was exported with the static shape {wanted} for {name!r}, "
                    f"got {'x'.join(map(str, got[1:]))}: use the size it was exported for, or export it again "
                    "without --static-shape"
                )

    def _run(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.format == "onnx":
            return self._session.run(self.outputs, arrays)
        # One request per thread, reused: sessions on other threads may share the model. Inputs are
        # read in place (they are contiguous copies or the caller's own arrays); outputs are copied out.
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        result = request.infer([arrays[name] for name in self.inputs], share_inputs=True)  # by position
        return [result[self._compiled.outputs[k]] for k in range(len(self.outputs))]

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(arrays[name]) for name in self.inputs}
        self._check(arrays)
        n = len(next(iter(arrays.values())))
        if self.batch is None or n == self.batch:
            return dict(zip(self.outputs, self._run(arrays)))
        pieces = []
        for start in range(0, n, self.batch):
            piece = {k: v[start:start + self.batch] for k, v in arrays.items()}
            short = self.batch - len(next(iter(piece.values())))
            if short:
                piece = {k: np.concatenate([v] + [v[-1:]] * short) for k, v in piece.items()}
            pieces.append(self._run(piece))
        # outputs whose first axis is not the batch (stacked hidden states) put it second
        out = {}
        for k, name in enumerate(self.outputs):
            axis = 1 if name == "hidden_states" else 0
            joined = np.concatenate([p[k] for p in pieces], axis=axis)
            out[name] = joined[:n] if axis == 0 else joined[:, :n]
        return out


def graph_path(folder: Path, stem: str, fmt: str) -> Path:
    return Path(folder) / f"{stem}{SUFFIXES[fmt]}"


def _numpy(x: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return x.detach().to("cpu").numpy().astype(dtype, copy=False)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True))


# ---------------------------------------------------------------------------------- modules


class ExportedModule(torch.nn.Module):
    """What every exported component shares: its original config, float32 on the CPU, and
    refusals for what only the PyTorch layers can do."""

    def __init__(self, config, fmt: str):
        super().__init__()
        self._config = config
        self.export_format = fmt

    @property
    def config(self):
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            raise UserError(f"an exported ({self.export_format}) model runs on the CPU only, not on {device}")
        if dtype is not None and dtype != torch.float32:
            raise UserError(f"an exported ({self.export_format}) model runs in float32 only, not {dtype}")
        return self

    @property
    def attn_processors(self):
        raise refuse("changing the attention (editing, PAG, IP-Adapter, attention control)")

    def set_attn_processor(self, *args, **kwargs):
        raise refuse("changing the attention (editing, PAG, IP-Adapter, attention control)")

    def load_lora_adapter(self, *args, **kwargs):
        raise refuse("a LoRA")

    def _load_ip_adapter_weights(self, *args, **kwargs):
        raise refuse("an IP-Adapter")


class _Namespace:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class ExportedUNet(ExportedModule):
    """UNet2DConditionModel's forward on a compiled graph (sample, timestep, encoder_hidden_states,
    and SDXL's text_embeds/time_ids or an LCM UNet's timestep_cond)."""

    def __init__(self, config, graph: CompiledGraph, fmt: str):
        super().__init__(config, fmt)
        self.graph = graph
        if config.get("projection_class_embeddings_input_dim"):  # diffusers' SDXL pipelines check this size
            self.add_embedding = _Namespace(linear_1=_Namespace(in_features=config["projection_class_embeddings_input_dim"]))

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if down_block_additional_residuals is not None or mid_block_additional_residual is not None \
                or down_intrablock_additional_residuals is not None:
            raise refuse("ControlNet / T2I-Adapter")
        if cross_attention_kwargs:
            raise refuse("cross_attention_kwargs (LoRA scale, attention control)")
        if class_labels is not None or attention_mask is not None or encoder_attention_mask is not None:
            raise refuse("class labels or attention masks")
        added = dict(added_cond_kwargs or {})
        if added.get("image_embeds") is not None:
            raise refuse("an IP-Adapter")
        batch = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
        arrays = {"sample": _numpy(sample), "timestep": _numpy(t), "encoder_hidden_states": _numpy(encoder_hidden_states)}
        if "text_embeds" in self.graph.inputs:
            if added.get("text_embeds") is None or added.get("time_ids") is None:
                raise UserError("this SDXL UNet needs added_cond_kwargs text_embeds and time_ids")
            arrays["text_embeds"] = _numpy(added["text_embeds"])
            arrays["time_ids"] = _numpy(torch.as_tensor(added["time_ids"]).expand(batch, -1))
        if "timestep_cond" in self.graph.inputs:
            if timestep_cond is None:
                raise UserError("this UNet (LCM) needs timestep_cond")
            arrays["timestep_cond"] = _numpy(timestep_cond)
        out = _tensor(self.graph(**arrays)["out_sample"]).to(sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _ExportedAutoencoder(ExportedModule):
    """What AutoencoderKL and AutoencoderTiny share: an encoder and a decoder graph, decode -> sample."""

    def __init__(self, config, encoder: CompiledGraph | None, decoder: CompiledGraph, fmt: str):
        super().__init__(config, fmt)
        self.encoder_graph, self.decoder_graph = encoder, decoder
        self.use_slicing = self.use_tiling = False

    def _encoded(self, x, output: str) -> torch.Tensor:
        if self.encoder_graph is None:
            raise UserError("this exported model has no VAE encoder: export it again to use img2img")
        return _tensor(self.encoder_graph(images=_numpy(x))[output])

    def decode(self, z, return_dict=True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        images = _tensor(self.decoder_graph(latents=_numpy(z))["images"]).to(z.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def enable_slicing(self):  # the runtime takes the whole batch; nothing to slice
        pass

    def disable_slicing(self):
        pass


class ExportedVAE(_ExportedAutoencoder):
    """AutoencoderKL's encode (-> latent_dist) and decode (-> sample) on two compiled graphs."""

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        dist = DiagonalGaussianDistribution(self._encoded(x, "moments"))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        dist = self.encode(sample).latent_dist
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode(), return_dict=return_dict)


class ExportedTinyVAE(_ExportedAutoencoder):
    """AutoencoderTiny's (TAESD's) encode (-> latents) and decode (-> sample) on two compiled graphs,
    which include its input and output scaling ([-1, 1] pixels on both sides)."""

    is_tiny_autoencoder = True  # atelier.core.vae.is_tiny

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

        latents = self._encoded(x, "latents").to(x.dtype)
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def forward(self, sample, return_dict=True):
        """Encode then decode (without AutoencoderTiny's rounding of the latents to 8 bits)."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)


class ExportedTextEncoder(ExportedModule):
    """CLIPTextModel / CLIPTextModelWithProjection: last_hidden_state, the pooled output (or the
    projected text_embeds) and every layer's hidden states, which clip skip reads; the final layer
    norm is a real torch LayerNorm, as A1111's clip skip applies it to an earlier layer."""

    def __init__(self, config, graph: CompiledGraph, fmt: str, final_layer_norm: torch.nn.LayerNorm, projection: bool):
        super().__init__(config, fmt)
        self.graph = graph
        self.final_layer_norm = final_layer_norm
        self.projection = projection

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_attentions=None,
                output_hidden_states=None, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise refuse("a text attention mask")
        if position_ids is not None or output_attentions:
            raise refuse("position ids or attention outputs")
        out = self.graph(input_ids=_numpy(torch.as_tensor(input_ids), np.int64))
        last = _tensor(out["last_hidden_state"])
        pooled = _tensor(out["pooled"])
        hidden = tuple(_tensor(out["hidden_states"]).unbind(0)) if output_hidden_states else None
        if self.projection:
            result = CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
        else:
            result = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
        return result if return_dict else result.to_tuple()


# ---------------------------------------------------------------------------------- a folder


def read_export_info(folder) -> dict | None:
    """The export record of an exported model folder, or None for any other folder."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") not in FORMATS or not isinstance(info.get("components"), dict):
        raise UserError(f"{path} is not an atelier export record (format and components)")
    return info


def is_exported(folder) -> bool:
    return (Path(folder) / EXPORT_FILE).is_file()


def _frozen_config(path: Path):
    from diffusers.configuration_utils import FrozenDict

    if not path.is_file():
        raise UserError(f"{path} is missing: export the model again")
    return FrozenDict(json.loads(path.read_text(encoding="utf-8")))


def _graph(folder: Path, stem: str, info: dict, threads) -> CompiledGraph:
    fmt = info["format"]
    path = graph_path(folder, stem, fmt)
    if not path.is_file():
        raise UserError(f"{path} is missing: export the model again")
    try:
        return CompiledGraph(path, fmt, threads=threads, precision=info.get("precision", "fp32"))
    except UserError:
        raise
    except Exception as exc:  # the runtimes raise their own kinds on a damaged file
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"{FORMATS[fmt]} cannot load {path}: {first}") from None


def load_component(folder: Path, name: str, info: dict, threads=None) -> ExportedModule:
    """One exported component of the folder (`unet`, `vae`, `text_encoder`, `text_encoder_2`)."""
    from safetensors.torch import load_file

    fmt, kind = info["format"], info["components"][name]
    sub = folder / name
    if kind == "unet":
        return ExportedUNet(_frozen_config(sub / "config.json"), _graph(sub, "model", info, threads), fmt)
    if kind == "vae":
        encoder = _graph(sub, "encoder", info, threads) if graph_path(sub, "encoder", fmt).is_file() else None
        return ExportedVAE(_frozen_config(sub / "config.json"), encoder, _graph(sub, "decoder", info, threads), fmt)
    if kind in ("text", "text_projection"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(sub, local_files_only=True)
        state = load_file(sub / "final_layer_norm.safetensors")
        norm = torch.nn.LayerNorm(state["weight"].shape[0], eps=config.layer_norm_eps)
        norm.load_state_dict(state)
        return ExportedTextEncoder(config, _graph(sub, "model", info, threads), fmt, norm.eval(), kind == "text_projection")
    raise UserError(f"{folder / EXPORT_FILE}: unknown component kind {kind!r}")


def is_exported_tiny_autoencoder(info: dict) -> bool:
    return info["components"] == {TINY_VAE: TINY_VAE}


def load_exported_tiny_autoencoder(folder, *, threads: int | None = None) -> ExportedTinyVAE:
    """The ExportedTinyVAE of a folder written by `export_tiny_autoencoder` (config.json, encoder
    and decoder graphs, export.json side by side)."""
    folder = Path(folder)
    info = read_export_info(folder)
    if info is None or not is_exported_tiny_autoencoder(info):
        raise UserError(f"{folder} is not an exported tiny autoencoder: export one with `atelier export toyworld-taesd`")
    encoder, decoder = (_graph(folder, stem, info, threads) for stem in ("encoder", "decoder"))
    return ExportedTinyVAE(_frozen_config(folder / "config.json"), encoder, decoder, info["format"])


def load_exported(folder, *, threads: int | None = None):
    """The diffusers pipeline (its model_index.json's class) of an exported folder: the scheduler and
    tokenizers as saved, the exported components compiled by their runtime on the CPU, no safety
    checker. `threads`: the runtime's thread count (default: torch's)."""
    import diffusers
    import inspect

    folder = Path(folder)
    info = read_export_info(folder)
    if info is None:
        raise UserError(f"{folder} is not an exported model (no {EXPORT_FILE}): export one with `atelier export`")
    if is_exported_tiny_autoencoder(info):
        raise UserError(f"{folder} is an exported tiny autoencoder, not a model: give it as the stream's tiny "
                        "autoencoder (vae=, --tiny-vae)")
    import_runtime(info["format"])
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, index.get("_class_name", ""), None)
    if cls is None:
        raise UserError(f"{folder}/model_index.json names an unknown pipeline {index.get('_class_name')!r}")
    kwargs = {}
    for name in inspect.signature(cls.__init__).parameters:
        spec = index.get(name)
        if name in info["components"]:
            kwargs[name] = load_component(folder, name, info, threads)
        elif isinstance(spec, list) and spec[0] is not None:
            library = __import__(spec[0])
            kwargs[name] = getattr(library, spec[1]).from_pretrained(folder / name, local_files_only=True)
        elif isinstance(spec, list):
            kwargs[name] = None
        elif name in index and not name.startswith("_"):
            kwargs[name] = spec
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs["requires_safety_checker"] = False
    pipe = cls(**kwargs)
    pipe.atelier_export = info
    return pipe
