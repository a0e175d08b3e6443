"""Stable Diffusion XL: a 1024 px UNet with two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG) and
size/crop conditioning (`text_time`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._generation import HubControlNet
from nbkit.families.base import FolderConfigs, HubModel
from nbkit.families.stable_diffusion import StableDiffusionFamily


class SDXL(StableDiffusionFamily):
    name = "sdxl"
    title = "SDXL"
    prediction_type = "epsilon"
    native_resolution = 1024
    allowed_resolutions = range(768, 1153, 64)
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_count = 2
    cross_attention_dim = 2048
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    tiny_native_resolution = 64
    hub_models = (
        HubModel("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "Stable Diffusion XL base 1.0"),
    )
    detection_priority = 10

    def claims(self, configs: FolderConfigs) -> bool:
        second_encoder = configs.index.get("text_encoder_2")
        has_second_encoder = isinstance(second_encoder, list) and None not in second_encoder
        return has_second_encoder or configs.denoiser.get("addition_embed_type") == "text_time"

    # -- models: the tiny model, memory figures ---------------------------------------------------
    # (methods about this family's models go here)

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (methods about this family's files go here)

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
    # (methods about training this family go here)

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    preview_coefficients = (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    )
    controlnet_group = "sdxl"
    controlnet_title = "SDXL"
    controlnets = (
        HubControlNet("controlnet-canny-sdxl-1.0", "diffusers/controlnet-canny-sdxl-1.0", "canny"),
        HubControlNet("controlnet-depth-sdxl-1.0", "diffusers/controlnet-depth-sdxl-1.0", "depth"),
    )

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"  # SDXL's size/crop conditioning


FAMILY = SDXL()
