"""Z-Image and FLUX.2 [klein] in the web UI's generation service, its gradio fields and the A1111 API
(their tiny models, CPU, 64 px, 2 steps)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import test_webui_browser as web
import torch
from PIL import Image
from test_webui_browser import browser  # noqa: F401  (the fixture)
from webui_support import decode, png_b64, start_server

from nbkit.errors import NbkitError
from nbkit.families import get_family
from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.models.memory import DeviceFacts
from nbkit.webui.models import ModelCatalog
from nbkit.webui.service import GenerationRequest, GenerationService

FAMILIES = ("zimage", "flux2")
FAST = {
    "steps": 2,
    "width": 64,
    "height": 64,
    "seed": 1234,
    "save_images": False,
    "prompt": "a dog",
    "sampler_name": "Euler",
    "cfg_scale": 1.0,
}


def _req(**overrides):
    return GenerationRequest(**{**FAST, **overrides})


def _pixels(output):
    return [np.asarray(image) for image in output.images]


def _diffusers_lora(name, folder, path):
    """A train-free LoRA of the tiny transformer (peft on the family's LoRA targets, random non-zero B),
    saved by the pipeline's `save_lora_weights`: the diffusers file a session's LoRA loads from."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = DiffusionPipeline.from_pretrained(folder)
    targets = get_family(name).lora_target_modules("transformer")
    pipeline.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    )
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        for key, parameter in pipeline.transformer.named_parameters():
            if "lora_B" in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    type(pipeline).save_lora_weights(
        path.parent / "tmp-lora", transformer_lora_layers=get_peft_model_state_dict(pipeline.transformer)
    )
    shutil.move(path.parent / "tmp-lora" / "pytorch_lora_weights.safetensors", path)
    shutil.rmtree(path.parent / "tmp-lora")


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """A storage root with both tiny models in models/ and a LoRA of each in loras/."""
    root = tmp_path_factory.mktemp("zimage-flux2-root")
    (root / "loras").mkdir()
    for name in FAMILIES:
        shutil.copytree(tiny_model_dir(name), root / "models" / f"tiny-{name}")
        _diffusers_lora(name, root / "models" / f"tiny-{name}", root / "loras" / f"{name}lora.safetensors")
    return root


_services: dict[str, GenerationService] = {}


@pytest.fixture(params=FAMILIES)
def service(request, root):
    name = request.param
    if name not in _services:
        catalog = ModelCatalog(storage_root=root, include_base_models=False)
        _services[name] = GenerationService(catalog, device="cpu", model=f"tiny-{name}")
    return _services[name]


def test_txt2img_same_seed_same_image_and_infotext(service):
    first = service.generate(_req(batch_size=2))
    again = service.generate(_req(batch_size=2))
    assert service.family in FAMILIES and first.seeds == [1234, 1235]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again), strict=True))
    info = parse_infotext(first.infotexts[0])
    assert info.sampler == "Euler" and info.schedule == "Simple" and info.cfg_scale == 1.0
    assert info.parameters["Model"] == f"tiny-{service.family}"
    substituted = service.generate(_req(sampler_name="DPM++ 2M Karras"))
    assert substituted.warnings[0].startswith("Sampler substitution: DPM++ 2M ran as Euler")
    assert parse_infotext(substituted.infotexts[0]).sampler == "Euler"


def test_live_preview_where_the_family_has_one(service):
    service.preview_every = 1
    seen = []
    original = service._set_progress

    def spy(**changes):
        if "preview" in changes:
            seen.append(changes["preview"])
        original(**changes)

    service._set_progress = spy
    try:
        service.generate(_req())
    finally:
        del service._set_progress
    previews = [image for image in seen if image is not None]
    if get_family(service.family).preview_coefficients:  # Z-Image: 1/8 size
        assert [image.size for image in previews] == [(8, 8), (8, 8)]
    else:  # FLUX.2: none
        assert previews == []


