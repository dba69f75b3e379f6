"""Toy-world edit benchmark: local editing methods against plain img2img and diffusers' LEDITS++.

Cases come from the toy world's edit generator (color, shape, size, add, remove, in turn) on
rendered source scenes; every method edits the same cases in this one process. Scores (the toy
world's `score_edit`): success = the judge finds exactly the target scene; preservation = share of
untouched objects found unchanged; background PSNR = outside the changed objects' boxes (inf when
identical; the mean caps each case at 100 dB, the median is shown too); s/edit = wall time.

    HF_HUB_OFFLINE=1 python benchmarks/edits.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch

from _results import write_section
from atelier.edit.methods import Editor, EditSettings
from atelier.models import load_pipeline
from atelier.toyworld import EDIT_TYPES, edit_cases, render_pil, score_edit

CASE_SEED = 2024


def leditspp_runner(pipe, steps: int = 25, skip: float = 0.15, edit_guidance: float = 5.0, threshold: float = 0.9):
    """diffusers' LEditsPPPipelineStableDiffusion on the same components. LEDITS++ takes edit concepts,
    not a target caption: the target object's phrase is added, the source object's phrase removed.
    Its defaults (skip 0.15, edit guidance 5, threshold 0.9), 25 inversion steps like ours."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2)
    led = LEditsPPPipelineStableDiffusion(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    led.set_progress_bar_config(disable=True)

    def run(case, image, seed):
        concepts, reverse = [], []
        if case.kind == "add":
            concepts, reverse = [case.changed[0].phrase()], [False]
        elif case.kind == "remove":
            concepts, reverse = [case.changed[0].phrase()], [True]
        else:
            concepts, reverse = [case.changed[1].phrase(), case.changed[0].phrase()], [False, True]
        generator = torch.Generator("cpu").manual_seed(seed)
        led.invert(image=image, source_prompt=case.source_caption, num_inversion_steps=steps, skip=skip,
                   generator=generator, height=image.height, width=image.width)
        return led(editing_prompt=concepts, reverse_editing_direction=reverse, edit_guidance_scale=edit_guidance,
                   edit_threshold=threshold, generator=generator).images[0]

    return run


def methods_for(model: str, pipe, editor: Editor):
    def ours(**kw):
        return lambda case, image, seed: editor.edit(image, case.source_caption, case.target_caption,
                                                     EditSettings(seed=seed, **kw)).image

    if model == "toyworld-turbo":
        return {
            "one-step (inverter)": ours(method="one-step"),  # SwiftEdit with the built-in toyworld-inverter
            "turbo (4 steps, noise mask)": ours(method="turbo"),
            "turbo (4 steps, attention mask)": ours(method="turbo", mask_from="attention"),
            "turbo, no mask (inversion only)": ours(method="turbo", mask_from="none"),
            "img2img strength 0.5 (2 steps)": ours(method="img2img", strength=0.5),
            "img2img strength 0.75 (3 steps)": ours(method="img2img", strength=0.75),
        }
    return {
        "ddpm (noise mask)": ours(method="ddpm"),
        "ddpm (attention mask)": ours(method="ddpm", mask_from="attention"),
        "diffedit (ddim, noise mask)": ours(method="diffedit"),
        "img2img strength 0.6": ours(method="img2img", strength=0.6),
        "img2img strength 0.8": ours(method="img2img", strength=0.8),
        "diffusers LEDITS++": leditspp_runner(pipe),
    }


def speed(args) -> int:
    """Time per edit of the multi-step methods and the one-step method, interleaved case by case in
    this one process, so that machine noise hits them alike."""
    pipes = {m: load_pipeline(m) for m in ("toyworld", "toyworld-turbo")}
    editors = {m: Editor(p) for m, p in pipes.items()}
    runs = {"ddpm (toyworld, 25 steps x 0.8)": ("toyworld", "ddpm"), "diffedit (toyworld)": ("toyworld", "diffedit"),
            "turbo (toyworld-turbo, 4 steps)": ("toyworld-turbo", "turbo"),
            "one-step (toyworld-turbo + inverter)": ("toyworld-turbo", "one-step")}
    cases = edit_cases(args.speed, seed=CASE_SEED)
    totals = dict.fromkeys(runs, 0.0)
    for i, case in enumerate(cases):
        image = render_pil(case.source)
        names = list(runs)[i % len(runs):] + list(runs)[: i % len(runs)]
        for name in names:
            model, method = runs[name]
            started = time.perf_counter()
            editors[model].edit(image, case.source_caption, case.target_caption, EditSettings(method=method, seed=i))
            totals[name] += time.perf_counter() - started
    one = totals["one-step (toyworld-turbo + inverter)"]
    lines = [f"{args.speed} cases, methods interleaved case by case; torch {torch.__version__}, {args.threads} threads", "",
             f"{'method':<40} {'s/edit':>7} {'x one-step':>11}", "-" * 60]
    lines += [f"{name:<40} {t / len(cases):7.3f} {t / one:11.1f}" for name, t in totals.items()]
    table = "\n".join(lines)
    print(table)
    if args.results:
        write_section(args.results, "Edit speed (atelier.edit)", table,
                      f"HF_HUB_OFFLINE=1 python benchmarks/edits.py --speed {args.speed} --results benchmarks/RESULTS.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=250)
    parser.add_argument("--models", default="toyworld,toyworld-turbo")
    parser.add_argument("--only", help="run only methods whose name contains this text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", help="write the table into this markdown file's 'Edits' section")
    parser.add_argument("--speed", type=int, metavar="N", help="only time the multi-step and one-step methods on N cases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed:
        return speed(args)

    cases = edit_cases(args.cases, seed=CASE_SEED)
    sources = [render_pil(c.source) for c in cases]
    lines = [f"{args.cases} cases ({', '.join(EDIT_TYPES)} in turn; seed {CASE_SEED}), rendered 64x64 sources; "
             f"torch {torch.__version__}, {args.threads} threads", ""]
    header = f"{'model':<15} {'method':<34} {'success':>8} {'preserved':>9} {'bg PSNR':>8} {'median':>7} {'s/edit':>7}  " + \
             " ".join(f"{k:>6}" for k in EDIT_TYPES)
    lines += [header, "-" * len(header)]
    for model in args.models.split(","):
        pipe = load_pipeline(model)
        editor = Editor(pipe)
        for name, run in methods_for(model, pipe, editor).items():
            if args.only and args.only not in name:
                continue
            scores, by_kind, started = [], defaultdict(list), time.perf_counter()
            for i, (case, image) in enumerate(zip(cases, sources)):
                score = score_edit(case, run(case, image, i), image)
                scores.append(score)
                by_kind[case.kind].append(score.success)
            seconds = (time.perf_counter() - started) / len(cases)
            psnrs = [min(s.background_psnr, 100.0) for s in scores]
            row = (f"{model:<15} {name:<34} {sum(s.success for s in scores) / len(scores):8.1%} "
                   f"{statistics.mean(s.preservation for s in scores):9.1%} {statistics.mean(psnrs):8.1f} "
                   f"{statistics.median(psnrs):7.1f} {seconds:7.2f}  " +
                   " ".join(f"{sum(by_kind[k]) / max(1, len(by_kind[k])):6.0%}" for k in EDIT_TYPES))
            lines.append(row)
            print(row, flush=True)
    lines += ["", "bg PSNR: mean over cases with each capped at 100 dB (identical backgrounds are inf); "
              "success per kind on the right"]
    table = "\n".join(lines)
    print(table)
    if args.results:
        models = args.models.split(",")
        write_section(args.results, f"Edits (atelier.edit): {', '.join(models)}", table,
                      f"HF_HUB_OFFLINE=1 python benchmarks/edits.py --models {args.models} --results benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
