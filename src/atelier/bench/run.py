"""Large generation runs over a prompt set: sharded across processes, resumable after a kill.

A run makes `images_per_prompt` images of every prompt, image k from seed + k (the same seeds for
every prompt). Its work units are the (prompt id, seed) pairs in prompt order; process `rank` of
`world` takes the contiguous slice `shard(units, rank, world)`, so each unit belongs to exactly one
process whatever the others do. A process makes its units in order, up to `batch_size` of them per
pipeline call whatever their prompts (`GenerationRequest.per_image`), so that a run of one image per
prompt still fills the GPU; batching never changes an image.

The run folder:

    manifest.json             model, generation parameters, prompt source, images_per_prompt,
                              seed and the prompt table {id: {"prompt", "category"}}
    images/{id}_{seed}.png    one image per unit, with A1111 "parameters" metadata
    logs/rank{R}.jsonl        one line per image process R wrote: {"id", "seed", "rank", "world",
                              "file", "seconds"}; appended across resumes

Images appear atomically (temporary file + os.replace). Starting a run again resumes it: a unit
whose PNG exists and decodes fully is skipped, a PNG that does not decode is made again, temporaries
left by a killed writer are deleted. Resuming with other settings (model, parameters, seeds, prompts)
is refused unless `overwrite`, which deletes the old run's images first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from atelier.core.images import open_image, save_png
from atelier.core.io import TEMP_SUFFIX, atomic_write_bytes
from atelier.errors import UserError

MANIFEST = "manifest.json"
IMAGES = "images"
LOGS = "logs"
MANIFEST_FORMAT = "atelier-bench-run"
# What must match for a run to be resumed.
COMPARED = ("model", "parameters", "images_per_prompt", "seed", "prompts")
# Calls that may fail before the first success before the run gives up (the fault is not the prompts').
MAX_EARLY_FAILURES = 3


@dataclass(frozen=True)
class Unit:
    id: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.id}_{self.seed}.png"


@dataclass
class RunSummary:
    written: int = 0
    skipped: int = 0  # already finished
    failed: int = 0
    seconds: float = 0.0
    processes: int = 1
    failures: list = field(default_factory=list)  # {"id", "seed", "error"}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunImage:
    path: Path
    id: str
    prompt: str
    category: str | None
    seed: int


@dataclass
class Run:
    """A run folder as `read_run` finds it: `manifest` (the dict of manifest.json), `images` (the
    finished ones, in prompt then seed order) and `missing` ((id, seed) units without a PNG yet)."""

    dir: Path
    manifest: dict
    images: list[RunImage]
    missing: list[tuple[str, int]]

    @property
    def complete(self) -> bool:
        return not self.missing


def work_units(prompt_ids, images_per_prompt: int, seed: int) -> list[Unit]:
    return [Unit(pid, seed + k) for pid in prompt_ids for k in range(images_per_prompt)]


def shard(units: list, rank: int, world: int) -> list:
    """Process `rank`'s contiguous slice of `units`; the slices of ranks 0..world-1 partition them."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    n = len(units)
    return units[n * rank // world : n * (rank + 1) // world]


def read_run(run_dir) -> Run:
    """The manifest and the finished images of a run folder (written by `run_generation`).

    An image counts as finished when its PNG exists: PNGs appear atomically, so an existing one is
    complete (only a damaged disk or a hand-made file says otherwise; a resumed run checks them).
    """
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    if manifest is None:
        raise UserError(f"not a bench run: {run_dir} has no {MANIFEST}")
    images, missing = [], []
    for unit in work_units(manifest["prompts"], manifest["images_per_prompt"], manifest["seed"]):
        path = run_dir / IMAGES / unit.file
        if path.is_file():
            entry = manifest["prompts"][unit.id]
            images.append(RunImage(path, unit.id, entry["prompt"], entry.get("category"), unit.seed))
        else:
            missing.append((unit.id, unit.seed))
    return Run(run_dir, manifest, images, missing)


def run_generation(
    items,
    outdir,
    pipe,
    *,
    model: str,
    prompt_source: dict | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    negative_prompt: str = "",
    steps: int | None = None,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
    width: int | None = None,
    height: int | None = None,
    clip_skip: int | None = None,
    batch_size: int = 4,
    state=None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Generate this process's share of the run in `outdir` (see the module docstring).

    items: `PromptItem`s (atelier.bench.prompts); model: what the manifest records as the model (the
    source it was loaded from); prompt_source: recorded as is (e.g. {"path", "format"}).
    Generation parameters left as None take the model's defaults, as `atelier generate` does; they
    are resolved once and recorded resolved. batch_size bounds the images of one pipeline call
    (consecutive units, of any prompts); it never changes the pixels.
    state: an accelerate `PartialState`, a (rank, world) pair, or None (one process). With a
    PartialState the processes wait for each other at set-up and the summary adds up every
    process's counts; with a pair each process only counts its own.
    """
    from atelier.generate.request import GenerationRequest, resolve_request

    ranks = _Ranks.of(state)
    outdir = Path(outdir)
    if len({item.id for item in items}) != len(items):
        raise UserError("the prompt set has the same id twice")
    template = resolve_request(pipe, GenerationRequest(
        prompt="", negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale, sampler=sampler,
        schedule=schedule, width=width, height=height, clip_skip=clip_skip, seed=seed,
        n_images=images_per_prompt, batch_size=batch_size,
    ))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "model": model,
        "parameters": {
            "model_name": template.model_name, "negative_prompt": template.negative_prompt,
            "steps": template.steps, "sampler": template.sampler, "schedule": template.schedule,
            "cfg_scale": template.cfg_scale, "clip_skip": template.clip_skip,
            "width": template.width, "height": template.height,
        },
        "prompt_source": prompt_source,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "prompts": {item.id: {"prompt": item.prompt, "category": item.category} for item in items},
    }
    units = work_units([item.id for item in items], images_per_prompt, seed)
    mine = shard(units, ranks.rank, ranks.world)

    _check_resumable(outdir, manifest, overwrite)
    ranks.barrier()  # every process has checked the old manifest before anything changes
    if overwrite and ranks.rank == 0:
        (outdir / MANIFEST).unlink(missing_ok=True)
    _clean(outdir, mine, units, ranks, overwrite)
    ranks.barrier()
    if ranks.rank == 0:
        atomic_write_bytes(outdir / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    summary = RunSummary(processes=ranks.world)
    start = time.monotonic()
    todo = []
    for unit in mine:
        if _finished(outdir / IMAGES / unit.file):
            summary.skipped += 1
        else:
            todo.append(unit)
    prompts = {item.id: item.prompt for item in items}
    _generate(pipe, template, prompts, todo, batch_size, outdir, ranks, summary,
              bar=_bar(len(mine), summary.skipped, ranks, progress))
    summary.seconds = round(time.monotonic() - start, 3)
    return ranks.total(summary)


# --- the parts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranks:
    rank: int
    world: int
    state: object = None  # an accelerate PartialState: barriers and gathering

    @classmethod
    def of(cls, state) -> "_Ranks":
        if state is None:
            return cls(0, 1)
        if isinstance(state, tuple):
            rank, world = state
            if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
                raise UserError(f"rank {rank} of {world} processes is not a process of the run")
            return cls(rank, world)
        return cls(state.process_index, state.num_processes, state)

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def total(self, summary: RunSummary) -> RunSummary:
        if self.state is None or self.world == 1:
            return summary
        from accelerate.utils import gather_object

        parts = gather_object([summary.to_dict()])
        return RunSummary(
            written=sum(p["written"] for p in parts), skipped=sum(p["skipped"] for p in parts),
            failed=sum(p["failed"] for p in parts), seconds=max(p["seconds"] for p in parts),
            processes=self.world, failures=[f for p in parts for f in p["failures"]],
        )


def _read_manifest(outdir: Path) -> dict | None:
    path = outdir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not an atelier bench manifest")
    return manifest


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in COMPARED:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "parameters" and isinstance(a, dict):
            out += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in b if a.get(k) != b.get(k)]
        elif key == "prompts" and isinstance(a, dict):
            changed = sum(1 for i in set(a) | set(b) if a.get(i) != b.get(i))
            out.append(f"{changed} prompt(s) differ")
        else:
            out.append(f"{key} {a!r} -> {b!r}")
    return out


def _check_resumable(outdir: Path, manifest: dict, overwrite: bool) -> None:
    if overwrite:
        return
    old = _read_manifest(outdir)
    if old is None:
        images = outdir / IMAGES
        if images.is_dir() and any(p.suffix == ".png" for p in images.iterdir()):
            raise UserError(f"{images} holds images but {outdir} has no {MANIFEST}; pass --overwrite to start again")
        return
    diffs = _differences(old, manifest)
    if diffs:
        raise UserError(f"{outdir} holds a run with other settings ({'; '.join(diffs)}); "
                        "resume it with the same ones, choose another --outdir, or pass --overwrite")


def _temporary_of(name: str) -> str | None:
    """The file a temporary left by `atomic_open` was for: `.{file}.{random}.tmp` -> file."""
    if not name.endswith(TEMP_SUFFIX):
        return None
    return name[1:-len(TEMP_SUFFIX)].rpartition(".")[0] if name.startswith(".") else ""


def _clean(outdir: Path, mine: list[Unit], units: list[Unit], ranks: _Ranks, overwrite: bool) -> None:
    """Delete temporaries of this process's units (and, on rank 0, of no unit at all); with
    `overwrite`, the same for the old run's PNGs and logs. No two processes touch the same file."""
    images = outdir / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    own = {u.file for u in mine}
    every = {u.file for u in units}
    for entry in os.scandir(images):
        target = _temporary_of(entry.name)
        if target is None:
            if not (overwrite and entry.name.endswith(".png")):
                continue
            target = entry.name
        if target in own or (ranks.rank == 0 and target not in every):
            Path(entry.path).unlink(missing_ok=True)
    if overwrite and (outdir / LOGS).is_dir():  # each its own log; rank 0 those of ranks no process has now
        for log in (outdir / LOGS).glob("rank*.jsonl"):
            number = log.stem[len("rank"):]
            if number == str(ranks.rank) or (ranks.rank == 0 and not (number.isdigit() and int(number) < ranks.world)):
                log.unlink(missing_ok=True)


def _finished(path: Path) -> bool:
    """Whether a unit's PNG exists and decodes fully; one that does not is deleted."""
    if not path.exists():
        return False
    try:
        open_image(path, load=True)
        return True
    except UserError:
        path.unlink(missing_ok=True)
        return False


def _calls(todo: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Units in groups for one pipeline call, in order, at most batch_size each, whatever their prompts
    (`generate` splits a group whose prompts would need padding, so no image changes)."""
    return [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]


def _describe(call: list[Unit]) -> str:
    """The units of a failed call for the warning: `a seeds 0-3` when they are one prompt's, else
    `4 images (a seed 0 ... d seed 0)`."""
    first, last = call[0], call[-1]
    if all(u.id == first.id for u in call):
        return f"{first.id} seeds {first.seed}-{last.seed}" if len(call) > 1 else f"{first.id} seed {first.seed}"
    return f"{len(call)} images ({first.id} seed {first.seed} ... {last.id} seed {last.seed})"


def _bar(total: int, done: int, ranks: _Ranks, enabled: bool):
    from tqdm.auto import tqdm

    desc = "images" if ranks.world == 1 else f"images (rank 0 of {ranks.world})"
    return tqdm(total=total, initial=done, unit="img", desc=desc, dynamic_ncols=True,
                disable=not enabled or ranks.rank != 0)


def _generate(pipe, template, prompts, todo, batch_size, outdir, ranks, summary, *, bar) -> None:
    from atelier.generate.run import generate

    log_path = outdir / LOGS / f"rank{ranks.rank}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    early_failures = 0
    with open(log_path, "a", encoding="utf-8") as log, bar:
        for call in _calls(todo, batch_size):
            t0 = time.monotonic()
            request = replace(template, per_image=[(prompts[u.id], u.seed) for u in call],
                              n_images=len(call), batch_size=len(call))
            try:
                images = generate(pipe, request, progress=False)
            except Exception as exc:  # noqa: BLE001 - one call's failure does not end the run
                summary.failed += len(call)
                summary.failures += [{"id": u.id, "seed": u.seed, "error": str(exc)} for u in call]
                print(f"atelier: warning: {_describe(call)} failed: {exc}", file=sys.stderr)
                early_failures += 1
                if not summary.written and early_failures >= MAX_EARLY_FAILURES:
                    raise
                continue
            seconds = round((time.monotonic() - t0) / len(call), 3)
            for unit, image in zip(call, images):
                save_png(image.image, outdir / IMAGES / unit.file, image.parameters)
                log.write(json.dumps({"id": unit.id, "seed": unit.seed, "rank": ranks.rank, "world": ranks.world,
                                      "file": f"{IMAGES}/{unit.file}", "seconds": seconds}) + "\n")
                log.flush()
                summary.written += 1
                bar.update(1)
