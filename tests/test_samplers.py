"""atelier.samplers: named samplers on diffusers schedulers.

Checks that every name builds on real checkpoints' scheduler configs and keeps the model's
settings, that schedules are the published formulas, that options survive diffusers' config
traps, that A1111 metadata round-trips, and that each sampler really converges to the exact
probability-flow ODE solution (deterministic) or to the data distribution (stochastic) on a
Gaussian mixture whose denoiser is known in closed form.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import diffusers
import numpy as np
import pytest
import torch
from scheduler_configs import CONFIGS, RAW, SD15, SD21, SDXL, SD_TURBO

from atelier.cli import main
from atelier.errors import UserError
from atelier.samplers import SAMPLERS, a1111_fields, from_a1111_fields, list_samplers, make_scheduler, resolve
from atelier.samplers.build import plan_scheduler
from atelier.samplers.analytic import DEFAULT_MIXTURE, MixtureModel, ode_error, run_sampler

# diffusers 0.42 converts 0-d tensors with np.array(copy=False) thousands of times per scheduler;
# recording each of those numpy 2 deprecation warnings costs more than the tests themselves
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SPEC_NAMES = [s.name for s in SAMPLERS]
SPECS = {s.name: s for s in SAMPLERS}


@functools.lru_cache(maxsize=None)
def _prototype(name: str, config_name: str, schedule: str | None):
    return make_scheduler(name, CONFIGS[config_name], schedule=schedule)


def built(name: str, config_name: str, schedule: str | None = None):
    """make_scheduler on a named config; a fresh copy of a cached build, because diffusers'
    KDPM2 constructors alone take ~0.4 s (they run set_timesteps(1000) element by element)."""
    return copy.deepcopy(_prototype(name, config_name, schedule))


def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, n=1000) -> np.ndarray:
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def model_sigma_range() -> tuple[float, float]:
    ac = scaled_linear_alphas_cumprod()
    sigmas = np.sqrt((1 - ac) / ac)
    return float(sigmas[0]), float(sigmas[-1])


def step_sigmas(scheduler) -> np.ndarray:
    """The distinct noise levels a scheduler steps through (second-order schedulers repeat them)."""
    sigmas = torch.unique_consecutive(scheduler.sigmas.double())
    return sigmas[sigmas > 0].numpy()


def expected_spacing(spec, raw: dict) -> str:
    """The base config's spacing when it really set one, else the target class's default."""
    if "timestep_spacing" in raw:
        return raw["timestep_spacing"]
    return inspect.signature(spec.scheduler_class.__init__).parameters["timestep_spacing"].default


# ---------------------------------------------------------------------------------------------
# Every name on every real config


# hub json as written and as loaded into a pipeline, across the five model families
BUILD_CONFIGS = ["sd15-json", "sd15-loaded", "sd21-loaded", "sdxl-json", "sdxl-loaded", "sd-turbo-loaded"]


@pytest.mark.parametrize("config_name", BUILD_CONFIGS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_sampler_builds_on_every_config_and_keeps_the_model(name, config_name):
    config = CONFIGS[config_name]
    raw = RAW[config_name.rsplit("-", 1)[0]]
    spec = SPECS[name]
    scheduler = built(name, config_name)

    assert type(scheduler) is spec.scheduler_class
    assert scheduler.config.prediction_type == raw.get("prediction_type", "epsilon")
    assert scheduler.config.beta_schedule == "scaled_linear"
    np.testing.assert_allclose(
        scheduler.alphas_cumprod.double().numpy(), scaled_linear_alphas_cumprod(), rtol=1e-4
    )
    assert scheduler.config.steps_offset == raw["steps_offset"]
    if spec.fixed_schedule is None:
        assert scheduler.config.timestep_spacing == expected_spacing(spec, raw)

    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps.double()
    assert len(timesteps) >= 20 and torch.isfinite(timesteps).all()
    assert timesteps.min() >= 0 and timesteps.max() <= 999
    if getattr(scheduler, "sigmas", None) is not None:
        assert torch.isfinite(scheduler.sigmas).all()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_allowed_schedule_builds_and_sets_exactly_its_options(name):
    spec = SPECS[name]
    for schedule in spec.schedules:
        scheduler = built(name, "sdxl-loaded", schedule)
        flags = {f: scheduler.config.get(f) for f in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")}
        for flag, value in flags.items():
            if flag in spec.init_keys:
                assert value is (flag == f"use_{schedule}_sigmas"), (schedule, flag, value)
        scheduler.set_timesteps(12)
        assert torch.isfinite(scheduler.timesteps.double()).all()
        if getattr(scheduler, "sigmas", None) is not None:
            assert torch.isfinite(scheduler.sigmas).all()


def test_turbo_configs_keep_trailing_spacing():
    for config in (SD_TURBO, CONFIGS["sdxl-turbo-loaded"]):
        for name in ("Euler a", "Euler", "DPM++ 2M", "DDIM", "LCM"):
            scheduler = make_scheduler(name, config)
            assert scheduler.config.timestep_spacing == "trailing"
        scheduler = make_scheduler("Euler a", config)
        scheduler.set_timesteps(1)
        assert scheduler.timesteps.tolist() == [999]  # one-step Turbo starts from pure noise
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_spacing_schedules_set_the_comfyui_timesteps():
    # ComfyUI: simple = sigmas[999 - int(k * 1000 / n)], ddim_uniform = 1, 1 + 1000 // n, ...
    simple = make_scheduler("Euler", SD15, schedule="simple")
    simple.set_timesteps(10)
    assert simple.timesteps.tolist() == [999 - 100 * k for k in range(10)]
    ddim = make_scheduler("Euler", SD15, schedule="ddim_uniform")
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == [901 - 100 * k for k in range(10)]
    normal = make_scheduler("Euler", SDXL, schedule="normal")  # overrides SDXL's leading spacing
    normal.set_timesteps(10)
    np.testing.assert_allclose(normal.timesteps.numpy(), np.linspace(999, 0, 10), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Schedules are the published formulas over the model's own sigma range

KARRAS_CAPABLE = [s.name for s in SAMPLERS if "karras" in s.schedules]


@pytest.mark.parametrize("config_name", ["sd15-json", "sdxl-loaded", "sd-turbo-loaded"])  # linspace, leading, trailing
@pytest.mark.parametrize("name", KARRAS_CAPABLE)
def test_karras_and_exponential_sigmas_follow_the_formulas(name, config_name):
    sigma_min, sigma_max = model_sigma_range()
    n = 15
    ramp = np.linspace(0, 1, n)
    rho = 7.0
    karras = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    exponential = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))

    for schedule, expected in (("karras", karras), ("exponential", exponential)):
        if schedule not in SPECS[name].schedules:
            continue
        scheduler = built(name, config_name, schedule)
        scheduler.set_timesteps(n)
        got = step_sigmas(scheduler)
        # DPM2/DPM2 a/DPM++ 2S a also list their midpoints; the schedule is every other level
        if len(got) == 2 * n - 1:
            got = got[::2]
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=f"{name} {schedule} on {config_name}")


def test_edm_entries_are_karras_rho_7_euler_and_dpmpp_2m():
    for edm, plain in (("EDM Euler", "Euler"), ("EDM DPM++ 2M", "DPM++ 2M")):
        a = make_scheduler(edm, SD15)
        b = make_scheduler(plain, SD15, schedule="karras")
        assert type(a) is type(b) and a.config.use_karras_sigmas
        a.set_timesteps(20)
        b.set_timesteps(20)
        torch.testing.assert_close(a.sigmas, b.sigmas)


# ---------------------------------------------------------------------------------------------
# The from_config / _use_default_values traps


def test_sampler_options_in_the_base_config_do_not_leak():
    # a pipeline currently running DPM++ 2M SDE Karras, switched to plain DPM++ 2M
    base = diffusers.DPMSolverMultistepScheduler.from_config(
        SD15, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", solver_order=3
    ).config
    switched = make_scheduler("DPM++ 2M", base)
    assert switched.config.use_karras_sigmas is False
    assert switched.config.algorithm_type == "dpmsolver++"
    assert switched.config.solver_order == 2
    fresh = make_scheduler("DPM++ 2M", SD15)
    switched.set_timesteps(20)
    fresh.set_timesteps(20)
    torch.testing.assert_close(switched.sigmas, fresh.sigmas)


def test_use_default_values_cannot_revert_a_changed_model_setting():
    # diffusers #7626: a copied config whose value was changed but is still listed in
    # _use_default_values; from_config would silently drop it.
    config = dict(diffusers.EulerDiscreteScheduler.from_config(SD15).config)
    assert "prediction_type" in config["_use_default_values"]
    config["prediction_type"] = "v_prediction"
    config["use_karras_sigmas"] = True
    config["_use_default_values"] = list(config["_use_default_values"]) + ["use_karras_sigmas"]
    assert make_scheduler("Euler", config).config.prediction_type == "v_prediction"
    assert make_scheduler("Euler", config).config.use_karras_sigmas is False
    assert make_scheduler("Euler", config, schedule="karras").config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M Karras", config).config.use_karras_sigmas is True


def test_true_defaults_in_use_default_values_follow_diffusers():
    # SD 1.5's hub config has no timestep_spacing: PNDM filled in its default "leading"; switching
    # class must give the new class's default (diffusers' own from_config semantics).
    loaded = CONFIGS["sd15-loaded"]
    assert loaded.timestep_spacing == "leading" and "timestep_spacing" in loaded["_use_default_values"]
    assert make_scheduler("Euler", loaded).config.timestep_spacing == "linspace"
    assert make_scheduler("DDIM", loaded).config.timestep_spacing == "leading"


def test_model_keys_the_target_class_lacks_are_carried_for_the_next_switch():
    euler = make_scheduler("Euler", SD15)  # EulerDiscreteScheduler has no clip_sample
    ddim = make_scheduler("DDIM", euler.config)  # DDIM's own default would be clip_sample=True
    assert ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is False


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["DDIM", "DDPM"])
def test_clipping_stays_off_unless_the_model_config_asks(name, config_name):
    # A config that never mentions clip_sample (atelier's bundled sdxl / sdxl-turbo / sd-turbo, many
    # fine-tunes); DDIM and DDPM default it to True.
    config = {k: v for k, v in dict(CONFIGS[config_name]).items() if k != "clip_sample"}
    scheduler = make_scheduler(name, config)
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False
    asked = {**dict(config), "clip_sample": True, "_use_default_values": []}
    assert make_scheduler(name, asked).config.clip_sample is True
    assert make_scheduler(name, config, clip_sample=True).config.clip_sample is True


def test_bundled_sdxl_ddim_matches_unclipped_ddim():
    from atelier.models.loader import CONFIGS_DIR

    for bundle in ("sdxl", "sdxl-turbo", "sd-turbo"):
        config = json.loads((CONFIGS_DIR / f"{bundle}.json").read_text())["scheduler"]
        ours = make_scheduler("DDIM", config)
        reference = diffusers.DDIMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")
                                               and k in inspect.signature(diffusers.DDIMScheduler).parameters},
                                            clip_sample=False)
        ours.set_timesteps(10)
        reference.set_timesteps(10)
        x = torch.full((1, 4, 2, 2), 3.0)
        eps = torch.full((1, 4, 2, 2), -2.5)  # predicted x0 far outside [-1, 1]
        t = ours.timesteps[-1]
        torch.testing.assert_close(ours.step(eps, t, x).prev_sample, reference.step(eps, t, x).prev_sample)


def test_zero_snr_models_refuse_samplers_that_would_drop_it():
    ztsnr = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    euler = make_scheduler("Euler", ztsnr)
    assert euler.config.rescale_betas_zero_snr is True
    assert float(euler.alphas_cumprod[-1]) < 1e-6  # terminal SNR ~ 0
    with pytest.raises(UserError, match="rescale_betas_zero_snr"):
        make_scheduler("Heun", ztsnr)


def test_flow_matching_configs_are_refused():
    with pytest.raises(UserError, match="flow-matching"):
        make_scheduler("Euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_overrides_are_applied_and_verified():
    assert make_scheduler("DPM++ 2M", SD15, solver_order=3).config.solver_order == 3
    assert make_scheduler("DPM++ SDE", SD15, noise_sampler_seed=7).config.noise_sampler_seed == 7
    with pytest.raises(UserError, match="has no option"):
        make_scheduler("Euler a", SD15, use_karras_sigmas=True)
    with pytest.raises(UserError, match="schedule="):
        make_scheduler("DPM++ 2M", SD15, use_karras_sigmas=True)
    # UniPC's __init__ silently rewrites an unknown solver_type to "bh2": caught, not shipped
    with pytest.raises(UserError, match="changed option solver_type"):
        make_scheduler("UniPC", SD15, solver_type="midpoint")


# ---------------------------------------------------------------------------------------------
# Names, aliases, impossible combinations


@pytest.mark.parametrize(
    "name, schedule, expected",
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "karras")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "karras")),
        ("dpmpp_2m", "karras", ("DPM++ 2M", "karras")),
        ("k_dpmpp_2m", None, ("DPM++ 2M", None)),
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "karras")),
        ("dpmpp_2m_sde_gpu", "exponential", ("DPM++ 2M SDE", "exponential")),
        ("euler_ancestral", "normal", ("Euler a", "normal")),
        ("DPM2 a Karras", None, ("DPM2 a", "karras")),
        ("LMS Karras", None, ("LMS", "karras")),
        ("dpm_2", "sgm_uniform", ("DPM2", "sgm_uniform")),
        ("uni_pc", "SGM Uniform", ("UniPC", "sgm_uniform")),
        ("uni_pc_bh2", None, ("UniPC bh2", None)),
        ("ddim", "ddim_uniform", ("DDIM", "ddim_uniform")),
        ("dpmpp_2s_ancestral", "karras", ("DPM++ 2S a", "karras")),
        ("dpmpp_sde", "Automatic", ("DPM++ SDE", None)),
        ("lcm", None, ("LCM", None)),
        ("EDM Euler", None, ("EDM Euler", "karras")),
    ],
)
def test_names_resolve(name, schedule, expected):
    choice = resolve(name, schedule)
    assert (choice.name, choice.schedule) == expected


def test_the_same_request_in_three_spellings_builds_the_same_scheduler():
    a = make_scheduler("DPM++ 2M Karras", SDXL)
    b = make_scheduler("DPM++ 2M", SDXL, schedule="Karras")
    c = make_scheduler("dpmpp_2m", SDXL, schedule="karras")
    assert dict(a.config) == dict(b.config) == dict(c.config)


@pytest.mark.parametrize(
    "name, schedule, message",
    [
        ("Euler a Karras", None, "EulerAncestralDiscreteScheduler has no use_karras_sigmas"),
        ("Euler a", "exponential", "no use_exponential_sigmas"),
        ("LCM", "karras", "its own timestep schedule"),
        ("lcm", "sgm_uniform", "its own timestep schedule"),
        ("DDIM", "karras", "DDIMScheduler has no use_karras_sigmas"),
        ("EDM Euler", "exponential", "defined on the 'karras' schedule"),
        ("DPM++ 2M Karras", "exponential", "already names the 'karras' schedule"),
        ("DPM++ 2N", None, "Did you mean 'DPM++ 2M'"),
        ("eulr", None, "Did you mean 'euler'"),
        ("dpmpp_3m_sde", None, "only up to order 2"),
        ("DPM adaptive", None, "not available"),
        ("Euler", "karas", "Did you mean 'karras'"),
        ("Euler", "kl_optimal", "not available"),
        ("", None, "sampler name is required"),
    ],
)
def test_bad_requests_raise_helpful_user_errors(name, schedule, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+").replace("(", r"\(")):
        make_scheduler(name, SD15, schedule=schedule)


def test_list_samplers_describes_every_entry():
    entries = {e["name"]: e for e in list_samplers()}
    assert set(entries) == set(SPEC_NAMES)
    dpm = entries["DPM++ 2M"]
    assert dpm["diffusers_class"] == "DPMSolverMultistepScheduler"
    assert "dpmpp_2m" in dpm["aliases"] and "DPM++ 2M Karras" in dpm["a1111_legacy_names"]
    assert dpm["a1111_automatic_schedule"] == "karras"
    assert "karras" in dpm["schedules"] and "beta" in dpm["schedules"]
    assert "karras" not in entries["Euler a"]["schedules"] and "normal" in entries["Euler a"]["schedules"]
    assert entries["LCM"]["schedules"] == [] and entries["EDM Euler"]["schedules"] == ["karras"]
    for required in ("DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a", "Euler", "Euler a",
                     "Heun", "LMS", "DDIM", "UniPC", "UniPC bh2", "DEIS", "LCM", "TCD"):
        assert required in entries


# ---------------------------------------------------------------------------------------------
# A1111 metadata


def test_a1111_fields_written_like_a1111():
    assert a1111_fields("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert a1111_fields("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")
    assert a1111_fields("euler_ancestral") == ("Euler a", "Automatic")
    assert a1111_fields("Euler", "sgm_uniform") == ("Euler", "SGM Uniform")
    assert a1111_fields("EDM Euler") == ("Euler", "Karras")
    # A1111's Automatic for DPM++ 2M is Karras, so the model's own schedule must be spelled out
    assert a1111_fields("DPM++ 2M") == ("DPM++ 2M", "Uniform")
    assert a1111_fields("DPM++ 2M", base_config=SD_TURBO) == ("DPM++ 2M", "SGM Uniform")


def test_from_a1111_fields_reads_old_and_new_infotext():
    assert from_a1111_fields("DPM++ 2M", "Karras") == ("DPM++ 2M", "karras")
    assert from_a1111_fields("DPM++ 2M Karras") == ("DPM++ 2M", "karras")  # A1111 < 1.9
    assert from_a1111_fields("DPM++ 2M", None) == ("DPM++ 2M", None)  # < 1.9: it meant uniform
    assert from_a1111_fields("DPM++ 2M", "Automatic") == ("DPM++ 2M", "karras")  # >= 1.9 default
    assert from_a1111_fields("DPM++ 2M SDE", "Automatic") == ("DPM++ 2M SDE", "exponential")
    assert from_a1111_fields("Euler a", "Automatic") == ("Euler a", None)
    assert from_a1111_fields("DPM++ 2M Karras", "Exponential") == ("DPM++ 2M", "karras")  # suffix wins
    with pytest.raises(UserError, match="EulerAncestralDiscreteScheduler"):
        from_a1111_fields("Euler a", "Karras")
    with pytest.raises(UserError, match="not available"):
        from_a1111_fields("DPM++ 2M", "Align Your Steps")


@pytest.mark.parametrize("config_name", ["sd15-loaded", "sdxl-loaded", "sd-turbo-loaded"])
def test_a1111_fields_round_trip_to_the_same_scheduler(config_name):
    # compares the exact constructor plans (class + arguments), which determine the scheduler;
    # building each one would spend most of the time in diffusers' KDPM2 constructors
    config = CONFIGS[config_name]
    for spec in SAMPLERS:
        for schedule in (None, *spec.schedules):
            original = plan_scheduler(resolve(spec.name, schedule), config)
            name, parsed_schedule = from_a1111_fields(*a1111_fields(spec.name, schedule, base_config=config))
            again = plan_scheduler(resolve(name, parsed_schedule), config)
            assert again.scheduler_class is original.scheduler_class, (spec.name, schedule)
            assert effective(again) == effective(original), (spec.name, schedule, name, parsed_schedule)


def effective(plan) -> dict:
    """Constructor arguments with the class defaults filled in."""
    params = inspect.signature(plan.scheduler_class.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **plan.init_kwargs}


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_lists_samplers_as_json():
    code, out, _ = _cli("samplers", "--json")
    assert code == 0
    data = json.loads(out)
    names = {e["name"] for e in data["samplers"]}
    assert names == set(SPEC_NAMES)
    assert data["schedules"]["karras"]["use_karras_sigmas"] is True


def test_cli_table_and_resolution():
    code, out, _ = _cli("samplers")
    assert code == 0 and "DPM++ 2M Karras" in out and "dpmpp_2m" in out
    code, out, _ = _cli("samplers", "dpmpp_2m_sde", "--schedule", "karras", "--json")
    assert code == 0
    resolved = json.loads(out)
    assert resolved["sampler"] == "DPM++ 2M SDE"
    assert resolved["options"]["algorithm_type"] == "sde-dpmsolver++"
    assert resolved["options"]["use_karras_sigmas"] is True
    code, _, err = _cli("samplers", "Euler a Karras")
    assert code == 2 and err.startswith("atelier: error:") and "use_karras_sigmas" in err


# ---------------------------------------------------------------------------------------------
# Convergence on an exactly solvable model

DETERMINISTIC = [s.name for s in SAMPLERS if not s.stochastic]
STOCHASTIC = [s.name for s in SAMPLERS if s.stochastic and not s.own_schedule]


def _errors(name, config_name, schedule, steps, noise):
    errors = []
    for n in steps:
        scheduler = built(name, config_name, schedule)
        errors.append(ode_error(DEFAULT_MIXTURE, run_sampler(scheduler, MixtureModel(DEFAULT_MIXTURE, scheduler), noise, n)))
    return errors


@pytest.mark.parametrize("config_name", ["sd15-loaded", "sd21-loaded"])  # epsilon and v-prediction
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_probability_flow_solution(name, config_name):
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    spec = SPECS[name]
    schedules = [spec.fixed_schedule] if spec.fixed_schedule else [None, *(s for s in ("karras",) if s in spec.schedules)]
    for schedule in schedules:
        e10, e40 = _errors(name, config_name, schedule, (10, 40), noise)
        assert math.isfinite(e10) and math.isfinite(e40)
        # measured on SD 1.5 betas: Euler 0.134 -> 0.044 (first order), Heun 0.067 -> 0.0039
        assert e40 < 0.5 * e10, f"{name} {schedule}: error {e10:.3g} at 10 steps, {e40:.3g} at 40"
        assert e40 < 0.1, f"{name} {schedule}: error {e40:.3g} at 40 steps"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_sample_the_data_distribution(name):
    mixture = DEFAULT_MIXTURE
    scheduler = make_scheduler(name, SD15, **({"noise_sampler_seed": 0} if name == "DPM++ SDE" else {}))
    model = MixtureModel(mixture, scheduler)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3000, 2, generator=generator)
    x = run_sampler(scheduler, model, noise, 30, generator=generator).end_x

    # 3000 draws: sampling error alone is ~0.01 on weights and ~0.04 on the largest covariance
    # entry (1.65); measured at 30 steps: Euler a 0.011 / 0.083, DPM++ 2S a 0.007 / 0.041
    weights = mixture.responsibilities(x).mean(0)
    np.testing.assert_allclose(weights, mixture.weights, atol=0.04, err_msg=name)
    np.testing.assert_allclose(x.mean(0), mixture.mean(), atol=0.06, err_msg=name)
    np.testing.assert_allclose(np.cov(x.T), mixture.covariance(), rtol=0.1, atol=0.03, err_msg=name)
