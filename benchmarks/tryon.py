"""Virtual try-on on the toy world, measured (issue 16, part 3; docs/tryon.md "Measured").

data        WORK/data: the toy try-on set in VITON-HD's layout (`write_tryon_data(n=--train-n, test_n=--test-n,
            seed=0)`), reused when WORK/data/tryon.json records the same settings.
train       four runs of `train_tryon` on it from the toy base (1500 steps, batch 16; the settings of
            `atelier train tryon ... --checkpointing_steps 250 --checkpoints_total_limit 2 --validation_steps 500`):
            catvton (attention-only), ootd (garment UNet trained), catvton-full (--trainable all),
            ootd-frozen (--freeze_garment_unet), in WORK/<variant>. Finished runs are reused; a run another
            process is training (an `atelier train tryon` whose --output_dir is that folder) is waited for.
toy         catvton and ootd on every test pair (paired and unpaired) at the method's guidance and
            --infer-steps steps, then `evaluate_tryon`: judge success / garment right / preserved, paired
            SSIM / LPIPS / FID / KID, unpaired FID / KID, seconds per image.
cfg         both methods at guidance 1.0 / 1.5 / 2.5 / 3.5 on the first --cfg-pairs paired and unpaired pairs:
            the judge's scores.
ablations   ootd vs ootd-frozen, catvton vs catvton-full on every test pair: the judge's scores, trainable
            parameters, training seconds per step.
shipped     the built-in `toyworld-tryon` as installed, scored like the toy part, with its training history (its
            tryon.json: the runs it was trained and fine-tuned with).
memory      one training step of the full-size SD 1.5-inpainting UNet at 256x192 (benchmarks/_tryon_memory.py):
            attention-only vs full, with and without gradient checkpointing, each in its own process.

Results are written in the evaluation layout, WORK/results/<variant>/steps<S>-g<G>/{paired,unpaired}/
<person>__<garment>.png (one folder per sampling setting, shared by the parts), each image's sampling
time in timing.json beside them; existing results are kept, so an interrupted run resumes. When a model
is retrained, its old results are removed. Without the train part, the parts need finished runs.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/tryon.py --work runs/tryon --results benchmarks/RESULTS.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/tryon.py --work /tmp/tb --steps 4 --train-n 32 \\
        --test-n 8 --cfg-pairs 2 --infer-steps 4 --skip memory                                    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from _results import check_command, command_line, write_section
from atelier.core.images import save_png
from atelier.core.io import atomic_write_bytes

PARTS = ("data", "train", "toy", "cfg", "ablations", "shipped", "memory")
SHIPPED = "toyworld-tryon"  # the built-in model the shipped part measures
# variant -> (method, options beyond the method's defaults)
VARIANTS = {"catvton": ("catvton", {}), "ootd": ("ootd", {}),
            "catvton-full": ("catvton", {"trainable": "all"}), "ootd-frozen": ("ootd", {"freeze_garment_unet": True})}
DESCRIBED = {"catvton": "attention-only (default)", "catvton-full": "every parameter (--trainable all)",
             "ootd": "both UNets, all (default)", "ootd-frozen": "try-on UNet only (--freeze_garment_unet)"}
# The run settings: those of `atelier train tryon --max_train_steps 1500 --train_batch_size 16
# --validation_steps 500 --checkpointing_steps 250 --checkpoints_total_limit 2` (every other option its default).
RUN = dict(base="toyworld", train_batch_size=16, checkpointing_steps=250, checkpoints_total_limit=2, validation_steps=500)
GUIDANCES = (1.0, 1.5, 2.5, 3.5)
SPLITS = ("paired", "unpaired")
TARGETS = "Targets (issue 16): paired success >= 85 %, unpaired success >= 80 %, preservation >= 99 %."
MEMORY_CATVTON = 49.57  # CatVTON's attention-only parameter count of SD 1.5-inpainting, millions
WAIT_SECONDS = 60


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def data_settings(train_n: int, test_n: int) -> dict:
    return {"seed": 0, "train": train_n, "test_paired": test_n, "test_unpaired": test_n}


def ensure_data(data: Path, train_n: int, test_n: int, *, write: bool) -> dict:
    """WORK/data with these settings: reused when its tryon.json records them, else written (or, with
    `write` off, refused)."""
    from atelier.toyworld.tryon import write_tryon_data

    manifest, want = data / "tryon.json", data_settings(train_n, test_n)
    have = json.loads(manifest.read_text()) if manifest.is_file() else None
    if have is not None and all(have.get(k) == v for k, v in want.items()) and (data / "test" / "cases.jsonl").is_file():
        log(f"data: reusing {data} ({train_n} training cases, {test_n} + {test_n} test cases)")
        return have
    if not write:
        found = "no tryon.json" if have is None else "other settings (" + ", ".join(f"{k} {have.get(k)}" for k in want) + ")"
        raise SystemExit(f"tryon.py: error: {data} has {found}; run the data part (drop --skip data)")
    start = time.perf_counter()
    summary = write_tryon_data(data, n=train_n, test_n=test_n, seed=0)
    log(f"data: wrote {data} in {time.perf_counter() - start:.0f} s")
    return summary


def slot_sizes(cases: list[dict]) -> dict:
    """Share (%) of each slot size among the test persons (paired and unpaired show the same persons)."""
    sizes = Counter(r["slot"]["size"] for r in cases if r["split"] == "paired")
    total = sum(sizes.values())
    return {size: 100.0 * n / total for size, n in sorted(sizes.items())}


# ----------------------------------------------------------------------------- training


def train_config(variant: str, data: Path, out: Path, steps: int, threads: int):
    """The variant's TryOnTrainConfig. `data` is recorded resolved (symlinks followed), as a run started with
    the data folder's real path records it, so train_tryon's settings check accepts that run."""
    from atelier.train.tryon import TryOnTrainConfig

    method, options = VARIANTS[variant]
    return TryOnTrainConfig(method=method, data=str(data.resolve()), output_dir=str(out), max_train_steps=steps,
                            threads=threads, **RUN, **options)


def training_elsewhere(out: Path) -> int | None:
    """The id of another process running `atelier train tryon --output_dir OUT` (Linux /proc), or None."""
    target = out.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            args = [a.decode("utf-8", "replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "tryon" not in args:
            continue
        for i, arg in enumerate(args):
            value = args[i + 1] if arg == "--output_dir" and i + 1 < len(args) else \
                arg.split("=", 1)[1] if arg.startswith("--output_dir=") else None
            if value and (Path(cwd) / value).resolve() == target:
                return int(proc.name)
    return None


def wait_for_other(out: Path) -> None:
    while (pid := training_elsewhere(out)) is not None:
        log(f"{out}: being trained by process {pid}; checking again in {WAIT_SECONDS} s")
        time.sleep(WAIT_SECONDS)


def ensure_run(variant: str, work: Path, data: Path, steps: int, threads: int, *, train: bool) -> dict:
    """The finished run of `variant` (its done.json), trained or resumed here when `train`."""
    from atelier.train.tryon import train_tryon

    out = work / variant
    wait_for_other(out)
    if not (out / "done.json").is_file():
        if not train:
            raise SystemExit(f"tryon.py: error: {out} holds no finished run (no done.json); run the train part "
                             "(drop --skip train)")
        log(f"train: {variant} ({steps} steps) in {out}")
        start = time.perf_counter()
        train_tryon(train_config(variant, data, out, steps, threads))
        log(f"train: {variant} done in {(time.perf_counter() - start) / 60:.1f} min")
    done = json.loads((out / "done.json").read_text())
    if not (out / "final" / "tryon.json").is_file():
        raise SystemExit(f"tryon.py: error: {out} has done.json but no final/ model folder")
    return done


def trainable_count(model, run: Path) -> tuple[int, int]:
    """(trained parameters, all parameters) of the run's model, the trained ones chosen as train_tryon
    chose them from its settings.json (method's set, a widened conv_in, the garment UNet frozen or not)."""
    settings = json.loads((run / "settings.json").read_text())
    options, net = settings["options"], model.net
    extra = [net.unet.conv_in.weight, net.unet.conv_in.bias] if settings.get("widened_conv_in") else []
    if model.method == "ootd":
        params = net.trainable(options["trainable"], extra, freeze_garment_unet=bool(options["freeze_garment_unet"]))
    else:
        params = net.trainable(options["trainable"], extra)
    unique = {id(p): p for p in params}
    return sum(p.numel() for p in unique.values()), sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- sampling


def pairs_of(data: Path, split: str, limit: int | None = None) -> list[tuple[str, str]]:
    from atelier.toyworld.tryon import PAIRS_FILES, read_pairs

    pairs = read_pairs(data / PAIRS_FILES[split])
    return pairs[:limit] if limit is not None else pairs


class Sampler:
    """One model's results folders (one per sampling setting): a variant's run (WORK/<variant>/final) or,
    with `source`, any try-on model folder or built-in name."""

    def __init__(self, variant: str, work: Path, done: dict, steps: int, source=None):
        self.variant, self.work, self.steps = variant, work, steps
        self.run = work / variant
        self.source = source if source is not None else self.run / "final"
        self.root = work / "results" / variant
        self._model = None
        identity = {k: done.get(k) for k in ("steps", "wall_time_s", "final_loss", "model_record")}
        record = self.root / "model.json"
        if record.is_file() and json.loads(record.read_text()) != identity:
            log(f"{variant}: the model was retrained since its results were drawn; removing them")
            for old in self.root.iterdir():
                if old.is_dir():
                    shutil.rmtree(old)
        atomic_write_bytes(record, json.dumps(identity, indent=2).encode("utf-8"))

    @property
    def model(self):
        if self._model is None:
            from atelier.tryon import load_tryon_model

            self._model = load_tryon_model(self.source, device="cpu")
        return self._model

    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def info(self) -> dict:
        from atelier.tryon.model import INFO_FILE, resolve_tryon_folder

        return json.loads((resolve_tryon_folder(self.source) / INFO_FILE).read_text())

    def default_guidance(self) -> float:
        from atelier.tryon.model import DEFAULTS

        return float({**DEFAULTS[self.method], **self.info.get("defaults", {})}["guidance"])

    def folder(self, guidance: float) -> Path:
        return self.root / f"steps{self.steps}-g{guidance:g}"

    def draw(self, data: Path, guidance: float, limit: int | None = None) -> Path:
        """Results of the first `limit` pairs (all by default) of each setting at `guidance`, those
        missing drawn now (seed: the pair's line number in its pairs file); their times in timing.json."""
        from atelier.toyworld.tryon import result_name
        from atelier.tryon import try_on

        folder = self.folder(guidance)
        timing_file = folder / "timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        todo = [(split, k, p, g) for split in SPLITS for k, (p, g) in enumerate(pairs_of(data, split, limit))
                if not (folder / split / result_name(p, g)).is_file()]
        if todo:
            log(f"{self.variant}: drawing {len(todo)} results at guidance {guidance:g}, {self.steps} steps")
        for n, (split, k, person, garment) in enumerate(todo):
            name = result_name(person, garment)
            test = data / "test"
            start = time.perf_counter()
            image = try_on(self.model, test / "image" / person, test / "cloth" / garment,
                           test / "agnostic-mask" / f"{Path(person).stem}_mask.png", steps=self.steps, guidance=guidance, seed=k)
            timing[f"{split}/{name}"] = time.perf_counter() - start
            save_png(image, folder / split / name, f"try-on {self.variant} ({self.method}), steps: {self.steps}, "
                     f"guidance: {guidance:g}, seed: {k}, person: {person}, garment: {garment}")
            atomic_write_bytes(timing_file, json.dumps(timing, indent=1).encode("utf-8"))
            if (n + 1) % 50 == 0:
                log(f"{self.variant}: {n + 1} / {len(todo)}")
        return folder

    def seconds_per_image(self, guidance: float, names: list[str]) -> float | None:
        file = self.folder(guidance) / "timing.json"
        timing = json.loads(file.read_text()) if file.is_file() else {}
        times = [timing[n] for n in names if n in timing]
        return float(np.mean(times)) if times else None


