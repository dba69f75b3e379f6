"""Benchmark atelier.samplers: each sampler's cost per step relative to one UNet call, and its
error against the exact probability-flow ODE solution as steps grow.

Cost (CPU time of this process, one torch thread, medians over repeats): a tiny
UNet2DConditionModel (built inline from a small config, CPU, fixed seed) is timed
on one 1x4x32x32 latent with CFG-sized batch 2; each sampler's scheduler work per model call
(scale_model_input + step, averaged over a whole 20-step run, plus set_timesteps once) is timed
on the same latent in the same process. The ratio says what fraction of a step the sampler
itself adds; with a real SD UNet (~1000x slower than this tiny one) it is negligible.

Error: samplers run on the exactly solvable Gaussian-mixture model of
`atelier.samplers.analytic` (SD 1.5 betas, epsilon prediction) from the same 256 noise draws;
the RMS distance to the exact ODE solution from the same start is printed at 5/10/20/40 steps,
with the convergence order fitted to it. A second table runs schedule variants up to 160 steps to
show where the order of the multistep solvers goes on SD 1.5's schedule.
Stochastic samplers have no single ODE target; for them the error in the recovered mixture
weights (max over components, 4000 samples, 30 steps) is printed instead.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/samplers.py --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import diffusers
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scheduler_configs import SD15  # noqa: E402

from atelier.samplers import SAMPLERS, make_scheduler  # noqa: E402
from _results import check_command, command_line, write_section  # noqa: E402
from atelier.samplers.analytic import (  # noqa: E402
    DEFAULT_MIXTURE,
    MixtureModel,
    SchedulerSigmaModel,
    final_step_error,
    observed_order,
    training_sigmas,
    ode_error,
    run_sampler,
)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def median_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of this process per call: with one torch thread this is the work done,
    unaffected by other processes competing for the cores (wall-clock time would not be)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return float(np.median(times))


def unet_call_seconds(unet, repeats: int) -> float:
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unet(latents, 500, encoder_hidden_states=text)  # warm-up
        return median_seconds(lambda: unet(latents, 500, encoder_hidden_states=text), repeats)


def scheduler_seconds_per_call(name: str, steps: int, repeats: int) -> tuple[float, float, int]:
    """(seconds of scheduler work per model call, set_timesteps seconds, model calls per run)."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    model_output = 0.1 * torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    overrides = {"noise_sampler_seed": 0} if name == "DPM++ SDE" else {}
    scheduler = make_scheduler(name, SD15, **overrides)
    generator = torch.Generator().manual_seed(3)
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters

    def loop() -> float:
        """CPU seconds of one run's scale_model_input + step calls (set_timesteps before, untimed)."""
        scheduler.set_timesteps(steps)
        x = latents * scheduler.init_noise_sigma
        start = time.process_time()
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            kwargs = {"generator": generator} if accepts_generator else {}
            x = scheduler.step(model_output + 0 * x_in, t, x, **kwargs).prev_sample
        return time.process_time() - start

    loop()  # warm-up
    total = float(np.median([loop() for _ in range(repeats)]))
    set_timesteps = median_seconds(lambda: scheduler.set_timesteps(steps), repeats)
    calls = len(scheduler.timesteps)
    return total / calls, set_timesteps, calls


def ode_errors(name: str, steps_list, noise, config=SD15, schedule=None, model=MixtureModel, **overrides) -> list[float]:
    errors = []
    for steps in steps_list:
        scheduler = make_scheduler(name, config, schedule=schedule, **overrides)
        run = run_sampler(scheduler, model(DEFAULT_MIXTURE, scheduler), noise, steps)
        errors.append(ode_error(DEFAULT_MIXTURE, run))
    return errors