def test_lora_weight_changes_the_image_and_unloads(service):
    bare = _pixels(service.generate(_req()))[0]  # loads the model: its family is known from here on
    name = f"{service.family}lora"
    half = service.generate(_req(prompt=f"a dog <lora:{name}:0.5>"))
    full = service.generate(_req(prompt=f"a dog <lora:{name}:1>"))
    assert not np.array_equal(bare, _pixels(half)[0]) and not np.array_equal(
        _pixels(half)[0], _pixels(full)[0]
    )
    assert f'Lora hashes: "{name}: ' in half.infotexts[0]
    assert parse_infotext(half.infotexts[0]).prompt == f"a dog <lora:{name}:0.5>"
    # A trailing tag leaves no space behind (the Qwen tokenizer would keep it).
    assert np.array_equal(bare, _pixels(service.generate(_req(prompt=f"a dog <lora:{name}:0>")))[0])
    assert np.array_equal(bare, _pixels(service.generate(_req()))[0])  # unloaded after the request
    assert not service.pipeline.get_list_adapters()
    # The other family's LoRA fits none of this model's modules: said in nbkit's words, not peft's.
    other = next(family for family in FAMILIES if family != service.family)
    with pytest.raises(NbkitError, match="made for another model family"):
        service.generate(_req(prompt=f"a dog <lora:{other}lora:1>"))
    assert np.array_equal(bare, _pixels(service.generate(_req()))[0])
    assert not service.pipeline.get_list_adapters()


