"""Tiny offline models: real topologies that load through the ordinary diffusers/transformers paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.models.tiny import TINY_FAMILIES, build_tiny_pipeline, save_tiny_pipeline
from nbkit.models.tiny_vision import (
    DEFAULT_LABELS,
    TINY_CLASSIFIER_RESOLUTION,
    TINY_CLASSIFIERS,
    build_tiny_classifier,
    save_tiny_classifier,
)

PIPELINE_CLASS = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sd2-v": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
UNET_FAMILIES = tuple(PIPELINE_CLASS)


def _state(pipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipeline, name, None) is not None
        for key, value in getattr(pipeline, name).state_dict().items()
    }


def _folder_bytes(path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def test_every_family_has_a_tiny_model():
    # flux: tests/test_tiny_flux.py; zimage and flux2: tests/test_tiny_qwen_families.py
    assert (*UNET_FAMILIES, "flux", "zimage", "flux2") == TINY_FAMILIES


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_saved_family_loads_and_generates(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    assert _folder_bytes(folder) < 10 * 2**20
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipeline) is PIPELINE_CLASS[family]
    assert (
        pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        == FAMILIES[family].tiny_native_resolution
    )
    pipeline.set_progress_bar_config(disable=True)
    # No height/width: the pipeline's default size must be the tiny native resolution.
    images = pipeline(
        "a photo of zwx dog",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    size = FAMILIES[family].tiny_native_resolution
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.01


def test_sd1_matches_sd15_layout(tiny_model_dir):
    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir("sd1"))
    unet = pipeline.unet.config
    assert tuple(unet.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet.layers_per_block == 2
    assert not unet.use_linear_projection
    assert unet.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.text_encoder.config.hidden_act == "quick_gelu"
    assert pipeline.text_encoder.config.max_position_embeddings == 77
    assert pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert len(pipeline.vae.config.block_out_channels) == 4
    assert pipeline.vae.config.scaling_factor == 0.18215
    assert isinstance(pipeline.scheduler, PNDMScheduler)
    assert pipeline.scheduler.config.steps_offset == 1
    assert pipeline.scheduler.config.skip_prk_steps
    assert pipeline.safety_checker is None
    assert pipeline.config.requires_safety_checker is False


@pytest.mark.parametrize(("family", "prediction_type"), [("sd2", "epsilon"), ("sd2-v", "v_prediction")])
def test_sd2_matches_sd21_layout(tiny_model_dir, family, prediction_type):
    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir(family))
    assert pipeline.scheduler.config.prediction_type == prediction_type
    if family == "sd2-v":
        assert isinstance(pipeline.scheduler, DDIMScheduler)
    unet = pipeline.unet.config
    assert unet.use_linear_projection
    assert isinstance(unet.attention_head_dim, (list, tuple))
    assert unet.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.text_encoder.config.hidden_act == "gelu"
    assert pipeline.tokenizer.pad_token == "!"
    assert pipeline.tokenizer.pad_token_id == 0


def test_sdxl_has_two_text_encoders_and_text_time(tiny_model_dir):
    pipeline = DiffusionPipeline.from_pretrained(tiny_model_dir("sdxl"))
    unet = pipeline.unet.config
    text_encoder, text_encoder_2 = pipeline.text_encoder, pipeline.text_encoder_2
    assert type(text_encoder).__name__ == "CLIPTextModel"
    assert type(text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert text_encoder.config.hidden_act == "quick_gelu"
    assert text_encoder_2.config.hidden_act == "gelu"
    assert tuple(unet.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == (
        6 * unet.addition_time_embed_dim + text_encoder_2.config.projection_dim
    )
    assert unet.cross_attention_dim == text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert unet.use_linear_projection
    assert pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert pipeline.tokenizer_2.pad_token == "!"
    assert pipeline.vae.config.scaling_factor == 0.13025
    assert isinstance(pipeline.scheduler, EulerDiscreteScheduler)
    assert pipeline.config.force_zeros_for_empty_prompt is True
    # The slow-tokenizer files travel with both tokenizers.
    for name in ("tokenizer", "tokenizer_2"):
        assert (tiny_model_dir("sdxl") / name / "vocab.json").is_file()
        assert (tiny_model_dir("sdxl") / name / "merges.txt").is_file()


def test_same_seed_is_bit_identical_and_rng_is_left_alone():
    rng_before = torch.random.get_rng_state()
    first, second = _state(build_tiny_pipeline("sd1", seed=3)), _state(build_tiny_pipeline("sd1", seed=3))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = _state(build_tiny_pipeline("sd1", seed=4))
    assert not torch.equal(first["unet.conv_in.weight"], other["unet.conv_in.weight"])
    # transformers 5 drops the "text_model." prefix of older versions; either is fine here.
    (embedding,) = [key for key in first if key.endswith("token_embedding.weight")]
    assert not torch.equal(first[embedding], other[embedding])


def test_pickled_weights_option_round_trips(tmp_path):
    folder = save_tiny_pipeline("sd2", tmp_path / "legacy", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert (folder / "text_encoder" / "pytorch_model.bin").is_file()
    assert not list(folder.rglob("*.safetensors"))
    loaded = _state(DiffusionPipeline.from_pretrained(folder))
    built = _state(build_tiny_pipeline("sd2"))
    assert all(torch.equal(loaded[key], built[key]) for key in built)


def test_save_refuses_a_folder_of_other_files_and_replaces_a_saved_model(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"not a model")
    with pytest.raises(NbkitError, match=r"model_index\.json"):
        save_tiny_pipeline("sd1", folder)
    with pytest.raises(NbkitError, match=r"config\.json"):
        save_tiny_classifier("vit", folder)
    assert [path.name for path in folder.iterdir()] == ["keep.jpg"]
    model = save_tiny_classifier("vit", tmp_path / "vit", seed=1)
    (model / "stale.txt").write_text("from the earlier save")
    save_tiny_classifier("vit", model, seed=2)
    assert not (model / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos", "vit"]


def test_unknown_family_names_the_allowed_ones(tmp_path):
    with pytest.raises(NbkitError, match="sd2-v") as error:
        save_tiny_pipeline("sd3", tmp_path / "x")
    assert "'sd3'" in str(error.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", TINY_CLASSIFIERS)
def test_tiny_classifier_loads_with_auto_classes(tmp_path, kind):
    folder = save_tiny_classifier(kind, tmp_path / kind)
    assert _folder_bytes(folder) < 2**20
    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert model.config.id2label == dict(enumerate(DEFAULT_LABELS))
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("RGB", (40, 60), (10, 90, 250))]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    size = TINY_CLASSIFIER_RESOLUTION[kind]
    assert pixels.shape == (2, 3, size, size)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert logits.shape == (2, len(DEFAULT_LABELS))
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits[0], logits[1])
    built, _ = build_tiny_classifier(kind)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in built.state_dict().items())


def test_unknown_classifier_and_bad_labels():
    with pytest.raises(NbkitError, match="mobilevit"):
        build_tiny_classifier("resnet")
    with pytest.raises(NbkitError, match="labels"):
        build_tiny_classifier("vit", labels=["cat", "cat"])
