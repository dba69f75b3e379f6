"""Speed and memory: quantization, torch.compile, bf16, channels-last and the exported runtimes
(OpenVINO, ONNX Runtime), each row against fp32 eager in this one process, on time AND quality.

1. One UNet call (batch 2, as with CFG) on the full-size SD 1.5 and SDXL architectures (real configs
   from atelier's bundled single-file configs, random weights) at 256 px, and on the shipped toy
   UNet: seconds per call (median; each configuration's calls alternate with the fp32 baseline's),
   weight bytes (and the quantized Linear layers' bytes against their fp32 bytes), the call's peak
   memory (RSS sampled every 2 ms above the level before the call) and the output's PSNR against
   fp32 (data range: the fp32 output's). SDXL's 10 GB of fp32 weights leave no room for a second copy
   on a 24 GB machine: its int8 row quantizes the baseline itself after the baseline was timed.
2. The shipped toy models end to end: judge accuracy (objects right on held-out captions; a
   configuration may cost at most 2 points) and seconds per image against fp32 eager, interleaved.
3. The stream on toyworld-turbo (its default live settings): frames/s of engine configurations
   against the per-frame diffusers img2img pipeline (fp32, full VAE), interleaved; and the engine's
   judged prompt-edit success on toy edit cases (at most 5 points below the fp32 engine's). Beside an
   exported model, toyworld-taesd is exported to the same runtime; "taesd encoder" rows encode the
   frames with it and decode them with the model's VAE. "int8 VAE decoder": the OpenVINO bf16 export
   with `--quantize int8` (its decoder's up blocks in 8 bit, NNCF, calibrated on 32 latents the model
   generates from toy captions; atelier.runtime.quantize).

4. The VAE decoder alone in 8 bit (`atelier export --quantize int8`): toyworld-turbo's at 64 px, calibrated
   on latents it generates from toy captions, and the full-size SD 1.5 architecture (random weights; SDXL's
   decoder has the same layers) at 256 px, calibrated on standard normal latents: seconds per call and
   PSNR against fp32 eager on latents outside the calibration set, OpenVINO fp32, bf16 and bf16 + int8.

Parts 1 and 2 write RESULTS.md's section "speed", part 3 its own section "speed-stream", part 4 "speed-decoder".

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/speed.py --results benchmarks/RESULTS.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/speed.py --threads 1 --skip unet,toy --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/speed.py --archs toy --per-count 2 --frames 4 --cases 4   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from _results import check_command, command_line, write_section
from atelier.models import load_pipeline, to_img2img
from atelier.speed.compile import compile_unet, dummy_unet_inputs
from atelier.speed.numerics import apply_cpu_numerics
from atelier.speed.quantize import linear_layers, model_bytes, quantize_module, tensor_bytes

MB = 2**20
HELD_OUT_SEED = 3_000_000_000
CASE_SEED = 2024


# ----------------------------------------------------------------------------- measuring


class PeakRSS:
    """Peak resident memory above the level at entry, sampled from /proc every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    mse = float(((out - ref) ** 2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * np.log10(span**2 / mse)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(base, other, repeats: int) -> tuple[float, float]:
    """Median seconds of `base()` and `other()`, called alternately (the order swapping each round)."""
    a, b = [], []
    for r in range(repeats):
        if r % 2:
            b.append(timed(other))
            a.append(timed(base))
        else:
            a.append(timed(base))
            b.append(timed(other))
    return statistics.median(a), statistics.median(b)


# ----------------------------------------------------------------------------- 1. UNet calls


def build_unet(arch: str):
    from diffusers import UNet2DConditionModel

    if arch == "toy":
        return load_pipeline("toyworld-turbo").unet.eval(), 64
    config = json.loads(resources.files("atelier.models.configs").joinpath(f"{arch}.json").read_text())["unet"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    return unet, 256


def quantized_linear_share(unet, quantized, skip=None) -> float:
    """Bytes of the quantized Linear layers' weights against the same layers' fp32 bytes."""
    names = set(linear_layers(unet, *(() if skip is None else (skip,))))
    before = sum(tensor_bytes(m.weight) for n, m in unet.named_modules() if n in names)
    after = sum(tensor_bytes(m.weight) for n, m in quantized.named_modules() if n in names)
    return after / before


class Runner:
    """A configured copy of the UNet (or exported graph) and how to call it."""

    def __init__(self, name, module, inputs, *, cast=None, note=""):
        self.name, self.module, self.note = name, module, note
        self.inputs = inputs if cast is None else {k: (v.to(cast) if torch.is_tensor(v) and v.is_floating_point() else v)
                                                   for k, v in inputs.items()}

    @torch.no_grad()  # not inference_mode: its tensors could not be deep-copied and quantized later
    def __call__(self):
        return self.module(**self.inputs, return_dict=False)[0].float()


def exported_unet(unet, inputs, fmt: str, folder: Path, precision: str):
    """The UNet alone through atelier.runtime's converter, at the benchmark's static shapes."""
    from atelier.runtime.export import _export_graph, _UNetGraph
    from atelier.runtime.modules import CompiledGraph, ExportedUNet, graph_path

    example = {k: inputs[k] for k in ("sample", "timestep", "encoder_hidden_states")}
    example["timestep"] = example["timestep"].float()
    path = graph_path(folder, "model", fmt)
    _export_graph(_UNetGraph(unet, []), example, ["out_sample"], {}, path, fmt)
    graph = CompiledGraph(path, fmt, threads=torch.get_num_threads(), precision=precision)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return ExportedUNet(dict(unet.config), graph, fmt), size


def unet_configs(arch: str):
    """(name, how to make it from the fp32 UNet) in table order."""
    configs = [
        ("fp32 + channels-last", lambda u: u.to(memory_format=torch.channels_last)),
        ("bf16 weights", lambda u: u.to(torch.bfloat16)),
        ("int8 weights (quanto)", lambda u: quantize_module(u, "int8wo")),
        ("int8 dynamic (torchao)", lambda u: quantize_module(u, "int8dq")),
        ("int4 weights (quanto)", lambda u: quantize_module(u, "int4wo")),
        ("compile regional (inductor)", lambda u: compile_unet(u, "regional")),
        ("int8 dynamic + compile regional", lambda u: (quantize_module(u, "int8dq"), compile_unet(u, "regional"))),
        ("OpenVINO fp32", "openvino:fp32"),
        ("OpenVINO bf16 (CPU's auto)", "openvino:auto"),
        ("ONNX Runtime fp32", "onnx:fp32"),
    ]
    if arch == "sdxl":  # no room for a second fp32 copy: see the module docstring
        return [("bf16 weights", configs[1][1]), ("int8 weights (quanto), in place", "inplace-int8wo")]
    if arch == "sd1":
        return [c for c in configs if not c[1] == "onnx:fp32"]  # 3.4 GB: over ONNX's 2 GB single-file limit, not measured
    return configs


def unet_rows(arch: str, repeats: int) -> list[tuple]:
    unet, pixels = build_unet(arch)
    inputs = dummy_unet_inputs(unet, batch=2, size=pixels // 8)
    base = Runner("fp32 eager", unet, inputs)
    base()
    with PeakRSS() as mem:
        ref = base()
    base_bytes = model_bytes(unet)
    base_times = [timed(base) for _ in range(repeats)]
    rows = [(arch, "fp32 eager", 1.0, statistics.median(base_times), base_bytes, None, mem.peak, float("inf"), "")]
    print(f"{arch}: fp32 eager {statistics.median(base_times):.3f} s/call", file=sys.stderr, flush=True)
    if arch == "toy":  # the denormal guard, on the toy UNet where the issue measured it
        def kept():
            torch.set_flush_denormal(False)
            try:
                return base()
            finally:
                torch.set_flush_denormal(True)
        t_base, t_kept = interleaved(base, kept, repeats)
        rows.append((arch, "fp32 eager, denormals not flushed", t_base / t_kept, t_base, base_bytes, None, None,
                     psnr(kept(), ref), "atelier flushes them by default on CPU"))
    for name, make in unet_configs(arch):
        gc.collect()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if make == "inplace-int8wo":
                    t_base = statistics.median(base_times)
                    # byte counts, not a copy of the weights: SDXL's fp32 Linear weights alone are ~6 GB
                    names = set(linear_layers(unet))
                    fp32_bytes = sum(tensor_bytes(m.weight) for n, m in unet.named_modules() if n in names)
                    quantize_module(unet, "int8wo")
                    share = sum(tensor_bytes(m.weight) for n, m in unet.named_modules() if n in names) / fp32_bytes
                    runner = Runner(name, unet, inputs)
                    runner()
                    with PeakRSS() as mem:
                        out = runner()
                    t = statistics.median([timed(runner) for _ in range(repeats)])
                    rows.append((arch, name, t_base / t, t, model_bytes(unet), share, mem.peak, psnr(out, ref),
                                 "timed after the baseline, not interleaved"))
                    continue
                if isinstance(make, str):
                    fmt, precision = make.split(":")
                    start = time.perf_counter()
                    module, size = exported_unet(unet, inputs, fmt, Path(tmp), precision)
                    runner, share = Runner(name, module, inputs), None
                    setup = f"export + load {time.perf_counter() - start:.0f} s"
                else:
                    module = copy.deepcopy(unet)
                    start = time.perf_counter()
                    make(module)
                    module.eval()
                    cast = torch.bfloat16 if name.startswith("bf16") else None
                    runner = Runner(name, module, inputs, cast=cast)
                    runner()  # compiles, for the compiled rows
                    setup = f"warm-up {time.perf_counter() - start:.0f} s" if "compile" in name else ""
                    size = model_bytes(module)
                    share = quantized_linear_share(unet, module) if "quanto" in name or "torchao" in name else None
                with PeakRSS() as mem:
                    out = runner()
                t_base, t = interleaved(base, runner, repeats)
                rows.append((arch, name, t_base / t, t, size, share, mem.peak, psnr(out, ref), setup))
                print(f"{arch}: {name} {t:.3f} s/call, {t_base / t:.2f}x", file=sys.stderr, flush=True)
                del runner, module
        except Exception as exc:  # noqa: BLE001 - a configuration this machine cannot run is a row, not a crash
            rows.append((arch, name, None, None, None, None, None, None, f"failed: {str(exc).splitlines()[0][:90]}"))
            print(f"{arch}: {name} failed: {exc}", file=sys.stderr, flush=True)
    torch._dynamo.reset()
    return rows


def format_unet_rows(rows) -> str:
    lines = [f"{'architecture':<6} {'configuration':<36} {'x fp32':>6} {'s/call':>7} {'weights MB':>10} "
             f"{'qLinear/fp32':>12} {'call peak MB':>12} {'PSNR dB':>8}  note", "-" * 120]
    for arch, name, ratio, t, size, share, peak, q, note in rows:
        lines.append(
            f"{arch:<6} {name:<36} "
            + (f"{ratio:6.2f} {t:7.3f} " if ratio is not None else f"{'-':>6} {'-':>7} ")
            + (f"{size / MB:10.0f} " if size is not None else f"{'-':>10} ")
            + (f"{share:12.1%} " if share is not None else f"{'':>12} ")
            + (f"{peak / MB:12.0f} " if peak is not None else f"{'':>12} ")
            + (f"{q:8.1f}" if q is not None and np.isfinite(q) else f"{'exact' if q is not None else '-':>8}")
            + (f"  {note}" if note else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. the toy models end to end


def held_out(per_count: int):
    from atelier.toyworld.scene import sample_scene

    rng = random.Random(HELD_OUT_SEED)
    scenes = [sample_scene(rng, n) for n in (1, 2, 3) for _ in range(per_count)]
    return [(s, s.caption(rng)) for s in scenes]


def toy_pipelines(model: str, tmp: Path):
    """(name, pipeline, setup note) for each configuration of a toy model, fp32 eager first."""
    from atelier.runtime import export_pipeline

    yield "fp32 eager", load_pipeline(model), ""
    for mode, label in (("int8wo", "int8 weights (quanto)"), ("int8dq", "int8 dynamic (torchao)"),
                        ("int4wo", "int4 weights (quanto)")):
        pipe = load_pipeline(model)
        quantize_module(pipe.unet, mode)
        yield label, pipe, ""
    pipe = load_pipeline(model)
    compile_unet(pipe.unet, "regional")
    yield "compile regional (inductor)", pipe, "compiled on first call"
    for fmt, label in (("openvino", "OpenVINO fp32"), ("onnx", "ONNX Runtime fp32")):
        start = time.perf_counter()
        folder = export_pipeline(load_pipeline(model), tmp / fmt, fmt)
        yield label, load_pipeline(str(folder)), f"export {time.perf_counter() - start:.0f} s"


def toy_rows(model: str, per_count: int) -> list[tuple]:
    from atelier.generate import GenerationRequest, generate
    from atelier.toyworld.judge import judge

    cases = held_out(per_count)

    def run(pipe, k, caption):
        return generate(pipe, GenerationRequest(caption, seed=k), progress=False)[0].image

    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipe, note in toy_pipelines(model, Path(tmp)):
            run(pipe, 0, cases[0][1])  # warm up (compiles the compiled row)
            right, t_self, t_base = 0, [], []
            for k, (scene, caption) in enumerate(cases):
                if base is not None:
                    t_base.append(timed(lambda: run(base, k, caption)))
                start = time.perf_counter()
                image = run(pipe, k, caption)
                t_self.append(time.perf_counter() - start)
                right += judge(np.asarray(image), scene).objects_right
            if base is None:
                base, t_base = pipe, t_self
            accuracy = right / len(cases)
            rows.append((model, name, accuracy, statistics.mean(t_self), statistics.mean(t_base) / statistics.mean(t_self), note))
            print(f"{model}: {name} {100 * accuracy:.1f}% {statistics.mean(t_self):.3f} s/image", file=sys.stderr, flush=True)
            if pipe is not base:
                del pipe
            gc.collect()
    torch._dynamo.reset()
    return rows


def format_toy_rows(rows, per_count: int) -> str:
    lines = [f"{3 * per_count} held-out captions (1/2/3 objects), each model at its defaults",
             f"{'model':<15} {'configuration':<28} {'objects right':>13} {'vs fp32':>8} {'s/image':>8} {'x fp32':>7}  note",
             "-" * 100]
    base = {}
    for model, name, acc, t, ratio, note in rows:
        base.setdefault(model, acc)
        lines.append(f"{model:<15} {name:<28} {100 * acc:12.1f}% {100 * (acc - base[model]):+7.1f} {t:8.3f} {ratio:7.2f}"
                     + (f"  {note}" if note else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. the stream


def stream_rows(frames_n: int, cases_n: int, repeats: int) -> tuple[str, list]:
    from stream import animation, img2img_runner

    from atelier.models import load_tiny_autoencoder
    from atelier.runtime import export_pipeline, export_tiny_autoencoder
    from atelier.runtime.cli import toy_calibration_prompts
    from atelier.stream import StreamEngine
    from atelier.stream.engine import default_settings
    from atelier.toyworld import edit_cases, render_pil, score_edit

    pipe = load_pipeline("toyworld-turbo")
    settings = default_settings(pipe)
    t_index = settings["t_index_list"]
    prompt = "a large red circle and a small green square"
    frames = animation(frames_n)
    baseline, _ = img2img_runner(pipe, len(t_index))
    cases = edit_cases(cases_n, seed=CASE_SEED)
    sources = [render_pil(c.source) for c in cases]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # (format, OpenVINO precision): "auto" computes in bf16 on CPUs that have it
        runtimes = {"onnx": ("onnx", "fp32"), "openvino": ("openvino", "fp32"), "openvino-bf16": ("openvino", "auto")}
        exported = {key: load_pipeline(str(export_pipeline(load_pipeline("toyworld-turbo"), Path(tmp) / key, fmt, precision=precision)))
                    for key, (fmt, precision) in runtimes.items()}
        int8 = export_pipeline(load_pipeline("toyworld-turbo"), Path(tmp) / "openvino-int8", "openvino", precision="auto",
                               quantize="int8", calibration_prompts=toy_calibration_prompts(32))
        exported["openvino-int8"] = load_pipeline(str(int8))
        taesd = load_tiny_autoencoder("toyworld-taesd", device="cpu", dtype="fp32")
        tiny = {key: export_tiny_autoencoder(taesd, Path(tmp) / f"taesd-{key}", fmt, precision=precision)  # on the model's runtime
                for key, (fmt, precision) in runtimes.items()}
        quantized = load_pipeline("toyworld-turbo")
        quantize_module(quantized.unet, "int8wo")
        engines = {
            "engine fp32 (full VAE)": StreamEngine(pipe, t_index_list=t_index),
            "engine + toyworld-taesd": StreamEngine(pipe, t_index_list=t_index, vae="toyworld-taesd"),
            "engine + taesd, int8 weights (quanto)": StreamEngine(quantized, t_index_list=t_index, vae="toyworld-taesd"),
            "engine, ONNX Runtime (full VAE, exported)": StreamEngine(exported["onnx"], t_index_list=t_index),
            "engine, OpenVINO bf16 (full VAE, exported)": StreamEngine(exported["openvino-bf16"], t_index_list=t_index),
            "engine + taesd, OpenVINO": StreamEngine(exported["openvino"], t_index_list=t_index, vae=tiny["openvino"]),
            "engine + taesd, OpenVINO bf16": StreamEngine(exported["openvino-bf16"], t_index_list=t_index, vae=tiny["openvino-bf16"]),
            "engine + taesd, ONNX Runtime": StreamEngine(exported["onnx"], t_index_list=t_index, vae=tiny["onnx"]),
            # the tiny encoder only: the full VAE decodes (a tiny decoder is where TAESD loses quality)
            "engine + taesd encoder, ONNX Runtime": StreamEngine(exported["onnx"], t_index_list=t_index, vae_encoder=tiny["onnx"]),
            "engine + taesd encoder, OpenVINO bf16": StreamEngine(exported["openvino-bf16"], t_index_list=t_index,
                                                                  vae_encoder=tiny["openvino-bf16"]),
            "engine, OpenVINO bf16 + int8 VAE decoder": StreamEngine(exported["openvino-int8"], t_index_list=t_index),
            "engine + taesd encoder, OV bf16 + int8 decoder": StreamEngine(exported["openvino-int8"], t_index_list=t_index,
                                                                          vae_encoder=tiny["openvino-bf16"]),
        }
        for name, engine in engines.items():
            successes = []
            for case, image in zip(cases, sources):
                engine.prepare(case.target_caption)  # an empty buffer: every frame passes every stage
                successes.append(score_edit(case, engine(image), image).success)
            engine.prepare(prompt)
            for frame in frames[:3]:
                engine(frame)
            t_base, t = [], []
            for r in range(repeats):
                for frame in frames:
                    pair = [(t_base, lambda f=frame: baseline(f)), (t, lambda f=frame, e=engine: e(f))]
                    for bucket, fn in (pair if r % 2 == 0 else pair[::-1]):
                        bucket.append(timed(fn))
            rows.append((name, len(frames) * repeats / sum(t), sum(t_base) / sum(t), statistics.mean(successes)))
            print(f"stream: {name} {rows[-1][1]:.1f} frames/s, {rows[-1][2]:.2f}x img2img, edits {rows[-1][3]:.0%}",
                  file=sys.stderr, flush=True)
    header = (f"toyworld-turbo, stages {t_index} (the live default), guidance off, {frames_n} frames x {repeats} rounds, "
              f"each configuration interleaved with the per-frame diffusers img2img pipeline (fp32, full VAE); "
              f"prompt edits: {cases_n} toy edit cases (seed {CASE_SEED})")
    return header, rows


# ----------------------------------------------------------------------------- 4. the VAE decoder in 8 bit


def build_vae(arch: str, n: int):
    """(VAE, pixels, n latents at its decoder's input scale): toyworld-turbo's VAE with latents it generates
    from toy captions, or a full-size architecture with random weights and standard normal latents (a random
    model has no latents of its own)."""
    from diffusers import AutoencoderKL

    from atelier.runtime.cli import toy_calibration_prompts
    from atelier.runtime.quantize import latents_of_prompts

    if arch == "toy":
        pipe = load_pipeline("toyworld-turbo")
        return pipe.vae.eval(), 64, latents_of_prompts(pipe, toy_calibration_prompts(n), n, 64, 64)
    config = json.loads(resources.files("atelier.models.configs").joinpath(f"{arch}.json").read_text())["vae"]
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    return vae, 256, [torch.randn(1, vae.config.latent_channels, 32, 32, generator=g) for _ in range(n)]


def decoder_rows(arch: str, repeats: int, calibration_n: int) -> list[tuple]:
    """The decoder exported at a static shape: OpenVINO fp32, bf16, and bf16 with its up blocks in 8 bit
    (atelier.runtime.quantize), each interleaved with fp32 eager; PSNR on 4 latents outside the calibration."""
    import shutil

    from atelier.runtime.export import _export_graph, _VAEDecoderGraph
    from atelier.runtime.modules import CompiledGraph, graph_path
    from atelier.runtime.quantize import quantize_decoder

    vae, pixels, latents = build_vae(arch, calibration_n + 4)
    calibration, held = latents[:calibration_n], torch.cat(latents[calibration_n:])
    z = held[:1]

    @torch.no_grad()
    def base():
        return vae.decode(z).sample

    with torch.no_grad():
        ref = vae.decode(held).sample
    t0 = statistics.median([timed(base) for _ in range(repeats)])
    rows = [(arch, pixels, "fp32 eager", 1.0, t0, float("inf"), "")]
    print(f"decoder {arch}: fp32 eager {t0:.3f} s/call", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain, eight = Path(tmp) / "plain", Path(tmp) / "int8"
        plain.mkdir()
        path = graph_path(plain, "decoder", "openvino")
        _export_graph(_VAEDecoderGraph(vae), {"latents": z}, ["images"], {}, path, "openvino")
        shutil.copytree(plain, eight)
        start = time.perf_counter()
        record = quantize_decoder(graph_path(eight, "decoder", "openvino"), calibration)
        note = f"{calibration_n} calibration latents, {time.perf_counter() - start:.0f} s"
        for name, folder, precision in (("OpenVINO fp32", plain, "fp32"), ("OpenVINO bf16 (CPU's auto)", plain, "auto"),
                                        ("OpenVINO bf16 + int8 up blocks", eight, "auto")):
            graph = CompiledGraph(graph_path(folder, "decoder", "openvino"), "openvino", threads=torch.get_num_threads(),
                                  precision=precision)
            out = torch.cat([torch.from_numpy(graph(latents=x[None].numpy())["images"]) for x in held])
            t_base, t = interleaved(base, lambda g=graph: g(latents=z.numpy()), repeats)
            rows.append((arch, pixels, name, t_base / t, t, psnr(out, ref), note if folder is eight else ""))
            print(f"decoder {arch}: {name} {t:.3f} s/call, {t_base / t:.2f}x", file=sys.stderr, flush=True)
    assert record["vae_decoder"] == "int8"
    return rows


def format_decoder_rows(rows) -> str:
    lines = [f"{'architecture':<13} {'px':>4}  {'configuration':<32} {'x fp32':>7} {'s/call':>8} {'PSNR dB':>8}  note",
             "-" * 100]
    lines += [f"{arch:<13} {px:>4}  {name:<32} {ratio:7.2f} {t:8.3f} {p:8.1f}  {note}"
              for arch, px, name, ratio, t, p, note in rows]
    return "\n".join(lines)


def format_stream_rows(header: str, rows) -> str:
    base = rows[0][3]
    lines = [header, "", f"{'configuration':<48} {'frames/s':>9} {'x img2img':>10} {'edits followed':>15} {'vs fp32':>8}",
             "-" * 96]
    lines += [f"{name:<48} {fps:9.1f} {ratio:10.2f} {100 * ok:14.1f}% {100 * (ok - base):+8.1f}"
              for name, fps, ratio, ok in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="toy,sd1,sdxl", help="UNet architectures of part 1 (toy, sd1, sdxl)")
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per configuration in part 1")
    parser.add_argument("--per-count", type=int, default=30, help="part 2: held-out captions per object count")
    parser.add_argument("--frames", type=int, default=30, help="part 3: frames per round")
    parser.add_argument("--rounds", type=int, default=2, help="part 3: rounds")
    parser.add_argument("--cases", type=int, default=60, help="part 3: toy edit cases for the edit success")
    parser.add_argument("--decoder-archs", default="toy,sd1", help="part 4: VAE decoder architectures (toy, sd1, sdxl)")
    parser.add_argument("--calibration", type=int, default=32, help="part 4: calibration latents")
    parser.add_argument("--skip", default="", help="parts to skip: unet,toy,stream,decoder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: atelier's choice)")
    parser.add_argument("--results", help="write the tables into this markdown file's speed section")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.results:
        check_command(__file__, argv)
    numerics = apply_cpu_numerics("cpu", threads=args.threads)
    skip = set(filter(None, args.skip.split(",")))
    parts = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, denormals flushed: {numerics.get('flush_denormal')}"]
    if "unet" not in skip:
        rows = [row for arch in filter(None, args.archs.split(",")) for row in unet_rows(arch, args.repeats)]
        parts.append("1. One UNet call, batch 2 (toy at 64 px, SD 1.5 / SDXL architectures with random weights at 256 px)\n\n"
                     + format_unet_rows(rows))
    if "toy" not in skip:
        rows = toy_rows("toyworld", args.per_count) + toy_rows("toyworld-turbo", args.per_count)
        parts.append("2. The toy models end to end (generate at each model's defaults)\n\n" + format_toy_rows(rows, args.per_count))
    stream = None
    if "stream" not in skip:
        stream = "3. The stream\n\n" + format_stream_rows(*stream_rows(args.frames, args.cases, args.rounds))
    decoder = None
    if "decoder" not in skip:
        rows = [row for arch in filter(None, args.decoder_archs.split(",")) for row in decoder_rows(arch, args.repeats, args.calibration)]
        decoder = "4. The VAE decoder in 8 bit (one call, batch 1)\n\n" + format_decoder_rows(rows)
    print("\n\n".join(parts + [p for p in (stream, decoder) if p]))
    if args.results:
        command = command_line(__file__, argv)
        if len(parts) > 1:  # parts 1 and 2
            write_section(args.results, "speed", "Speed and memory (atelier.speed, atelier.runtime)",
                          "\n\n".join(parts), command)
        if stream:  # its own section: it can be measured again without the hour that parts 1 and 2 take
            write_section(args.results, "speed-stream", "Speed: the stream on the CPU fast path (atelier.stream, atelier.runtime)",
                          f"{parts[0]}\n\n{stream}", command,
                          "Part 3 of speed.py writes this section, parts 1 and 2 the section \"Speed and memory\"; a part 3 "
                          "printed there is from a run before the split, and this section supersedes it. Target (issue 17): "
                          ">= 3x the per-frame img2img pipeline with edits followed within 5 points of the fp32 engine.")
        if decoder:
            write_section(args.results, "speed-decoder", "Speed: the VAE decoder in 8 bit (atelier export --quantize int8)",
                          f"{parts[0]}\n\n{decoder}", command,
                          "Part 4 of speed.py. The decoder's up blocks run in 8 bit (NNCF), its input stage "
                          "(post_quant_conv, conv_in, mid block) in bf16; atelier.runtime.quantize says why.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
