"""The web UI's generation service on the tiny models: modes, seeds, hires fix, LoRAs, VAE, stopping."""

from __future__ import annotations

import gc
import hashlib
import re
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from nbkit.errors import NbkitError
from nbkit.generation.infotext import parse_infotext
from nbkit.webui.lora import lora_hash, parse_loras
from nbkit.webui.models import HASH_CACHE, ModelCatalog
from nbkit.webui.service import GenerationRequest, GenerationService

FAST = {"steps": 3, "width": 64, "height": 64, "seed": 1234, "save_images": False, "prompt": "a dog"}


def _req(**overrides):
    return GenerationRequest(**{**FAST, **overrides})


def _init_image(size=(80, 64)):
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(255, 0, size[1], dtype=np.uint8)[:, None]
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = (250, 250, 40)
    return Image.fromarray(pixels)


def _mask(size=(64, 64)):
    mask = Image.new("L", size, 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def _pixels(output):
    return [np.asarray(image) for image in output.images]


def _add_lora(pipeline, storage_root, name="subject"):
    """A train-free LoRA: peft adapters with non-zero random weights, exported in kohya format."""
    from peft import LoraConfig

    from nbkit.train.lora_export import save_lora

    pipeline.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    pipeline.text_encoder.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        )
    )
    generator = torch.Generator("cpu").manual_seed(3)
    with torch.no_grad():
        for model in (pipeline.unet, pipeline.text_encoder):
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    files = save_lora(
        pipeline.unet, [pipeline.text_encoder], storage_root / "loras", family="sd1", metadata={}, name=name
    )
    files["diffusers"].unlink()  # the loras folder holds the kohya file only, as A1111's does
    return files["kohya"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("webui-root")
    _add_lora(StableDiffusionPipeline.from_pretrained(tiny_model_dir("sd1")), root)
    return root


@pytest.fixture(scope="module")
def sd1(storage, tiny_model_dir):
    catalog = ModelCatalog(None, storage, include_base_models=False)
    service = GenerationService(catalog, None, model=str(tiny_model_dir("sd1")), device="cpu")
    service.ensure_model()
    return service


def test_txt2img_batches_seeds_and_infotexts(sd1):
    output = sd1.generate(_req(negative_prompt="blurry", batch_size=2, n_iter=2))
    assert [image.size for image in output.images] == [(64, 64)] * 4
    assert output.seeds == [1234, 1235, 1236, 1237]
    for seed, text in zip(output.seeds, output.infotexts, strict=True):
        info = parse_infotext(text)
        assert (info.prompt, info.negative_prompt, info.seed, info.size, info.steps) == (
            "a dog",
            "blurry",
            seed,
            (64, 64),
            3,
        )
        assert info.parameters["Sampler"] == "Euler a"
    # The second iteration is the batch its seeds make on their own (same batch size: CPU kernels may
    # round differently for another batch size, so only the same shape is compared bit for bit).
    again = sd1.generate(_req(negative_prompt="blurry", seed=1236, batch_size=2))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(again), _pixels(output)[2:], strict=True))
    other = sd1.generate(_req(negative_prompt="blurry", seed=99))
    assert not np.array_equal(_pixels(other)[0], _pixels(output)[0])


def test_img2img_uses_the_init_image_and_resize_modes(sd1):
    init = _init_image()
    request = _req(height=96, mode="img2img", init_image=init, denoising_strength=0.5)
    output = sd1.generate(request)
    assert output.images[0].size == (64, 96)
    assert parse_infotext(output.infotexts[0]).denoising_strength == 0.5
    assert np.array_equal(_pixels(sd1.generate(request))[0], _pixels(output)[0])
    other_init = sd1.generate(
        _req(height=96, mode="img2img", init_image=init.rotate(180), denoising_strength=0.5)
    )
    assert not np.array_equal(_pixels(other_init)[0], _pixels(output)[0])
    for mode in (1, 2):
        cropped = sd1.generate(_req(height=96, mode="img2img", init_image=init, resize_mode=mode))
        assert cropped.images[0].size == (64, 96)
    with pytest.raises(ValueError, match="needs an init image"):
        sd1.generate(_req(mode="img2img"))
    with pytest.raises(ValueError, match="leaves no step"):
        sd1.generate(_req(mode="img2img", init_image=init, denoising_strength=0.1))


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_repaints_only_the_mask(sd1, fill):
    from nbkit.webui.controlnet import resize_for_generation

    init = _init_image((64, 64))
    request = _req(
        mode="inpaint", init_image=init, mask=_mask(), mask_blur=2, inpainting_fill=fill, batch_size=2
    )
    output = sd1.generate(request)
    assert [image.size for image in output.images] == [(64, 64)] * 2
    assert parse_infotext(output.infotexts[0]).parameters["Mask blur"] == "2"
    original = np.asarray(resize_for_generation(init, 64, 64))
    result = _pixels(output)[0]
    assert np.array_equal(result[:8], original[:8])  # far from the mask: the original, exactly
    assert not np.array_equal(result[24:40, 24:40], original[24:40, 24:40])
    inverted = sd1.generate(_req(mode="inpaint", init_image=init, mask=_mask(), inpainting_mask_invert=True))
    assert np.array_equal(_pixels(inverted)[0][28:36, 28:36], original[28:36, 28:36])


