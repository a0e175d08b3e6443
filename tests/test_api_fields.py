"""A1111's request fields against a running `nbkit ui` on the tiny model: `null` is a field's default,
`samples_format` sets the format of the images sent and saved, `override_settings` lasts one request,
`firstpass_image` runs the hires fix's second pass, and a malformed field is FastAPI's 422 body."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic_core import to_jsonable_python
from webui_support import decode, png_b64, shared_server

from nbkit.generation.infotext import read_infotext
from nbkit.webui.api_models import Img2ImgRequest, Txt2ImgRequest, to_generation_request
from nbkit.webui.security import Limits

SMALL = {"width": 64, "height": 64, "steps": 2}
SEED = 4321
# What every generation here sets itself (the size and steps keep it fast; the seed makes it repeatable).
FIXED = ("width", "height", "steps", "seed")
PICTURE = png_b64(Image.new("RGB", (64, 64), (120, 40, 200)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _post(http, server, path: str, body: dict, status: int = 200) -> dict:
    response = http.post(server.api + path, json=body, timeout=180)
    assert response.status_code == status, response.text[:1000]
    return response.json()


def _pixels(encoded: str) -> np.ndarray:
    return np.asarray(decode(encoded).convert("RGB"))


def _defaults(model: type) -> dict:
    """Each field's declared default as JSON (what a client sending A1111's defaults sends)."""
    return {
        name: to_jsonable_python(field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
    }


# --- null is the default --------------------------------------------------------------------------------


def test_null_in_every_txt2img_field_is_its_default(server, http):
    nulls = dict.fromkeys(Txt2ImgRequest.model_fields)
    body = _post(http, server, "/txt2img", {**nulls, **SMALL})
    info = json.loads(body["info"])
    assert (info["cfg_scale"], info["sampler_name"], info["batch_size"], len(body["images"])) == (
        7.0,
        "Euler",
        1,
        1,
    )
    assert info["seed"] >= 0  # "seed": null is a random seed, as -1
    assert body["parameters"]["seed"] == -1 and body["parameters"]["styles"] == []
    assert decode(body["images"][0]).format == "PNG"
    # the size and steps null are A1111's 512x512 and 50 steps, shown by the caps they meet (no 512x512 run)
    over = {**nulls, "enable_hr": True, "hr_scale": 5}
    assert "2560x2560" in _post(http, server, "/txt2img", over, status=400)["detail"]
    few = {**nulls, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1, "denoising_strength": 0.01}
    assert "50 steps" in _post(http, server, "/txt2img", few, status=400)["detail"]
    # "sampler_name": null with a sampler_index: the index names it, as A1111 reads them
    indexed = _post(http, server, "/txt2img", {**SMALL, "sampler_name": None, "sampler_index": "DDIM"})
    assert json.loads(indexed["info"])["sampler_name"] == "DDIM"


def test_null_in_every_img2img_field_is_its_default(server, http):
    nulls = dict.fromkeys(Img2ImgRequest.model_fields)
    body = _post(http, server, "/img2img", {**nulls, **SMALL, "init_images": [PICTURE]})
    info = json.loads(body["info"])
    assert (info["width"], info["denoising_strength"], info["cfg_scale"]) == (64, 0.75, 7.0)
    assert body["parameters"]["init_images"] is None  # not echoed without include_init_images
    # init_images null is no image, as A1111 answers
    missing = _post(http, server, "/img2img", {**SMALL, "init_images": None}, status=404)
    assert set(missing) == {"error", "detail", "body", "errors"} and "init_images" in missing["detail"]


TXT2IMG_DEFAULTS = {name: value for name, value in _defaults(Txt2ImgRequest).items() if name not in FIXED}


@pytest.fixture(scope="module")
def baseline(server, http):
    return _pixels(_post(http, server, "/txt2img", {**SMALL, "seed": SEED})["images"][0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.dictionaries(
        st.sampled_from(sorted(TXT2IMG_DEFAULTS)),
        st.booleans(),  # True: null, False: the declared default
        min_size=1,
        max_size=len(TXT2IMG_DEFAULTS),
    )
)
def test_null_or_the_declared_default_gives_the_same_image(server, http, baseline, fields):
    body = {name: None if null else TXT2IMG_DEFAULTS[name] for name, null in fields.items()}
    answer = _post(http, server, "/txt2img", {**body, **SMALL, "seed": SEED})
    assert np.array_equal(_pixels(answer["images"][0]), baseline), body


# --- samples_format ---------------------------------------------------------------------------------------


def _newest_output(server, suffix: str):
    files = sorted((server.root / "outputs").rglob(f"*{suffix}"), key=lambda path: path.stat().st_mtime)
    assert files, f"no {suffix} file was saved"
    return files[-1]


@pytest.mark.parametrize(("samples_format", "kind"), [("jpg", "JPEG"), ("webp", "WEBP"), ("JPEG", "JPEG")])
def test_samples_format_sets_the_format_sent_and_saved_with_the_infotext(server, http, samples_format, kind):
    body = _post(
        http,
        server,
        "/txt2img",
        {**SMALL, "seed": 7, "save_images": True, "override_settings": {"samples_format": samples_format}},
    )
    info = json.loads(body["info"])
    data = base64.b64decode(body["images"][0])
    image = Image.open(io.BytesIO(data))
    assert image.format == kind and image.size == (64, 64)
    # the infotext rides in the EXIF UserComment, where A1111 writes it, and PNG Info reads it there
    read = _post(http, server, "/png-info", {"image": body["images"][0]})
    assert read["info"] == info["infotexts"][0] and read["parameters"]["Seed"] == "7"
    saved = _newest_output(server, ".jpg" if kind == "JPEG" else ".webp")
    assert Image.open(saved).format == kind and read_infotext(saved) == info["infotexts"][0]


def test_options_set_the_format_until_changed_and_jpeg_quality_counts(server, http):
    try:
        assert _post(http, server, "/options", {"samples_format": "webp", "webp_lossless": True}) is None
        options = http.get(server.api + "/options", timeout=10).json()
        assert options["samples_format"] == "webp" and options["webp_lossless"] is True
        lossless = _post(http, server, "/txt2img", {**SMALL, "seed": 3})
        reference = _post(
            http, server, "/txt2img", {**SMALL, "seed": 3, "override_settings": {"samples_format": "png"}}
        )
        assert decode(lossless["images"][0]).format == "WEBP"
        assert np.array_equal(_pixels(lossless["images"][0]), _pixels(reference["images"][0]))  # no loss
        small, large = (
            len(base64.b64decode(_post(http, server, "/txt2img", {**SMALL, "seed": 3, "override_settings": {
                "samples_format": "jpg", "jpeg_quality": quality}})["images"][0]))
            for quality in (5, 100)
        )  # fmt: skip
        assert small < large
        # enable_pnginfo off: no infotext in the images
        bare = _post(http, server, "/txt2img", {**SMALL, "override_settings": {"enable_pnginfo": False}})
        assert _post(http, server, "/png-info", {"image": bare["images"][0]})["info"] == ""
        refused = http.post(server.api + "/options", json={"samples_format": "tiff"}, timeout=10)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "samples_format"]
    finally:
        _post(http, server, "/options", {"samples_format": "png", "webp_lossless": False})


# --- override_settings ------------------------------------------------------------------------------------


def test_override_settings_last_one_request_unless_told_to_stay(server, http):
    once = _post(http, server, "/txt2img", {**SMALL, "override_settings": {"samples_format": "jpg"}})
    assert decode(once["images"][0]).format == "JPEG"
    assert once["parameters"]["override_settings"] == {"samples_format": "jpg"}
    after = _post(http, server, "/txt2img", SMALL)
    assert decode(after["images"][0]).format == "PNG"
    assert http.get(server.api + "/options", timeout=10).json()["samples_format"] == "png"
    try:
        kept = {
            "override_settings": {"samples_format": "webp"},
            "override_settings_restore_afterwards": False,
        }
        _post(http, server, "/txt2img", {**SMALL, **kept})
        assert http.get(server.api + "/options", timeout=10).json()["samples_format"] == "webp"
        assert decode(_post(http, server, "/txt2img", SMALL)["images"][0]).format == "WEBP"
    finally:
        _post(http, server, "/options", {"samples_format": "png"})


def test_an_unknown_override_is_ignored_and_named_in_the_info(server, http):
    body = _post(
        http,
        server,
        "/txt2img",
        {
            **SMALL,
            "seed": SEED,
            "override_settings": {"forge_additional_modules": [], "samples_format": "png"},
        },
    )
    assert any("forge_additional_modules" in note for note in json.loads(body["info"])["warnings"])
    assert body["parameters"]["override_settings"] == {"samples_format": "png"}
    unknown_model = {**SMALL, "override_settings": {"sd_model_checkpoint": "no-such-model"}}
    assert "no-such-model" in _post(http, server, "/txt2img", unknown_model, status=404)["detail"]


def test_fields_nbkit_does_not_act_on_are_named_in_the_warnings(server, http):
    asked = {"restore_faces": True, "tiling": True, "hr_sampler_name": "Euler", "refiner_checkpoint": "None"}
    overrides = {"eta_noise_seed_delta": 31337, "samples_format": "png"}
    body = _post(http, server, "/txt2img", {**SMALL, **asked, "override_settings": overrides})
    [note] = json.loads(body["info"])["warnings"]
    assert note.endswith("restore_faces, tiling, hr_sampler_name, override_settings.eta_noise_seed_delta")
    # What webuiapi sends by default asks for nothing nbkit lacks.
    defaults = {
        "restore_faces": False,
        "tiling": None,
        "hr_sampler_name": "Use same sampler",
        "eta": 1.0,
        "s_noise": 1,
    }
    assert json.loads(_post(http, server, "/txt2img", {**SMALL, **defaults})["info"])["warnings"] == []


def test_clip_skip_reads_an_earlier_text_encoder_layer(server, http):
    """A1111's "Clip skip" (`CLIP_stop_at_last_layers`, as Open WebUI and SillyTavern send it)."""
    runs = {
        skip: _post(
            http,
            server,
            "/txt2img",
            {
                **SMALL,
                "seed": SEED,
                "prompt": "a dog",
                "override_settings": {"CLIP_stop_at_last_layers": skip},
            },
        )
        for skip in (1, 2)
    }
    assert not np.array_equal(_pixels(runs[1]["images"][0]), _pixels(runs[2]["images"][0]))
    infos = {skip: json.loads(body["info"]) for skip, body in runs.items()}
    assert "Clip skip" not in infos[1]["infotexts"][0]  # A1111 writes it only above 1
    assert "Clip skip: 2" in infos[2]["infotexts"][0] and infos[2]["clip_skip"] == 2


