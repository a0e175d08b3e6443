"""Upscalers: the tiny ESRGAN through spandrel, the safe file loading, the bounds, the torchvision shim,
A1111's extras semantics and the hires fix's model and latent upscalers (all offline, CPU, small)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.extras import ExtrasSettings, run_extras
from nbkit.generation.hires import LATENT_UPSCALERS, HiresFix, upscale
from nbkit.generation.upscalers import (
    KNOWN_UPSCALERS,
    PIL_UPSCALERS,
    Upscalers,
    build_tiny_esrgan_state_dict,
    load_upscaler_model,
    run_tiled,
    save_tiny_esrgan,
    target_size,
)

REPO = Path(__file__).resolve().parent.parent


def _picture(width: int = 40, height: int = 28, seed: int = 0) -> Image.Image:
    """A smooth picture with some detail (a gradient and a few squares)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    for _ in range(4):
        top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
        pixels[top : top + 6, left : left + 6] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("root") / "upscalers"
    save_tiny_esrgan(folder, scale=4)
    save_tiny_esrgan(folder, scale=2)
    return folder


@pytest.fixture(scope="module")
def upscalers(folder):
    return Upscalers(folder, tile=32, overlap=8)


@pytest.mark.parametrize("scale", [2, 4])
def test_tiny_esrgan_loads_through_spandrel_and_upscales_by_its_scale(folder, scale):
    model = load_upscaler_model(folder / f"tiny-esrgan-{scale}x.safetensors")
    assert model.architecture.name == "ESRGAN" and model.scale == scale
    picture = _picture()
    result = run_tiled(model, picture)
    assert result.size == (40 * scale, 28 * scale)
    # The identity paths keep the picture: it is close to a plain resize of the input.
    resized = np.asarray(picture.resize(result.size, Image.Resampling.BICUBIC), float)
    assert np.corrcoef(np.asarray(result, float).ravel(), resized.ravel())[0, 1] > 0.8


def test_output_changes_with_the_weights_and_not_between_runs(tmp_path, folder):
    picture = _picture()
    model = load_upscaler_model(folder / "tiny-esrgan-4x.safetensors")
    other = load_upscaler_model(save_tiny_esrgan(tmp_path, scale=4, seed=1))
    first, again, changed = (np.asarray(run_tiled(m, picture), int) for m in (model, model, other))
    assert np.array_equal(first, again)
    assert np.abs(first - changed).mean() > 2
    same = build_tiny_esrgan_state_dict(seed=3)
    assert all(torch.equal(value, build_tiny_esrgan_state_dict(seed=3)[key]) for key, value in same.items())


def test_tiles_blend_into_the_whole_picture(folder):
    model = load_upscaler_model(folder / "tiny-esrgan-4x.safetensors")
    picture = _picture(70, 50)
    whole = np.asarray(run_tiled(model, picture, tile=512), int)
    tiled = np.asarray(run_tiled(model, picture, tile=24, overlap=8), int)  # 3 x 3 tiles
    assert whole.shape == tiled.shape == (200, 280, 3)
    assert np.abs(whole - tiled).mean() < 1.0 and np.abs(whole - tiled).max() < 24


def test_a_pth_of_plain_tensors_loads_and_one_that_runs_code_is_refused(tmp_path, folder):
    # Real-ESRGAN's own .pth layout: the tensors nested under params_ema.
    state = build_tiny_esrgan_state_dict(scale=4)
    torch.save({"params_ema": state}, tmp_path / "plain.pth")
    assert load_upscaler_model(tmp_path / "plain.pth").scale == 4

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"params_ema": state, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(NbkitError, match="run code"):
        load_upscaler_model(tmp_path / "evil.pth")
    # A TorchScript file (spandrel's own loader would run it with torch.jit.load) is refused too.
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), str(tmp_path / "script.pt"))
    with pytest.raises(NbkitError):
        load_upscaler_model(tmp_path / "script.pt")
    assert not marker.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    with pytest.raises(NbkitError, match=r"no upscaler architecture|holds no"):
        load_upscaler_model(tmp_path / "junk.safetensors")