def result_names(data: Path, limit: int | None = None) -> list[str]:
    from atelier.toyworld.tryon import result_name

    return [f"{split}/{result_name(p, g)}" for split in SPLITS for p, g in pairs_of(data, split, limit)]


def judge_folder(folder: Path, cases: list[dict], names: list[str]) -> dict:
    """The judge's success / garment right / preserved (%) per setting over the cases named `names`."""
    from atelier.toyworld.tryon import read_result, score_tryon

    wanted = set(names)
    out = {}
    for split in SPLITS:
        rows = [r for r in cases if r["split"] == split and r["result"] in wanted]
        scores = [score_tryon(read_result(folder / r["result"]), r["case"]) for r in rows]
        out[split] = {"cases": len(rows), **{k: 100.0 * float(np.mean([s[k] for s in scores])) if scores else float("nan")
                                              for k in ("success", "garment_right", "preserved")}}
    return out


def machine_free(text: str) -> str:
    """`text` without this machine's home folder (RESULTS.md names no paths of this machine)."""
    return text.replace(str(Path.home()), "~")


def fmt(value, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}{spec}}"


def judged(scores: dict, split: str) -> str:
    s = scores[split]
    return f"{s['success']:7.1f} {s['garment_right']:7.1f} {s['preserved']:7.1f}"


