"""ControlNet: the registry refuses pairs that do not fit, preprocessors, and requests on sd1 and sdxl."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.models.tiny import save_tiny_controlnet, save_tiny_depth_model
from nbkit.webui import controlnet as cn
from nbkit.webui.models import ModelCatalog
from nbkit.webui.service import ControlNetUnit, GenerationRequest, GenerationService

FAST = {"steps": 3, "width": 64, "height": 64, "seed": 7, "save_images": False, "prompt": "a house"}


def _picture(size=(96, 80)):
    pixels = np.full((size[1], size[0], 3), 30, dtype=np.uint8)
    pixels[20:60, 25:70] = (240, 240, 240)  # a bright box: edges for Canny
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {family: save_tiny_controlnet(family, root / f"cn-{family}") for family in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return save_tiny_depth_model(tmp_path_factory.mktemp("depth") / "tiny-dpt")


def _service(tiny_model_dir, family):
    return GenerationService(
        ModelCatalog(include_base_models=False), model=str(tiny_model_dir(family)), device="cpu"
    )


def test_canny_and_depth_maps_have_the_generation_size(depth_model):
    picture = _picture()
    edges = cn.preprocess(picture, "canny", 64, 96)
    assert edges.size == (64, 96) and edges.mode == "RGB"
    assert set(np.unique(np.asarray(edges))) == {0, 255}  # edges of the box, nothing else
    depth = cn.preprocess(picture, "depth", 64, 96, depth=cn.DepthEstimator(str(depth_model)))
    assert depth.size == (64, 96) and depth.mode == "RGB"
    assert np.asarray(depth).min() == 0 and np.asarray(depth).max() == 255  # normalised
    assert cn.preprocess(picture, "none", 64, 96).size == (64, 96)
    for mode in (1, 2):
        assert cn.resize_for_generation(picture, 64, 96, mode).size == (64, 96)
    with pytest.raises(NbkitError, match="no preprocessor is called 'openpose'"):
        cn.preprocess(picture, "openpose", 64, 64)


def test_registry_names_families_and_refuses_misfits(controlnets, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    assert {spec.family for spec in cn.CONTROLNETS.values()} == {"sd1", "sd2", "sdxl"}
    source = cn.find_controlnet("lllyasviel/control_v11p_sd15_canny")
    assert (source.name, source.family) == ("control_v11p_sd15_canny", "sd1")
    assert cn.find_controlnet(str(controlnets["sdxl"])).family == "sdxl"
    assert cn.find_controlnet(str(controlnets["sd1"])).family == "sd1"
    sdxl_unet = UNet2DConditionModel.load_config(tiny_model_dir("sdxl") / "unet")
    with pytest.raises(NbkitError, match=r"is for SD 1\.5 models, but the loaded model is SDXL") as error:
        cn.check_compatible(source, sdxl_unet)
    assert "controlnet-canny-sdxl-1.0" in str(error.value)  # names the ones that would fit
    sd2_unet = UNet2DConditionModel.load_config(tiny_model_dir("sd2") / "unet")
    with pytest.raises(NbkitError, match=r"SD 2\.x"):
        cn.check_compatible(cn.find_controlnet(str(controlnets["sd1"])), sd2_unet)
    cn.check_compatible(cn.find_controlnet(str(controlnets["sdxl"])), sdxl_unet)
    with pytest.raises(NbkitError, match="no ControlNet is called"):
        cn.find_controlnet("nonsense")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_requests_run_and_steer_the_image(tiny_model_dir, controlnets, family):
    service = _service(tiny_model_dir, family)
    plain = service.generate(GenerationRequest(**FAST))
    unit = ControlNetUnit(str(controlnets[family]), _picture(), preprocessor="canny")
    output = service.generate(GenerationRequest(**FAST, controlnet=unit))
    assert output.images[0].size == (64, 64) and output.control_image.size == (64, 64)
    assert not np.array_equal(np.asarray(output.images[0]), np.asarray(plain.images[0]))
    assert "Module: canny" in output.infotexts[0]
    img2img = service.generate(
        GenerationRequest(**FAST, mode="img2img", init_image=_picture(), controlnet=unit)
    )
    assert img2img.images[0].size == (64, 64)
    again = service.generate(GenerationRequest(**FAST))  # the ControlNet was for that request only
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))


def test_depth_controlnet_through_the_service(tiny_model_dir, controlnets, depth_model):
    service = _service(tiny_model_dir, "sd1")
    service.depth_model = str(depth_model)
    unit = ControlNetUnit(str(controlnets["sd1"]), _picture(), preprocessor="depth", weight=0.5)
    output = service.generate(GenerationRequest(**FAST, controlnet=unit))
    assert output.images[0].size == (64, 64) and output.control_image.size == (64, 64)


def test_an_incompatible_controlnet_is_refused_before_loading(tiny_model_dir, controlnets, monkeypatch):
    service = _service(tiny_model_dir, "sdxl")
    service.ensure_model()

    def no_load(*args, **kwargs):
        raise AssertionError("the ControlNet was loaded")

    monkeypatch.setattr(cn, "load_controlnet", no_load)
    unit = ControlNetUnit(str(controlnets["sd1"]), _picture(), preprocessor="canny")
    with pytest.raises(NbkitError, match=r"is for SD 1\.5 models, but the loaded model is SDXL"):
        service.generate(GenerationRequest(**FAST, controlnet=unit))
    hub = ControlNetUnit("control_v11f1p_sd15_depth", _picture(), preprocessor="depth")
    with pytest.raises(NbkitError, match=r"SD 1\.5"):
        service.generate(GenerationRequest(**FAST, controlnet=hub))
