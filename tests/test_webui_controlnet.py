"""ControlNet: the registry refuses pairs that do not fit, names, preprocessors, and requests with one or
several units on sd1 and sdxl."""

from __future__ import annotations

import dataclasses

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
    output = service.generate(GenerationRequest(**FAST, controlnet=[unit]))
    assert output.images[0].size == (64, 64) and output.control_images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(output.images[0]), np.asarray(plain.images[0]))
    assert "Module: canny" in output.infotexts[0]
    img2img = service.generate(
        GenerationRequest(**FAST, mode="img2img", init_image=_picture(), controlnet=[unit])
    )
    assert img2img.images[0].size == (64, 64)
    again = service.generate(GenerationRequest(**FAST))  # the ControlNet was for that request only
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))


def test_depth_controlnet_through_the_service(tiny_model_dir, controlnets, depth_model):
    service = _service(tiny_model_dir, "sd1")
    service.depth_model = str(depth_model)
    unit = ControlNetUnit(str(controlnets["sd1"]), _picture(), preprocessor="depth", weight=0.5)
    output = service.generate(GenerationRequest(**FAST, controlnet=[unit]))
    assert output.images[0].size == (64, 64) and output.control_images[0].size == (64, 64)


def test_an_incompatible_controlnet_is_refused_before_loading(tiny_model_dir, controlnets, monkeypatch):
    service = _service(tiny_model_dir, "sdxl")
    service.ensure_model()

    def no_load(*args, **kwargs):
        raise AssertionError("the ControlNet was loaded")

    monkeypatch.setattr(cn, "load_controlnet", no_load)
    unit = ControlNetUnit(str(controlnets["sd1"]), _picture(), preprocessor="canny")
    with pytest.raises(NbkitError, match=r"is for SD 1\.5 models, but the loaded model is SDXL"):
        service.generate(GenerationRequest(**FAST, controlnet=[unit]))
    hub = ControlNetUnit("control_v11f1p_sd15_depth", _picture(), preprocessor="depth")
    with pytest.raises(NbkitError, match=r"SD 1\.5"):
        service.generate(GenerationRequest(**FAST, controlnet=[hub]))
    fitting = ControlNetUnit(str(controlnets["sdxl"]), _picture(), preprocessor="canny")
    with pytest.raises(NbkitError, match=r"SD 1\.5"):  # one misfit refuses the request before any loads
        service.generate(GenerationRequest(**FAST, controlnet=[fitting, unit]))


def test_extension_model_and_module_names_resolve(tmp_path, controlnets):
    import shutil

    shutil.copytree(controlnets["sd1"], tmp_path / "controlnet" / "tiny-edges")
    hub = "control_v11p_sd15_canny"
    for name in (f"{hub} [d14c016b]", hub.upper(), "lllyasviel/control_v11p_sd15_canny"):
        assert cn.find_controlnet(name).name == hub
    # a partial name: the shortest that contains it, preferring the ones that fit the loaded model
    assert cn.find_controlnet("canny", group="sdxl").name == "controlnet-canny-sdxl-1.0"
    assert cn.find_controlnet("canny").name == hub
    local = cn.find_controlnet("TINY-EDGES [0123abcd]", storage_root=tmp_path)
    assert (local.name, local.family) == ("tiny-edges", "sd1")
    assert cn.find_controlnet("edges", storage_root=tmp_path).source == str(
        tmp_path / "controlnet" / "tiny-edges"
    )
    assert cn.controlnet_names(tmp_path)[-1] == "tiny-edges" and hub in cn.controlnet_names(tmp_path)
    with pytest.raises(NbkitError, match="tiny-edges"):  # the known names, local ones included
        cn.find_controlnet("openpose", storage_root=tmp_path)
    assert cn.find_module("depth_midas").preprocessor == "depth" and cn.find_module("Canny").name == "canny"
    assert cn.find_module(None).preprocessor == "none"
    with pytest.raises(NbkitError, match="none, canny, depth_anything_v2"):
        cn.find_module("openpose_full")
    assert [
        cn.resize_mode_index(v) for v in ("Just Resize", "crop and resize", 2, 3, "Envelope (Outer Fit)")
    ] == [
        0,
        1,
        2,
        0,
        2,
    ]
    assert [
        cn.control_mode_index(v) for v in (0, "My prompt is more important", "controlnet is more important")
    ] == [
        0,
        1,
        2,
    ]
    for bad in ("Stretch", -1):
        with pytest.raises(ValueError, match="resize_mode"):
            cn.resize_mode_index(bad)
    with pytest.raises(ValueError, match="control_mode"):
        cn.control_mode_index(3)


