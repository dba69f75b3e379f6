"""Stream throughput: StreamEngine against a plain diffusers img2img pipeline call per frame.

Same model, same frames (a moving toy-world animation), same number of UNet evaluations per frame
and guidance off, in this one process, in alternating rounds so that machine noise hits both:

  diffusers img2img     AutoPipelineForImage2Image(prompt, image, ...) per frame (encodes the
                        prompt, sets timesteps, draws noise, encodes, denoises, decodes every time)
  engine, frame by frame StreamEngine with use_denoising_batch=False
  engine, stream batch  StreamEngine (one UNet call covers every stage)

Also the engine's overhead: its time per frame minus its own VAE encode + UNet + VAE decode time.

    HF_HUB_OFFLINE=1 python benchmarks/stream.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from _results import write_section
from atelier.models import load_pipeline, to_img2img
from atelier.stream import StreamEngine
from atelier.toyworld.render import render_pil
from atelier.toyworld.scene import CELLS, Scene, ToyObject

PROMPT = "a large blue circle at the top left and a small yellow square in the center"


def animation(n: int, seed: int = 0):
    """Toy-world frames: two shapes gliding across the canvas, as the page's built-in source does."""
    rng = random.Random(seed)
    cells = list(CELLS)
    frames = []
    for i in range(n):
        a, b = cells[(i // 8) % 9], cells[(i // 8 + 4) % 9]
        d = i % 8 - 4  # glide within the cell, then jump to the next one
        frames.append(render_pil(Scene((ToyObject("circle", "red", "large", a, d, 0), ToyObject("square", "green", "small", b, 0, d)))))
    rng.shuffle(frames[: n // 10])  # some abrupt cuts too
    return frames


def img2img_runner(pipe, stages: int):
    img2img = to_img2img(pipe)
    img2img.set_progress_bar_config(disable=True)
    # `int(steps * strength)` denoising steps, as many as the engine's stages.
    steps = stages + 1
    strength = (stages + 0.5) / steps
    generator = torch.Generator("cpu")

    def run(frame):
        generator.manual_seed(2)
        return img2img(PROMPT, image=frame, num_inference_steps=steps, strength=strength, guidance_scale=0.0,
                       generator=generator, output_type="pil").images[0]

    return run, int(steps * strength)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toyworld-turbo")
    parser.add_argument("--frames", type=int, default=60, help="frames per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny-vae", default="toyworld-taesd", help="also run the engine with this tiny autoencoder ('' for none)")
    parser.add_argument("--results", help="write the table into this markdown file's 'Stream' section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    frames = animation(args.frames)
    rows = []
    for stages in (1, 2, 4):
        t_index = [round(15 + i * (35 / stages)) for i in range(stages)]
        batch = StreamEngine(pipe, t_index_list=t_index)
        single = StreamEngine(pipe, t_index_list=t_index, use_denoising_batch=False)
        engines = [batch, single]
        baseline, unet_calls = img2img_runner(pipe, stages)
        assert unet_calls == stages, (unet_calls, stages)
        methods = {"diffusers img2img": baseline, "engine, frame by frame": single, "engine, stream batch": batch}
        if args.tiny_vae:
            tiny = StreamEngine(pipe, t_index_list=t_index, vae=args.tiny_vae)
            engines.append(tiny)
            methods[f"stream batch + {args.tiny_vae}"] = tiny
        for engine in engines:
            engine.prepare(PROMPT)
        times = {name: 0.0 for name in methods}
        for frame in frames[:3]:  # warm up every path
            for run in methods.values():
                run(frame)
        batch.profile = True
        batch.timings = dict.fromkeys(batch.timings, 0.0)
        names = list(methods)
        calls = 0
        # Interleaved frame by frame, in rotating order, so that machine noise hits every method alike.
        for r in range(args.rounds):
            for i, frame in enumerate(frames):
                k = (i + r) % len(names)
                for name in names[k:] + names[:k]:
                    start = time.perf_counter()
                    methods[name](frame)
                    times[name] += time.perf_counter() - start
                calls += 1
        base = times["diffusers img2img"]
        model_share = sum(batch.timings.values()) / times["engine, stream batch"]
        for name in methods:
            overhead = f"{1 - model_share:6.1%}" if name == "engine, stream batch" else ""
            rows.append((stages, str(t_index), name, calls / times[name], base / times[name], overhead))
        print(f"done: {stages} stage(s)", file=sys.stderr)

    lines = [
        f"model {args.model}, 64x64, guidance off, {args.frames} frames x {args.rounds} rounds, methods interleaved frame by frame; "
        f"torch {torch.__version__}, {args.threads} threads",
        "",
        f"{'stages':>6}  {'t_index':<14} {'method':<32} {'frames/s':>9} {'x img2img':>10} {'overhead':>9}",
        "-" * 86,
    ]
    for stages, t_index, name, fps, ratio, overhead in rows:
        lines.append(f"{stages:>6}  {t_index:<14} {name:<32} {fps:9.1f} {ratio:10.2f} {overhead:>9}")
    lines.append("")
    lines.append("overhead: engine time per frame not spent in its VAE encode, UNet and VAE decode calls")
    if args.tiny_vae:
        lines.append(f"{args.tiny_vae}: the tiny autoencoder replaces the VAE for encode and decode (its judged round trip is in "
                     "docs/toyworld-training.md)")
    table = "\n".join(lines)
    print(table)
    if args.results:
        write_section(args.results, "Stream engine (atelier.stream)", table,
                      "HF_HUB_OFFLINE=1 python benchmarks/stream.py --results benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