# LDSR: an A1111 upscaler nbkit does not have (done with Lanczos, and the infotext says so).
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", "LDSR"])
def test_hires_fix_returns_the_upscaled_size(sd1, upscaler):
    request = _req(
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler=upscaler,
        hr_second_pass_steps=4,
        denoising_strength=0.5,
    )
    output = sd1.generate(request)
    assert output.images[0].size == (96, 96)
    info = parse_infotext(output.infotexts[0])
    assert info.size == (64, 64)  # A1111 writes the first pass's size
    assert info.parameters["Hires upscale"] == "1.5"
    assert info.parameters["Hires steps"] == "4"
    assert info.parameters["Hires upscaler"] == ("Latent" if upscaler == "Latent" else "Lanczos")
    assert info.parameters.get("Hires upscaler requested") == (upscaler if upscaler == "LDSR" else None)
    assert info.denoising_strength == 0.5
    assert np.array_equal(_pixels(sd1.generate(request))[0], _pixels(output)[0])


def test_lora_tags_apply_and_are_removed_after(sd1, storage):
    base = _pixels(sd1.generate(_req()))[0]
    with_lora = sd1.generate(_req(prompt="a dog <lora:subject:1>"))
    assert np.abs(_pixels(with_lora)[0].astype(int) - base).max() > 10
    info = parse_infotext(with_lora.infotexts[0])
    assert info.prompt == "a dog <lora:subject:1>"  # the infotext keeps the tag, as A1111's does
    digest = lora_hash(storage / "loras" / "subject.safetensors")
    assert info.parameters["Lora hashes"] == f"subject: {digest[:12]}"
    zero = sd1.generate(_req(prompt="a dog <lora:subject:0>"))
    assert np.array_equal(_pixels(zero)[0], base)
    assert np.array_equal(_pixels(sd1.generate(_req()))[0], base)  # unloaded after
    assert not sd1.pipeline.get_list_adapters()
    with pytest.raises(NbkitError, match="no LoRA is called 'missing'"):
        sd1.generate(_req(prompt="<lora:missing:1>"))


def test_sd_session_lora_lists_loads_and_hashes_its_kohya_file(sd1, storage, tmp_path):
    """An SD session LoRA is the kohya file A1111 users share: /loras lists it, the infotext's `Lora
    hashes` hashes it, and it is the file loaded (not the session's diffusers file beside it)."""
    import shutil

    from nbkit.session.core import Session
    from nbkit.session.manifest import ExportedModel
    from nbkit.train.export import file_sha256

    session = Session.create("dog", root=tmp_path)
    folder = session.path / "models" / "dog-lora"
    folder.mkdir(parents=True)
    shutil.copy(storage / "loras" / "subject.safetensors", folder / "dog.safetensors")
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"not what an SD LoRA loads")
    kohya = "models/dog-lora/dog.safetensors"
    session.manifest.add_model(
        ExportedModel(
            name="dog-lora",
            kind="lora",
            files={"diffusers": "models/dog-lora/pytorch_lora_weights.safetensors", "kohya": kohya},
            family="sd1",
            resolution=64,
            base_model="sd15",
            sha256={kohya: file_sha256(folder / "dog.safetensors")},
        )
    )
    session.save()
    catalog = ModelCatalog(session, storage, include_base_models=False)
    entry = catalog.find_lora("dog")
    assert entry.to_api()["path"] == str(folder / "dog.safetensors") == str(entry.file_to_load)
    assert entry.sha256 == file_sha256(folder / "dog.safetensors")
    own = sd1.catalog
    sd1.catalog = catalog
    try:
        output = sd1.generate(_req(prompt="a dog <lora:dog:1>"))
    finally:
        sd1.catalog = own
    same = sd1.generate(_req(prompt="a dog <lora:subject:1>"))
    assert np.array_equal(_pixels(output)[0], _pixels(same)[0])
    digest = lora_hash(folder / "dog.safetensors")
    assert parse_infotext(output.infotexts[0]).parameters["Lora hashes"] == f"dog: {digest[:12]}"


def test_lora_prompt_syntax():
    assert parse_loras("a <lora:x:0.5> dog, <LORA:y>") == (
        "a  dog,",
        [parse_loras("<lora:x:0.5>")[1][0], parse_loras("<lora:y:1>")[1][0]],
    )
    tag = parse_loras("<lora:name:0.8:0.3>")[1][0]
    assert (tag.name, tag.te_weight, tag.unet_weight) == ("name", 0.8, 0.3)
    tag = parse_loras("<lora:name:te=0.2>")[1][0]
    assert (tag.te_weight, tag.unet_weight) == (0.2, 0.2)
    with pytest.raises(NbkitError, match="not a number"):
        parse_loras("<lora:name:strong>")


