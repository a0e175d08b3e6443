"""A1111 sampler and schedule names -> diffusers schedulers built from the model's own config, stepping
through the sigmas A1111 computes; fallbacks and substitutions noted, never an error."""

from __future__ import annotations

import numpy as np
import pytest

from nbkit.generation import schedules
from nbkit.generation.samplers import (
    SAMPLERS,
    SCHEDULES,
    build_scheduler,
    choose,
    list_samplers,
    list_schedulers,
    resolve,
    sampler_name,
    split_legacy_name,
)


@pytest.fixture(scope="module")
def scheduler_configs(tiny_model_dir):
    from diffusers import DDIMScheduler, PNDMScheduler

    return {
        "sd1": PNDMScheduler.from_pretrained(tiny_model_dir("sd1"), subfolder="scheduler").config,
        "sd2-v": DDIMScheduler.from_pretrained(tiny_model_dir("sd2-v"), subfolder="scheduler").config,
    }


@pytest.fixture(scope="module")
def table(scheduler_configs):
    from diffusers import DDPMScheduler

    return schedules.training_sigmas(DDPMScheduler.from_config(scheduler_configs["sd1"]).alphas_cumprod)


def _step_sigmas(scheduler) -> np.ndarray:
    """The distinct sigmas a k-diffusion-style scheduler steps through (second-order ones repeat some)."""
    values = scheduler.sigmas.numpy().astype(np.float64)
    return np.array(sorted(set(np.round(values, 4).tolist()), reverse=True))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_from_the_models_config(scheduler_configs, family, name):
    config = scheduler_configs[family]
    scheduler = build_scheduler(config, name, "Karras")
    # The model's own settings survive the swap: v-prediction above all.
    assert scheduler.config.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        assert scheduler.config[key] == config[key], key
    scheduler.set_timesteps(5)
    assert 5 <= len(scheduler.timesteps) <= 10  # second-order schedulers list most timesteps twice


@pytest.mark.parametrize("label", list(SCHEDULES))
@pytest.mark.parametrize("name", ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM++ 2M", "DPM++ SDE"])
def test_schedulers_step_through_a1111s_sigmas(scheduler_configs, table, name, label):
    """Each schedule type reaches each kind of diffusers scheduler (Karras hook, Euler a's sigmas)."""
    scheduler = build_scheduler(scheduler_configs["sd1"], name, label)
    scheduler.set_timesteps(7)
    chosen = choose(name, label)
    wanted = schedules.schedule_sigmas(
        chosen.schedule.name, table, 7, discard_penultimate=chosen.sampler.discard_penultimate
    )
    if (
        wanted[-1] > 0
        and "use_karras_sigmas" in scheduler.config
        and "final_sigmas_type" not in scheduler.config
    ):
        wanted[-1] = 0.0  # KL Optimal's last sigma: these schedulers always end at 0
    np.testing.assert_allclose(_step_sigmas(scheduler), np.round(wanted, 4), rtol=1e-3, atol=1e-3)


def test_lcm_runs_a1111s_sigmas_on_its_distilled_timesteps(scheduler_configs):
    scheduler = build_scheduler(scheduler_configs["sd1"], "LCM")
    scheduler.set_timesteps(4)
    # A1111's LCM steps evenly over the 50 timesteps LCM was distilled on (19, 39, ..., 999).
    assert scheduler.timesteps.tolist()[0] == 999 and scheduler.timesteps.tolist()[-1] == 19
    assert all((int(t) + 1) % 20 == 0 for t in scheduler.timesteps)
    karras = build_scheduler(scheduler_configs["sd1"], "LCM", "Karras")
    karras.set_timesteps(4)
    assert karras.timesteps.tolist() != scheduler.timesteps.tolist()


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "UniPC", "DPM fast"])
def test_timestep_samplers_ignore_the_schedule_type_as_a1111s_do(scheduler_configs, name):
    timesteps = []
    for label in ("Automatic", "Karras", "Normal"):
        scheduler = build_scheduler(scheduler_configs["sd1"], name, label)
        scheduler.set_timesteps(20)
        timesteps.append(scheduler.timesteps.tolist())
    assert timesteps[0] == timesteps[1] == timesteps[2]


def test_ddim_takes_a1111s_timesteps(scheduler_configs):
    scheduler = build_scheduler(scheduler_configs["sd2-v"], "DDIM", "normal")
    scheduler.set_timesteps(20)
    # A1111: timesteps 0, 50, ..., 950 plus one, the last step down to the first training alpha.
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