def test_the_list_is_a1111s_order_and_names_are_found(upscalers, folder):
    names = upscalers.names()
    assert names[:3] == list(PIL_UPSCALERS) == ["None", "Lanczos", "Nearest"]
    models = names[3:]
    assert models == sorted(models, key=str.lower)
    assert {"tiny-esrgan-2x", "tiny-esrgan-4x", *KNOWN_UPSCALERS} <= set(models)
    items = {info.name: info.to_api() for info in upscalers.list()}
    assert items["tiny-esrgan-2x"]["scale"] == 2 and items["tiny-esrgan-2x"]["model_path"].endswith(
        ".safetensors"
    )
    assert items["R-ESRGAN 4x+"]["model_url"].startswith("https://github.com/xinntao/Real-ESRGAN/")
    assert upscalers.find("TINY-ESRGAN-4X").name == "tiny-esrgan-4x"
    with pytest.raises(ValueError, match="close names: tiny-esrgan-4x"):
        upscalers.find("tiny-esrgan-4")
    assert Upscalers(None).names() == ["None", "Lanczos", "Nearest"]


def test_a_known_model_is_never_downloaded_offline(tmp_path):
    upscalers = Upscalers(tmp_path / "upscalers")
    with pytest.raises(NbkitError, match="HF_HUB_OFFLINE"):
        upscalers.check_available("R-ESRGAN 4x+")
    with pytest.raises(NbkitError, match="HF_HUB_OFFLINE"):
        upscalers.upscale(_picture(), "4x-UltraSharp", 2)
    assert not (tmp_path / "upscalers").exists()


def test_sizes_are_bounded(upscalers):
    picture = _picture(64, 64)
    with pytest.raises(NbkitError, match="above this server's limit"):
        upscalers.upscale(picture, "Lanczos", 4, max_pixels=128 * 128)
    # 96x96 is within the cap, but one 4x model pass would make 256x256 > 4 x the cap first.
    with pytest.raises(NbkitError, match="model pass"):
        upscalers.upscale(picture, "tiny-esrgan-4x", 1.5, max_pixels=100 * 100)
    with pytest.raises(ValueError, match="scale"):
        upscalers.upscale(picture, "Lanczos", 0)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 80),
    height=st.integers(1, 80),
    scale=st.floats(0.2, 4),
    name=st.sampled_from(PIL_UPSCALERS),
)
def test_pil_upscalers_make_a1111s_size(width, height, scale, name):
    result = Upscalers(None).upscale(Image.new("RGB", (width, height), "red"), name, scale)
    assert result.size == target_size(width, height, scale)
    assert result.width % 8 == 0 and result.height % 8 == 0


def test_a_model_runs_until_the_target_then_resizes(upscalers):
    picture = _picture()
    result = upscalers.upscale(picture, "tiny-esrgan-2x", 3)  # two 2x passes, then down to 3x
    assert result.size == target_size(40, 28, 3) == (120, 80)
    lanczos = upscalers.upscale(picture, "Lanczos", 3)
    assert np.abs(np.asarray(result, int) - np.asarray(lanczos, int)).mean() > 1


def test_extras_scale_to_crop_blend_and_face_restoration_note(upscalers):
    picture = _picture()
    to = ExtrasSettings(resize_mode=1, upscaling_resize_w=96, upscaling_resize_h=96, upscaler_1="Lanczos")
    result, info = run_extras(picture, to, upscalers)
    assert result.size == (96, 96)  # 40x28 upscaled by 96/28, then centred on a 96x96 canvas
    assert info == {
        "Postprocess upscale to": "96x96",
        "Postprocess crop to": "96x96",
        "Postprocess upscaler": "Lanczos",
    }
    blend = ExtrasSettings(
        upscaler_1="Lanczos",
        upscaler_2="tiny-esrgan-2x",
        extras_upscaler_2_visibility=0.5,
        gfpgan_visibility=1,
    )
    result, info = run_extras(picture, blend, upscalers)
    lanczos = upscalers.upscale(picture, "Lanczos", 2)
    model = upscalers.upscale(picture, "tiny-esrgan-2x", 2)
    assert np.array_equal(np.asarray(result), np.asarray(Image.blend(lanczos, model, 0.5)))
    assert info["Postprocess upscaler 2"] == "tiny-esrgan-2x" and info["GFPGAN visibility"] == 1
    unchanged, info = run_extras(picture, ExtrasSettings(upscaler_1="None"), upscalers)
    assert np.array_equal(np.asarray(unchanged), np.asarray(picture)) and info == {}
    with pytest.raises(ValueError, match="no upscaler"):
        ExtrasSettings(upscaler_1="ESRGAN_5x").check(upscalers)


