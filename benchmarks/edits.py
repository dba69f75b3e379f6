"""Toy-world edit benchmark: local editing methods against plain img2img and diffusers' LEDITS++.

Cases come from the toy world's edit generator (color, shape, size, add, remove, in turn) on
rendered source scenes; every method edits the same cases in this one process. With --partial N,
the contract's partial-caption cases instead: color, shape and size edits on scenes of 2-3 objects
whose source and target captions name only the edited object, as a user writes "make the red circle
blue"; every method gets those captions and nothing else, and must keep the unmentioned objects. Scores (the toy
world's `score_edit`): success = the judge finds exactly the target scene; preservation = share of
untouched objects found unchanged; background PSNR = outside the changed objects' boxes (inf when
identical; the mean caps each case at 100 dB, the median is shown too); s/edit = wall time of the
edit call alone (see TIME_NOTE).

    HF_HUB_OFFLINE=1 python benchmarks/edits.py --models toyworld --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --models toyworld-turbo --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --speed 20 --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --speed 2 --real-size sd-turbo --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --leditspp-check 20 --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --partial 60 --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --one-step-ablation 250 --partial 60 --results benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/edits.py --cases 5     # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from _results import check_command, command_line, write_section
from atelier.edit.methods import Editor, EditSettings
from atelier.models import load_pipeline
from atelier.toyworld import EDIT_TYPES, PARTIAL_EDIT_TYPES, edit_cases, render_pil, score_edit
from atelier.toyworld.edits import psnr
from atelier.toyworld.judge import judge

CASE_SEED = 2024


def leditspp_pipeline(pipe):
    """diffusers' LEditsPPPipelineStableDiffusion on the same components, with its SDE DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2)
    led = LEditsPPPipelineStableDiffusion(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    led.set_progress_bar_config(disable=True)
    return led


def leditspp_concepts(case) -> tuple[list[str], list[bool]]:
    """LEDITS++ takes edit concepts, not a target caption: the target object's phrase is added, the
    source object's phrase removed (for a partial-caption case: its target and source captions)."""
    if case.kind == "add":
        return [case.changed[0].phrase()], [False]
    if case.kind == "remove":
        return [case.changed[0].phrase()], [True]
    return [case.changed[1].phrase(), case.changed[0].phrase()], [False, True]


def leditspp_runner(pipe, steps: int = 25, skip: float = 0.15, edit_guidance: float = 5.0, threshold: float = 0.9,
                    source_prompt: bool = False, source_guidance: float = 3.5):
    """LEDITS++ with its defaults (skip 0.15, edit guidance 5, threshold 0.9), 25 inversion steps like ours.

    The inversion runs without a source prompt: diffusers' generation pass never applies the source
    prompt's guidance, so noise maps inverted under it (source_prompt=True, CFG `source_guidance`)
    do not reproduce the image even with the edit off (see `reconstruction_check`).
    run(case, image, seed, edit=False) turns the edit off (no edit concepts)."""
    led = leditspp_pipeline(pipe)

    def run(case, image, seed, edit: bool = True):
        generator = torch.Generator("cpu").manual_seed(seed)
        led.invert(image=image, source_prompt=case.source_caption if source_prompt else "",
                   source_guidance_scale=source_guidance, num_inversion_steps=steps, skip=skip,
                   generator=generator, height=image.height, width=image.width)
        if not edit:
            return led(editing_prompt=None, generator=generator).images[0]
        concepts, reverse = leditspp_concepts(case)
        return led(editing_prompt=concepts, reverse_editing_direction=reverse, edit_guidance_scale=edit_guidance,
                   edit_threshold=threshold, generator=generator).images[0]

    return run


def methods_for(model: str, pipe, editor: Editor):
    def ours(**kw):
        return lambda case, image, seed: editor.edit(image, case.source_caption, case.target_caption,
                                                     EditSettings(seed=seed, **kw)).image

    if model == "toyworld-turbo":
        from atelier.image_prompts.sources import model_adapter

        image_branch = {}
        if model_adapter(getattr(pipe, "name_or_path", None)) is not None:  # toyworld-ip: the source as image prompt
            own = Editor(load_pipeline(model))  # its own pipeline: the adapter stays out of the other methods' UNet
            image_branch = {"one-step (inverter, image branch)": lambda case, image, seed: own.edit(
                image, case.source_caption, case.target_caption,
                EditSettings(method="one-step", image_branch="on", seed=seed)).image}
        return {
            "one-step (inverter)": ours(method="one-step", image_branch="off"),  # SwiftEdit with toyworld-inverter
            **image_branch,
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


def evaluate_method(run, cases, sources) -> tuple[list, float]:
    """Scores of `run` on every case, and its wall time per edit: the run call alone (not the judge),
    after one untimed warm-up edit."""
    run(cases[0], sources[0], 0)
    scores, seconds = [], 0.0
    for i, (case, image) in enumerate(zip(cases, sources)):
        started = time.perf_counter()
        result = run(case, image, i)
        seconds += time.perf_counter() - started
        scores.append(score_edit(case, result, image))
    return scores, seconds / len(cases)


TIME_NOTE = ("s/edit: wall time of one whole edit call, after an untimed warm-up edit: everything the method does "
             "to the image, i.e. encoding the source image and the prompts, the inversion where the method inverts "
             "(ddpm, diffedit, turbo and LEDITS++ invert the image in full; one-step: one inverter call), mask "
             "estimation where it masks (noise or attention mask: {samples} UNet calls on a batch of 2, source and "
             "target prompt; LEDITS++: its own masks during denoising), the edit's denoising and decoding. Not "
             "included: loading the model (once per model, before timing) and judging the result.")


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
    for model, method in runs.values():  # warm-up, untimed
        editors[model].edit(render_pil(cases[0].source), cases[0].source_caption, cases[0].target_caption,
                            EditSettings(method=method, seed=0))
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
        write_section(args.results, "edit-speed", "Edit speed (atelier.edit)", table, command_line(__file__, args.argv),
                      TIME_NOTE.format(samples=EditSettings().mask_samples))
    return 0


class UnetWork:
    """Counts what an edit computes while installed: batch items through `unets` (the generator, the
    inverter), and the seconds spent in the VAE's encode and decode."""

    def __init__(self, unets, vae):
        self.unets, self.vae = unets, vae
        self.items, self.vae_seconds = 0, 0.0

    def __enter__(self):
        def count(module, args, kwargs):
            self.items += (args[0] if args else kwargs["sample"]).shape[0]

        self.hooks = [unet.register_forward_pre_hook(count, with_kwargs=True) for unet in self.unets]
        self.saved = {name: getattr(self.vae, name) for name in ("encode", "decode")}
        for name, call in self.saved.items():
            def timed(*a, _call=call, **k):
                started = time.perf_counter()
                try:
                    return _call(*a, **k)
                finally:
                    self.vae_seconds += time.perf_counter() - started
            setattr(self.vae, name, timed)
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        for name in self.saved:
            delattr(self.vae, name)  # the instance's wrapper goes; the class's method is back


def real_size_speed(args) -> int:
    """The speed comparison on a full-size architecture (atelier's bundled config, random weights): the
    multi-step methods and the one-step method (an inverter of the generator's architecture, saved and
    loaded as `atelier train inverter` writes one) on one pipeline, interleaved case by case. Only time
    means anything here: the pictures of random weights are noise."""
    import tempfile

    from diffusers import UNet2DConditionModel

    from _real_size import random_pipeline

    pipe = random_pipeline(args.real_size)
    editor = Editor(pipe)
    cases = edit_cases(args.speed, seed=CASE_SEED)
    sources = [render_pil(c.source).resize((args.size, args.size), Image.NEAREST) for c in cases]
    with tempfile.TemporaryDirectory() as inverter:
        UNet2DConditionModel.from_config(pipe.unet.config).save_pretrained(inverter)  # SwiftEdit: the generator's shape
        runs = {"ddpm (25 steps x 0.8, CFG 7.5)": EditSettings(method="ddpm", guidance_scale=7.5),
                "turbo (4 steps, noise mask)": EditSettings(method="turbo"),
                "one-step (inverter)": EditSettings(method="one-step", image_branch="off", inverter=inverter)}
        for settings in runs.values():  # warm-up, untimed
            editor.edit(sources[0], cases[0].source_caption, cases[0].target_caption, settings)
        unets = [pipe.unet, editor.one_step(inverter).inv.unet]
        totals = {name: [0.0, 0, 0.0] for name in runs}  # seconds, UNet batch items, VAE seconds
        for i, (case, image) in enumerate(zip(cases, sources)):
            names = list(runs)[i % len(runs):] + list(runs)[: i % len(runs)]
            for name in names:
                with UnetWork(unets, pipe.vae) as work:
                    started = time.perf_counter()
                    editor.edit(image, case.source_caption, case.target_caption, replace(runs[name], seed=i))
                    seconds = time.perf_counter() - started
                totals[name][0] += seconds
                totals[name][1] += work.items
                totals[name][2] += work.vae_seconds
                print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    n = len(cases)
    one = totals["one-step (inverter)"][0]
    unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    lines = [f"{args.real_size} architecture (atelier's bundled config, random weights, {unet:.0f} M UNet parameters), "
             f"{args.size}x{args.size} px, fp32; {n} cases, methods interleaved case by case; torch {torch.__version__}, "
             f"{args.threads} threads", "",
             f"{'method':<34} {'s/edit':>8} {'x one-step':>11} {'UNet items/edit':>16} {'VAE s/edit':>11}", "-" * 84]
    lines += [f"{name:<34} {t / n:8.2f} {t / one:11.1f} {items / n:16.0f} {vae / n:11.2f}"
              for name, (t, items, vae) in totals.items()]
    lines += ["", "UNet items: samples through a UNet (the generator's or the inverter's) per edit; a batch of 2 counts 2"]
    table = "\n".join(lines)
    print(table)
    if args.results:
        write_section(args.results, f"edit-speed-{args.real_size}", f"Edit speed at real size ({args.real_size})", table,
                      command_line(__file__, args.argv), TIME_NOTE.format(samples=EditSettings().mask_samples))
    return 0


def reconstruction_check(args) -> int:
    """LEDITS++ with its edit turned off must give back the source image (up to the VAE round trip)."""
    pipe = load_pipeline("toyworld")
    cases = edit_cases(args.leditspp_check, seed=CASE_SEED)
    sources = [render_pil(c.source) for c in cases]
    vae = leditspp_pipeline(pipe)
    settings = {
        "no source prompt (this benchmark)": dict(runner=leditspp_runner(pipe), edit=False),
        "source caption at CFG 3.5 (before)": dict(runner=leditspp_runner(pipe, source_prompt=True), edit=False),
        "no source prompt, edit guidance 0": dict(runner=leditspp_runner(pipe, edit_guidance=0.0), edit=True),
    }
    lines = [f"{len(cases)} edit cases' sources (seed {CASE_SEED}), toyworld, 25 inversion steps, skip 0.15; "
             f"torch {torch.__version__}, {args.threads} threads", "",
             f"{'inversion / generation':<38} {'PSNR mean':>9} {'median':>7} {'min':>6} {'source judged right':>20}",
             "-" * 84]
    for name, setting in settings.items():
        psnrs, right = [], 0
        for i, (case, image) in enumerate(zip(cases, sources)):
            result = setting["runner"](case, image, i, edit=setting["edit"])
            psnrs.append(min(psnr(np.asarray(image), np.asarray(result)), 100.0))
            right += judge(np.asarray(result), case.source).match
        lines.append(f"{name:<38} {statistics.mean(psnrs):9.1f} {statistics.median(psnrs):7.1f} {min(psnrs):6.1f} "
                     f"{right / len(cases):19.0%}")
        print(lines[-1], flush=True)
    vae_psnrs = [psnr(np.asarray(image), np.asarray(vae.invert(image=image, num_inversion_steps=1, height=image.height,
                                                                width=image.width).vae_reconstruction_images[0]))
                 for image in sources]
    lines += ["", f"VAE round trip alone (the best any latent method can do): PSNR mean {statistics.mean(vae_psnrs):.1f} dB"]
    table = "\n".join(lines)
    print(table)
    if args.results:
        notes = ("diffusers' LEditsPPPipelineStableDiffusion with the edit turned off (no edit concepts, or concepts at "
                 "edit guidance 0), PSNR of the whole 64x64 image against the source. Its generation pass denoises "
                 "with the unconditional prediction plus edit guidance only; it never applies the source prompt's "
                 "guidance, so noise maps inverted under the source caption at CFG 3.5 do not reproduce the image. "
                 "The toyworld edit table's LEDITS++ row used to invert that way (4.4 % success, 34.8 % preserved); "
                 "it now inverts without a source prompt.")
        write_section(args.results, "leditspp-reconstruction", "LEDITS++ reconstruction check (edit off)", table,
                      command_line(__file__, args.argv), notes)
    return 0


def method_rows(args, cases, kinds) -> list[str]:
    """The table's header and one row per model and method: every method edits every case."""
    sources = [render_pil(c.source) for c in cases]
    header = f"{'model':<15} {'method':<34} {'success':>8} {'preserved':>9} {'bg PSNR':>8} {'median':>7} {'s/edit':>7}  " + \
             " ".join(f"{k:>6}" for k in kinds)
    lines = [header, "-" * len(header)]
    for model in args.models.split(","):
        pipe = load_pipeline(model)
        editor = Editor(pipe)
        for name, run in methods_for(model, pipe, editor).items():
            if args.only and args.only not in name:
                continue
            scores, seconds = evaluate_method(run, cases, sources)
            lines.append(method_row(model, name, cases, scores, seconds, kinds))
            print(lines[-1], flush=True)
    return lines


def method_row(model: str, name: str, cases, scores, seconds: float, kinds) -> str:
    by_kind = defaultdict(list)
    for case, score in zip(cases, scores):
        by_kind[case.kind].append(score.success)
    psnrs = [min(s.background_psnr, 100.0) for s in scores]
    return (f"{model:<15} {name:<34} {sum(s.success for s in scores) / len(scores):8.1%} "
            f"{statistics.mean(s.preservation for s in scores):9.1%} {statistics.mean(psnrs):8.1f} "
            f"{statistics.median(psnrs):7.1f} {seconds:7.2f}  " +
            " ".join(f"{sum(by_kind[k]) / max(1, len(by_kind[k])):6.0%}" for k in kinds))


PSNR_NOTE = ("bg PSNR: mean over cases with each capped at 100 dB (identical backgrounds are inf); "
             "success per kind on the right")


def full_edits(args) -> int:
    cases = edit_cases(args.cases, seed=CASE_SEED)
    models = args.models.split(",")
    lines = [f"{args.cases} cases ({', '.join(EDIT_TYPES)} in turn; seed {CASE_SEED}), rendered 64x64 sources; "
             f"torch {torch.__version__}, {args.threads} threads", ""]
    lines += method_rows(args, cases, EDIT_TYPES)
    lines += ["", PSNR_NOTE]
    table = "\n".join(lines)
    print(table)
    if args.results:
        notes = TIME_NOTE.format(samples=EditSettings().mask_samples)
        if "toyworld" in models:
            notes += (" LEDITS++ (diffusers) inverts without a source prompt, the only way its generation pass "
                      "reproduces the source; see the LEDITS++ reconstruction check.")
        write_section(args.results, "edits-" + "+".join(models), f"Edits (atelier.edit): {', '.join(models)}", table,
                      command_line(__file__, args.argv), notes)
    return 0


PARTIAL_NOTE = ("Partial-caption edit cases (docs/toyworld.md): color, shape and size edits in turn on rendered "
                "scenes of 2-3 objects; the source and target captions name only the edited object (\"a large red "
                "circle at the top left\" -> \"a large blue circle at the top left\"), and every method gets exactly "
                "those captions, nothing else (img2img: the target caption; LEDITS++: the target caption as an edit "
                "concept added, the source caption as one removed). success: the judge finds the whole expected "
                "scene, the unmentioned objects included; preserved: share of the unmentioned objects found "
                "unchanged; bg PSNR outside the edited object's boxes. ")


def partial_edits(args) -> int:
    cases = edit_cases(args.partial, seed=CASE_SEED, partial=True)
    models = args.models.split(",")
    lines = [f"{args.partial} partial-caption cases ({', '.join(PARTIAL_EDIT_TYPES)} in turn; seed {CASE_SEED}), "
             f"rendered 64x64 sources of 2-3 objects; torch {torch.__version__}, {args.threads} threads", ""]
    lines += method_rows(args, cases, PARTIAL_EDIT_TYPES)
    lines += ["", PSNR_NOTE]
    table = "\n".join(lines)
    print(table)
    if args.results:
        notes = PARTIAL_NOTE + TIME_NOTE.format(samples=EditSettings().mask_samples)
        write_section(args.results, "partial-edits-" + "+".join(models),
                      f"Partial-caption edits (atelier.edit): {', '.join(models)}", table,
                      command_line(__file__, args.argv), notes)
    return 0


# What moved one-step editing on partial captions: each row adds one change to the one before.
ONE_STEP_STEPS = {
    "noise mask >= 0.5, source prompt outside (before)": dict(mask_from="noise", mask_threshold=0.5,
                                                               outside_prompt="source", noise_release=0.0),
    "+ mask times attention to the changed phrase, >= 0.6": dict(mask_from="both", mask_threshold=0.6,
                                                                  outside_prompt="source", noise_release=0.0),
    "+ edit prompt outside the mask (SwiftEdit's ARaM)": dict(mask_from="both", mask_threshold=0.6,
                                                               outside_prompt="target", noise_release=0.0),
    "+ noise release 1 (the defaults)": {},
    "defaults, but the noise mask alone": dict(mask_from="noise", mask_threshold=0.5),
    "defaults, one mask region (--mask-regions 1)": dict(mask_regions=1),
}


def one_step_ablation(args) -> int:
    """One-step editing on toyworld-turbo with the changes that took it to the partial-caption target,
    one at a time, on the full-caption and the partial-caption cases."""
    sets = {"full": edit_cases(args.one_step_ablation, seed=CASE_SEED),
            "partial": edit_cases(args.partial or 60, seed=CASE_SEED, partial=True)}
    sources = {name: [render_pil(c.source) for c in cases] for name, cases in sets.items()}
    editor = Editor(load_pipeline("toyworld-turbo"))
    header = f"{'one-step variant':<54} " + "  ".join(f"{name + ': success preserved':>27}" for name in sets)
    lines = [f"one-step (toyworld-turbo + toyworld-inverter, text only), {len(sets['full'])} full-caption and "
             f"{len(sets['partial'])} partial-caption cases (seed {CASE_SEED}); torch {torch.__version__}, "
             f"{args.threads} threads", "", header, "-" * len(header)]
    for name, changes in ONE_STEP_STEPS.items():
        cells = []
        for set_name, cases in sets.items():
            run = lambda case, image, seed: editor.edit(image, case.source_caption, case.target_caption, EditSettings(
                method="one-step", image_branch="off", seed=seed, **changes)).image
            scores, _ = evaluate_method(run, cases, sources[set_name])
            cells.append(f"{sum(s.success for s in scores) / len(scores):18.1%} "
                         f"{statistics.mean(s.preservation for s in scores):8.1%}")
        lines.append(f"{name:<54} " + "  ".join(cells))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.results:
        notes = ("Each row adds one change to the row before it (the last two rows change the defaults once more: the "
                 "attention taken away again; only the mask's connected region with the strongest response kept). "
                 "The mask: the inverter's noise difference |F(x0, target) - F(x0, source)|, times (\"both\") the "
                 "inverter's cross-attention to the phrase holding the changed words (edit.masks.phrase_positions). "
                 "Outside the mask the generator attends to the source prompt (before) or, as in SwiftEdit's ARaM, "
                 "to the edit prompt. Noise release: inside the mask the inverted noise moves away from its "
                 "inversion under the edit prompt (edit.one_step.released), when the edit replaces source words.")
        write_section(args.results, "one-step-ablation", "One-step editing: what moved partial-caption edits",
                      table, command_line(__file__, args.argv), notes)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=250, help="edit cases (default 250; e.g. 5 for a smoke run)")
    parser.add_argument("--models", default="toyworld,toyworld-turbo")
    parser.add_argument("--only", help="run only methods whose name contains this text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", help="write the table into this markdown file's section of this run (edits, partial edits, ...)")
    parser.add_argument("--speed", type=int, metavar="N", help="only time the multi-step and one-step methods on N cases")
    parser.add_argument("--real-size", metavar="CONFIG",
                        help="with --speed: time the methods on this full-size architecture (a bundled config: sd1, sd-turbo, ...; "
                             "random weights) instead of the toy models")
    parser.add_argument("--size", type=int, default=256, help="with --real-size: the images' side in pixels (default 256)")
    parser.add_argument("--leditspp-check", type=int, metavar="N",
                        help="only check that LEDITS++ with its edit off reconstructs N sources")
    parser.add_argument("--partial", type=int, metavar="N",
                        help="run N partial-caption edit cases (captions naming only the edited object) instead of --cases")
    parser.add_argument("--one-step-ablation", type=int, metavar="N",
                        help="one-step editing's changes one at a time on N full-caption cases and --partial (60) partial ones")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.results:
        check_command(__file__, args.argv)
    modes = {name: value for name, value in (("--speed", args.speed), ("--leditspp-check", args.leditspp_check),
                                             ("--one-step-ablation", args.one_step_ablation),
                                             ("--partial", None if args.one_step_ablation else args.partial))
             if value is not None}
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} are separate runs; give one")
    if min([args.cases, *modes.values(), args.partial or 1]) < 1:
        parser.error("--cases, --speed, --leditspp-check, --one-step-ablation and --partial take a positive number")
    if args.real_size and not args.speed:
        parser.error("--real-size goes with --speed N")
    if args.real_size:
        from atelier.models.loader import bundled_config_names

        if args.real_size not in bundled_config_names():
            parser.error(f"--real-size: no bundled config {args.real_size!r}; choose from {', '.join(bundled_config_names())}")
    if args.size < 8 or args.size % 8:
        parser.error("--size takes a positive multiple of 8")
    torch.set_num_threads(args.threads)
    if args.one_step_ablation:
        return one_step_ablation(args)
    if args.speed:
        return real_size_speed(args) if args.real_size else speed(args)
    if args.leditspp_check:
        return reconstruction_check(args)
    if args.partial:
        return partial_edits(args)
    return full_edits(args)


if __name__ == "__main__":
    sys.exit(main())
