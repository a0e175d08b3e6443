"""FLUX.1 in the web UI's generation service and the A1111 API (tiny Flux model, CPU, 64 px, 2 steps)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from webui_support import decode, png_b64, start_server

from nbkit.errors import NbkitError
from nbkit.generation.infotext import parse_infotext, read_infotext
from nbkit.models.memory import DeviceFacts
from nbkit.webui.models import ModelCatalog
from nbkit.webui.service import ControlNetUnit, GenerationRequest, GenerationService

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


def _diffusers_lora(folder, path):
    """A train-free Flux LoRA on the tiny transformer (peft, random non-zero B), saved by diffusers."""
    from diffusers import DiffusionPipeline, FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    )
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        for key, parameter in pipeline.transformer.named_parameters():
            if "lora_B" in key:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    FluxPipeline.save_lora_weights(
        path.parent / "tmp-lora", transformer_lora_layers=get_peft_model_state_dict(pipeline.transformer)
    )
    shutil.move(path.parent / "tmp-lora" / "pytorch_lora_weights.safetensors", path)
    shutil.rmtree(path.parent / "tmp-lora")


def _kohya_lora(path):
    """A Flux LoRA in kohya's/ComfyUI's BFL key layout (`lora_unet_double_blocks_...`)."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(5)
    tensors = {}
    for block in range(2):
        key = f"lora_unet_double_blocks_{block}_img_attn_proj"
        tensors[key + ".lora_down.weight"] = torch.randn(4, 32, generator=generator)
        tensors[key + ".lora_up.weight"] = torch.randn(32, 4, generator=generator)
        tensors[key + ".alpha"] = torch.tensor(4.0)
    save_file(tensors, path)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """A storage root with the tiny Flux folder in models/ and two Flux LoRAs in loras/."""
    root = tmp_path_factory.mktemp("flux-root")
    shutil.copytree(tiny_model_dir("flux"), root / "models" / "tiny-flux")
    (root / "loras").mkdir()
    _diffusers_lora(root / "models" / "tiny-flux", root / "loras" / "fluxsubject.safetensors")
    _kohya_lora(root / "loras" / "fluxkohya.safetensors")
    return root


@pytest.fixture(scope="module")
def service(root):
    catalog = ModelCatalog(storage_root=root, include_base_models=False)
    return GenerationService(catalog, device="cpu", model="tiny-flux")


def test_catalog_lists_the_flux_folder_with_its_family(service):
    entry = service.catalog.find("tiny-flux")
    assert entry.family == "flux" and entry.kind == "file"
    assert {lora.name for lora in service.catalog.loras} == {"fluxsubject", "fluxkohya"}


def test_txt2img_same_seed_same_image_and_infotext(service):
    first = service.generate(_req(batch_size=2))
    again = service.generate(_req(batch_size=2))
    assert type(service.pipeline).__name__ == "FluxPipeline" and service.family == "flux"
    assert first.seeds == [1234, 1235]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again), strict=True))
    info = parse_infotext(first.infotexts[0])
    assert info.distilled_cfg_scale == 3.5 and info.sampler == "Euler" and info.cfg_scale == 1.0
    assert info.parameters["Model"] == "tiny-flux"
    other = service.generate(_req(distilled_cfg_scale=7.0))
    assert parse_infotext(other.infotexts[0]).distilled_cfg_scale == 7.0
    assert not np.array_equal(_pixels(first)[0], _pixels(other)[0])


def test_img2img_and_inpaint(service):
    init = Image.new("RGB", (64, 64), (220, 40, 40))
    first = service.generate(_req(mode="img2img", init_image=init, steps=3, denoising_strength=0.7))
    again = service.generate(_req(mode="img2img", init_image=init, steps=3, denoising_strength=0.7))
    assert np.array_equal(_pixels(first)[0], _pixels(again)[0])
    assert (
        "Denoising strength: 0.7" in first.infotexts[0] and "Distilled CFG Scale: 3.5" in first.infotexts[0]
    )
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    painted = service.generate(
        _req(mode="inpaint", init_image=init, mask=mask, mask_blur=0, steps=3, denoising_strength=0.9)
    )
    pixels = np.asarray(painted.images[0])
    assert (pixels[:8, :8] == (220, 40, 40)).all()  # the unmasked area keeps its pixels