def test_the_hires_fix_takes_model_upscalers_and_every_latent_mode(upscalers):
    pictures = [_picture(32, 32)]
    model = HiresFix(scale=1.5, upscaler="tiny-esrgan-4x", upscalers=upscalers)
    assert model.used_upscaler == "tiny-esrgan-4x" and "Hires upscaler requested" not in model.parameters()
    upscaled = upscale(pictures, model, 48, 48)[0]
    lanczos = upscale(pictures, HiresFix(scale=1.5, upscaler="Lanczos"), 48, 48)[0]
    assert upscaled.size == (48, 48)
    assert np.abs(np.asarray(upscaled, int) - np.asarray(lanczos, int)).mean() > 1
    unknown = HiresFix(upscaler="LDSR", upscalers=upscalers)
    assert unknown.parameters()["Hires upscaler"] == "Lanczos"
    assert unknown.parameters()["Hires upscaler requested"] == "LDSR"
    latents = torch.randn(1, 4, 8, 8)
    for mode in LATENT_UPSCALERS:
        assert upscale(latents, HiresFix(upscaler=mode), 128, 96).shape == (1, 4, 12, 16)


def _shim_run(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter (spandrel not yet imported); it prints one JSON line."""
    script = textwrap.dedent(code)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *(env or {}).get("extra", [])])}
    output = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


SHIM_CHECK = """
    import json, sys
    from nbkit.errors import NbkitError
    from nbkit.generation.upscalers import import_spandrel
    spandrel = import_spandrel()
    lama = sys.modules["spandrel.architectures.LaMa.__arch.LaMa"]
    try:
        lama.rotate(None, None, None)
        refused = None
    except NbkitError as error:
        refused = str(error)
    print(json.dumps({
        "left": sorted(name for name in sys.modules if name.split(".")[0] == "torchvision"),
        "esrgan": "ESRGAN" in spandrel.MAIN_REGISTRY,
        "refused": refused,
    }))
"""


def test_spandrel_imports_without_torchvision_and_leaves_sys_modules_clean(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        absent = _shim_run(SHIM_CHECK)
        assert absent["left"] == [] and absent["esrgan"]
        assert "torchvision" in absent["refused"]
    # A torchvision that raises on import (a CUDA build beside a CPU torch): the same, and nothing of
    # the broken package stays in sys.modules.
    broken = tmp_path / "broken" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    result = _shim_run(SHIM_CHECK, {"extra": [str(tmp_path / "broken")]})
    assert result["left"] == [] and result["esrgan"] and "torchvision" in result["refused"]


def test_a_known_model_downloads_into_the_folder_checked_and_whole(tmp_path, folder):
    """From a loopback server: the file lands under its name only once its sha256 matched."""
    import functools
    import hashlib
    import http.server
    import threading

    from nbkit.generation.upscalers import KnownUpscaler

    served = tmp_path / "served"
    served.mkdir()
    data = (folder / "tiny-esrgan-4x.safetensors").read_bytes()
    (served / "model.safetensors").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/model.safetensors"
    try:
        upscalers = Upscalers(tmp_path / "upscalers", downloads=True)
        wrong = KnownUpscaler("Wrong 4x", "wrong-4x.safetensors", 4, "0" * 64, url=url)
        with pytest.raises(NbkitError, match="sha256"):
            upscalers.fetch(wrong)
        assert not (tmp_path / "upscalers" / "wrong-4x.safetensors").exists()
        right = KnownUpscaler(
            "Right 4x", "right-4x.safetensors", 4, hashlib.sha256(data).hexdigest(), url=url
        )
        path = upscalers.fetch(right)
    finally:
        httpd.shutdown()
    assert path == tmp_path / "upscalers" / "right-4x.safetensors" and path.read_bytes() == data
    assert [p.name for p in (tmp_path / "upscalers").iterdir() if not p.name.startswith(".")] == [path.name]
    assert upscalers.upscale(_picture(), "right-4x", 4).size == (160, 112)
