"""LoRA / DreamBooth on the toy world, judged exactly (issue 14; docs/lora.md).

concepts    each reserved concept of the contract (the shapes `ring` and `bar`, the colour `teal`),
            taught from 8 rendered instance images whose caption `.txt` puts the token `sks` where
            the concept's word would be, each its own `atelier train lora` run with the defaults plus
            prior preservation (the class images of `prior`) and pivotal tuning of `sks` as one new
            token (RECIPE; a turbo model also trains at its sampling timesteps), to every model of `--models`.
            Then 50 held-out captions with the token, one image each at the model's defaults: concept
            right (the judge names the new shape or colour on the object that carries it) and the
            rest of the caption right (every other attribute and object).
            Targets: >= 80 % and >= 80 %, training <= 15 min per concept on this CPU.
composites  on --ablation-model, the shapes of --concepts taught with the recipe from the instance images
            alone and with COMPOSITES composites of them (each instance's concept object pasted into a free
            cell of a class image, captioned with both), and with the token warm-up (WARMUP) too; the
            prior (objects right on the standard captions) after each run.
prior       objects right on the standard held-out captions of the base world (no token) with the
            base model, after the ring run with the defaults, with prior preservation, with the concepts'
            recipe, and with the recipe's class loss pulled toward the frozen base model's prediction
            (--prior_loss_target base_model) at weights 1, 4, 16 (PRIOR_VARIANTS); target a drop <= 5
            points with prior preservation.
ablations   the same data and steps, one change each from the defaults: DoRA, pivotal tuning, Min-SNR
            (gamma 5), Prodigy, rank 16, decoder inversion (100 steps).
memory      real size: `train_lora` (rank 4, 128 px, batch 1) on the full-size SD 1.5 and SDXL
            architectures (atelier's bundled configs, random weights, the real CLIP tokenizer), each in
            its own process: seconds per step and peak memory (RSS) with and without gradient
            checkpointing, and how much the training adds to the loaded weights.

Training runs through the CLI (`python -m atelier.cli train lora ...`, the `atelier` command), timed from
outside; evaluation loads the LoRA (and embedding) into the base model in this process and generates
through `atelier.generate.generate`. Finished runs are reused (a run folder with its LoRA file), so an
interrupted benchmark resumes.

    HF_HUB_OFFLINE=1 python benchmarks/lora.py --work runs/lora-bench --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/lora.py --work /tmp/lb --concepts ring --models toyworld \\
        --held-out 4 --prior 6 --steps 20 --skip ablations                                   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _real_size import random_pipeline
from _results import check_command, command_line, write_section
from atelier.core.images import save_png
from atelier.core.io import atomic_write_bytes
from atelier.generate import GenerationRequest, generate
from atelier.models import apply_lora, load_pipeline
from atelier.models.embeddings import apply_embedding
from atelier.toyworld.concepts import check_concept, held_out_examples, instance_examples, score_concept
from atelier.toyworld.judge import judge
from atelier.toyworld.render import render_pil
from atelier.train.toyworld import held_out_scenes

TOKEN = "sks"
ABLATIONS = {
    "DoRA": ["--use_dora"],
    "pivotal tuning": ["--train_text_encoder_ti", "--token_abstraction", TOKEN],  # the captions' token, not TOK
    "Min-SNR (gamma 5)": ["--snr_gamma", "5"],
    "Prodigy": ["--optimizer", "prodigy", "--learning_rate", "1.0"],
    "rank 16": ["--rank", "16", "--lora_alpha", "16"],
    "decoder inversion": ["--decoder_inversion_steps", "100"],
}
CLASS_IMAGES = 100
CLASS_SEED = 4_400_000
PRIOR_FLAGS = ["--with_prior_preservation", "--class_data_dir", "{work}/class-{model}", "--num_class_images", "{classes}"]
# The concepts' recipe (docs/lora.md, "Why the rest of the caption fails"): the defaults plus prior preservation
# (without it the LoRA is not bound to the token: holes and colours leak into the other objects of a caption and
# into the base world) plus pivotal tuning of `sks` as one new token (the toy tokenizer splits `sks` into three
# never-trained character tokens, which spill into the rest of the caption).
RECIPE = PRIOR_FLAGS + ["--train_text_encoder_ti", "--token_abstraction", TOKEN, "--num_new_tokens_per_abstraction", "1"]
# A few-step distilled model is only run at its sampling timesteps; trained at uniform ones it loses the map it
# was distilled to (toyworld-turbo's prior after the ring run: 40 % uniform, 75 % at its timesteps).
TURBO_TIMESTEPS = ["--train_timesteps", "999,749,499,249"]


def recipe_for(model: str) -> list[str]:
    return RECIPE + (TURBO_TIMESTEPS if "turbo" in model else [])


# The prior-drift table: the ring run without and with prior preservation, then the recipe with the class rows'
# target the images' noise (DreamBooth's) or the frozen base model's own prediction, at growing weights.
PRIOR_VARIANTS = {
    "defaults": lambda model: [],
    "prior preservation": lambda model: PRIOR_FLAGS,
    "recipe": recipe_for,
    "recipe, base-model target": lambda model: recipe_for(model) + ["--prior_loss_target", "base_model"],
    "recipe, base-model target x4": lambda model: recipe_for(model) + ["--prior_loss_target", "base_model",
                                                                          "--prior_loss_weight", "4"],
    "recipe, base-model target x16": lambda model: recipe_for(model) + ["--prior_loss_target", "base_model",
                                                                           "--prior_loss_weight", "16"],
}


def write_instance_data(concept: str, folder: Path) -> Path:
    images = folder / "instance"
    for i, ex in enumerate(instance_examples(concept, 8, token=TOKEN)):
        if not (images / f"{i:03d}.png").is_file():
            save_png(render_pil(ex.scene), images / f"{i:03d}.png", ex.caption)
            atomic_write_bytes(images / f"{i:03d}.txt", (ex.caption + "\n").encode("utf-8"))
    return images


COMPOSITES = 24
# Break-A-Scene's first phase: the new token alone first, at a higher rate, then the LoRA with it (docs/lora.md).
WARMUP = ["--ti_warmup_steps", "300", "--max_train_steps", "700", "--text_encoder_lr", "2e-3"]
COMPOSITE_VARIANTS = {  # name: (with composites, flags)
    "recipe": (False, recipe_for),
    "recipe + composites": (True, recipe_for),
    "recipe + token warm-up + composites": (True, lambda model: recipe_for(model) + WARMUP),
}


def write_composite_data(model: str, concept: str, folder: Path, class_dir: Path) -> Path:
    """The 8 instance images and COMPOSITES composites: each instance's concept object pasted into a free cell
    of a class image (the base model's own drawing of a base caption), captioned with both."""
    from atelier.toyworld.cli import read_backgrounds
    from atelier.toyworld.concepts import composites

    images = write_instance_data(concept, folder)
    write_class_images(model, class_dir, CLASS_IMAGES)
    instances = instance_examples(concept, 8, token=TOKEN)
    pictures = [np.asarray(render_pil(e.scene)) for e in instances]
    for k, (picture, caption) in enumerate(composites(instances, pictures, read_backgrounds(class_dir), COMPOSITES)):
        if not (images / f"composite-{k:03d}.png").is_file():
            save_png(Image.fromarray(picture), images / f"composite-{k:03d}.png", caption)
            atomic_write_bytes(images / f"composite-{k:03d}.txt", (caption + "\n").encode("utf-8"))
    return images


def write_class_images(model: str, folder: Path, n: int) -> None:
    """Prior-preservation images: the base model's own images of random base-world captions, each with its
    caption in a .txt beside it (kohya's captioned regularisation images)."""
    import random

    from atelier.toyworld.scene import sample_scene

    rng = random.Random(CLASS_SEED)
    pipe = None
    for k in range(n):
        scene = sample_scene(rng, rng.randint(1, 3))
        caption = scene.caption(rng)
        path = folder / f"class-{k:05d}.png"
        if not path.is_file():
            pipe = pipe or load_pipeline(model)
            out = generate(pipe, GenerationRequest(caption, seed=CLASS_SEED + k), progress=False)[0]
            save_png(out.image, path, out.parameters)
            atomic_write_bytes(path.with_suffix(".txt"), (caption + "\n").encode("utf-8"))


def train(model: str, data: Path, out: Path, flags: list[str], *, threads: int, steps: int | None,
          inversion_steps: int | None = None) -> dict:
    """`atelier train lora` in a subprocess (reused when `out` holds a finished run): its summary and wall time."""
    record = out / "bench.json"
    if record.is_file():
        return json.loads(record.read_text())
    cmd = [sys.executable, "-m", "atelier.cli", "train", "lora", "--pretrained_model_name_or_path", model,
           "--instance_data_dir", str(data), "--output_dir", str(out), "--threads", str(threads), "--json", *flags]
    if steps is not None:
        cmd += ["--max_train_steps", str(steps)]
    if inversion_steps is not None:
        cmd += ["--decoder_inversion_steps", str(inversion_steps)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    summary = {**json.loads(done.stdout), "bench_seconds": seconds}
    atomic_write_bytes(record, json.dumps(summary, indent=2).encode("utf-8"))
    return summary


def trained_pipeline(model: str, out: Path | None):
    pipe = load_pipeline(model)
    if out is not None:
        apply_lora(pipe, out / "pytorch_lora_weights.safetensors")
        embeddings = sorted(out.glob("*_emb.safetensors"))
        if embeddings:
            apply_embedding(pipe, embeddings[0], token=TOKEN)
    return pipe


def image(pipe, caption: str, seed: int) -> np.ndarray:
    return np.asarray(generate(pipe, GenerationRequest(caption, seed=seed), progress=False)[0].image)


def concept_scores(pipe, concept: str, n: int) -> dict:
    held = held_out_examples(concept, n, token=TOKEN, instances=instance_examples(concept, 8, token=TOKEN))
    scores = [score_concept(image(pipe, ex.caption, k), ex, concept) for k, ex in enumerate(held)]
    return {key: float(np.mean([s[key] for s in scores])) for key in ("concept_right", "rest_right", "match")}


@torch.no_grad()
def round_trip_scores(pipe, concept: str, n: int) -> dict:
    """The held-out scenes rendered exactly, encoded and decoded by the model's VAE (the posterior's mean,
    as the trainer encodes its instance images), and scored like generated images: what the latents a
    LoRA learns to reproduce can show at best."""
    from atelier.core.vae import decode, encode

    held = held_out_examples(concept, n, token=TOKEN, instances=instance_examples(concept, 8, token=TOKEN))
    scores = []
    for ex in held:
        x = torch.from_numpy(np.asarray(render_pil(ex.scene), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        out = decode(pipe.vae, encode(pipe.vae, x))[0].float().permute(1, 2, 0).cpu().numpy()
        scores.append(score_concept(((out + 1) * 127.5).round().clip(0, 255).astype(np.uint8), ex, concept))
    return {key: float(np.mean([s[key] for s in scores])) for key in ("concept_right", "rest_right", "match")}


def prior_score(pipe, n: int) -> float:
    scenes, captions = held_out_scenes(n)
    return float(np.mean([judge(image(pipe, c, 10_000 + k), s).objects_right for k, (s, c) in enumerate(zip(scenes, captions))]))


# ----------------------------------------------------------------------------- real-size memory


def memory_child(arch: str, checkpointing: bool, threads: int) -> dict:
    """One process: build the full-size pipeline, then two steps of `train_lora` on it (rank 4, 128 px)."""
    import atelier.models
    from atelier.train.lora import LoraTrainConfig, train_lora

    torch.set_num_threads(threads)
    pipe = random_pipeline(arch)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    atelier.models.load_pipeline = lambda *a, **k: pipe  # train_lora loads its base through atelier.models
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i, ex in enumerate(instance_examples("ring", 2, token=TOKEN)):
            render_pil(ex.scene).resize((128, 128)).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(ex.caption)
        summary = train_lora(LoraTrainConfig(pretrained_model_name_or_path=arch, instance_data_dir=str(data),
                                             output_dir=str(Path(tmp) / "out"), resolution=128, rank=4, lora_alpha=4,
                                             train_batch_size=1, max_train_steps=2, learning_rate=1e-4,
                                             gradient_checkpointing=checkpointing, checkpointing_steps=1000, threads=threads))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    return {"arch": arch, "gradient_checkpointing": checkpointing, "seconds_per_step": summary["seconds_per_step"],
            "weights_gb": loaded / 2**30, "peak_gb": peak / 2**30, "trainable": trainable}


def memory_rows(archs, threads: int) -> list[str]:
    lines = [f"{'architecture':<14} {'gradient ckpt':>13} {'s/step':>7} {'weights loaded GB':>18} {'peak GB':>8} {'training adds GB':>17}",
             "-" * 84]
    for arch in archs:
        for checkpointing in (False, True):
            done = subprocess.run([sys.executable, __file__, "--memory-child", arch, "--threads", str(threads)]
                                  + (["--gradient-checkpointing"] if checkpointing else []),
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if done.returncode != 0:
                raise SystemExit(f"memory run {arch} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            lines.append(f"{arch:<14} {'on' if checkpointing else 'off':>13} {r['seconds_per_step']:7.1f} {r['weights_gb']:18.2f} "
                         f"{r['peak_gb']:8.2f} {r['peak_gb'] - r['weights_gb']:17.2f}")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def run_dir(work: Path, model: str, concept: str, variant: str) -> Path:
    return work / "runs" / f"{model}-{concept}-{variant.replace(',', '').replace(' ', '-')}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", metavar="DIR", help="folder for data and training runs (finished runs are reused)")
    p.add_argument("--models", default="toyworld,toyworld-turbo")
    p.add_argument("--concepts", default="ring,bar,teal")
    p.add_argument("--held-out", type=int, default=50, help="held-out captions per concept")
    p.add_argument("--prior", type=int, default=60, help="standard held-out captions for the prior drift")
    p.add_argument("--steps", type=int, help="override the trainer's default --max_train_steps (smoke runs)")
    p.add_argument("--inversion-steps", type=int, help="override the trainer's default --decoder_inversion_steps (smoke runs)")
    p.add_argument("--ablation-model", default="toyworld")
    p.add_argument("--ablation-concept", default="ring")
    p.add_argument("--memory-archs", default="sd1,sdxl", help="full-size architectures of the memory part")
    p.add_argument("--skip", default="", help="parts to skip: concepts,composites,prior,ablations,memory")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", help="write the RESULTS.md section here")
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.gradient_checkpointing, args.threads)))
        return 0
    if not args.work:
        p.error("--work is required")
    if args.results:
        check_command(__file__, argv)
    torch.set_num_threads(args.threads)
    work, skip = Path(args.work), set(args.skip.split(","))
    models, concepts = args.models.split(","), args.concepts.split(",")
    sections = []

    def concept_row(model, concept, variant, flags, composited=False):
        if composited:
            data = write_composite_data(model, concept, work / "data" / f"{concept}-composites-{model}",
                                        work / f"class-{model}")
        else:
            data = write_instance_data(concept, work / "data" / concept)
        if "--with_prior_preservation" in flags:
            write_class_images(model, work / f"class-{model}", CLASS_IMAGES)
        out = run_dir(work, model, concept, variant)
        flags = [f.format(work=work, model=model, classes=CLASS_IMAGES) for f in flags]
        summary = train(model, data, out, flags, threads=args.threads, steps=args.steps,
                        inversion_steps=args.inversion_steps)
        pipe = trained_pipeline(model, out)
        scores = concept_scores(pipe, concept, args.held_out)
        print(f"{model} {concept} {variant}: {scores} in {summary['bench_seconds']:.0f} s", file=sys.stderr, flush=True)
        return out, pipe, summary, scores

    if "concepts" not in skip:
        lines = [f"{'model':<15} {'concept':<8} {'concept right':>14} {'rest right':>11} {'whole caption':>14} {'train min':>10} {'steps':>6}",
                 "-" * 84]
        for model in models:
            for concept in concepts:
                _, pipe, summary, s = concept_row(model, concept, "recipe", recipe_for(model))
                lines.append(f"{model:<15} {concept:<8} {100 * s['concept_right']:13.1f}% {100 * s['rest_right']:10.1f}% "
                             f"{100 * s['match']:13.1f}% {summary['bench_seconds'] / 60:10.1f} {summary.get('steps', ''):>6}")
                ceiling = round_trip_scores(pipe, concept, args.held_out)
                lines.append(f"{'  VAE round trip':<24} {100 * ceiling['concept_right']:13.1f}% "
                             f"{100 * ceiling['rest_right']:10.1f}% {100 * ceiling['match']:13.1f}%")
        sections.append(("lora-concepts", "LoRA: teaching the toy world new concepts (prior preservation + pivotal tuning, 8 instance images each)", lines,
                         f"{args.held_out} held-out captions per concept (1-2 objects, scenes no instance image shows), "
                         f"one image each at the model's defaults. Training: the defaults plus prior preservation ({CLASS_IMAGES} class "
                         "images the base model drew from random base captions, each with its caption file) and pivotal "
                         "tuning of `sks` as one new token (`RECIPE` in benchmarks/lora.py); on toyworld-turbo, training at its "
                         "sampling timesteps too (`--train_timesteps 999,749,499,249`). 'VAE round trip': the same held-out scenes "
                         "rendered exactly, encoded (posterior mean, as the trainer encodes) and decoded by the model's VAE, judged the same "
                         "way: what latents like the ones the LoRA is trained on can show. Targets (issue 14): concept right >= 80 %, rest right "
                         ">= 80 %, <= 15 min per concept. Training time is the wall time of the `atelier train lora` "
                         "command (one thread), model loading and decoder inversion included."))

    if "composites" not in skip:
        model = args.ablation_model
        lines = [f"{'concept':<8} {'variant':<36} {'concept right':>14} {'rest right':>11} {'whole caption':>14} "
                 f"{'prior':>7} {'train min':>10}", "-" * 106]
        base = prior_score(trained_pipeline(model, None), args.prior)
        for concept in concepts:
            if check_concept(concept) != "shape":
                continue  # teal: the toy VAE cannot write it (docs/lora.md), composites do not change that
            for variant, (composited, flags) in COMPOSITE_VARIANTS.items():
                flags = flags(model)
                if args.steps is not None and WARMUP[0] in flags:  # a smoke run's few steps: a warm-up that fits them
                    flags[flags.index(WARMUP[0]) + 1] = str(max(1, args.steps // 2))
                _, pipe, summary, s = concept_row(model, concept, variant, flags, composited)
                lines.append(f"{concept:<8} {variant:<36} {100 * s['concept_right']:13.1f}% {100 * s['rest_right']:10.1f}% "
                             f"{100 * s['match']:13.1f}% {100 * prior_score(pipe, args.prior):6.1f}% "
                             f"{summary['bench_seconds'] / 60:10.1f}")
        lines.append(f"{'base model, objects right on the standard captions':<60} {100 * base:>45.1f}%")
        sections.append(("lora-composites", f"LoRA: the instance objects pasted into class images ({model})", lines,
                         f"{args.held_out} held-out captions per concept, {args.prior} standard captions for the prior "
                         "(objects right, base world, no token). recipe: the concepts' (prior preservation + pivotal tuning "
                         f"of `sks`, 400 steps, 8 instance images); composites: {COMPOSITES} more training images, each "
                         "instance's concept object cut out of its image (the renderer's coverage of it, its pixels the "
                         "instance's) and pasted into a free cell of one of the class images, captioned with both "
                         "(`atelier toyworld concept-data --composites N --backgrounds CLASS_DIR`); nothing in them that "
                         "the 8 instance images and the base model do not show. token warm-up: `--ti_warmup_steps 300 "
                         "--max_train_steps 700 --text_encoder_lr 2e-3`."))

    if "prior" not in skip:
        model, concept = args.ablation_model, args.ablation_concept
        rows = [("base model", trained_pipeline(model, None), None)]
        for variant, flags in PRIOR_VARIANTS.items():
            _, pipe, _, scores = concept_row(model, concept, variant, flags(model))
            rows.append((f"+ {concept} LoRA ({variant})", pipe, scores))
        base = None
        lines = [f"{'':<44} {'concept right':>14} {'rest right':>11} {'objects right':>14} {'vs base':>8}", "-" * 95]
        for name, pipe, scores in rows:
            acc = prior_score(pipe, args.prior)
            base = acc if base is None else base
            taught = (f"{100 * scores['concept_right']:13.1f}% {100 * scores['rest_right']:10.1f}%" if scores
                      else f"{'':>14} {'':>11}")
            lines.append(f"{name:<44} {taught} {100 * acc:13.1f}% {100 * (acc - base):+8.1f}")
        sections.append(("lora-prior", f"LoRA: prior drift ({model}, {concept})", lines,
                         f"Objects right on {args.prior} standard held-out captions of the base world (1/2/3 objects, "
                         f"no token), and the concept's {args.held_out} held-out captions for what each run learnt. Prior "
                         f"preservation: {CLASS_IMAGES} class images the base model drew from random base captions, each "
                         "with its caption file; recipe: the concepts' (prior preservation and pivotal tuning of `sks` as "
                         "one new token); base-model target: `--prior_loss_target base_model` (the class rows pulled toward "
                         "the frozen base model's prediction) at the `--prior_loss_weight` named. Target (issue 14): a drop "
                         "<= 5 points with prior preservation."))

    if "ablations" not in skip:
        model, concept = args.ablation_model, args.ablation_concept
        lines = [f"{'variant':<18} {'concept right':>14} {'rest right':>11} {'whole caption':>14} {'train min':>10}", "-" * 72]
        for variant, flags in {"defaults": [], **ABLATIONS}.items():
            _, _, summary, s = concept_row(model, concept, variant, flags)
            lines.append(f"{variant:<18} {100 * s['concept_right']:13.1f}% {100 * s['rest_right']:10.1f}% "
                         f"{100 * s['match']:13.1f}% {summary['bench_seconds'] / 60:10.1f}")
        sections.append(("lora-ablations", f"LoRA: ablations ({model}, {concept})", lines,
                         f"The same data and steps as the defaults, one change each; {args.held_out} held-out captions."))

    if "memory" not in skip:
        sections.append(("lora-memory", "LoRA: one training step at real size", memory_rows(args.memory_archs.split(","), args.threads),
                         "`train_lora` with rank 4 on the attention projections, 128 px, batch 1, fp32, one thread, on the "
                         "full-size SD 1.5 and SDXL architectures (atelier's bundled configs, random weights), each row in "
                         "its own process. Peak = the process's maximum RSS; weights = RSS once the pipeline is built; "
                         "s/step = the trainer's mean over two steps (the first includes warm-up)."))

    for key, title, lines, notes in sections:
        print(f"{title}\n\n" + "\n".join(lines) + "\n")
        if args.results:
            write_section(args.results, key, title, "\n".join(lines), command_line(__file__, argv), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
