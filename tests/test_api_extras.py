"""A1111's extras routes and upscaler lists against a real `nbkit ui` server (tiny model, tiny ESRGANs in
its upscalers folder, CPU), with plain requests and with webuiapi's own calls."""

from __future__ import annotations

import base64
import io
import json
import urllib.parse

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from webui_support import PASSWORD, USER, decode, png_b64, shared_server

from nbkit.generation.infotext import read_infotext
from nbkit.generation.upscalers import KNOWN_UPSCALERS, save_tiny_esrgan


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    server = shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))
    for scale in (2, 4):  # the folder is listed on every request: no restart needed
        save_tiny_esrgan(server.root / "upscalers", scale=scale)
    return server


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _picture(width: int = 40, height: int = 24) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _with_parameters(image: Image.Image, text: str) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def _single(http, server, **fields):
    return http.post(server.api + "/extra-single-image", json=fields, timeout=120)


def test_upscalers_latent_modes_and_realesrgan_lists(server, http):
    upscalers = http.get(server.api + "/upscalers", timeout=30).json()
    names = [item["name"] for item in upscalers]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert names[3:] == sorted(names[3:], key=str.lower)
    assert {"tiny-esrgan-2x", "tiny-esrgan-4x", *KNOWN_UPSCALERS} <= set(names)
    items = {item["name"]: item for item in upscalers}
    assert set(items["None"]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert items["tiny-esrgan-2x"]["scale"] == 2
    assert items["tiny-esrgan-2x"]["model_path"].endswith("upscalers/tiny-esrgan-2x.safetensors")
    assert items["R-ESRGAN 4x+"]["model_url"].endswith("/RealESRGAN_x4plus.pth")
    modes = [item["name"] for item in http.get(server.api + "/latent-upscale-modes", timeout=30).json()]
    assert modes == [
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    ]
    realesrgan = http.get(server.api + "/realesrgan-models", timeout=30).json()
    assert {item["name"] for item in realesrgan} >= {"R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "R-ESRGAN 2x+"}
    assert all(set(item) == {"name", "path", "scale"} for item in realesrgan)


@pytest.mark.parametrize(
    ("upscaler", "factor", "size"),
    [
        ("None", 2, (40, 24)),  # A1111: no upscaler 1, the picture as it was
        ("Lanczos", 2, (80, 48)),
        ("Nearest", 1.5, (56, 32)),  # rounded down to a multiple of 8, as A1111 does
        ("tiny-esrgan-4x", 2, (80, 48)),
        ("tiny-esrgan-2x", 3, (120, 72)),
    ],
)
def test_single_image_with_each_upscaler_kind(server, http, upscaler, factor, size):
    source = _with_parameters(_picture(), "a dog\nSteps: 2, Seed: 7, Size: 40x24")
    response = _single(http, server, image=source, upscaler_1=upscaler, upscaling_resize=factor)
    assert response.status_code == 200, response.text
    body = response.json()
    image = decode(body["image"])
    assert image.size == size
    assert image.info["parameters"] == "a dog\nSteps: 2, Seed: 7, Size: 40x24"  # the input's chunk stays
    if upscaler == "None":
        assert body["html_info"] == "<p></p>" and "postprocessing" not in image.info
    else:
        text = f"Postprocess upscale by: {factor:g}, Postprocess upscaler: {upscaler}"
        assert image.info["postprocessing"] == text and body["html_info"] == f"<p>{text}</p>"


def test_models_differ_from_lanczos_and_scale_to_crops(server, http):
    source = png_b64(_picture())
    results = {
        name: np.asarray(decode(_single(http, server, image=source, upscaler_1=name).json()["image"]), int)
        for name in ("Lanczos", "tiny-esrgan-4x")
    }
    assert np.abs(results["Lanczos"] - results["tiny-esrgan-4x"]).mean() > 1
    body = _single(
        http,
        server,
        image=source,
        upscaler_1="tiny-esrgan-2x",
        resize_mode=1,
        upscaling_resize_w=64,
        upscaling_resize_h=64,
        upscaler_2="Nearest",
        extras_upscaler_2_visibility=0.4,
        codeformer_visibility=0.5,
        codeformer_weight=0.3,
        gfpgan_visibility=None,  # null: the default
    ).json()
    assert decode(body["image"]).size == (64, 64)
    for part in (
        "Postprocess upscale to: 64x64",
        "Postprocess crop to: 64x64",
        "Postprocess upscaler 2: Nearest",
    ):
        assert part in body["html_info"]
    assert "CodeFormer visibility: 0.5" in body["html_info"] and "no face restorers" in body["html_info"]


def test_batch_images(server, http):
    response = http.post(
        server.api + "/extra-batch-images",
        json={
            "imageList": [
                {"data": png_b64(_picture(40, 24)), "name": "a.png"},
                {"data": "data:image/png;base64," + png_b64(_picture(16, 32)), "name": "b.png"},
            ],
            "upscaler_1": "tiny-esrgan-2x",
            "upscaling_resize": 2,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [decode(image).size for image in body["images"]] == [(80, 48), (32, 64)]
    assert "Postprocess upscaler: tiny-esrgan-2x" in body["html_info"]


def test_results_follow_the_samples_format_option(server, http):
    """As A1111's extras: a JPEG when the option says jpg, with the generation's parameters in its EXIF."""
    assert http.post(server.api + "/options", json={"samples_format": "jpg"}, timeout=30).status_code == 200
    try:
        encoded = _with_parameters(_picture(), "a red fox\nSteps: 2, Seed: 7")
        response = _single(http, server, image=encoded, upscaler_1="Nearest", upscaling_resize=2)
    finally:
        http.post(server.api + "/options", json={"samples_format": "png"}, timeout=30)
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image"])
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert read_infotext(data) == "a red fox\nSteps: 2, Seed: 7"


def test_refusals(server, http):
    source = png_b64(_picture())
    unknown = _single(http, server, image=source, upscaler_1="tiny-esrgan-4")
    assert unknown.status_code == 400 and "tiny-esrgan-4x" in unknown.text  # the close name
    too_big = _single(http, server, image=source, upscaler_1="Lanczos", upscaling_resize=200)
    assert too_big.status_code == 400 and "limit" in too_big.text
    offline = _single(http, server, image=source, upscaler_1="R-ESRGAN 4x+")
    assert offline.status_code == 400 and "HF_HUB_OFFLINE" in offline.text
    assert _single(http, server, image="not base64 of a picture!", upscaler_1="Lanczos").status_code == 422
    assert _single(http, server, image=source, resize_mode=2).status_code == 422
    assert _single(http, server, image=source, extras_upscaler_2_visibility=1.5).status_code == 422
    many = [{"data": source, "name": f"{i}.png"} for i in range(17)]
    assert (
        http.post(server.api + "/extra-batch-images", json={"imageList": many}, timeout=60).status_code == 400
    )
    assert not (server.root / "upscalers" / "RealESRGAN_x4plus.pth").exists()


def test_webuiapi_extras_calls_work_unchanged(server):
    webuiapi = pytest.importorskip("webuiapi")
    address = urllib.parse.urlsplit(server.url)
    api = webuiapi.WebUIApi(host=address.hostname, port=address.port)
    api.set_auth(USER, PASSWORD)
    single = api.extra_single_image(image=_picture(), upscaler_1="tiny-esrgan-4x", upscaling_resize=2)
    assert single.image.size == (80, 48) and "tiny-esrgan-4x" in single.info
    batch = api.extra_batch_images(
        images=[_picture(), _picture(24, 24)], upscaler_1="Lanczos", upscaling_resize=1.5
    )
    assert [image.size for image in batch.images] == [(56, 32), (32, 32)]


def test_the_hires_fix_runs_a_model_upscaler(server, http):
    response = http.post(
        server.api + "/txt2img",
        json={
            "prompt": "a dog",
            "width": 64,
            "height": 64,
            "steps": 2,
            "enable_hr": True,
            "hr_scale": 1.5,
            "hr_upscaler": "tiny-esrgan-4x",
            "denoising_strength": 0.5,
        },
        timeout=180,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert decode(body["images"][0]).size == (96, 96)
    info = json.loads(body["info"])
    infotext = info["infotexts"][0]
    assert "Hires upscaler: tiny-esrgan-4x" in infotext and "Hires upscaler requested" not in infotext
    assert info["warnings"] == []
    # A name nbkit does not have runs Lanczos, and the answer says so (A1111 stops with an error).
    response = http.post(
        server.api + "/txt2img",
        json={"prompt": "a dog", "width": 64, "height": 64, "steps": 2, "enable_hr": True, "hr_scale": 1.5,
              "hr_upscaler": "../upscalers/nothing", "denoising_strength": 0.5},
        timeout=180,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    [warning] = json.loads(response.json()["info"])["warnings"]
    assert "../upscalers/nothing" in warning and "Lanczos ran instead" in warning


def test_png_info_sends_to_every_generation_tab_and_to_extras(tmp_path):
    import gradio as gr

    from nbkit.webui.panel import Panel
    from nbkit.webui.security import Limits
    from nbkit.webui.tabs import SENT_FIELDS, _send, png_info_tab

    text = (
        "a dog\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, "
        "Seed: 42, Size: 64x96, Denoising strength: 0.4, Hires upscale: 1.5, Hires steps: 3, "
        "Hires upscaler: R-ESRGAN 4x+"
    )
    with gr.Blocks() as blocks, gr.Tabs() as tabs:
        panels = {}
        for mode in ("txt2img", "img2img", "inpaint", "controlnet"):
            with gr.Tab(mode, id=mode):
                panels[mode] = Panel(mode, Limits())
        with gr.Tab("Extras", id="extras"):
            extras = {"image": gr.Image()}
        png_info_tab(panels, tabs, extras)
    ids = {block.elem_id for block in blocks.blocks.values()}
    assert {"pnginfo-send", "pnginfo-send-img2img", "pnginfo-send-inpaint", "pnginfo-send-controlnet"} <= ids
    assert "pnginfo-send-extras" in ids
    for mode, expected in (
        (
            "txt2img",
            {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "R-ESRGAN 4x+", "hr_second_pass_steps": 3},
        ),
        ("img2img", {"denoising_strength": 0.4, "init_image": "picture.png"}),
        ("inpaint", {"mask_editor": "picture.png"}),
    ):
        fields = [name for name in SENT_FIELDS if name in panels[mode].fields]
        tab, *values = _send(mode, fields)(text, "picture.png")
        sent = dict(zip(fields, values, strict=True))
        assert tab.constructor_args["selected"] == mode
        common = {"prompt": "a dog", "negative_prompt": "blurry", "steps": 12, "sampler_name": "DPM++ 2M"}
        common.update(scheduler="Karras", cfg_scale=5.0, seed=42, width=64, height=96)
        assert sent.items() >= {**common, **expected}.items()