def test_img2img_inpaint_and_hires(service):
    init = Image.new("RGB", (64, 64), (220, 40, 40))
    first = service.generate(_req(mode="img2img", init_image=init, steps=3, denoising_strength=0.7))
    again = service.generate(_req(mode="img2img", init_image=init, steps=3, denoising_strength=0.7))
    assert np.array_equal(_pixels(first)[0], _pixels(again)[0])
    assert "Denoising strength: 0.7" in first.infotexts[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = service.generate(
        _req(mode="inpaint", init_image=init, mask=mask, mask_blur=0, steps=3, denoising_strength=0.9)
    )
    pixels = np.asarray(painted.images[0])
    assert (pixels[:8, :8] == (220, 40, 40)).all()  # the unmasked area keeps its pixels
    assert not (pixels[24:40, 24:40] == (220, 40, 40)).all()
    hires = service.generate(
        _req(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.6)
    )
    assert hires.images[0].size == (96, 96) and "Hires upscaler: Lanczos" in hires.infotexts[0]
    with pytest.raises(ValueError, match="pick a pixel upscaler"):
        service.generate(_req(enable_hr=True, hr_upscaler="Latent"))


def test_left_out_fields_take_the_models_own_defaults(service):
    """What an API client leaves out (`model_defaults`) takes the model's settings: Turbo's 8 steps,
    [klein]'s 4, CFG 1, and a pixel upscaler for the hires fix."""
    steps = {"zimage": 8, "flux2": 4}[service.family]
    left = ("steps", "cfg_scale", "sampler_name", "scheduler", "hr_upscaler")
    output = service.generate(
        _req(
            steps=50,
            cfg_scale=7.0,
            sampler_name="Euler",
            hr_upscaler="Latent",
            enable_hr=True,
            hr_scale=1.25,
            denoising_strength=0.5,
            model_defaults=left,
        )
    )
    ran = output.request
    assert (ran.steps, ran.cfg_scale, ran.hr_upscaler) == (steps, 1.0, "Lanczos")
    assert f"Steps: {steps}," in output.infotexts[0] and "CFG scale: 1," in output.infotexts[0]
    given = service.generate(_req(steps=3, cfg_scale=2.0))  # values the client sent stay
    assert "Steps: 3," in given.infotexts[0]


def test_ui_fields_take_the_loaded_models_defaults(service):
    import gradio as gr

    from nbkit.webui.panel import Panel
    from nbkit.webui.security import Limits
    from nbkit.webui.ui import _model_defaults, fitted_fields

    service.ensure_model()
    with gr.Blocks():
        panels = {mode: Panel(mode, Limits()) for mode in ("txt2img", "img2img")}
    names = {id(component): name for panel in panels.values() for name, component in panel.fields.items()}
    defaults = _model_defaults(service)
    updates = fitted_fields(panels, service.family, defaults, set_values=True)
    values: dict[str, list] = {}
    for component, update in updates:
        values.setdefault(names[id(component)], []).append(update)
    steps = {"zimage": 8, "flux2": 4}[service.family]
    assert [args["value"] for args in values["steps"]] == [steps, steps]
    assert [args["value"] for args in values["cfg_scale"]] == [1.0, 1.0]
    assert [args["choices"] for args in values["sampler_name"]] == [["Euler"], ["Euler"]]
    assert [args["value"] for args in values["hr_upscaler"]] == ["Lanczos"]  # txt2img's only
    assert all(args["visible"] is False for args in values["distilled_cfg_scale"])

    def sent(updates, name):
        return [update.get("value") for c, update in updates if names[id(c)] == name]

    # The same model's defaults again: the values people set stay (only the menus' choices are sent).
    assert sent(fitted_fields(panels, service.family, defaults, set_values=False), "steps") == [None, None]
    # A page just opened on an SD model: its fields already hold A1111's defaults, none is sent again.
    opened = fitted_fields(
        panels, "sd1", get_family("sd1").generation_defaults(None), set_values=True, opened=True
    )
    assert all(
        sent(opened, name) == [None, None] for name in ("steps", "cfg_scale", "sampler_name", "scheduler")
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_faked_t4_is_refused_before_loading(name, root, monkeypatch):
    import nbkit.models.memory as memory

    monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("Tesla T4", 15.0, bf16=False))
    catalog = ModelCatalog(storage_root=root, include_base_models=False)
    service = GenerationService(catalog, device="cuda", model=f"tiny-{name}")
    title = re.escape(get_family(name).title)
    with pytest.raises(NbkitError, match=rf"Tesla T4 cannot run {title}: it has no bfloat16"):
        service.generate(_req())
    assert service.pipeline is None


@pytest.fixture(scope="module")
def server(root):
    process = start_server(root, root / "models" / "tiny-zimage")
    yield process
    process.stop()


@pytest.mark.parametrize("name", FAMILIES)
def test_api_txt2img_lora_img2img_and_defaults(server, name):
    import requests

    body = {
        "prompt": "a dog",
        "seed": 1234,
        "width": 64,
        "height": 64,
        "override_settings": {"sd_model_checkpoint": f"tiny-{name}"},
        "override_settings_restore_afterwards": False,
    }
    steps = {"zimage": 8, "flux2": 4}[name]
    response = requests.post(server.api + "/txt2img", json=body, timeout=300)
    assert response.status_code == 200, response.text
    data = response.json()
    text = read_infotext(decode(data["images"][0]))
    # steps and CFG left out: the model's own (A1111's 50 steps at CFG 7 would be wrong for it)
    assert f"Steps: {steps}," in text and "CFG scale: 1," in text and "Sampler: Euler" in text
    info = json.loads(data["info"])
    assert info["steps"] == steps and info["cfg_scale"] == 1.0 and info["infotexts"] == [text]
    # A CFG scale sent runs on Z-Image; the distilled [klein] ignores it, and info says what ran, as the
    # infotext does.
    asked = requests.post(server.api + "/txt2img", json={**body, "steps": 2, "cfg_scale": 4.0}, timeout=300)
    ran = {"zimage": 4.0, "flux2": 1.0}[name]
    assert json.loads(asked.json()["info"])["cfg_scale"] == ran
    assert f"CFG scale: {ran:g}," in read_infotext(decode(asked.json()["images"][0]))

    fast = {**body, "steps": 2, "cfg_scale": 1.0}
    bare = requests.post(server.api + "/txt2img", json=fast, timeout=300).json()
    lora = requests.post(
        server.api + "/txt2img", json={**fast, "prompt": f"a dog <lora:{name}lora:0.5>"}, timeout=300
    ).json()
    lora_text = read_infotext(decode(lora["images"][0]))
    assert "Steps: 2," in lora_text and f'Lora hashes: "{name}lora: ' in lora_text
    assert not np.array_equal(np.asarray(decode(bare["images"][0])), np.asarray(decode(lora["images"][0])))

    init = png_b64(Image.new("RGB", (64, 64), (30, 200, 30)))
    response = requests.post(
        server.api + "/img2img",
        json={**fast, "init_images": [init], "denoising_strength": 0.7, "steps": 3},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert "Denoising strength: 0.7" in read_infotext(decode(response.json()["images"][0]))

    hires = requests.post(
        server.api + "/txt2img", json={**fast, "enable_hr": True, "hr_scale": 1.5}, timeout=300
    )
    assert hires.status_code == 200, hires.text  # no upscaler named: a pixel one, not "Latent"
    assert decode(hires.json()["images"][0]).size == (96, 96)
    euler_a = requests.post(server.api + "/txt2img", json={**fast, "sampler_name": "Euler a"}, timeout=300)
    assert euler_a.status_code == 200, euler_a.text  # runs as the flow-matching Euler, said in info
    assert json.loads(euler_a.json()["info"])["warnings"][0].startswith(
        "Sampler substitution: Euler a ran as Euler"
    )


@web.pytestmark  # skipped without Debian's chromium, as the other browser tests
@pytest.mark.parametrize("name", FAMILIES)
def test_browser_opens_on_the_models_defaults_and_generates(name, tmp_path, tiny_model_dir, browser):  # noqa: F811
    """The page opens with the model's own steps and CFG, a flow sampler and a pixel hires upscaler."""
    from selenium.webdriver.common.by import By

    server = start_server(tmp_path / "root", tiny_model_dir(name), "--auth", f"{web.USER}:{web.PASSWORD}")
    try:
        web._log_in(browser, server.url)
        steps = {"zimage": "8", "flux2": "4"}[name]
        field = browser.find_element(
            By.XPATH,
            "//label[contains(., 'Sampling steps')]/ancestor::div[contains(@class,'block')][1]//input[@type='number']",
        )
        web._wait(lambda: field.get_attribute("value") == steps, 60, f"the steps to become {steps}")
        cfg = browser.find_element(By.CSS_SELECTOR, "#txt2img-cfg input[type='number']")
        assert cfg.get_attribute("value") == "1"
        assert (
            browser.find_element(By.CSS_SELECTOR, "#txt2img-sampler input").get_attribute("value") == "Euler"
        )
        info = web._generate(browser, "a photo of zwx dog")
    finally:
        server.stop()
    assert info.startswith("a photo of zwx dog\n") and "Steps: 3," in info and "CFG scale: 1," in info


def test_api_fields_left_out_and_the_sd_families_keep_a1111s_defaults():
    from nbkit.webui.api_models import Txt2ImgRequest, to_generation_request
    from nbkit.webui.requests import MODEL_DEFAULT_FIELDS
    from nbkit.webui.security import Limits

    left_out = to_generation_request(Txt2ImgRequest(prompt="a dog"), Limits())
    assert set(left_out.model_defaults) == set(MODEL_DEFAULT_FIELDS)
    assert (left_out.steps, left_out.cfg_scale, left_out.sampler_name) == (50, 7.0, "Euler")  # A1111's
    sent = to_generation_request(
        Txt2ImgRequest(prompt="a dog", steps=5, sampler_index="Euler", hr_upscaler="Latent"), Limits()
    )
    assert set(sent.model_defaults) == {"cfg_scale", "scheduler"}

    service = GenerationService(ModelCatalog(include_base_models=False), device="cpu")
    request = GenerationRequest(
        steps=50, cfg_scale=7.0, hr_upscaler="Latent", model_defaults=MODEL_DEFAULT_FIELDS
    )
    assert service._with_model_defaults(request, get_family("sd1")) is request
    flux = service._with_model_defaults(request, get_family("flux"))  # FLUX.1 packs its latents
    assert (flux.steps, flux.cfg_scale, flux.sampler_name, flux.hr_upscaler) == (
        50,
        7.0,
        "Euler a",
        "Lanczos",
    )
