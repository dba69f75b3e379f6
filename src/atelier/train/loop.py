"""The one training loop every atelier trainer runs (the toy-world stages, the inverter; LoRA,
IP-Adapter and try-on trainers plug in the same way).

A trainer builds its models, hands the trainable ones and the optimizer to `TrainLoop.prepare` (which
resumes them from the last good checkpoint), puts its frozen models on the loop's device with
`frozen`, and calls `run` with a step function `step(step, micro) -> loss` or `(loss, parts)`. The
loop owns the rest: the learning-rate schedule, gradient accumulation and mixed precision through
accelerate, gradient clipping, the loss log, atomic checkpoints every `checkpoint_every` steps
(model, optimizer and any extra state), evaluation every `eval_every` steps, and the loss plot.

    loop = TrainLoop("runs/x/stage", total_steps=1000, checkpoint_every=100)
    frozen_vae = loop.frozen(vae)
    (model,), opt = loop.prepare({"model": model}, torch.optim.AdamW(model.parameters(), 1e-4))
    loop.run(lambda step, micro: loss_of(model, batch(step, micro)), lr=lambda step: 1e-4, clip=1.0)
    loop.finish({"final_loss": loop.losses[-1]})

Checkpoints are one file with the previous one kept beside it, or, with `numbered=True` (the diffusers
training scripts' layout), one folder per save, `checkpoint-<step>/training_state.safetensors`, of which
`keep` are kept (`--checkpoints_total_limit`); `resume_from` picks the one to resume ("latest" or a path);
`on_checkpoint(folder)` may write more into each folder (the weights as they are at that step).

With `speed` (SpeedOptions: --compile, --compile-mode, --channels-last), `loop.speed_up(unet, ...)` compiles
the UNets the step function runs (trained or frozen) in place and/or makes them channels-last; `run`
gives them back eager and contiguous when it ends. Compiled in place, their state-dict keys (the
checkpoints', the exported weights') are those of the plain modules.

Every step's data must come from a seed derived from the step (and micro-batch), so a resumed run
makes exactly the steps an uninterrupted one makes."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from atelier.core.io import atomic_dir, atomic_open
from atelier.errors import UserError
from atelier.train.checkpoint import load_first_good, load_state, remove_stale_temp_files, save_state

STATE_FILE = "training_state.safetensors"  # inside a numbered checkpoint folder
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, project_dir=None,
                     logging_dir=None, flag: str = "mixed_precision", find_unused_parameters: bool = False):
    """accelerate's Accelerator. `find_unused_parameters`: a distributed run whose steps leave some trained
    parameters without a gradient (a text encoder whose training stops part-way)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    project = None
    if project_dir is not None:
        project = ProjectConfiguration(project_dir=str(project_dir),
                                       logging_dir=str(Path(project_dir) / (logging_dir or "logs")))
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                           project_config=project, kwargs_handlers=handlers)
    except ValueError as exc:
        raise UserError(f"{flag} {mixed_precision}: {str(exc).splitlines()[0]} (on CPU use no or bf16)") from None


