"""The shipped real configs of Z-Image-Turbo and FLUX.2 [klein] 4B / 9B build at full width on `meta`.

Each component is built from its folder's JSON by the classes its `model_index.json` names, with no
weights, and its parameter count is the published model's (see each folder's SOURCES.md). Folders
are read directly, not through family detection, so these checks hold whatever adapter claims them.
"""

from __future__ import annotations

import json

import pytest
import torch

from nbkit.realsize.random_models import PACKAGE, build_component, model_components, parameter_count

CONFIGS = PACKAGE / "configs"

# Exact counts of a meta build with diffusers 0.42 / transformers 5; the published sizes in comments.
EXPECTED = {
    "zimage-turbo": {
        "transformer": 6_154_908_736,  # "6B" (6.15B)
        "text_encoder": 4_022_468_096,  # Qwen3-4B as Qwen3Model, "4.0B"
        "vae": 83_819_683,  # FLUX.1's autoencoder
    },
    "flux2-klein-4b": {
        "transformer": 3_875_544_576,  # "4B"
        "text_encoder": 4_022_468_096,  # Qwen3-4B, tied LM head
        "vae": 84_046_115,  # the FLUX.2 autoencoder
    },
    "flux2-klein-9b": {
        "transformer": 9_078_581_248,  # "9B"
        "text_encoder": 8_190_735_360,  # Qwen3-8B, "8.2B" (untied LM head)
        "vae": 84_046_115,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_real_config_builds_with_the_published_sizes(name: str) -> None:
    folder = CONFIGS / name
    counts = {}
    for component, (_library, class_name) in model_components(folder).items():
        if "Tokenizer" in class_name or "Scheduler" in class_name:
            continue
        with torch.device("meta"):
            counts[component] = parameter_count(build_component(folder, component))
    assert counts == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_parts_agree(name: str) -> None:
    """The transformer reads what the text encoder gives and the VAE makes; the scheduler loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = CONFIGS / name

    def read(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text(encoding="utf-8"))

    transformer, text_encoder, vae = read("transformer"), read("text_encoder"), read("vae")
    if "cap_feat_dim" in transformer:  # Z-Image: the second-to-last hidden state, 2x2 patches in the DiT
        assert transformer["cap_feat_dim"] == text_encoder["hidden_size"]
        assert transformer["in_channels"] == vae["latent_channels"]
    else:  # FLUX.2: three hidden states stacked, 2x2 patches packed by the VAE
        assert transformer["joint_attention_dim"] == 3 * text_encoder["hidden_size"]
        assert transformer["in_channels"] == vae["latent_channels"] * 4
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert (folder / "SOURCES.md").is_file()