def test_sd_sampler_runs_as_euler_and_controlnet_is_refused(service):
    substituted = service.generate(_req(sampler_name="DPM++ 2M Karras"))
    assert substituted.warnings[0].startswith("Sampler substitution: DPM++ 2M ran as Euler")
    info = parse_infotext(substituted.infotexts[0])
    assert info.sampler == "Euler" and info.schedule == "Karras" and "Sampler substitution" in info.parameters
    unit = ControlNetUnit(model="canny-sd15", image=Image.new("RGB", (64, 64)))
    with pytest.raises(NbkitError, match=r"ControlNet is not available.*FLUX\.1"):
        service.generate(_req(controlnet=[unit]))


@pytest.mark.parametrize("name", ["fluxsubject", "fluxkohya"])
def test_flux_lora_weight_one_changes_weight_zero_is_identical(service, name):
    bare = _pixels(service.generate(_req()))[0]
    with_lora = service.generate(_req(prompt=f"a dog <lora:{name}:1>"))
    assert not np.array_equal(bare, _pixels(with_lora)[0])
    assert f'Lora hashes: "{name}: ' in with_lora.infotexts[0]
    assert parse_infotext(with_lora.infotexts[0]).prompt == f"a dog <lora:{name}:1>"
    zero = service.generate(_req(prompt=f"a dog <lora:{name}:0>"))
    assert np.array_equal(bare, _pixels(zero)[0])
    # Unloaded after the request: the bare model again, and no adapters left.
    assert np.array_equal(bare, _pixels(service.generate(_req()))[0])
    assert not service.pipeline.get_list_adapters()


def test_faked_t4_is_refused_before_loading(root, monkeypatch):
    import nbkit.models.memory as memory

    monkeypatch.setattr(memory, "device_facts", lambda index=0: DeviceFacts("Tesla T4", 15.0, bf16=False))
    catalog = ModelCatalog(storage_root=root, include_base_models=False)
    service = GenerationService(catalog, device="cuda", model="tiny-flux")
    with pytest.raises(NbkitError, match=r"Tesla T4 cannot run FLUX\.1: it has no bfloat16") as caught:
        service.generate(_req())
    assert "L4 or A100" in str(caught.value)
    assert service.pipeline is None


@pytest.fixture(scope="module")
def server(root):
    process = start_server(root, root / "models" / "tiny-flux")
    yield process
    process.stop()