def test_a_chosen_vae_is_used_and_named(sd1, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    AutoencoderKL.from_config(sd1.pipeline.vae.config).save_pretrained(tmp_path / "my-vae")
    base = _pixels(sd1.generate(_req()))[0]
    output = sd1.generate(_req(vae=str(tmp_path / "my-vae")))
    assert not np.array_equal(_pixels(output)[0], base)
    assert parse_infotext(output.infotexts[0]).parameters["VAE"] == "my-vae"
    assert np.array_equal(_pixels(sd1.generate(_req()))[0], base)
    with pytest.raises(NbkitError, match="no such VAE"):
        sd1.generate(_req(vae=str(tmp_path / "nothing")))


def test_interrupt_from_another_thread_keeps_what_was_made(sd1):
    sd1.preview_every = 1
    seen = []

    def watch():
        while True:
            progress = sd1.progress()
            if progress.sampling_step >= 2:
                seen.append(progress)
                sd1.interrupt()
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.time()
    output = sd1.generate(_req(steps=40, n_iter=3))
    watcher.join(5)
    assert output.interrupted
    assert len(output.images) == 1 and output.images[0].size == (64, 64)
    progress = seen[0]
    assert progress.job == "txt2img" and progress.job_count == 3 and progress.sampling_steps == 40
    assert 0 < progress.fraction < 1
    assert isinstance(progress.preview, Image.Image) and progress.preview.size == (8, 8)
    assert sd1.progress().job_count == 0  # idle again
    assert time.time() - started < 30


def test_skip_ends_the_batch_and_goes_on(sd1, monkeypatch):
    full = sd1.generate(_req(steps=8, n_iter=2))
    original = sd1._on_step

    def on_step(step):
        original(step)
        if step.batch == 0 and step.step == 2:
            sd1.skip()

    monkeypatch.setattr(sd1, "_on_step", on_step)
    skipped = sd1.generate(_req(steps=8, n_iter=2))
    assert not skipped.interrupted and len(skipped.images) == 2
    assert not np.array_equal(_pixels(skipped)[0], _pixels(full)[0])  # cut short
    assert np.array_equal(_pixels(skipped)[1], _pixels(full)[1])  # the next batch ran in full


@pytest.mark.parametrize("family", ["sd2", "sd2-v", "sdxl"])
def test_every_family_runs_all_modes(tiny_model_dir, family):
    service = GenerationService(
        ModelCatalog(include_base_models=False), model=str(tiny_model_dir(family)), device="cpu"
    )
    init = _init_image((64, 64))
    for request in (
        _req(),
        _req(mode="img2img", init_image=init),
        _req(mode="inpaint", init_image=init, mask=_mask()),
        _req(enable_hr=True, hr_scale=2, denoising_strength=0.5),
    ):
        output = service.generate(request)
        expected = (128, 128) if request.enable_hr else (64, 64)
        assert output.images[0].size == expected
        assert parse_infotext(output.infotexts[0]).seed == 1234


def test_switching_model_frees_the_old_one(tiny_model_dir):
    catalog = ModelCatalog(include_base_models=False)
    service = GenerationService(catalog, device="cpu")
    service.select_model(str(tiny_model_dir("sd1")))
    old = weakref.ref(service.pipeline.unet)
    service.generate(_req(mode="img2img", init_image=_init_image()))
    entry = service.select_model(str(tiny_model_dir("sd2")))
    gc.collect()
    assert old() is None
    assert service.current is entry and entry.model_name == tiny_model_dir("sd2").name


def test_models_folder_titles_carry_cached_hashes(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine.safetensors").write_bytes(b"not really a model" * 100)
    digest = hashlib.sha256(b"not really a model" * 100).hexdigest()
    catalog = ModelCatalog(None, tmp_path, include_base_models=False)
    entry = catalog.find("mine")
    assert entry.title == f"mine.safetensors [{digest[:10]}]" and entry.sha256 == digest
    assert catalog.find(digest[:10]) is entry
    assert (models / HASH_CACHE).is_file()

    def fail(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr("nbkit.convert.hashes.model_hashes", fail)
    catalog.refresh()  # unchanged: from the cache
    assert catalog.find(entry.title).sha256 == digest
    (models / "mine.safetensors").write_bytes(b"changed")
    with pytest.raises(AssertionError, match="hashed again"):
        catalog.refresh()


def test_memory_has_a1111_shape(sd1):
    memory = sd1.memory()
    assert set(memory["ram"]) == {"free", "used", "total"} and memory["ram"]["total"] > 0
    assert "error" in memory["cuda"] or "system" in memory["cuda"]


def test_bad_requests_fail_before_generating(sd1):
    with pytest.raises(ValueError, match="mode must be"):
        sd1.generate(_req(mode="outpaint"))
    with pytest.raises(ValueError, match="needs a mask"):
        sd1.generate(_req(mode="inpaint", init_image=_init_image()))
    with pytest.raises(ValueError, match="hires scale"):
        sd1.generate(_req(enable_hr=True, hr_scale=0.5))
    with pytest.raises(ValueError, match="batch_size"):
        sd1.generate(_req(batch_size=0))
    assert re.fullmatch(r"\d+", str(sd1.progress().job_count))