def weight_error(name: str) -> float:
    overrides = {"noise_sampler_seed": 0} if name == "DPM++ SDE" else {}
    scheduler = make_scheduler(name, SD15, **overrides)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4000, 2, generator=generator)
    x = run_sampler(scheduler, MixtureModel(DEFAULT_MIXTURE, scheduler), noise, 30, generator=generator).end_x
    return float(np.abs(DEFAULT_MIXTURE.responsibilities(x).mean(0) - np.asarray(DEFAULT_MIXTURE.weights)).max())


# SD 1.5's betas with a 100x smaller beta_start: the same schedule but for its low-noise end
# (sigma_min 0.0029 instead of 0.029).
WIDE = {**SD15, "beta_start": SD15["beta_start"] / 100}
ORDER_STEPS = (10, 20, 40, 80, 160)
# (label, sampler, config, schedule, scheduler overrides, model)
ORDER_VARIANTS = [
    ("Euler", "Euler", SD15, None, {}, MixtureModel),
    ("Heun", "Heun", SD15, None, {}, MixtureModel),
    ("Heun, Karras", "Heun", SD15, "karras", {}, MixtureModel),
    ("DPM++ 2M", "DPM++ 2M", SD15, None, {}, MixtureModel),
    ("  last step 2nd order, to sigma_min", "DPM++ 2M", SD15, None, {"final_sigmas_type": "sigma_min"}, MixtureModel),
    ("  trailing spacing", "DPM++ 2M", SD15, None, {"timestep_spacing": "trailing"}, MixtureModel),
    ("  beta_start / 100", "DPM++ 2M", WIDE, None, {}, MixtureModel),
    ("  Karras (= EDM DPM++ 2M)", "DPM++ 2M", SD15, "karras", {}, MixtureModel),
    ("  Karras, to sigma_min", "DPM++ 2M", SD15, "karras", {"final_sigmas_type": "sigma_min"}, MixtureModel),
    ("UniPC", "UniPC", SD15, None, {}, MixtureModel),
    ("  Karras", "UniPC", SD15, "karras", {}, MixtureModel),
    ("  Karras, model at exact sigma", "UniPC", SD15, "karras", {}, SchedulerSigmaModel),
    ("UniPC bh2", "UniPC bh2", SD15, None, {}, MixtureModel),
    ("  Karras, to sigma_min", "UniPC bh2", SD15, "karras", {"final_sigmas_type": "sigma_min"}, MixtureModel),
    ("DEIS", "DEIS", SD15, None, {}, MixtureModel),
    ("  Karras", "DEIS", SD15, "karras", {}, MixtureModel),
    ("  exponential sigmas", "DEIS", SD15, "exponential", {}, MixtureModel),
]


def order_study(noise, emit) -> dict:
    """Errors at 10-160 steps for the samplers and schedule variants that tell why the multistep
    solvers look first order on SD 1.5's schedule; returns the figures the notes quote."""
    header = f"{'sampler / variant':<38} " + " ".join(f"{'err@' + str(s):>9}" for s in ORDER_STEPS) + \
        f" {'order 10-40':>11} {'40-160':>6}"
    emit(header)
    emit("-" * len(header))
    orders = {}
    for label, name, config, schedule, overrides, model in ORDER_VARIANTS:
        errors = ode_errors(name, ORDER_STEPS, noise, config, schedule, model, **overrides)
        low, high = observed_order(ORDER_STEPS[:3], errors[:3]), observed_order(ORDER_STEPS[2:], errors[2:])
        orders[(name, label.strip())] = (low, high)
        emit(f"{label:<38} " + " ".join(f"{e:9.2e}" for e in errors) + f" {low:11.2f} {high:6.2f}")
    emit()
    emit("SD 1.5 timesteps evenly spaced in t (DPM++ 2M's linspace): the last step, from the last timestep to sigma(t=0)")
    header = (f"{'steps':>5} {'last t':>6} {'sigma there':>11} {'log-sigma length of last step':>30} {'of the one before':>18} "
              f"{'of first step':>14}")
    emit(header)
    emit("-" * len(header))
    sigma0 = float(training_sigmas(make_scheduler("DPM++ 2M", SD15))[0])
    last = {}
    for steps in ORDER_STEPS:
        scheduler = make_scheduler("DPM++ 2M", SD15, final_sigmas_type="sigma_min")
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.double().numpy()
        last[steps] = (int(scheduler.timesteps[-1]), sigmas[-2], np.log(sigmas[-2] / sigma0), np.log(sigmas[0] / sigmas[1]),
                       np.log(sigmas[-3] / sigmas[-2]))
        emit(f"{steps:>5} {last[steps][0]:>6} {last[steps][1]:>11.4f} {last[steps][2]:>30.2f} {last[steps][4]:>18.3f} "
             f"{last[steps][3]:>14.3f}")
    karras = make_scheduler("EDM DPM++ 2M", SD15)
    karras.set_timesteps(ORDER_STEPS[-1])
    sigma_max = float(karras.sigmas[0])
    floor = final_step_error(DEFAULT_MIXTURE, noise.double().numpy() * sigma_max, sigma_max, sigma0)
    emit()
    emit(f"error of a first-order last step from sigma_min = {sigma0:.4f} to 0, from the exact state there: {floor:.2e}")
    return {"orders": orders, "last": last, "floor": floor, "sigma0": sigma0}


