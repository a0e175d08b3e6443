"""The ControlNet extension's API against a real `nbkit ui` server (tiny SD 1.5 model and ControlNets, CPU):
units in every field form, several units at once, webuiapi's units, and the `/controlnet/*` routes."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from webui_support import PASSWORD, USER, decode, png_b64, shared_server

from nbkit.generation.infotext import parse_infotext
from nbkit.webui.api_models import Img2ImgRequest, Txt2ImgRequest, to_generation_request
from nbkit.webui.security import Limits

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5, "prompt": "a house"}
CANNY, OTHER = "tiny-canny-sd1", "tiny-other-sd1"


def _picture(size=(96, 80), shade=240) -> Image.Image:
    pixels = np.full((size[1], size[0], 3), 30, dtype=np.uint8)
    pixels[20:60, 25:70] = shade  # a bright box: edges for Canny
    return Image.fromarray(pixels)


PICTURE = png_b64(_picture())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from nbkit.models.tiny import save_tiny_controlnet

    server = shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))
    # The server reads <root>/controlnet/ on every request: ControlNets put there now are offered.
    for name, seed in ((CANNY, 0), (OTHER, 1)):
        if not (server.root / "controlnet" / name).is_dir():
            save_tiny_controlnet("sd1", server.root / "controlnet" / name, seed=seed)
    return server


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _generate(http, server, units, path="/txt2img", **fields):
    body = {**SMALL, **fields, "alwayson_scripts": {"controlnet": {"args": units}}}
    response = http.post(server.api + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()
    return np.asarray(decode(result["images"][0]).convert("RGB")).astype(int), json.loads(result["info"])


def test_two_units_steer_the_image_further_and_each_writes_its_infotext(server, http):
    plain, _ = _generate(http, server, [])
    canny = {"module": "canny", "model": f"{CANNY} [0123abcd]", "image": PICTURE}
    one, _ = _generate(http, server, [canny])
    ready_map = {"module": "none", "model": OTHER, "image": PICTURE, "weight": 0.6, "control_mode": 2}
    two, info = _generate(http, server, [canny, {"enabled": False}, ready_map])
    assert not np.array_equal(one, plain) and not np.array_equal(two, one)
    parameters = parse_infotext(info["infotexts"][0]).parameters
    assert parameters["ControlNet 0"].startswith(f"Module: canny, Model: {CANNY}, Weight: 1.0")
    assert (
        "Weight: 0.6" in parameters["ControlNet 1"]
        and "ControlNet is more important" in parameters["ControlNet 1"]
    )
    assert "ControlNet 2" not in parameters  # numbered over the enabled units, as the extension does
    # img2img (a unit without an image reads the init image) and inpainting take several units too
    init = {"init_images": [png_b64(_picture((64, 64)))], "denoising_strength": 0.8}
    blank = {"module": "canny", "model": CANNY}
    _, info = _generate(http, server, [blank, ready_map], "/img2img", **init)
    assert "ControlNet 1" in info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    _, info = _generate(http, server, [canny, ready_map], "/img2img", mask=png_b64(mask), **init)
    assert "ControlNet 1" in info["infotexts"][0]


# --- the unit's field forms -------------------------------------------------------------------------------

SCRIBBLE = Image.new("L", (96, 80), 0)
SCRIBBLE.paste(255, (10, 10, 40, 40))


def _image_forms():
    raw, mask = PICTURE, png_b64(SCRIBBLE)
    return st.sampled_from(
        [
            ({"image": raw}, False),
            ({"image": "data:image/png;base64," + raw}, False),
            ({"input_image": raw}, False),
            ({"image": {"image": raw}}, False),
            ({"image": {"image": raw, "mask": mask}}, True),
            ({"image": [raw, mask]}, True),
            ({"image": [{"image": raw, "mask": mask}]}, True),
            ({"image": raw, "mask": mask}, True),
            ({"image": raw, "mask_image": mask}, True),
            ({"image": raw, "mask": None}, False),
        ]
    )


RESIZE = {
    0: 0,
    1: 1,
    2: 2,
    3: 0,
    "Just Resize": 0,
    "Crop and Resize": 1,
    "Resize and Fill": 2,
    "Inner Fit (Scale to Fit)": 1,
}
CONTROL = {
    0: 0,
    1: 1,
    2: 2,
    "Balanced": 0,
    "My prompt is more important": 1,
    "ControlNet is more important": 2,
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    form=_image_forms(),
    module=st.sampled_from(["canny", "Canny", "none", "depth", "depth_midas", "depth_anything_v2", None]),
    resize=st.sampled_from(list(RESIZE)),
    control=st.sampled_from(list(CONTROL)),
    processor_res=st.integers(-1, 3000),
    thresholds=st.tuples(st.floats(-1, 300), st.floats(-1, 300)),
    guidance=st.tuples(st.floats(0, 1), st.floats(0, 1)).filter(lambda pair: pair[0] < pair[1]),
    flags=st.fixed_dictionaries({"pixel_perfect": st.booleans(), "low_vram": st.booleans()}),
    extra=st.dictionaries(
        st.sampled_from(["hr_option", "save_detected_map", "union_control_type", "is_ui"]), st.just(None)
    ),
)
def test_every_unit_field_form_reads_as_the_extension_reads_it(
    form, module, resize, control, processor_res, thresholds, guidance, flags, extra
):
    fields, masked = form
    unit = {
        **fields,
        **flags,
        **extra,
        "model": "control_v11p_sd15_canny [d14c016b]",
        "module": module,
        "resize_mode": resize,
        "control_mode": control,
        "processor_res": processor_res,
        "threshold_a": thresholds[0],
        "threshold_b": thresholds[1],
        "guidance_start": guidance[0],
        "guidance_end": guidance[1],
    }
    body = Txt2ImgRequest.model_validate({**SMALL, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    [made] = to_generation_request(body, Limits()).controlnet
    assert made.image.size == (96, 80) and (made.mask is not None) == masked
    assert made.preprocessor == (
        "canny" if module in ("canny", "Canny") else "none" if module in ("none", None) else "depth"
    )
    assert (made.resize_mode, made.control_mode) == (RESIZE[resize], CONTROL[control])
    assert (made.guidance_start, made.guidance_end, made.pixel_perfect) == (*guidance, flags["pixel_perfect"])
    if made.preprocessor == "canny":  # out of range (-1 included): the extension's defaults
        assert made.processor_res == (processor_res if 64 <= processor_res <= 2048 else 512)
        expected = sorted(int(v) if 1 <= v <= 255 else d for v, d in zip(thresholds, (100, 200), strict=True))
        assert [made.low_threshold, made.high_threshold] == expected


def test_img2img_units_may_leave_the_image_to_the_init_image():
    body = Img2ImgRequest.model_validate(
        {**SMALL, "init_images": [PICTURE], "alwayson_scripts": {"controlnet": {"args": [{"model": CANNY}]}}}
    )
    assert to_generation_request(body, Limits()).controlnet[0].image is None


def _error_locs(response) -> list[tuple]:
    """The `loc` of each error of a 422 (in the `errors` list, or FastAPI's `detail` list)."""
    body = response.json()
    items = body["errors"] if isinstance(body.get("errors"), list) else body["detail"]
    return [tuple(item["loc"]) for item in items]


@pytest.mark.parametrize(
    ("unit", "field", "words"),
    [
        ({"module": "openpose_full"}, "module", ["none", "canny", "depth_anything_v2"]),
        ({"model": "None"}, "model", ["needs a model"]),
        ({"image": None}, "image", ["needs an image"]),
        ({"guidance_start": 0.5, "guidance_end": 0.5}, "guidance_start", ["below guidance_end"]),
        ({"resize_mode": "Stretch"}, "", ["Just Resize"]),
        ({"control_mode": 7}, "", ["control_mode"]),
        ({"image": PICTURE, "input_image": PICTURE}, "", ["older name"]),
        ({"image": [PICTURE]}, "image", ["one picture per unit"]),
        ({"weight": 2.5}, "weight", []),
    ],
)
def test_a_bad_unit_is_a_422_naming_its_field(server, http, unit, field, words):
    unit = {"model": CANNY, "image": PICTURE, "module": "canny", **unit}
    body = {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    response = http.post(server.api + "/txt2img", json=body, timeout=60)
    assert response.status_code == 422, response.text
    where = ("body", "alwayson_scripts", "controlnet", "args", 0, *([field] if field else []))
    assert any(loc[: len(where)] == where for loc in _error_locs(response)), response.text
    for word in words:
        assert word in response.text


def test_too_many_units_or_an_unknown_model_is_a_400_naming_what_there_is(server, http):
    def post(units):
        body = {**SMALL, "alwayson_scripts": {"controlnet": {"args": units}}}
        return http.post(server.api + "/txt2img", json=body, timeout=60)

    unit = {"model": CANNY, "image": PICTURE}
    response = post([unit] * 4)
    assert response.status_code == 400 and "limit of 3" in response.text
    response = post([{**unit, "model": "openpose [0123abcd]"}])
    assert (
        response.status_code == 400 and CANNY in response.text and "control_v11p_sd15_canny" in response.text
    )


# --- webuiapi, unchanged ------------------------------------------------------------------------------------


def test_webuiapi_controlnet_units_and_calls_work_unchanged(server):
    import webuiapi

    api = webuiapi.WebUIApi(
        host="127.0.0.1",
        port=server.url.rsplit(":", 1)[1].strip("/"),
        username=USER,
        password=PASSWORD,
        steps=2,
    )
    units = [
        webuiapi.ControlNetUnit(
            image=_picture(), module="canny", model=f"{CANNY} [0123abcd]", processor_res=64
        ),
        webuiapi.ControlNetUnit(image=_picture(), module="none", model=OTHER, weight=0.5, control_mode=1),
    ]
    result = api.txt2img(prompt="a house", width=64, height=64, seed=5, controlnet_units=units)
    assert result.image.size == (64, 64) and "ControlNet 1" in result.info["infotexts"][0]
    blank = webuiapi.ControlNetUnit(module="canny", model=CANNY)  # no image: img2img's init image
    result = api.img2img(images=[_picture((64, 64))], width=64, height=64, seed=5, controlnet_units=[blank])
    assert result.image.size == (64, 64) and "ControlNet 0" in result.info["infotexts"][0]
    assert api.controlnet_version() == 3
    assert {CANNY, OTHER} <= set(api.controlnet_model_list())
    assert api.controlnet_module_list() == ["none", "canny", "depth_anything_v2"]
    detected = api.controlnet_detect([_picture()], module="canny", processor_res=64)
    assert min(detected.image.size) == 64


# --- the routes ------------------------------------------------------------------------------------------


def test_every_controlnet_route_answers_in_the_extension_shape(server, http):
    get = lambda path, **params: http.get(server.url + path, params=params, timeout=30).json()  # noqa: E731
    assert get("controlnet/version") == {"version": 3}
    for update in ("true", "false"):
        models = get("controlnet/model_list", update=update)["model_list"]
        assert {CANNY, OTHER, "control_v11p_sd15_canny"} <= set(models) and "None" not in models
    for alias in ("true", "false"):
        modules = get("controlnet/module_list", alias_names=alias)
        assert modules["module_list"] == ["none", "canny", "depth_anything_v2"]
        sliders = modules["module_detail"]["canny"]["sliders"]
        assert [slider["name"] for slider in sliders] == ["Resolution", "Low Threshold", "High Threshold"]
        assert sliders[1] == {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    types = get("controlnet/control_types")["control_types"]
    assert list(types) == ["All", "Canny", "Depth"]
    assert types["Canny"]["module_list"] == ["none", "canny"] and types["Canny"]["default_option"] == "canny"
    assert CANNY in types["Canny"]["model_list"] and OTHER not in types["Canny"]["model_list"]
    assert types["Depth"]["default_model"] == "control_v11f1p_sd15_depth"
    assert types["All"]["model_list"][0] == "None"
    assert get("controlnet/settings") == {"control_net_unit_count": 3}
    # A1111's script lists name the always-on ControlNet, with a unit's defaults per slot
    assert get("sdapi/v1/scripts") == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    info = get("sdapi/v1/script-info")
    assert [(item["name"], item["is_alwayson"], item["is_img2img"]) for item in info] == [
        ("controlnet", True, False),
        ("controlnet", True, True),
    ]
    assert len(info[0]["args"]) == 3 and info[0]["args"][0]["value"]["module"] == "none"
    anonymous = server.session(auth=False)
    assert anonymous.get(server.url + "controlnet/version", timeout=30).status_code == 401  # behind the login


def test_detect_returns_canny_maps_and_names_the_modules_it_has(server, http):
    data_url = "data:image/png;base64," + PICTURE
    body = {
        "controlnet_module": "canny",
        "controlnet_input_images": [PICTURE, data_url],
        "controlnet_processor_res": 64,
        "controlnet_threshold_a": 50,
        "controlnet_threshold_b": 150,
    }
    response = http.post(server.url + "controlnet/detect", json=body, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["info"] == "Success" and len(result["images"]) == 2
    edges = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    assert edges.size == (77, 64) and set(np.unique(np.asarray(edges))) == {0, 255}
    # webuiapi's name of the images, nulls as defaults, and "none" (the picture as it is)
    same = http.post(
        server.url + "controlnet/detect",
        json={"controlnet_module": "none", "controlnet_images": [PICTURE], "controlnet_processor_res": None},
        timeout=60,
    ).json()
    assert decode(same["images"][0]).size == (96, 80)
    unknown = http.post(
        server.url + "controlnet/detect",
        json={"controlnet_module": "openpose", "controlnet_input_images": [PICTURE]},
        timeout=60,
    )
    assert unknown.status_code == 422 and "none, canny, depth_anything_v2" in unknown.text
    empty = http.post(server.url + "controlnet/detect", json={"controlnet_module": "canny"}, timeout=60)
    assert empty.status_code == 422 and "controlnet_input_images" in empty.text


def test_a_controlnet_path_outside_the_storage_root_is_refused(server, http, tmp_path_factory):
    """As `sd_vae`: a client names ControlNets, it does not make the server open folders elsewhere."""
    from nbkit.models.tiny import save_tiny_controlnet

    outside = tmp_path_factory.mktemp("elsewhere") / "tiny-outside"
    save_tiny_controlnet("sd1", outside, seed=2)
    for model in (str(outside), "/etc", "~/..", "../../etc"):
        unit = {"module": "none", "model": model, "image": PICTURE}
        body = {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
        response = http.post(server.api + "/txt2img", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert "only inside" in response.json()["detail"]
    inside = {"module": "none", "model": str(server.root / "controlnet" / CANNY), "image": PICTURE}
    _generate(http, server, [inside])  # a path inside the root is fine