# --- firstpass_image and styles -------------------------------------------------------------------------


def test_firstpass_image_runs_the_hires_second_pass_on_it(server, http):
    hires = {
        **SMALL,
        "seed": 11,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Lanczos",
        "firstpass_image": PICTURE,
    }
    body = _post(http, server, "/txt2img", hires)
    info = json.loads(body["info"])
    assert decode(body["images"][0]).size == (96, 96) and info["width"] == 96
    assert any("firstpass_image" in note for note in info["warnings"])
    assert body["parameters"]["firstpass_image"] is None  # an image is not echoed back
    # the second pass redraws the given picture: a different one gives a different result
    other = _post(http, server, "/txt2img", {**hires, "firstpass_image": png_b64(Image.new("RGB", (64, 64)))})
    assert not np.array_equal(_pixels(other["images"][0]), _pixels(body["images"][0]))
    # without enable_hr A1111 ignores it
    plain = _post(http, server, "/txt2img", {**SMALL, "firstpass_image": PICTURE})
    assert decode(plain["images"][0]).size == (64, 64)


def test_styles_reach_the_generation_request():
    request = to_generation_request(Txt2ImgRequest(styles=["cinematic", "sketch"], **SMALL), Limits())
    assert request.styles == ["cinematic", "sketch"]
    assert (
        to_generation_request(Txt2ImgRequest.model_validate({**SMALL, "styles": None}), Limits()).styles == []
    )


# --- errors ----------------------------------------------------------------------------------------------


def test_a_malformed_request_is_fastapis_422_body(server, http):
    image = "A" * 5000
    response = http.post(
        server.api + "/img2img",
        json={**SMALL, "steps": "two", "cfg_scale": 1000, "init_images": [image], "mask": 5},
        timeout=30,
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert set(response.json()) == {"detail"}
    by_loc = {tuple(item["loc"]): item for item in detail}
    assert {("body", "steps"), ("body", "cfg_scale"), ("body", "mask")} <= set(by_loc)
    for item in detail:
        assert {"type", "loc", "msg", "input"} <= set(item) and item["msg"]
    assert by_loc[("body", "steps")]["input"] == "two" and by_loc[("body", "steps")]["type"] == "int_parsing"
    assert by_loc[("body", "cfg_scale")]["ctx"] == {"le": 100.0}
    # an unreadable image names its field too, its value cut short
    junk = _post(http, server, "/img2img", {**SMALL, "init_images": [image]}, status=422)
    [item] = junk["detail"]
    assert item["loc"] == ["body", "init_images", 0] and len(item["input"]) < 100