def toy_header(first: str) -> list[str]:
    return [f"{'':<21}  {'-------------------- paired ---------------------':<57}  {'----------- unpaired ------------':<42}",
            f"{first:<8} {'steps':>5} {'guid.':>5}  {'success':>7} {'garment':>7} {'kept':>7} {'SSIM':>7} {'LPIPS':>7} "
            f"{'FID':>8} {'KID':>8}  {'success':>7} {'garment':>7} {'kept':>7} {'FID':>8} {'KID':>8}  {'s/image':>7}",
            "-" * 133]


def toy_row(name: str, steps: int, guidance: float, r: dict, seconds) -> str:
    """One row of the toy table from `evaluate_tryon`'s report `r`."""
    pa, un = r["paired"], r["unpaired"]
    return (f"{name:<8} {steps:>5} {guidance:5g}  {judged(r['judge'], 'paired')} {pa['ssim']:7.4f} "
            f"{fmt(pa['lpips'], '.4f', 7)} {fmt(pa['fid'], '.2f', 8)} {fmt(pa['kid'], '.4f', 8)}  "
            f"{judged(r['judge'], 'unpaired')} {fmt(un['fid'], '.2f', 8)} {fmt(un['kid'], '.4f', 8)}  {fmt(seconds, '.2f', 7)}")


