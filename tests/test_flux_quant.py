"""FLUX.1 with 8-bit/4-bit weights: the configs nbkit builds, torchao int8 on the tiny model (CPU).

bitsandbytes needs a CUDA GPU (diffusers' quantizer refuses without one), so its configs are checked
as built, not run; torchao's int8 weight-only runs here when torchao is installed.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from nbkit.errors import NbkitError
from nbkit.models import quantization as quant
from nbkit.models.memory import DeviceFacts, plan_memory

L4 = DeviceFacts("NVIDIA L4", 22.5, bf16=True)
FAST = {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 32, "output_type": "np"}


def _find(*installed):
    return lambda name: object() if name in installed else None


# --- choosing the backend (no backend needed) -----------------------------------------------------


def test_bitsandbytes_is_usable_only_with_cuda():
    both = _find("bitsandbytes", "torchao")
    assert quant.available_backends(find_spec=both, cuda=True) == ("bitsandbytes", "torchao")
    assert quant.available_backends(find_spec=both, cuda=False) == ("torchao",)
    assert quant.available_backends(find_spec=_find(), cuda=True) == ()


def test_bitsandbytes_is_preferred_and_torchao_does_8bit():
    assert quant.choose_backend("8bit", backends=("bitsandbytes", "torchao")) == "bitsandbytes"
    assert quant.choose_backend("4bit", backends=("bitsandbytes", "torchao")) == "bitsandbytes"
    assert quant.choose_backend("8bit", backends=("torchao",)) == "torchao"
    assert (
        quant.choose_backend("8bit", backends=("bitsandbytes", "torchao"), quantizer="torchao") == "torchao"
    )


def test_4bit_without_bitsandbytes_is_refused_naming_the_install(monkeypatch):
    with pytest.raises(NbkitError) as caught:
        quant.choose_backend("4bit", backends=("torchao",))
    message = str(caught.value)
    assert "4bit weights need bitsandbytes" in message and "usable here: torchao" in message
    assert "pip install bitsandbytes" in message
    with pytest.raises(NbkitError, match="torchao cannot load 4bit weights"):
        quant.choose_backend("4bit", backends=("torchao",), quantizer="torchao")
    with pytest.raises(NbkitError, match="pip install torchao"):
        quant.choose_backend("8bit", backends=())
    with pytest.raises(ValueError, match="quantization must be one of 8bit, 4bit"):
        quant.choose_backend("2bit", backends=("bitsandbytes",))
    # quantization_config asks available_backends (here: torchao only, as on a CPU machine).
    monkeypatch.setattr(quant, "available_backends", lambda **_: ("torchao",))
    with pytest.raises(NbkitError, match="4bit weights need bitsandbytes"):
        quant.quantization_config("4bit")


def test_bitsandbytes_configs_follow_diffusers_flux_recipes(monkeypatch):
    pytest.importorskip("bitsandbytes")
    import diffusers
    import transformers

    config = quant.quantization_config("4bit", backends=("bitsandbytes",))
    transformer, t5 = config.quant_mapping["transformer"], config.quant_mapping["text_encoder_2"]
    assert isinstance(transformer, diffusers.BitsAndBytesConfig)
    assert isinstance(t5, transformers.BitsAndBytesConfig)
    for part in (transformer, t5):
        assert part.load_in_4bit and part.bnb_4bit_quant_type == "nf4"
        assert part.bnb_4bit_compute_dtype == torch.bfloat16 and part.bnb_4bit_use_double_quant
    eight = quant.quantization_config(
        "8bit", backends=("bitsandbytes", "torchao"), components=["transformer"]
    )
    assert list(eight.quant_mapping) == ["transformer"] and eight.quant_mapping["transformer"].load_in_8bit


def test_load_pipeline_passes_bitsandbytes_on_cuda(monkeypatch, tiny_model_dir):
    """On a (faked) CUDA machine with bitsandbytes, `load_pipeline` asks diffusers for NF4 weights."""
    pytest.importorskip("bitsandbytes")
    from diffusers import DiffusionPipeline

    from nbkit.models.loading import load_pipeline

    captured = {}

    def fake_from_pretrained(folder, **kwargs):
        captured.update(kwargs)
        raise RuntimeError("captured")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="captured"):
        load_pipeline(tiny_model_dir("flux"), family="flux", torch_dtype=torch.bfloat16, quantization="4bit")
    mapping = captured["quantization_config"].quant_mapping
    assert set(mapping) == {"transformer", "text_encoder_2"}
    assert mapping["transformer"].load_in_4bit and mapping["transformer"].bnb_4bit_quant_type == "nf4"


def test_single_file_and_sd_families_are_refused(tmp_path, tiny_model_dir):
    from nbkit.models.loading import load_pipeline

    single = tmp_path / "flux1-dev.safetensors"
    single.write_bytes(b"not read")
    with pytest.raises(NbkitError) as caught:
        load_pipeline(single, family="flux", quantization="8bit")
    message = str(caught.value)
    assert "8bit weights load from a diffusers folder, not a single-file checkpoint" in message
    assert str(single) in message and "nbkit convert" in message
    pytest.importorskip("torchao")
    with pytest.raises(
        NbkitError,
        match=r"8-bit and 4-bit weights are for FLUX\.1, Z-Image and FLUX\.2 \[klein\]; this model is SD 1",
    ):
        load_pipeline(tiny_model_dir("sd1"), quantization="8bit")


# --- torchao int8 on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def torchao():
    return pytest.importorskip("torchao")


def test_tiny_flux_loads_8bit_through_torchao_and_renders(torchao, tiny_model_dir):
    from torchao.quantization import Int8Tensor

    from nbkit.models.loading import load_pipeline

    folder = tiny_model_dir("flux")
    plain = load_pipeline(folder, torch_dtype=torch.bfloat16)
    pipeline = load_pipeline(folder, torch_dtype=torch.bfloat16, quantization="8bit", quantizer="torchao")
    assert isinstance(pipeline.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert isinstance(pipeline.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight, Int8Tensor)
    assert not any(isinstance(weight, Int8Tensor) for weight in pipeline.text_encoder.parameters())
    assert (
        quant.describe_loaded(pipeline)
        == "text_encoder_2, transformer: 8-bit weights (torchao int8 weight-only)"
    )
    assert quant.describe_loaded(plain) is None
    images = [
        p("a dog", generator=torch.Generator().manual_seed(0), **FAST).images[0] for p in (plain, pipeline)
    ]
    assert np.isfinite(images[1]).all()
    difference = np.abs(images[0] - images[1]).max()
    assert 0 < difference < 0.1  # quantized, yet the same picture


@pytest.fixture
def quant_root(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir("flux"), tmp_path / "models" / "tiny-flux")
    return tmp_path


def test_webui_on_a_24gb_gpu_with_torchao_runs_8bit_offload(torchao, quant_root, monkeypatch):
    """A faked L4 with torchao: the service plans 8bit-offload, loads the weights quantized and offloads
    with model CPU offload (recorded: the CPU cannot run it), then txt2img and img2img render."""
    from diffusers import FluxPipeline
    from PIL import Image
    from torchao.quantization import Int8Tensor

    import nbkit.generation.placement as flux_runtime
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.service import GenerationRequest, GenerationService

    option = plan_memory("flux", "generate", L4, quantizers=("torchao",))
    assert option.name == "8bit-offload" and option.quantization == "8bit"
    monkeypatch.setattr(flux_runtime, "plan_generation_memory", lambda family, device: option)
    offloads = []
    monkeypatch.setattr(
        FluxPipeline, "enable_model_cpu_offload", lambda self, device=None: offloads.append(self)
    )
    monkeypatch.setattr(
        FluxPipeline, "enable_sequential_cpu_offload", lambda *a, **k: pytest.fail("no sequential offload")
    )
    service = GenerationService(
        ModelCatalog(storage_root=quant_root, include_base_models=False), device="cpu"
    )
    service.select_model("tiny-flux")
    assert offloads == [service.pipeline]
    assert isinstance(service.pipeline.transformer.transformer_blocks[0].attn.to_q.weight, Int8Tensor)
    assert any("8bit-offload" in note and "torchao int8 weight-only" in note for note in service.notes)
    common = {"steps": 2, "width": 64, "height": 64, "seed": 7, "save_images": False, "prompt": "a dog"}
    common.update(sampler_name="Euler", cfg_scale=1.0)
    txt = service.generate(GenerationRequest(**common))
    init = Image.new("RGB", (64, 64), (200, 50, 50))
    img = service.generate(
        GenerationRequest(**common, mode="img2img", init_image=init, denoising_strength=0.6)
    )
    assert txt.images[0].size == img.images[0].size == (64, 64)


# --- training a LoRA on the 8-bit transformer (torchao, CPU) --------------------------------------


def test_quantize_base_is_checked_before_loading(monkeypatch):
    from nbkit.models import memory
    from nbkit.session.manifest import BaseModelRef
    from nbkit.session.settings import TrainConfig
    from nbkit.train.inputs import check_family_config, check_memory

    flux = BaseModelRef(source="tiny-flux", family="flux", prediction_type="flow")
    assert check_memory(flux, TrainConfig()) is None  # auto on the CPU: as saved
    monkeypatch.setattr(memory, "device_facts", lambda index=0: L4)
    monkeypatch.setattr(memory, "quantizers_installed", lambda *args: ("bitsandbytes",))
    monkeypatch.setattr(quant, "available_backends", lambda **_: ("bitsandbytes",))
    assert check_memory(flux, TrainConfig()) == "4bit"
    with pytest.raises(NbkitError, match=r"needs the 4bit way .*quantize_base is 'none'"):
        check_memory(flux, TrainConfig(quantize_base="none"))
    with pytest.raises(NbkitError, match=r"needs the 4bit way .*quantize_base is '8bit'"):
        check_memory(flux, TrainConfig(quantize_base="8bit"))
    monkeypatch.setattr(quant, "available_backends", lambda **_: ())  # no CUDA for bitsandbytes after all
    with pytest.raises(NbkitError, match=r"NVIDIA L4 has 22 GiB: .*4bit way.*4bit weights need bitsandbytes"):
        check_memory(flux, TrainConfig())
    with pytest.raises(
        NbkitError, match=r"8-bit/4-bit base weights are for the large transformer families .*, not SDXL"
    ):
        check_family_config("sdxl", TrainConfig(quantize_base="8bit"))


def test_lora_trains_on_the_8bit_transformer_and_resumes_bit_exact(
    torchao, tiny_model_dir, tmp_path, monkeypatch
):
    from test_flux_train import FLUX, _pipeline, flow_loss
    from test_train_support import PROMPT, assert_same_tensors, load_tensors, make_session

    from nbkit.train import components as train_components
    from nbkit.train import trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))
    loads = []
    original = train_components.load_components

    def spy(*args, **kwargs):
        components = original(*args, **kwargs)
        loads.append(type(components.unet.transformer_blocks[0].attn.to_q.weight).__name__)
        return components

    monkeypatch.setattr(trainer, "load_components", spy)
    settings = {**FLUX, "quantize_base": "8bit", "unet_steps": 4, "checkpoint_every": 2, "random_flip": True}
    try:
        for name in ("reference", "stopped"):
            make_session(name, tiny_model_dir("flux"), "flux", **settings)
        reference = trainer.train("reference")
        first = trainer.train("stopped", max_steps_this_run=1)
        second = trainer.train("stopped", resume=True)
        make_session(
            "learn", tiny_model_dir("flux"), "flux", **{**settings, "unet_steps": 40, "unet_lr": 5e-3}
        )
        learned = trainer.train("learn")
    finally:
        torch.set_num_threads(threads)
    assert loads == ["Int8Tensor"] * 4  # every run trained on the int8 transformer
    assert second.finished and first.losses + second.losses == reference.losses
    final = [
        load_tensors(r.session / "checkpoints" / "unet-000004" / "transformer.safetensors")
        for r in (second, reference)
    ]
    assert_same_tensors(*final)
    # The exported LoRA is an ordinary one: it loads on the unquantized base and lowers the loss.
    diffusers_file = learned.lora_files["diffusers"]
    plain = load_tensors(reference.lora_files["diffusers"])
    assert all(tensor.dtype == torch.float32 for tensor in plain.values())
    base = _pipeline(tiny_model_dir("flux"))
    before = flow_loss(base, PROMPT)
    base.load_lora_weights(diffusers_file.parent, weight_name=diffusers_file.name)
    assert flow_loss(base, PROMPT) < before * 0.9
