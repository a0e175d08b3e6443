"""A1111 sampler and schedule names -> diffusers schedulers built from the model's own config."""

from __future__ import annotations

import importlib.util

import pytest

from nbkit.errors import NbkitError
from nbkit.generation.samplers import (
    SAMPLERS,
    build_scheduler,
    list_samplers,
    list_schedulers,
    resolve,
    sampler_name,
    schedule_label,
    split_legacy_name,
)

HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None
A1111_SAMPLERS = [
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DDIM",
    "PLMS", "UniPC", "LCM",
]  # fmt: skip


@pytest.fixture(scope="module")
def scheduler_configs(tiny_model_dir):
    from diffusers import DDIMScheduler, PNDMScheduler

    return {
        "sd1": PNDMScheduler.from_pretrained(tiny_model_dir("sd1"), subfolder="scheduler").config,
        "sd2-v": DDIMScheduler.from_pretrained(tiny_model_dir("sd2-v"), subfolder="scheduler").config,
    }


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
@pytest.mark.parametrize("name", A1111_SAMPLERS)
def test_every_sampler_builds_from_the_models_config(scheduler_configs, family, name):
    config = scheduler_configs[family]
    if name == "DPM++ SDE" and not HAS_TORCHSDE:
        with pytest.raises(NbkitError, match="needs the Python package torchsde") as caught:
            build_scheduler(config, name)
        assert "pip install torchsde" in str(caught.value)
        return
    scheduler = build_scheduler(config, name)
    assert type(scheduler).__name__ == SAMPLERS[name].scheduler_class
    assert sampler_name(scheduler) == name  # the reverse mapping
    # The model's own settings survive the swap: v-prediction above all.
    assert scheduler.config.prediction_type == config["prediction_type"]
    assert scheduler.config.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset"):
        if key in scheduler.config:
            assert scheduler.config[key] == config[key], key
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_schedules_set_the_diffusers_flags(scheduler_configs):
    config = scheduler_configs["sd2-v"]
    karras = build_scheduler(config, "Euler", "Karras")
    assert karras.config.use_karras_sigmas and not karras.config.use_exponential_sigmas
    assert build_scheduler(config, "Euler", "exponential").config.use_exponential_sigmas  # any case
    assert build_scheduler(config, "DDIM", "SGM Uniform").config.timestep_spacing == "trailing"
    assert build_scheduler(config, "Euler a", "sgm_uniform").config.timestep_spacing == "trailing"
    plain = build_scheduler(config, "Euler", "Automatic")
    assert not plain.config.use_karras_sigmas and plain.config.timestep_spacing == config["timestep_spacing"]
    # A1111's Automatic is the sampler's own default schedule.
    dpm = build_scheduler(config, "DPM++ 2M")
    assert dpm.config.use_karras_sigmas and dpm.config.algorithm_type == "dpmsolver++"
    sde = build_scheduler(config, "DPM++ 2M SDE", None)
    assert sde.config.use_exponential_sigmas and sde.config.algorithm_type == "sde-dpmsolver++"
    assert [schedule_label(s) for s in (karras, plain, dpm, sde)] == ["Karras", None, "Karras", "Exponential"]
    assert sampler_name(sde) == "DPM++ 2M SDE"


def test_a_flag_in_the_models_config_does_not_leak_into_another_schedule(scheduler_configs):
    karras_config = build_scheduler(scheduler_configs["sd1"], "Euler", "Karras").config
    assert not build_scheduler(karras_config, "Euler", "Exponential").config.use_karras_sigmas


@pytest.mark.parametrize(
    ("legacy", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("LMS Karras", "LMS", "Karras"),
        ("Euler a", "Euler a", None),
        ("k_dpmpp_2m", "k_dpmpp_2m", None),
    ],
)
def test_legacy_names_split_into_sampler_and_schedule(legacy, sampler, schedule):
    assert split_legacy_name(legacy) == (sampler, schedule)
    found, chosen = resolve(legacy, "automatic")
    assert found.name == (sampler if sampler != "k_dpmpp_2m" else "DPM++ 2M")
    assert chosen.label == (schedule or found.default_schedule or "Automatic")


def test_legacy_name_builds_the_same_scheduler_as_the_split_one(scheduler_configs):
    config = scheduler_configs["sd1"]
    legacy = build_scheduler(config, "DPM2 a Karras")
    split = build_scheduler(config, "DPM2 a", "Karras")
    assert dict(legacy.config) == dict(split.config) and legacy.config.use_karras_sigmas


def test_unknown_names_fail_with_the_valid_ones(scheduler_configs):
    with pytest.raises(ValueError, match=r"unknown sampler 'Eular a'; valid samplers: DPM\+\+ 2M, .*Euler a"):
        build_scheduler(scheduler_configs["sd1"], "Eular a")
    with pytest.raises(
        ValueError, match="unknown schedule type 'Karas'; valid schedule types: Automatic, Karras"
    ):
        build_scheduler(scheduler_configs["sd1"], "Euler", "Karas")
    with pytest.raises(
        ValueError, match=r"'Karras' is not available for sampler 'DDIM'.*: Automatic, SGM Uniform"
    ):
        build_scheduler(scheduler_configs["sd1"], "DDIM", "Karras")
    with pytest.raises(ValueError, match="names the Karras schedule but schedule type 'Exponential'"):
        resolve("DPM++ 2M Karras", "Exponential")
    with pytest.raises(ValueError, match="valid samplers"):
        resolve("")


def test_lists_have_a1111s_api_shape():
    samplers = list_samplers()
    assert [entry["name"] for entry in samplers] == list(SAMPLERS)
    assert set(A1111_SAMPLERS) == {entry["name"] for entry in samplers}
    euler_a = next(entry for entry in samplers if entry["name"] == "Euler a")
    assert euler_a == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "options": {"uses_ensd": "True"},
    }
    schedulers = list_schedulers()
    assert [entry["label"] for entry in schedulers][:4] == [
        "Automatic",
        "Karras",
        "Exponential",
        "SGM Uniform",
    ]
    assert schedulers[1] == {
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
