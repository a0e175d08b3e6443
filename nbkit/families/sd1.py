"""Stable Diffusion 1.x: a 512 px UNet that predicts noise, with OpenAI's CLIP ViT-L text encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._generation import HubControlNet
from nbkit.families.facts import FolderConfigs, HubModel, SingleFileComponent, SingleFileLayout
from nbkit.families.stable_diffusion import LDM_UNET, LDM_VAE, StableDiffusionFamily


class SD1(StableDiffusionFamily):
    name = "sd1"
    title = "SD 1.x"
    prediction_type = "epsilon"
    native_resolution = 512
    allowed_resolutions = range(384, 641, 64)
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_count = 1
    cross_attention_dim = 768
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = "https://github.com/CompVis/stable-diffusion"
    tiny_native_resolution = 64
    buckets_by_default = False
    hub_models = (
        HubModel(
            "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion 1.5",
            aliases=("runwayml/stable-diffusion-v1-5",),
        ),
    )  # fmt: skip
    detection_priority = -100  # any UNet that no other family claims

    def claims(self, configs: FolderConfigs) -> bool:
        return True

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    single_file = SingleFileLayout(
        (LDM_UNET, LDM_VAE, SingleFileComponent("text_encoder", "cond_stage_model.transformer.", "clip")),
        signature="cond_stage_model.transformer.",
        evidence="a CLIP ViT-L text encoder under cond_stage_model.transformer (SD 1.x)",
    )

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    controlnet_group = "sd1"
    controlnet_title = "SD 1.5"
    controlnets = (
        HubControlNet("control_v11p_sd15_canny", "lllyasviel/control_v11p_sd15_canny", "canny"),
        HubControlNet("control_v11f1p_sd15_depth", "lllyasviel/control_v11f1p_sd15_depth", "depth"),
    )

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        return True  # asked last: any ControlNet that no other group claims


FAMILY = SD1()