def test_processor_resolution_and_scribble_masks():
    picture = _picture((192, 160))
    for resolution in (None, 48, 2048):
        edges = cn.preprocess(picture, "canny", 64, 64, resolution=resolution, resize_mode=1)
        assert edges.size == (64, 64) and set(np.unique(np.asarray(edges))) <= {0, 255}
    assert min(cn.detect(picture, "canny", resolution=96).size) == 96  # the extension's processor_res
    long = cn.scale_short_side(Image.new("RGB", (4000, 10)), 512)
    assert long.width * long.height <= 4 * 512**2  # an elongated picture stays bounded
    black = Image.new("L", picture.size, 0)
    assert cn.unit_picture(picture, black) is picture  # an empty mask leaves the picture
    scribble = black.copy()
    scribble.paste(255, (10, 10, 40, 40))
    assert np.array_equal(np.asarray(cn.unit_picture(picture, scribble))[..., 0], np.asarray(scribble))
    with pytest.raises(ValueError, match="mask is 8x8"):
        cn.unit_picture(picture, Image.new("L", (8, 8)))


def test_several_units_run_together_each_with_its_control_mode(
    tmp_path, tiny_model_dir, controlnets, monkeypatch
):
    import shutil

    from nbkit.models.tiny import save_tiny_controlnet

    shutil.copytree(controlnets["sd1"], tmp_path / "controlnet" / "tiny-a")
    save_tiny_controlnet("sd1", tmp_path / "controlnet" / "tiny-b", seed=1)
    service = GenerationService(
        ModelCatalog(None, tmp_path, include_base_models=False),
        model=str(tiny_model_dir("sd1")),
        device="cpu",
    )
    loads = []
    load = cn.load_controlnet
    monkeypatch.setattr(
        cn, "load_controlnet", lambda source, **kw: loads.append(source.name) or load(source, **kw)
    )

    def pixels(**fields):
        output = service.generate(GenerationRequest(**FAST, **fields))
        return output, np.asarray(output.images[0]).astype(int)

    canny = ControlNetUnit("tiny-a", _picture(), preprocessor="canny")
    ready_map = ControlNetUnit("tiny-b", _picture(), preprocessor="none", weight=0.7, guidance_end=0.5)
    _, plain = pixels()
    _, one = pixels(controlnet=[canny])
    two_output, two = pixels(controlnet=[canny, ready_map])
    assert not np.array_equal(one, plain) and not np.array_equal(two, one)
    infotext = two_output.infotexts[0]
    assert '"Module: canny, Model: tiny-a, Weight: 1.0, Resize Mode: Crop and Resize' in infotext
    assert "ControlNet 1" in infotext and "Weight: 0.7" in infotext and "Guidance End: 0.5" in infotext
    assert len(two_output.control_images) == 2
    modes = [pixels(controlnet=[dataclasses.replace(canny, control_mode=mode)])[1] for mode in (1, 2)]
    assert not np.array_equal(modes[0], one) and not np.array_equal(modes[1], one)
    assert not np.array_equal(modes[0], modes[1])
    assert loads == ["tiny-a", "tiny-b"]  # loaded once, then kept
    # img2img and inpaint: a unit without an image uses the init image
    init = _picture((64, 64))
    img2img, _ = pixels(
        mode="img2img", init_image=init, controlnet=[dataclasses.replace(canny, image=None), ready_map]
    )
    assert np.array_equal(
        np.asarray(img2img.control_images[0]),
        np.asarray(cn.preprocess(init, "canny", 64, 64, resolution=512)),
    )
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint, _ = pixels(mode="inpaint", init_image=init, mask=mask, controlnet=[canny, ready_map])
    assert inpaint.images[0].size == (64, 64) and "ControlNet 1" in inpaint.infotexts[0]
    with pytest.raises(ValueError, match="unit 0 needs an image"):
        service.generate(GenerationRequest(**FAST, controlnet=[dataclasses.replace(canny, image=None)]))
