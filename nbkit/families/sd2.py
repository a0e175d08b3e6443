"""Stable Diffusion 2.x: a UNet with linear projections attending to OpenCLIP ViT-H (1024 wide, plain
gelu); the 512 px base predicts noise, the 768 px model predicts v."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._generation import HubControlNet
from nbkit.families.base import FolderConfigs, HubModel
from nbkit.families.stable_diffusion import StableDiffusionFamily, cross_attention_width

_IMPLEMENTATION = "https://github.com/Stability-AI/stablediffusion"
OPEN_CLIP_WIDTH = 1024


class SD2(StableDiffusionFamily):
    name = "sd2"
    title = "SD 2.x (512)"
    prediction_type = "epsilon"
    native_resolution = 512
    allowed_resolutions = range(384, 641, 64)
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_count = 1
    cross_attention_dim = OPEN_CLIP_WIDTH
    modelspec_architecture = "stable-diffusion-v2-512"
    modelspec_implementation = _IMPLEMENTATION
    tiny_native_resolution = 64
    hub_models = (
        HubModel("sd21-512", "stabilityai/stable-diffusion-2-1-base", "Stable Diffusion 2.1 base (512 px)"),
    )
    detection_priority = -10

    def claims(self, configs: FolderConfigs) -> bool:
        text_encoder, unet = configs.text_encoder, configs.denoiser
        # OpenCLIP ViT-H: 1024 wide, plain gelu (CLIP ViT-L of SD 1.x uses quick_gelu).
        open_clip = (
            text_encoder.get("hidden_act") == "gelu" or text_encoder.get("hidden_size") == OPEN_CLIP_WIDTH
        )
        return bool(
            cross_attention_width(unet) == OPEN_CLIP_WIDTH or unet.get("use_linear_projection") or open_clip
        )

    def accepts_prediction(self, prediction_type: str) -> bool:
        return prediction_type != "v_prediction"

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    controlnet_group = "sd2"  # the 512 base and the 768-v model take the same ControlNets
    controlnet_title = "SD 2.x"
    controlnets = (
        HubControlNet("controlnet-sd21-canny-diffusers", "thibaud/controlnet-sd21-canny-diffusers", "canny"),
        HubControlNet("controlnet-sd21-depth-diffusers", "thibaud/controlnet-sd21-depth-diffusers", "depth"),
    )

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        # Linear projections in the transformers (SD 1.5 has convolutions), without SDXL's text_time.
        return bool(config.get("use_linear_projection")) and config.get("addition_embed_type") != "text_time"


class SD2V(SD2):
    name = "sd2-v"
    title = "SD 2.x (768, v-prediction)"
    prediction_type = "v_prediction"
    native_resolution = 768
    allowed_resolutions = range(640, 961, 64)
    modelspec_architecture = "stable-diffusion-v2-768-v"
    tiny_native_resolution = 128  # as 768 is to 512
    hub_models = (
        HubModel(
            "sd21-768", "stabilityai/stable-diffusion-2-1", "Stable Diffusion 2.1 (768 px, v-prediction)"
        ),
    )

    def accepts_prediction(self, prediction_type: str) -> bool:
        return prediction_type == "v_prediction"

    # -- models: the tiny model, memory figures ---------------------------------------------------
    # (methods about this family's models go here)

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------
    # (methods about this family's files go here)

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------
    # (methods about training this family go here)

    # -- generation: pipelines, samplers, guidance, dtype --------------------------------------------
    # (methods about generating with this family go here)


FAMILY = SD2()
FAMILY_V = SD2V()