def training_history(info: dict) -> str:
    """How a try-on model was trained, oldest run first, from its tryon.json (`trained_with`, `steps`, and
    `fine_tuned_from` for each run it was fine-tuned from)."""
    runs, record = [], info
    while record:
        runs.append(record)
        record = record.get("fine_tuned_from")
    parts = []
    for n, run in enumerate(reversed(runs)):
        options = run.get("trained_with") or {}
        what = (f"{options.get('method', info.get('method'))}"
                + (", garment UNet frozen" if options.get("freeze_garment_unet") else "")
                + f", trainable {options.get('trainable')}") if n == 0 else "fine-tuned"
        lr = options.get("learning_rate")
        schedule = options.get("lr_scheduler", "constant")
        parts.append(f"{run.get('steps')} steps ({what}; batch {options.get('train_batch_size')}, learning rate "
                     f"{lr:g} {schedule}) from {options.get('base')}" if lr is not None else f"{run.get('steps')} steps")
    return ", then ".join(parts)


# ----------------------------------------------------------------------------- memory


def memory_lines(threads: int, steps: int) -> tuple[list[str], str]:
    import _tryon_memory

    rows = []
    for mode in _tryon_memory.MODES:
        for checkpointing in (False, True):
            rows.append(_tryon_memory.measure(mode, checkpointing, threads, steps))
            r = rows[-1]
            log(f"memory: {mode} ckpt {checkpointing}: {r['seconds_per_step']:.1f} s/step, peak {r['peak_gb']:.2f} GB")
    lines = [f"{'trained':<15} {'gradient ckpt':>13} {'trainable M':>12} {'s/step':>8} {'weights GB':>11} {'peak GB':>8} "
             f"{'training adds GB':>17}", "-" * 90]
    for r in rows:
        name = "attention-only" if r["mode"] == "attention" else "full"
        lines.append(f"{name:<15} {'on' if r['gradient_checkpointing'] else 'off':>13} {r['trainable'] / 1e6:12.2f} "
                     f"{r['seconds_per_step']:8.1f} {r['weights_gb']:11.2f} {r['peak_gb']:8.2f} "
                     f"{r['peak_gb'] - r['weights_gb']:17.2f}")
    attention = next(r["trainable"] for r in rows if r["mode"] == "attention")
    verdict = "matches" if round(attention / 1e6, 2) == MEMORY_CATVTON else "DOES NOT match"
    total = rows[0]["total_params"]
    notes = (f"One training step (forward, backward, AdamW) of the full-size SD 1.5-inpainting UNet architecture "
             f"(atelier's bundled SD 1.5 config, 9 input channels, random weights, fp32, {total / 1e6:.2f} M parameters), "
             f"batch 1 at 256x192 px: CatVTON's [person | garment] canvas, 32x48 latents; {threads} thread(s); each row "
             f"in its own process (benchmarks/_tryon_memory.py). Attention-only trains the self-attention layers: "
             f"{attention:,} parameters, which {verdict} CatVTON's {MEMORY_CATVTON} M. Weights = the process's RSS once "
             f"the UNet is built; peak = its maximum RSS; training adds = peak - weights (gradients, AdamW's two "
             f"moments, activations). s/step = the last of {steps} step(s)" + (" (the first includes warm-up)." if steps == 1 else "."))
    return lines, notes


