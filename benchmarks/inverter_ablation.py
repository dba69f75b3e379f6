"""One-step editing (SwiftEdit) with inverters trained differently, on the same toy edit cases.

Each variant is an inverter folder (its `atelier.json` names the IP-Adapter it was trained with, if
any) and an image-branch mode: `off` (text only), `on` (the source image as the generator's image
prompt through the inverter's adapter, or the model's own `toyworld-ip`, weighed by ARaM). Every
variant edits the same full-caption cases (`--cases`, seed 2024 as benchmarks/edits.py) and the
contract's partial-caption cases (`--partial`), on its own fresh `toyworld-turbo` pipeline. Reported:
success, preservation, background PSNR (`score_edit`), inversion PSNR (render -> VAE -> F -> G -> decode
against the render, with the source caption and, with the branch, the source as image prompt) and
s/edit, with its ratio to the 4-step turbo method (the best multi-step method) timed in the same run.

    HF_HUB_OFFLINE=1 python benchmarks/inverter_ablation.py \
        --variant "shipped=toyworld-inverter:off" --variant "b=runs/ablation2/b/stage2/final:on" \
        --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch

from _results import check_command, command_line, write_section
from edits import CASE_SEED, evaluate_method
from atelier.edit.methods import Editor, EditSettings
from atelier.models import load_pipeline
from atelier.toyworld import edit_cases, render_pil
from atelier.toyworld.edits import psnr

MODEL = "toyworld-turbo"


def parse_variant(text: str) -> tuple[str, str, str]:
    name, sep, rest = text.partition("=")
    folder, _, mode = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ("on", "off", "auto") else (rest, "", "off")
    if not sep or not name or not folder:
        raise SystemExit(f"--variant {text!r}: expected NAME=INVERTER[:on|off]")
    return name, folder, mode or "off"


@torch.no_grad()
def inversion_psnr(editor: Editor, inverter: str, mode: str, cases, sources) -> float:
    one = editor.one_step(inverter)
    adapters = one.image_branch(mode)
    values = []
    for case, image in zip(cases, sources):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        z = editor.den.encode_image(x)
        out = editor.den.decode_latents(one.reconstruct(z, case.source_caption, image=image, adapters=adapters))
        rec = ((out[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        values.append(min(100.0, psnr(np.asarray(image), rec)))
    return float(np.mean(values))


def summarize(scores) -> dict:
    return {"success": 100 * np.mean([s.success for s in scores]),
            "preserved": 100 * np.mean([s.preservation for s in scores]),
            "bg_psnr": statistics.fmean(min(100.0, s.background_psnr) for s in scores)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=INVERTER[:on|off]")
    p.add_argument("--cases", type=int, default=250)
    p.add_argument("--partial", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results")
    args = p.parse_args(argv)
    if args.results:
        check_command(__file__, argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant]
    full = edit_cases(args.cases, seed=CASE_SEED)
    partial = edit_cases(args.partial, seed=CASE_SEED, partial=True)
    full_src = [render_pil(c.source) for c in full]
    partial_src = [render_pil(c.source) for c in partial]

    baseline = Editor(load_pipeline(MODEL))
    turbo = lambda case, image, seed: baseline.edit(image, case.source_caption, case.target_caption,  # noqa: E731
                                                    EditSettings(method="turbo", seed=seed)).image
    _, turbo_seconds = evaluate_method(turbo, full[:50], full_src[:50])

    header = (f"{'variant':<34} {'full: success':>13} {'preserved':>9} {'bg PSNR':>7}   {'partial: success':>16} "
              f"{'preserved':>9} {'bg PSNR':>7}   {'inversion PSNR':>14} {'s/edit':>7} {'vs turbo':>8}")
    lines = [header]
    for name, inverter, mode in variants:
        editor = Editor(load_pipeline(MODEL))

        def run(case, image, seed, editor=editor, inverter=inverter, mode=mode):
            return editor.edit(image, case.source_caption, case.target_caption,
                               EditSettings(method="one-step", inverter=inverter, image_branch=mode, seed=seed)).image

        full_scores, seconds = evaluate_method(run, full, full_src)
        partial_scores, _ = evaluate_method(run, partial, partial_src)
        f, q = summarize(full_scores), summarize(partial_scores)
        inv = inversion_psnr(editor, inverter, mode, full, full_src)
        lines.append(f"{name + ' (' + mode + ')':<34} {f['success']:12.1f}% {f['preserved']:8.1f}% {f['bg_psnr']:7.1f}   "
                     f"{q['success']:15.1f}% {q['preserved']:8.1f}% {q['bg_psnr']:7.1f}   {inv:11.1f} dB "
                     f"{seconds:7.3f} {turbo_seconds / seconds:7.1f}x")
        print(lines[-1], flush=True)
    lines.append(f"turbo (4 steps, noise mask): {turbo_seconds:.3f} s/edit on the first 50 full cases, same process")
    if args.results:
        notes = (f"{args.cases} full-caption edit cases and {args.partial} partial-caption cases (seed {CASE_SEED}), "
                 f"one-step editing on `{MODEL}`, each variant on a fresh pipeline; 'vs turbo' = how many times faster "
                 "than the 4-step turbo method. Variants: see docs/image-prompts.md (the ablation).")
        write_section(args.results, "inverter-ablation", "One-step editing: inverter and image-branch ablation",
                      "\n".join(lines), command_line(__file__, argv), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
