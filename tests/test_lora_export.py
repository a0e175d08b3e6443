"""LoRA export: the kohya/A1111 file loads in diffusers and does exactly what the diffusers file does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from nbkit.train.lora_export import save_lora

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _load(tiny_model_dir, family):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir(family))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _text_encoders(pipeline):
    return [pipeline.text_encoder] + (
        [pipeline.text_encoder_2] if hasattr(pipeline, "text_encoder_2") else []
    )


def _generate(pipeline):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipeline(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    ).images


def _add_trained_lora(pipeline, *, text_encoders: bool):
    """Add adapters as diffusers' DreamBooth LoRA example does, then give them non-zero weights."""
    # alpha != rank on purpose: a wrong kohya alpha would change the scale and the images.
    pipeline.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    )
    models = [pipeline.unet]
    if text_encoders:
        for encoder in _text_encoders(pipeline):
            encoder.add_adapter(
                LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
            )
            models.append(encoder)
    generator = torch.Generator("cpu").manual_seed(1)
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # zero-initialised: the adapter would do nothing yet
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_loads_in_diffusers_and_matches_the_diffusers_file(tiny_model_dir, tmp_path, family):
    pipeline = _load(tiny_model_dir, family)
    base = _generate(pipeline)
    _add_trained_lora(pipeline, text_encoders=True)
    trained = _generate(pipeline)
    assert np.abs(trained - base).max() > 0.05, (
        "the LoRA must visibly change the output for this test to mean anything"
    )

    files = save_lora(
        pipeline.unet,
        _text_encoders(pipeline),
        tmp_path / "my-subject",
        family=family,
        metadata={"nbkit.session.settings": {"unet_steps": 10}, "modelspec.title": "My subject"},
    )
    assert files["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert files["kohya"].name == "my-subject.safetensors"

    with safe_open(files["kohya"], "pt") as handle:
        keys, header = list(handle.keys()), handle.metadata()
        alphas = {key: handle.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    te_prefixes = (
        ["lora_te1_text_model_", "lora_te2_text_model_"] if family == "sdxl" else ["lora_te_text_model_"]
    )
    for prefix in ["lora_unet_", *te_prefixes]:
        assert any(key.startswith(prefix) for key in keys), prefix
    assert all(key.startswith(("lora_unet_", *te_prefixes)) for key in keys)
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in keys)
    assert alphas["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"] == 8
    assert alphas[f"{te_prefixes[0]}encoder_layers_0_self_attn_q_proj.alpha"] == 2
    assert header["modelspec.architecture"].endswith("/lora")
    assert header["modelspec.architecture"].startswith(
        "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion-v1"
    )
    assert header["modelspec.title"] == "My subject"
    assert header["nbkit.session.settings"] == '{"unet_steps": 10}'

    # The folder (diffusers picks pytorch_lora_weights.safetensors beside the kohya file) and the kohya file.
    for source in (files["diffusers"].parent, files["kohya"]):
        fresh = _load(tiny_model_dir, family)
        fresh.load_lora_weights(str(source))
        # A lost text encoder LoRA or a wrong alpha would move pixels by ~0.1 or more.
        assert np.abs(_generate(fresh) - trained).max() < 1e-4, source


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp16_kohya_file_matches_the_fp16_diffusers_file(tiny_model_dir, tmp_path, family):
    pipeline = _load(tiny_model_dir, family)
    _add_trained_lora(pipeline, text_encoders=True)
    files = save_lora(
        pipeline.unet, _text_encoders(pipeline), tmp_path, family=family, metadata={}, dtype="float16"
    )
    with safe_open(files["kohya"], "pt") as handle:
        keys = handle.keys()
        assert {handle.get_tensor(key).dtype for key in keys} == {torch.float16}
    images = {}
    for kind in ("diffusers", "kohya"):
        fresh = _load(tiny_model_dir, family)
        fresh.load_lora_weights(str(files[kind]))
        images[kind] = _generate(fresh)
    # (Not compared with the fp32 model: a random tiny model amplifies fp16 rounding chaotically.)
    assert np.abs(images["kohya"] - images["diffusers"]).max() < 1e-4


def test_unet_only_export_has_no_text_encoder_keys(tiny_model_dir, tmp_path):
    pipeline = _load(tiny_model_dir, "sd1")
    _add_trained_lora(pipeline, text_encoders=False)
    trained = _generate(pipeline)
    files = save_lora(unet=pipeline.unet, out_dir=tmp_path, family="sd1", metadata={}, name="subject")
    with safe_open(files["kohya"], "pt") as handle:
        keys = handle.keys()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    fresh = _load(tiny_model_dir, "sd1")
    fresh.load_lora_weights(str(files["kohya"]))
    assert np.abs(_generate(fresh) - trained).max() < 1e-4


def test_bad_inputs_name_the_problem(tiny_model_dir, tmp_path):
    pipeline = _load(tiny_model_dir, "sd1")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(pipeline.unet, None, tmp_path, family="sd1", metadata={})
    with pytest.raises(ValueError, match="family must be one of"):
        save_lora(pipeline.unet, None, tmp_path, family="sd3", metadata={})
    with pytest.raises(ValueError, match="1 text encoder"):
        save_lora(None, [pipeline.text_encoder, pipeline.text_encoder], tmp_path, family="sd1", metadata={})
    with pytest.raises(ValueError, match="nothing to save"):
        save_lora(None, [None], tmp_path, family="sd1", metadata={})
    _add_trained_lora(pipeline, text_encoders=False)
    with pytest.raises(ValueError, match="resolution must be a positive"):
        save_lora(pipeline.unet, None, tmp_path, family="sd1", metadata={}, resolution=0)
    with pytest.raises(ValueError, match="hash of the tensors"):
        save_lora(pipeline.unet, None, tmp_path, family="sd1", metadata={"modelspec.hash_sha256": "0x1"})


def test_modelspec_keys_match_a_full_model_of_the_family(tiny_model_dir, tmp_path):
    """Resolution as trained, the hash of the tensors, and the family's names as a full model has them."""
    import hashlib
    import struct

    from nbkit.convert import convert_to_single_file

    pipeline = _load(tiny_model_dir, "sd2-v")
    _add_trained_lora(pipeline, text_encoders=True)
    # What accelerate may hand back: a wrapper, taken off with accelerate's own helper.
    wrapped = torch.nn.DataParallel(pipeline.unet)
    files = save_lora(
        wrapped,
        _text_encoders(pipeline),
        tmp_path / "lora",
        family="sd2-v",
        metadata={},
        resolution=192,
        description="my dog, sks",
        author="Ann",
    )
    with safe_open(files["kohya"], "pt") as handle:
        header = handle.metadata()
    assert header["modelspec.resolution"] == "192x192"
    assert header["modelspec.prediction_type"] == "v"
    assert (header["modelspec.description"], header["modelspec.author"]) == ("my dog, sks", "Ann")
    data = files["kohya"].read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert header["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + length :]).hexdigest()

    full = convert_to_single_file(tiny_model_dir("sd2-v"), tmp_path / "full.safetensors").metadata
    assert header["modelspec.architecture"] == full["modelspec.architecture"] + "/lora"
    assert header["modelspec.implementation"] == full["modelspec.implementation"]

    default = save_lora(pipeline.unet, None, tmp_path / "default", family="sd2-v", metadata={})
    with safe_open(default["kohya"], "pt") as handle:
        assert handle.metadata()["modelspec.resolution"] == "768x768"  # no size given: the family's