# ----------------------------------------------------------------------------- main


def parts_of(args, p) -> list[str]:
    if args.only and args.skip:
        p.error("--only and --skip exclude each other")
    chosen = args.only.split(",") if args.only else [x for x in PARTS if x not in args.skip.split(",")]
    unknown = [x for x in (args.only or args.skip).split(",") if x and x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    return [x for x in PARTS if x in chosen]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", metavar="DIR", required=True, help="data, training runs and results (all reused)")
    p.add_argument("--train-n", type=int, default=4000, help="training cases of the data set")
    p.add_argument("--test-n", type=int, default=100, help="test persons (paired and unpaired pairs each)")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    p.add_argument("--infer-steps", type=int, default=20, help="sampling steps of every result")
    p.add_argument("--cfg-pairs", type=int, default=50, help="pairs per setting (paired, unpaired) in the cfg part")
    p.add_argument("--memory-steps", type=int, default=1, help="training steps per memory configuration")
    p.add_argument("--only", default="", help=f"parts to run: {','.join(PARTS)}")
    p.add_argument("--skip", default="", help="parts to skip")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", help="write the RESULTS.md sections here")
    args = p.parse_args(argv)
    parts = parts_of(args, p)
    if args.results:
        check_command(__file__, argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "data"
    command = command_line(__file__, argv) if args.results else None

    def section(key, title, lines, notes):
        print(f"{title}\n\n" + "\n".join(lines) + "\n", flush=True)
        if args.results:
            write_section(args.results, key, title, "\n".join(lines), command, notes)

    needs_models = {"toy": ["catvton", "ootd"], "cfg": ["catvton", "ootd"], "ablations": list(VARIANTS), "shipped": []}
    evaluated = [x for x in parts if x in needs_models]
    if "train" in parts or "data" in parts or evaluated:
        manifest = ensure_data(data, args.train_n, args.test_n, write="data" in parts)
    wanted = [v for v in VARIANTS if "train" in parts or any(v in needs_models[x] for x in evaluated)]
    runs = {v: ensure_run(v, work, data, args.steps, args.threads, train="train" in parts) for v in wanted}
    if not evaluated:
        if "memory" in parts:
            section("tryon-memory", "Try-on: one training step at real size", *memory_lines(args.threads, args.memory_steps))
        return 0

    from atelier.toyworld.tryon import read_tryon_cases

    cases = read_tryon_cases(data)
    samplers = {v: Sampler(v, work, runs[v], args.infer_steps) for v in VARIANTS if any(v in needs_models[x] for x in evaluated)}
    every = result_names(data)
    n_pairs = {s: len(pairs_of(data, s)) for s in SPLITS}
    judged_all: dict = {}

    if "toy" in parts:
        from atelier.evaluate.tryon import evaluate_tryon

        lines = toy_header("method")
        missing = {}
        for v in ("catvton", "ootd"):
            s = samplers[v]
            g = s.default_guidance()
            r = evaluate_tryon(s.draw(data, g), data, features="toyworld")
            judged_all[(v, g)] = r["judge"]
            missing.update(r["missing"])
            lines.append(toy_row(v, args.infer_steps, g, r, s.seconds_per_image(g, every)))
            log(lines[-1])
        sizes = slot_sizes(cases)
        large = sizes.get("large", 0.0)
        notes = (f"Trained runs: {runs['catvton'].get('steps')} steps, batch 16, from the toy base "
                 f"({manifest.get('train')} training cases). "
                 f"{n_pairs['paired']} paired and {n_pairs['unpaired']} unpaired test pairs, one result each at the "
                 f"method's guidance and {args.infer_steps} DDIM steps (seed: the pair's line number). "
                 f"success / garment / kept: the judge's success, garment right (shape and colour at the slot, any "
                 f"size) and preserved (every other object unchanged), %. SSIM, LPIPS: each paired result against its "
                 f"person image; FID / KID: the results against the {n_pairs['paired']} test person images, "
                 f"toyworld-clip features (`evaluate_tryon(..., features=\"toyworld\")`). s/image: the `try_on` call "
                 f"(VAE and sampling), {args.threads} thread(s), mean over all results. {TARGETS}\n\n"
                 f"The contract's inputs do not show the slot's size (the mask hides the whole cell; every garment is a "
                 f"large product shot), so success is bounded by the share of slots of the size a method draws: in "
                 f"these test cases {large:.0f} % of the slots are large ("
                 + ", ".join(f"{k} {x:.0f} %" for k, x in sizes.items()) + "); garment right is the score without "
                 "the size." + "".join(f"\n\nLPIPS: n/a — {machine_free(reason)}" for key, reason in missing.items()
                                       if key == "lpips"))
        section("tryon-toy", "Try-on: CatVTON and OOTDiffusion on the toy world", lines, notes)

    if "cfg" in parts:
        subset = result_names(data, args.cfg_pairs)
        lines = [f"{'':<8} {'':>8}  {'-------- paired --------':>23}  {'------- unpaired -------':>23}",
                 f"{'method':<8} {'guidance':>8}  {'success':>7} {'garment':>7} {'kept':>7}  {'success':>7} {'garment':>7} "
                 f"{'kept':>7} {'s/image':>8}", "-" * 78]
        for v in ("catvton", "ootd"):
            s = samplers[v]
            for g in GUIDANCES:
                folder = s.draw(data, g, args.cfg_pairs)
                scores = judge_folder(folder, cases, subset)
                lines.append(f"{v:<8} {g:8g}  {judged(scores, 'paired')}  {judged(scores, 'unpaired')} "
                             f"{fmt(s.seconds_per_image(g, subset), '.2f', 8)}")
                log(lines[-1])
        per = min(args.cfg_pairs, n_pairs["paired"])
        notes = (f"The first {per} paired and {min(args.cfg_pairs, n_pairs['unpaired'])} unpaired test pairs, one result "
                 f"each at {args.infer_steps} DDIM steps (seed: the pair's line number), guidance on the garment (the "
                 "unconditional branch has zero garment latents; 1.0 is one UNet call per step). Defaults: catvton "
                 "2.5, ootd 2.0. success / garment / kept as in the toy table (%); no FID on these subsets.")
        section("tryon-cfg", "Try-on: guidance on the garment", lines, notes)

    if "ablations" in parts:
        lines = [f"{'variant':<13} {'trains':<42} {'trainable M':>11} {'s/step':>7}  "
                 f"{'paired: success':>15} {'garment':>7} {'kept':>7}  {'unpaired: success':>17} {'garment':>7} {'kept':>7}",
                 "-" * 142]
        for v in ("ootd", "ootd-frozen", "catvton", "catvton-full"):
            s = samplers[v]
            g = s.default_guidance()
            folder = s.draw(data, g)
            scores = judged_all.get((v, g)) or judge_folder(folder, cases, every)
            trained, total = trainable_count(s.model, s.run)
            lines.append(f"{v:<13} {DESCRIBED[v]:<42} {trained / 1e6:11.2f} {runs[v].get('seconds_per_step', float('nan')):7.2f}  "
                         f"{scores['paired']['success']:15.1f} {scores['paired']['garment_right']:7.1f} "
                         f"{scores['paired']['preserved']:7.1f}  {scores['unpaired']['success']:17.1f} "
                         f"{scores['unpaired']['garment_right']:7.1f} {scores['unpaired']['preserved']:7.1f}")
            log(lines[-1])
        notes = (f"Each variant trained with the same data, steps ({runs['catvton'].get('steps')}) and batch (16) from the toy base; one "
                 f"change from its method's defaults. {n_pairs['paired']} paired and {n_pairs['unpaired']} unpaired test "
                 f"pairs at the method's guidance, {args.infer_steps} DDIM steps; success / garment / kept as in the toy "
                 "table (%). trainable M: the parameters the run trained (its settings.json: the method's set, the "
                 "widened conv_in of a text-to-image base, the garment UNet unless frozen), in millions. s/step: the "
                 "run's wall time per step from its done.json (validation grids and checkpoints included; runs trained "
                 "side by side share the CPU).")
        section("tryon-ablations", "Try-on: what trains (ablations)", lines, notes)

    if "shipped" in parts:
        import hashlib

        from atelier.evaluate.tryon import evaluate_tryon
        from atelier.tryon.model import INFO_FILE, resolve_tryon_folder

        text = (resolve_tryon_folder(SHIPPED) / INFO_FILE).read_text(encoding="utf-8")
        s = Sampler("shipped", work, {"model_record": hashlib.sha256(text.encode()).hexdigest()}, args.infer_steps,
                    source=SHIPPED)
        g = s.default_guidance()
        r = evaluate_tryon(s.draw(data, g), data, features="toyworld")
        lines = toy_header("method") + [toy_row(s.method, args.infer_steps, g, r, s.seconds_per_image(g, every))]
        log(lines[-1])
        notes = (f"The built-in `{SHIPPED}` as installed (the default of `atelier tryon`), on the toy part's "
                 f"{n_pairs['paired']} paired and {n_pairs['unpaired']} unpaired test pairs at its default guidance "
                 f"and {args.infer_steps} DDIM steps, scored the same way. Trained: {training_history(json.loads(text))}. "
                 f"{TARGETS} As in the toy table, success is bounded by the slots' sizes, which the inputs do not show "
                 f"({slot_sizes(cases).get('large', 0.0):.0f} % of these slots are large); garment right is the score "
                 "without the size.")
        section("tryon-shipped", f"Try-on: the shipped {SHIPPED}", lines, notes)

    if "memory" in parts:
        section("tryon-memory", "Try-on: one training step at real size", *memory_lines(args.threads, args.memory_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
