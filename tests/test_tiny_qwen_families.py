"""The tiny Z-Image and FLUX.2 [klein] models: the real topologies, saved as diffusers folders their
pipelines load and run, with nbkit's offline Qwen tokenizer and its chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, ZImagePipeline

from nbkit.cli import main
from nbkit.families import detect_family_from_config, family_of_pipeline
from nbkit.models.tiny import build_tiny_pipeline
from nbkit.tokenizers import QWEN_PAD_TOKEN, make_qwen_tokenizer

PIPELINES = {"zimage": ZImagePipeline, "flux2": Flux2KleinPipeline}


@pytest.mark.parametrize("family", PIPELINES)
def test_the_tiny_model_loads_and_renders_two_steps(family, tiny_model_dir):
    folder = tiny_model_dir(family)
    assert sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) < 10 * 2**20
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipeline) is PIPELINES[family]
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        prompt="a photo of zwx dog",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01
    assert detect_family_from_config(folder) == (family, "flow", 64)
    assert family_of_pipeline(pipeline).name == family


def test_tiny_zimage_has_the_real_topology():
    pipeline = build_tiny_pipeline("zimage")
    transformer = pipeline.transformer.config
    assert (transformer.n_layers, transformer.n_refiner_layers) == (2, 1)
    assert sum(transformer.axes_dims) == transformer.dim // transformer.n_heads  # rotary axes fill a head
    assert transformer.cap_feat_dim == pipeline.text_encoder.config.hidden_size
    assert transformer.in_channels == pipeline.vae.config.latent_channels == 16
    assert (pipeline.vae.config.scaling_factor, pipeline.vae.config.shift_factor) == (0.3611, 0.1159)
    encoder = pipeline.text_encoder.config
    assert type(pipeline.text_encoder).__name__ == "Qwen3Model"
    assert encoder.num_attention_heads > encoder.num_key_value_heads  # grouped-query attention, as Qwen3
    assert not pipeline.scheduler.config.use_dynamic_shifting and pipeline.scheduler.config.shift == 3.0


def test_tiny_flux2_has_the_real_topology():
    pipeline = build_tiny_pipeline("flux2")
    transformer = pipeline.transformer.config
    assert (transformer.num_layers, transformer.num_single_layers) == (2, 2)
    assert transformer.in_channels == 4 * pipeline.vae.config.latent_channels == 128
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert not transformer.guidance_embeds and pipeline.config.is_distilled  # a distilled [klein]
    # Layers 9, 18 and 27 of the Qwen3 encoder are stacked into one token embedding.
    assert pipeline.text_encoder.config.num_hidden_layers >= 28
    assert transformer.joint_attention_dim == 3 * pipeline.text_encoder.config.hidden_size
    bn = pipeline.vae.bn
    assert (bn.running_var > 0).all() and bn.running_mean.abs().max() > 0  # a normalisation that shows


@pytest.mark.parametrize("family", PIPELINES)
def test_the_tiny_model_is_deterministic(family):
    first, second = build_tiny_pipeline(family, seed=5), build_tiny_pipeline(family, seed=5)
    for name in ("transformer", "text_encoder", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        assert all(torch.isfinite(value).all() for value in a.values() if value.is_floating_point())


def test_qwen_tokenizer_keeps_prompt_words_whole_and_renders_qwen3s_chat_template():
    tokenizer = make_qwen_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of zwx dog").input_ids)
    assert tokens[:3] == ["a", "\u0120photo", "\u0120of"] and tokens[-1] == "\u0120dog"
    assert len(tokens) > 5  # "zwx" is several pieces
    messages = [{"role": "user", "content": "a dog"}]
    thinking = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert thinking == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert plain == thinking + "<think>\n\n</think>\n\n"
    padded = tokenizer(plain, padding="max_length", max_length=40)
    assert (
        padded.input_ids[-1] == tokenizer.convert_tokens_to_ids(QWEN_PAD_TOKEN)
        and padded.attention_mask[-1] == 0
    )
    assert tokenizer.convert_ids_to_tokens(tokenizer(plain).input_ids)[0] == "<|im_start|>"  # one token
    assert tokenizer.decode(tokenizer("a photo of zwx dog").input_ids) == "a photo of zwx dog"


@pytest.mark.parametrize("family", PIPELINES)
def test_cli_builds_the_tiny_model(family, tmp_path):
    assert main(["model", "tiny", family, str(tmp_path / family)]) == 0
    assert (tmp_path / family / "transformer" / "config.json").is_file()
    assert (tmp_path / family / "tokenizer" / "tokenizer.json").is_file()