def order_notes(study: dict) -> str:
    orders, last, n = study["orders"], study["last"], ORDER_STEPS
    t40 = last[40]

    def o(name, label=None, part=1):
        return f"{orders[(name, label or name)][part]:.2f}"

    return f"""Columns: model calls for a 20-step run; scheduler CPU time per model call (scale_model_input + step) and that time divided by one tiny-UNet call; set_timesteps CPU time; RMS error against the exact probability-flow ODE solution on the analytic Gaussian mixture at 5/10/20/40 steps and the order fitted to it (log-log slope over 10-40 steps); stochastic samplers: max error of the recovered mixture weights.

Why DPM++ 2M, UniPC and DEIS look first order on SD 1.5's schedule (second table; orders fitted over 10-40 and 40-160 steps):

- The timesteps are evenly spaced in t, and SD's betas make sigma(t) ~ sqrt(beta_start * (t + 1)) near t = 0. The last timestep is t ~ 1000/N ({t40[0]} at 40 steps, sigma {t40[1]:.3f}), and the last step, from there to sigma(t=0), spans {t40[2]:.2f} in log sigma at 40 steps and still {last[n[-1]][2]:.2f} at {n[-1]}, where the first step spans {t40[3]:.3f} and {last[n[-1]][3]:.3f}. Whatever the solver's order, the error of that step scales with its starting sigma squared, ~1/N: first order overall (DPM++ 2M {o("DPM++ 2M", part=0)} / {o("DPM++ 2M")}, UniPC {o("UniPC", part=0)} / {o("UniPC")}, UniPC bh2 {o("UniPC bh2", part=0)} / {o("UniPC bh2")}). Making the last step second order does not help ({o("DPM++ 2M", "last step 2nd order, to sigma_min")} from 40 to 160 steps with final_sigmas_type="sigma_min"), nor does trailing spacing ({o("DPM++ 2M", "trailing spacing")}); a 100x smaller beta_start, which shrinks that sigma tenfold, gives {o("DPM++ 2M", "beta_start / 100")}, and Karras sigmas, which shrink every step, {o("DPM++ 2M", "Karras, to sigma_min", 0)} / {o("DPM++ 2M", "Karras, to sigma_min")} (UniPC {o("UniPC", "Karras", 0)}). The schedule, not the solvers: the same solvers are second order or better on Karras sigmas.
- Ending at sigma = 0 (final_sigmas_type="zero", the default of DPM++ 2M and UniPC bh2; Euler and Heun always) adds one first-order step from sigma_min = {study["sigma0"]:.4f} to 0 whose error does not shrink with N: {study["floor"]:.1e} on this mixture (last line). EDM DPM++ 2M (Karras, to 0: {o("DPM++ 2M", "Karras (= EDM DPM++ 2M)", 0)} / {o("DPM++ 2M", "Karras (= EDM DPM++ 2M)")}) and Heun ({o("Heun", part=0)} / {o("Heun")}) stall there beyond ~40 steps; ending at sigma_min they keep their order.
- With Karras sigmas, DPM-Solver, UniPC and DEIS round the timesteps they hand to the model to integers (exponential sigmas: truncate them) while they step with the exact sigmas, so the model sees a slightly wrong noise level (near t = 0 one timestep is 40 % in sigma). That error does not shrink with N and grows once several steps fall between two timesteps: UniPC Karras slows down near 1e-4 ({o("UniPC", "Karras")} from 40 to 160 steps; fed the exact sigma, the same run keeps {o("UniPC", "Karras, model at exact sigma")}), DEIS stalls near 2e-3 with Karras ({o("DEIS", "Karras")}) and exponential sigmas ({o("DEIS", "exponential sigmas")}).
- DEIS (order 3) on the evenly spaced schedule is erratic rather than first order: from 15 steps on it takes its last, long step at third order, extrapolating over {t40[2]:.2f} in log sigma from points {t40[4]:.2f} apart (at 40 steps); its error at 20 steps exceeds that at 10, and past 40 steps it falls faster ({o("DEIS")}).
- The error measure is not the cause: every run is compared with the exact ODE solution from its own start to its own final noise level (sigma_min or 0).
tests/test_sampler_order.py checks these orders (Euler 1; Heun and DPM++ 2M 2 where the schedule allows it; DPM++ 2M 1 on SD 1.5's own schedule; the floor of the last step to 0)."""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, help="also write the tables into this markdown file's 'Samplers' section")
    args = parser.parse_args(argv)
    if args.results:
        check_command(__file__, argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    unet = tiny_unet()
    params = sum(p.numel() for p in unet.parameters())
    unet_s = unet_call_seconds(unet, args.repeats * 4)
    emit(f"tiny UNet2DConditionModel: {params / 1e3:.0f}k params, one call (batch 2, 4x32x32) = {unet_s * 1e3:.2f} ms CPU")
    emit(f"torch {torch.__version__}, diffusers {diffusers.__version__}, 1 thread; mixture errors over 256 noise draws")
    emit()

    steps_list = (5, 10, 20, 40)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    header = (
        f"{'sampler':<18} {'calls/20 steps':>14} {'sched ms/call':>13} {'/ UNet call':>11} {'set_timesteps ms':>16}  "
        + " ".join(f"{'err@' + str(s):>9}" for s in steps_list) + f" {'order':>6}"
    )
    emit(header)
    emit("-" * len(header))
    for spec in SAMPLERS:
        per_call, set_ts, calls = scheduler_seconds_per_call(spec.name, 20, args.repeats)
        if spec.stochastic:
            accuracy = f"{'weights err (30 steps) ' + format(weight_error(spec.name), '.3f'):>39}" if not spec.own_schedule else f"{'n/a (needs a distilled model)':>39}"
        else:
            errors = ode_errors(spec.name, steps_list, noise)
            accuracy = " ".join(f"{e:9.2e}" for e in errors) + f" {observed_order(steps_list[1:], errors[1:]):6.2f}"
        emit(
            f"{spec.name:<18} {calls:>14d} {per_call * 1e3:>13.3f} {per_call / unet_s:>11.3f} {set_ts * 1e3:>16.2f}  {accuracy}"
        )
    emit()
    study = order_study(noise, emit)
    if args.results:
        write_section(args.results, "samplers", "Samplers (atelier.samplers)", "\n".join(lines),
                      command_line(__file__, argv), order_notes(study))


if __name__ == "__main__":
    main()