@pytest.mark.parametrize("name", list(schedules.SIGMA_FUNCTIONS))
@pytest.mark.parametrize("steps", [1, 2, 10, 11, 33])
def test_schedules_descend_from_the_models_range(table, name, steps):
    sigmas = schedules.schedule_sigmas(name, table, steps)
    assert len(sigmas) == steps + 1 and np.all(np.diff(sigmas) < 0)
    if name != "align_your_steps":  # NVIDIA's published sigmas, not the model's own range
        assert sigmas[0] <= table[-1] * 1.0001 and sigmas[-2] >= table[0] * 0.9999
    assert sigmas[-1] == pytest.approx(table[0]) if name == "kl_optimal" else sigmas[-1] == 0.0


def test_schedule_shapes(table):
    karras = schedules.schedule_sigmas("karras", table, 10)[:-1]
    assert karras[0] == pytest.approx(table[-1]) and karras[-1] == pytest.approx(table[0])
    exponential = schedules.schedule_sigmas("exponential", table, 10)[:-1]
    assert np.allclose(np.diff(np.log(exponential)), np.log(exponential[1] / exponential[0]))
    # At A1111's default rho 1, polyexponential is the exponential schedule.
    assert np.allclose(schedules.schedule_sigmas("polyexponential", table, 10)[:-1], exponential)
    kl = schedules.schedule_sigmas("kl_optimal", table, 10)
    assert np.allclose(np.diff(np.arctan(kl)), np.arctan(kl[1]) - np.arctan(kl[0]))
    # Automatic, Uniform and Normal: timesteps evenly spaced from the last to the first.
    uniform = schedules.schedule_sigmas("normal", table, 10)[:-1]
    assert np.allclose(np.diff(schedules.sigma_to_t(table, uniform)), -999 / 9)
    sgm = schedules.schedule_sigmas("sgm_uniform", table, 10)[:-1]
    assert np.allclose(schedules.sigma_to_t(table, sgm), np.linspace(999, 0, 11)[:-1])
    # DPM2's discarded next-to-last sigma: 11 steps' sigmas without the smallest non-zero one.
    eleven = schedules.schedule_sigmas("karras", table, 11)
    assert np.allclose(
        schedules.schedule_sigmas("karras", table, 10, discard_penultimate=True), np.delete(eleven, -2)
    )


def test_align_your_steps_takes_the_sdxl_list_for_1024_pixel_families(table):
    from nbkit.generation.placement import as_family

    sd1 = schedules.schedule_sigmas("align_your_steps", table, 11, as_family("sd1"))
    sdxl = schedules.schedule_sigmas("align_your_steps", table, 11, as_family("sdxl"))
    assert sd1[0] == sdxl[0] and not np.allclose(sd1, sdxl)
    assert np.allclose(sd1[:-1], schedules.AYS_SD15) and np.allclose(sdxl[:-1], schedules.AYS_SDXL)


def test_automatic_is_the_samplers_own_default():
    assert resolve("DPM++ 2M", "Automatic")[1].label == "Karras"
    assert resolve("DPM++ 2M SDE", None)[1].label == "Exponential"
    assert resolve("DPM2 a", "")[1].label == "Karras"
    assert resolve("Euler a", "automatic")[1].label == "Automatic"
    assert resolve("Euler", "NORMAL")[1].label == "Normal"  # any case, name or label


@pytest.mark.parametrize(
    ("legacy", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE Heun Exponential", "DPM++ 2M SDE Heun", "Exponential"),
        ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", None),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("Euler a sgm_uniform", "Euler a", "SGM Uniform"),
        ("Euler a", "Euler a", None),
        ("k_dpmpp_2m", "k_dpmpp_2m", None),
    ],
)
def test_legacy_names_split_into_sampler_and_schedule(legacy, sampler, schedule):
    assert split_legacy_name(legacy) == (sampler, schedule)
    chosen = choose(legacy, "automatic")
    assert chosen.sampler.name == (sampler if sampler != "k_dpmpp_2m" else "DPM++ 2M") and not chosen.notes
    assert chosen.schedule.label == (schedule or chosen.sampler.default_schedule or "Automatic")


