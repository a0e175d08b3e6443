"""Stable Diffusion 2.x: a UNet with linear projections attending to OpenCLIP ViT-H (1024 wide, plain
gelu); the 512 px base predicts noise, the 768 px model predicts v."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._generation import HubControlNet
from nbkit.families.facts import FolderConfigs, HubModel, SingleFileComponent, SingleFileLayout
from nbkit.families.stable_diffusion import LDM_UNET, LDM_VAE, StableDiffusionFamily, cross_attention_width

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
    buckets_by_default = False
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

    # -- models: the tiny model, memory figures ---------------------------------------------------

    tiny_attention_head_dim = (2, 2, 2, 4)  # as many heads as keep them 64 wide (5, 10, 20, 20); here 16
    linear_projection = True

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    single_file = SingleFileLayout(
        (
            LDM_UNET,
            LDM_VAE,
            SingleFileComponent("text_encoder", "cond_stage_model.model.", "open_clip", trailing_blocks=1),
        ),
        signature="cond_stage_model.model.",
        evidence="an OpenCLIP text encoder under cond_stage_model.model (SD 2.x)",
    )
    choice_hint = "512 px '-base' models"

    def open_clip_tokenizer(self, name: str) -> bool:
        return True

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

    upcast_attention = True

    def tiny_scheduler(self) -> Any:
        from nbkit.families._tiny import ddim_scheduler

        return ddim_scheduler(self.prediction_type)

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    original_config = "v2-inference-v.yaml"  # without it A1111 takes the weights for the 512 px model's
    choice_hint = "768 px v-prediction models (SD 2.0/2.1 768-v and models fine-tuned from them)"


FAMILY = SD2()
FAMILY_V = SD2V()