def test_api_txt2img_img2img_and_errors(server):
    import requests

    body = {**FAST, "distilled_cfg_scale": 5.0}
    del body["save_images"]
    response = requests.post(server.api + "/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    image = decode(data["images"][0])
    text = read_infotext(image)
    assert "Distilled CFG Scale: 5," in text and "Sampler: Euler" in text
    info = json.loads(data["info"])
    assert info["all_seeds"] == [1234] and info["infotexts"] == [text]
    again = requests.post(server.api + "/txt2img", json=body, timeout=120).json()
    assert np.array_equal(np.asarray(image), np.asarray(decode(again["images"][0])))

    init = png_b64(Image.new("RGB", (64, 64), (30, 200, 30)))
    response = requests.post(
        server.api + "/img2img",
        json={**body, "init_images": [init], "denoising_strength": 0.7, "steps": 3},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert "Denoising strength: 0.7" in read_infotext(decode(response.json()["images"][0]))

    # An SD sampler runs as the flow-matching Euler (the same image), said in info's warnings.
    euler_a = requests.post(server.api + "/txt2img", json={**body, "sampler_name": "Euler a"}, timeout=120)
    assert euler_a.status_code == 200, euler_a.text
    assert json.loads(euler_a.json()["info"])["warnings"][0].startswith(
        "Sampler substitution: Euler a ran as Euler"
    )
    assert np.array_equal(np.asarray(image), np.asarray(decode(euler_a.json()["images"][0])))


def test_vae_override_loads_in_the_pipelines_vae_dtype(service, root, tmp_path, monkeypatch):
    """A VAE override loads in the model's own VAE dtype, not `service.dtype` (float16 on a GPU, while
    FLUX.1 runs in bfloat16): faked here with float16 as `service.dtype` on the CPU's float32 pipeline."""
    bare = _pixels(service.generate(_req()))[0]
    shutil.copytree(root / "models" / "tiny-flux" / "vae", tmp_path / "vae")
    monkeypatch.setattr(service, "dtype", torch.float16)
    output = service.generate(_req(vae=str(tmp_path / "vae")))
    assert service._vae[1].dtype == service.pipeline.vae.dtype == torch.float32
    assert np.array_equal(bare, _pixels(output)[0])  # the same VAE weights: the same image
    assert "VAE: vae" in output.infotexts[0]


class _FakePipeline:
    def __init__(self):
        self.calls = []

    def to(self, device):
        self.calls.append(("to", str(device)))
        return self

    def enable_model_cpu_offload(self, device=None):
        self.calls.append(("offload", str(device)))


def test_low_vram_offloads_a_bf16_plan_as_derived_pipelines_expect():
    """Low VRAM with a FLUX.1 plan that fits whole ("bf16"): the pipeline is offloaded, not moved whole
    to the GPU, since `_offload` (which the derived pipelines follow) says offloaded (faked GPU)."""
    from nbkit.models.memory import MemoryOption

    service = GenerationService(ModelCatalog(include_base_models=False), device="cpu", low_vram=True)
    service.device = torch.device("cuda")
    pipeline = _FakePipeline()
    service._place(pipeline, MemoryOption("bf16", "bf16 on the GPU", 30.0))
    assert service._offload and pipeline.calls == [("offload", "cuda")]
    service.low_vram = False
    service._place(pipeline, MemoryOption("bf16", "bf16 on the GPU", 30.0))
    assert not service._offload and pipeline.calls[1:] == [("to", "cuda")]


def test_session_flux_lora_is_listed_by_its_kohya_file_and_loads_the_diffusers_one(service, root, tmp_path):
    """A session's FLUX.1 LoRA: the API lists (and the infotext hashes) the kohya file users share in
    ComfyUI; the diffusers file of the same weights is what loads."""
    from nbkit.session.core import Session
    from nbkit.session.manifest import ExportedModel
    from nbkit.train.export import file_sha256
    from nbkit.webui.lora import lora_hash

    session = Session.create("dog", root=tmp_path)
    folder = session.path / "models" / "dog-lora"
    folder.mkdir(parents=True)
    shutil.copy(root / "loras" / "fluxsubject.safetensors", folder / "pytorch_lora_weights.safetensors")
    _kohya_lora(folder / "dog.safetensors")  # other weights: which file loads shows in the pixels
    kohya = "models/dog-lora/dog.safetensors"
    session.manifest.add_model(
        ExportedModel(
            name="dog-lora",
            kind="lora",
            files={"diffusers": "models/dog-lora/pytorch_lora_weights.safetensors", "kohya": kohya},
            family="flux",
            resolution=64,
            base_model=str(root / "models" / "tiny-flux"),
            sha256={kohya: file_sha256(folder / "dog.safetensors")},
        )
    )
    session.save()
    catalog = ModelCatalog(session, storage_root=root, include_base_models=False)
    entry = catalog.find_lora("dog")
    assert entry.path == folder / "dog.safetensors" and entry.to_api()["path"] == str(entry.path)
    assert entry.sha256 == file_sha256(entry.path)
    assert entry.file_to_load == folder / "pytorch_lora_weights.safetensors"
    own = service.catalog
    service.catalog = catalog
    try:
        output = service.generate(_req(prompt="a dog <lora:dog:1>"))
    finally:
        service.catalog = own
    same_weights = service.generate(_req(prompt="a dog <lora:fluxsubject:1>"))
    assert np.array_equal(_pixels(output)[0], _pixels(same_weights)[0])
    assert f'Lora hashes: "dog: {lora_hash(entry.path)[:12]}"' in output.infotexts[0]