def test_legacy_name_builds_the_same_scheduler_as_the_split_one(scheduler_configs):
    config = scheduler_configs["sd1"]
    legacy, split = build_scheduler(config, "DPM2 a Karras"), build_scheduler(config, "DPM2 a", "Karras")
    legacy.set_timesteps(6)
    split.set_timesteps(6)
    assert dict(legacy.config) == dict(split.config) and legacy.sigmas.tolist() == split.sigmas.tolist()


def test_unknown_names_fall_back_as_a1111s_do():
    unknown = choose("Eular a", "Karas")
    assert unknown.sampler.name == "DPM++ 2M"  # A1111's first sampler
    assert unknown.schedule.label == "Karras"  # Automatic: DPM++ 2M's own default
    assert [str(note) for note in unknown.notes] == [
        "Sampler fallback: unknown sampler 'Eular a'; ran DPM++ 2M, A1111's first sampler",
        "Schedule type fallback: unknown schedule type 'Karas'; ran Automatic",
    ]
    assert unknown.infotext_pairs()["Sampler fallback"].startswith("unknown sampler 'Eular a'")
    # A legacy suffix wins over the schedule type, as in A1111, and says so.
    legacy = choose("DPM++ 2M Karras", "Exponential")
    assert (
        legacy.schedule.label == "Karras" and "takes over schedule type 'Exponential'" in legacy.warnings[0]
    )
    # An empty name is A1111's first sampler, silently.
    assert choose("", None).sampler.name == "DPM++ 2M" and not choose("", None).notes
    with pytest.raises(ValueError, match="sampler must be a sampler name"):
        choose(3)


@pytest.mark.parametrize(
    ("asked", "ran"),
    [
        ("DPM++ 2S a", "DPM2 a"),
        ("DPM++ 3M SDE", "DPM++ 2M SDE"),
        ("Restart", "Heun"),
        ("DDIM CFG++", "DDIM"),
        ("DPM fast", "DPM fast"),
        ("DPM adaptive", "DPM adaptive"),
    ],
)
def test_substitutions_name_what_ran(asked, ran):
    chosen = choose(asked)
    assert chosen.sampler.name == ran
    assert [note.key for note in chosen.notes] == ["Sampler substitution"]
    assert chosen.warnings[0].startswith(f"Sampler substitution: {asked} ran as ")
    if asked == "Restart":  # Restart's own default schedule, so Heun runs the same sigmas
        assert chosen.schedule.label == "Karras"


def test_dpm_sde_without_torchsde_runs_as_dpm_2m_sde(monkeypatch, scheduler_configs):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else real(name, *a)
    )
    chosen = choose("DPM++ SDE Karras")
    assert chosen.sampler.name == "DPM++ 2M SDE" and chosen.schedule.label == "Karras"
    assert "pip install torchsde" in chosen.warnings[0]
    assert type(chosen.build(scheduler_configs["sd1"])).__name__ == "DPMSolverMultistepScheduler"


def test_flow_models_run_euler_and_note_what_they_replace():
    assert not choose("Euler", "Beta", "flux").notes
    sd = choose("DPM++ 2M Karras", None, "flux")
    assert (sd.sampler.name, sd.schedule.label) == ("Euler", "Karras")
    assert sd.warnings == [
        "Sampler substitution: DPM++ 2M ran as Euler: nbkit runs FLUX.1 models (flow matching) with "
        "diffusers' flow-matching Euler (FlowMatchEulerDiscreteScheduler) only"
    ]
    other = choose("Nope", "normal", "flux")
    assert (other.sampler.name, other.schedule.label) == ("Euler", "Simple")
    assert [note.key for note in other.notes] == ["Sampler fallback", "Schedule type substitution"]
    assert choose("Euler", "Automatic", "flux").schedule.label == "Simple"


def test_lists_have_a1111s_api_shape():
    samplers = list_samplers()
    names = [entry["name"] for entry in samplers]
    assert names == list(SAMPLERS) and names[0] == "DPM++ 2M" and len(names) == len(set(names))
    assert {"DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart",
            "DDIM CFG++", "LCM"} <= set(names)  # fmt: skip
    euler_a = next(entry for entry in samplers if entry["name"] == "Euler a")
    assert euler_a == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "options": {"uses_ensd": "True"},
    }
    schedulers = list_schedulers()
    assert [entry["name"] for entry in schedulers] == list(schedules.SIGMA_FUNCTIONS)
    assert schedulers[2] == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }


def test_sampler_name_of_schedulers_a1111_does_not_know():
    class CustomScheduler:
        config = None

    assert sampler_name(CustomScheduler()) == "CustomScheduler"
