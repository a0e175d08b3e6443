"""The tiny FLUX.1 model: the real topology, saved as a diffusers folder FluxPipeline loads and runs."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

from nbkit.cli import main
from nbkit.families import detect_family_from_config
from nbkit.models.tiny import build_tiny_pipeline
from nbkit.tokenizers import make_t5_tokenizer


def test_tiny_flux_loads_and_renders_two_steps(tiny_model_dir):
    folder = tiny_model_dir("flux")
    assert sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) < 10 * 2**20
    pipeline = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipeline) is FluxPipeline
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a photo of zwx dog",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0.01
    assert detect_family_from_config(folder) == ("flux", "flow", 64)


def test_tiny_flux_has_the_real_topology():
    pipeline = build_tiny_pipeline("flux")
    transformer = pipeline.transformer.config
    assert (transformer.num_layers, transformer.num_single_layers) == (2, 2)  # double- and single-stream
    assert transformer.in_channels == 4 * pipeline.vae.config.latent_channels == 64
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.guidance_embeds  # dev-like
    assert transformer.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.text_encoder_2.config.feed_forward_proj == "gated-gelu"
    vae = pipeline.vae.config
    assert (vae.latent_channels, vae.use_quant_conv, vae.use_post_quant_conv) == (16, False, False)
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert pipeline.scheduler.config.use_dynamic_shifting


def test_tiny_flux_is_deterministic():
    first, second = build_tiny_pipeline("flux", seed=5), build_tiny_pipeline("flux", seed=5)
    for name in ("transformer", "text_encoder_2", "vae"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_t5_tokenizer_ends_with_eos_pads_with_pad_and_splits_rare_words():
    tokenizer = make_t5_tokenizer()
    ids = tokenizer("a photo of zwx dog").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["\u2581a", "\u2581photo", "\u2581of"] and tokens[-2:] == ["\u2581dog", "</s>"]
    assert len(tokens) > 5  # "zwx" is several pieces
    padded = tokenizer("dog", padding="max_length", max_length=8).input_ids
    assert padded[2:] == [tokenizer.pad_token_id] * 6 and tokenizer.pad_token_id == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of zwx dog"


def test_cli_builds_tiny_flux(tmp_path, capsys):
    assert main(["model", "tiny", "flux", str(tmp_path / "flux")]) == 0
    assert (tmp_path / "flux" / "transformer" / "config.json").is_file()
    assert (tmp_path / "flux" / "tokenizer_2" / "tokenizer.json").is_file()