def lr_schedule(name: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0):
    """The multiplier of the learning rate at each step (step -> factor), from diffusers' `get_scheduler`
    (on a throwaway optimizer: the loop sets the rates itself)."""
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_scheduler(name, optimizer=dummy, num_warmup_steps=warmup, num_training_steps=total,
                             num_cycles=cycles, power=power)
    return schedule.lr_lambdas[0]


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of `base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EmaState(torch.nn.Module):
    """Lets an EMA's shadow parameters (diffusers' EMAModel) ride in the same checkpoint as the model."""

    def __init__(self, ema):
        super().__init__()
        self.ema = ema

    def state_dict(self, *args, **kwargs):
        sd = self.ema.state_dict()
        return {"shadow": list(sd["shadow_params"]), "step": sd["optimization_step"]}

    def load_state_dict(self, state, strict=True):
        for p, s in zip(self.ema.shadow_params, state["shadow"]):
            p.data.copy_(s)
        self.ema.optimization_step = int(state["step"])


def numbered_checkpoints(folder) -> list[Path]:
    """The `checkpoint-<step>` folders of `folder` holding a training state, oldest first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NUMBERED.match(p.name))
             and (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return [p for _, p in sorted(found)]


class TrainLoop:
    """A resumable loop over `total_steps` optimizer steps, writing into `run_dir`:
    checkpoint.safetensors (and the previous one) or numbered checkpoint folders, loss.png, and
    done.json when finished."""

    def __init__(self, run_dir, total_steps: int, *, checkpoint_every: int, eval_every: int | None = None,
                 name: str | None = None, title: str | None = None, mixed_precision: str = "no",
                 gradient_accumulation_steps: int = 1, accelerator=None, speed=None, numbered: bool = False,
                 keep: int | None = None, resume_from=None, on_checkpoint=None):
        self.dir = Path(run_dir)
        self.name = name or self.dir.name
        self.title = title or self.name
        self.total, self.checkpoint_every, self.eval_every = total_steps, checkpoint_every, eval_every
        self.accelerator = accelerator or make_accelerator(mixed_precision, gradient_accumulation_steps)
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.dir)
        self.ckpt = self.dir / "checkpoint.safetensors"
        self.numbered, self.keep, self.resume_from, self.on_checkpoint = numbered, keep, resume_from, on_checkpoint
        self.losses: list[float] = []
        self.log: list[dict] = []
        self.step = 0
        self.seconds_before = 0.0  # wall time of earlier runs of this stage (before a resume)
        self.started = time.time()
        self.state: dict = {}  # name -> object with state_dict / load_state_dict, checkpointed
        self.models: list = []
        self.optimizer = None
        self.speed = speed  # atelier.speed.SpeedOptions for speed_up (None: off)
        self.sped_up: list = []  # the modules speed_up changed, restored when `run` ends
        self.speed_applied: dict = {}

    # ------------------------------------------------------------ placement

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of frozen models: half under mixed precision (trainable models stay fp32)."""
        return WEIGHT_DTYPES.get(self.accelerator.mixed_precision, torch.float32)

    def frozen(self, module, *, keep_original: bool = False):
        """`module` without gradients, in eval mode, on the device in the weight dtype. A VAE whose
        config asks for `force_upcast` stays fp32 under fp16, as diffusers' pipelines keep it.
        With `keep_original`, a dtype change happens on a copy (the caller still exports the original)."""
        dtype = self.weight_dtype
        config = getattr(module, "config", None)
        if dtype == torch.float16 and getattr(config, "force_upcast", False):
            dtype = torch.float32
        current = next(module.parameters(), torch.empty(0)).dtype
        if keep_original and current != dtype:
            module = copy.deepcopy(module)
        return module.requires_grad_(False).eval().to(self.device, dtype)

    def autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------ state

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.started

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def prepare(self, trainable: dict, optimizer, extra: dict | None = None):
        """Resume `trainable` modules, `extra` state and the optimizer from the last good checkpoint,
        then hand them to accelerate (device placement, mixed precision, distributed wrapping).
        Returns the prepared modules (in `trainable`'s order) and optimizer."""
        self.state = {**trainable, **(extra or {})}
        state = self._load(required=("step", "losses", "optimizer", *self.state))
        if state is not None:
            for key, module in self.state.items():
                module.load_state_dict(state[key])
            optimizer.load_state_dict(state["optimizer"])
            self.step, self.losses, self.log = int(state["step"]), list(state["losses"]), list(state.get("log", []))
            self.seconds_before, self.started = float(state.get("seconds", 0.0)), time.time()
            print(f"[{self.name}] resumed at step {self.step}", file=sys.stderr)
        *models, self.optimizer = self.accelerator.prepare(*trainable.values(), optimizer)
        self.models = models
        return models, self.optimizer

    def _load(self, required) -> dict | None:
        if not self.numbered:
            return load_state(self.ckpt, required=required)
        wanted = self.resume_from
        if wanted in (None, "latest"):
            return load_first_good([p / STATE_FILE for p in reversed(numbered_checkpoints(self.dir))], required)
        path = Path(wanted)
        if not path.exists() and (self.dir / path.name).exists():
            path = self.dir / path.name  # the diffusers scripts take a bare checkpoint-<step> name too
        file = path / STATE_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"--resume_from_checkpoint {wanted}: no training state there (expected a checkpoint-<step> "
                            f"folder holding {STATE_FILE}, or latest)")
        return load_first_good([file], required)

    def speed_up(self, *modules) -> dict:
        """Apply the loop's speed options to `modules` (the UNets the step runs, trained or frozen), in
        place, after `prepare`: channels-last, then torch.compile (regional by default, static shapes;
        it compiles on the first step, no warm-up: training needs gradients). Returns what was done."""
        options = self.speed
        if options is None or (options.compile == "off" and not options.channels_last):
            return {}
        from atelier.speed.compile import compile_unet

        for module in modules:
            if module is None or any(module is done for done in self.sped_up):
                continue
            if options.channels_last:
                module.to(memory_format=torch.channels_last)
            applied = {"channels_last": bool(options.channels_last)}
            if options.compile != "off":
                applied["compile"] = compile_unet(module, options.compile, dynamic=False,
                                                  backend=options.compile_backend, compile_mode=options.compile_mode)
            self.sped_up.append(module)
            self.speed_applied = {"unets": len(self.sped_up), **applied}
        if self.accelerator.is_main_process:
            c = self.speed_applied.get("compile")
            what = [f"compile {c['compile']} ({c['blocks']} modules per UNet, {c['mode']} mode, {c['backend']})"] if c else []
            what += ["channels-last"] if options.channels_last else []
            print(f"[{self.name}] speed: {', '.join(what)} on {len(self.sped_up)} UNet(s); compiles on the first step",
                  file=sys.stderr)
        return self.speed_applied

    def restore_speed(self) -> None:
        """The modules `speed_up` changed, eager and in the contiguous memory format again."""
        from atelier.speed.compile import uncompile

        for module in self.sped_up:
            uncompile(module)
            module.to(memory_format=torch.contiguous_format)
        self.sped_up = []

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    def save(self) -> None:
        if not self.accelerator.is_main_process:
            return
        state = {key: module.state_dict() for key, module in self.state.items()}
        state.update(optimizer=self.optimizer.state_dict(), step=self.step, losses=self.losses, log=self.log,
                     seconds=self.seconds)
        if not self.numbered:
            save_state(self.ckpt, state)
        else:
            with atomic_dir(self.dir / f"checkpoint-{self.step}") as folder:
                save_state(folder / STATE_FILE, state, keep_previous=False)
                if self.on_checkpoint is not None:
                    self.on_checkpoint(folder)
            if self.keep is not None:  # the oldest go once the new one is whole
                for old in numbered_checkpoints(self.dir)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.losses or not self.accelerator.is_main_process:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.losses, lw=0.5, alpha=0.4, label="loss")
        k = max(1, len(self.losses) // 50)
        smooth = np.convolve(self.losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, lw=1.5, label=f"mean of {k}")
        if min(self.losses) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(self.title)
        ax.legend()
        fig.tight_layout()
        with atomic_open(self.dir / "loss.png", "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------ the loop

    def run(self, step_fn, *, lr=None, clip: float | None = None, after_step=None, evaluate=None,
            window: int = 50) -> None:
        """Train until `total_steps`. `step_fn(step, micro)` returns the loss of one micro-batch (or
        `(loss, parts)`, a dict of floats handed to `evaluate`); `lr(step)` the learning rate of the
        step (or a list, one rate per optimizer param group); `after_step()` runs after each optimizer step (an EMA update); `evaluate(parts)` returns
        a dict for the log, every `eval_every` steps and at the last (under autocast, no gradients).
        When it ends (or fails), the modules `speed_up` changed are eager and contiguous again."""
        from tqdm.auto import tqdm

        if self.optimizer is None:
            raise RuntimeError("TrainLoop.prepare() first")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        bar = tqdm(total=self.total, initial=self.step, desc=self.title, dynamic_ncols=True,
                   disable=not self.accelerator.is_main_process)
        try:
            self._run(step_fn, bar, params, lr, clip, after_step, evaluate, window)
        finally:
            bar.close()
            self.restore_speed()

    def _run(self, step_fn, bar, params, lr, clip, after_step, evaluate, window) -> None:
        from tqdm.auto import tqdm

        acc, opt = self.accelerator, self.optimizer
        micro_steps = acc.gradient_accumulation_steps
        while self.step < self.total:
            if lr is not None:
                rate = lr(self.step)
                rates = rate if isinstance(rate, (list, tuple)) else [rate] * len(opt.param_groups)
                for group, r in zip(opt.param_groups, rates):  # a group's "lr_scale" keeps its rate relative
                    group["lr"] = r * group.get("lr_scale", 1.0)
            total, parts = 0.0, {}
            for micro in range(micro_steps):
                with acc.accumulate(*self.models):
                    with acc.autocast():
                        out = step_fn(self.step, micro)
                    loss, parts = out if isinstance(out, tuple) else (out, {})
                    acc.backward(loss)
                    total += loss.item() / micro_steps
                    if clip is not None and acc.sync_gradients:
                        acc.clip_grad_norm_(params, clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            self.losses.append(total)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-window:]):.4f}")
            last = self.step == self.total
            if evaluate is not None and self.eval_every and (self.step % self.eval_every == 0 or last):
                with acc.autocast(), torch.no_grad():
                    entry = evaluate(parts)
                if entry:
                    self.log.append({"step": self.step, **entry})
                    tqdm.write(f"[{self.name}] step {self.step}: {entry}", file=sys.stderr)
            if self.step % self.checkpoint_every == 0 or last:
                self.save()

    def finish(self, summary: dict) -> dict:
        """Write done.json (steps, wall time and `summary`) and the final loss plot."""
        done = {"steps": self.step, "wall_time_s": round(self.seconds, 1), **summary}
        if self.speed_applied:
            done["speed"] = self.speed_applied
        if self.accelerator.is_main_process:
            self.plot()
            with atomic_open(self.dir / "done.json", "w", encoding="utf-8") as f:
                f.write(json.dumps(done, indent=2))
        return done
