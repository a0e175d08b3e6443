"""Every A1111 sampler and schedule type runs; any name is answered (fallback or substitution, noted in
the infotext and the API's `info`); SillyTavern's default request (DDIM + normal) is answered 200."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webui_support import decode, shared_server

from nbkit.generation.generate import generate
from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.generation.samplers import (
    FLOW_SAMPLERS,
    SAMPLERS,
    SCHEDULES,
    choose,
    list_samplers,
    list_schedulers,
)

# SillyTavern's request to /sdapi/v1/txt2img with its default settings (SillyTavern's stable-diffusion
# extension `generateAutoImage` and `defaultSettings`; its server forwards the body as it is, with
# `url` and `auth`; `seed` is left out for the default -1 and `sd_vae` for no VAE).
SILLYTAVERN_DEFAULT = {
    "url": "http://localhost:7860",
    "auth": "",
    "prompt": "best quality, absurdres, aesthetic, full body portrait, a knight in a forest",
    "negative_prompt": "lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, "
    "normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "sampler_name": "DDIM",
    "scheduler": "normal",
    "steps": 20,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "restore_faces": False,
    "enable_hr": False,
    "hr_upscaler": "Latent",
    "hr_scale": 2.0,
    "denoising_strength": 0.7,
    "hr_second_pass_steps": 0,
    "override_settings": {"CLIP_stop_at_last_layers": 1},
    "override_settings_restore_afterwards": True,
    "clip_skip": 1,
    "save_images": True,
    "send_images": True,
    "do_not_save_grid": False,
    "do_not_save_samples": False,
}
SMALL = {"width": 64, "height": 64, "steps": 2}
# Spellings of each schedule type a legacy sampler name may end with (label, name, aliases).
SCHEDULE_SPELLINGS = [
    (schedule.label, spelling)
    for schedule in SCHEDULES.values()
    if schedule.label != "Automatic"
    for spelling in (schedule.label, schedule.name, *schedule.aliases)
]


@pytest.fixture(scope="module")
def sd1(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def test_every_sampler_runs_two_steps_on_the_tiny_model(sd1):
    """One pipeline call per sampler (each with another schedule type, so every one runs too)."""
    plain = None
    for name, label in zip(SAMPLERS, itertools.cycle(SCHEDULES), strict=False):
        result = generate(sd1, ["a dog"], seeds=5, steps=2, width=64, height=64, guidance_scale=7.0,
                          sampler=name, schedule=label)  # fmt: skip
        pixels = np.asarray(result.images[0])
        assert result.images[0].size == (64, 64) and pixels.std() > 0, (name, label)
        chosen = choose(name, label)
        info = parse_infotext(result.infotexts[0])
        assert (info.sampler, info.schedule) == (chosen.sampler.name, chosen.schedule.label)
        assert result.warnings == chosen.warnings
        assert [key for key in info.parameters if key.startswith("Sampler ")] == [n.key for n in chosen.notes]
        if name == "Euler":
            plain = pixels
    assert plain is not None


def test_sampler_and_schedule_change_the_image(sd1):
    def pixels(sampler, schedule):
        result = generate(sd1, ["a dog"], seeds=5, sampler=sampler, schedule=schedule, steps=3, width=64,
                          height=64, guidance_scale=7.0)  # fmt: skip
        return np.asarray(result.images[0])

    euler = pixels("Euler", "Automatic")
    assert not np.array_equal(euler, pixels("Euler", "Align Your Steps"))
    assert not np.array_equal(euler, pixels("DPM++ 2M", "Automatic"))
    # DDIM runs its own timesteps, as in A1111: the schedule type does not change its image.
    assert np.array_equal(pixels("DDIM", "Automatic"), pixels("DDIM", "normal"))


@settings(max_examples=300, deadline=None)
@given(sampler=st.text(max_size=40), schedule=st.none() | st.text(max_size=40))
def test_any_names_resolve(sampler, schedule):
    for family in (None, "flux"):
        chosen = choose(sampler, schedule, family)
        table = FLOW_SAMPLERS if family else SAMPLERS
        assert chosen.sampler in table.values()
        assert chosen.schedule.label != "Automatic" or chosen.sampler.default_schedule is None
        assert all(note.kind in ("fallback", "substitution") for note in chosen.notes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sampler=st.sampled_from(list(SAMPLERS)),
    schedule=st.sampled_from(SCHEDULE_SPELLINGS),
    given_schedule=st.sampled_from([None, "", "Automatic", "automatic"]),
)
def test_legacy_combined_names_split(sampler, schedule, given_schedule):
    label, spelling = schedule
    chosen = choose(f"{sampler} {spelling}", given_schedule)
    assert chosen == choose(sampler, label)
    assert chosen.schedule.label == label
    target = SAMPLERS[sampler].substitute
    assert chosen.sampler.name == (target.sampler if target and target.sampler else sampler)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(list(SAMPLERS)), junk=st.text(min_size=1, max_size=12).filter(str.strip))
def test_unknown_names_fall_back_with_a_note(name, junk):
    wrong = f"{junk}#"  # no A1111 name ends with "#"
    chosen = choose(wrong)
    assert chosen.sampler.name == "DPM++ 2M" and [note.key for note in chosen.notes] == ["Sampler fallback"]
    schedule = choose(name, wrong)
    assert schedule.notes[0].key == "Schedule type fallback"
    assert schedule.schedule.label == (SAMPLERS[name].default_schedule or "Automatic")


def test_lists_are_a1111s_full_lists(server, http):
    samplers = http.get(server.api + "/samplers", timeout=10).json()
    assert samplers == list_samplers() and len(samplers) == len(SAMPLERS)
    assert all(set(entry) == {"name", "aliases", "options"} for entry in samplers)
    schedulers = http.get(server.api + "/schedulers", timeout=10).json()
    assert schedulers == list_schedulers() and schedulers[0]["label"] == "Automatic"
    assert all(
        set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for entry in schedulers
    )


def test_sillytaverns_default_request_is_answered(server, http):
    # Its body as sent, but 64x64 for the tiny model (512x512 takes ~30 s on two cores and tests no more).
    replay = {**SILLYTAVERN_DEFAULT, "width": 64, "height": 64}
    response = http.post(server.api + "/txt2img", json=replay, timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["sampler_name"] == "DDIM" and info["warnings"] == []
    image = decode(body["images"][0])
    assert image.size == (64, 64)
    ran = parse_infotext(read_infotext(image))
    assert ran.sampler == "DDIM" and ran.schedule == "Normal" and ran.steps == 20  # A1111 writes "Normal" too
    assert ran.negative_prompt == SILLYTAVERN_DEFAULT["negative_prompt"]


def test_unknown_and_substituted_names_are_answered_with_warnings(server, http):
    fields = {**SMALL, "prompt": "a cat", "seed": 3}
    unknown = http.post(
        server.api + "/txt2img",
        json={**fields, "sampler_name": "No Such Sampler", "scheduler": "wavy"},
        timeout=120,
    )
    assert unknown.status_code == 200, unknown.text
    info = json.loads(unknown.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M"
    assert info["warnings"] == [
        "Sampler fallback: unknown sampler 'No Such Sampler'; ran DPM++ 2M, A1111's first sampler",
        "Schedule type fallback: unknown schedule type 'wavy'; ran Automatic",
    ]
    written = parse_infotext(info["infotexts"][0]).parameters
    assert written["Sampler"] == "DPM++ 2M" and written["Schedule type"] == "Karras"
    assert written["Sampler fallback"].startswith("unknown sampler 'No Such Sampler'")

    adaptive = http.post(
        server.api + "/txt2img", json={**fields, "sampler_name": "DPM adaptive"}, timeout=120
    )
    assert adaptive.status_code == 200, adaptive.text
    info = json.loads(adaptive.json()["info"])
    assert info["sampler_name"] == "DPM adaptive" and info["warnings"][0].startswith(
        "Sampler substitution: DPM adaptive ran as diffusers' DPMSolverSinglestepScheduler("
    )
    read = http.post(
        server.api + "/png-info", json={"image": adaptive.json()["images"][0]}, timeout=30
    ).json()
    assert read["parameters"]["Sampler substitution"] == info["warnings"][0].removeprefix(
        "Sampler substitution: "
    )
