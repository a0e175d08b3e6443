"""Stable Diffusion XL: a 1024 px UNet with two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG) and
size/crop conditioning (`text_time`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nbkit.families._generation import HubControlNet
from nbkit.families.facts import FolderConfigs, HubModel, SingleFileComponent, SingleFileLayout
from nbkit.families.stable_diffusion import LDM_UNET, LDM_VAE, StableDiffusionFamily

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


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

    # SDXL's VAE overflows in fp16 (the flag travels with the config).
    vae_latent = MappingProxyType({"latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True})
    clip_tokenizers = ("tokenizer", "tokenizer_2")

    def tiny_scheduler(self) -> Any:
        from nbkit.families._tiny import euler_scheduler

        return euler_scheduler(self.prediction_type)

    def make_tiny_pipeline(self) -> DiffusionPipeline:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from nbkit.families._tiny import sdxl_unet, text_encoder_config, vae
        from nbkit.tokenizers import make_clip_tokenizer

        tokenizer = make_clip_tokenizer()
        tokenizer_2 = make_clip_tokenizer(pad_token="!")
        # CLIP ViT-L (quick_gelu) + OpenCLIP bigG (gelu, wider, projected pooled output).
        text_encoder = CLIPTextModel(
            text_encoder_config(tokenizer, hidden_size=32, hidden_act="quick_gelu", projection_dim=32)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            text_encoder_config(tokenizer_2, hidden_size=64, hidden_act="gelu", projection_dim=64)
        )
        size = self.tiny_native_resolution
        return StableDiffusionXLPipeline(
            vae=vae(size, **self.vae_latent),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=sdxl_unet(size // 8, cross_attention_dim=32 + 64, pooled_dim=64),
            scheduler=self.tiny_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )

    # -- conversion: single-file layout, LoRA file keys ---------------------------------------------

    single_file = SingleFileLayout(
        (
            LDM_UNET,
            LDM_VAE,
            SingleFileComponent("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
            SingleFileComponent("text_encoder_2", "conditioner.embedders.1.model.", "open_clip"),
        ),
        signature="conditioner.embedders.1.model.",
        evidence="two text encoders under conditioner.embedders (SDXL)",
    )

    def open_clip_tokenizer(self, name: str) -> bool:
        return name == "tokenizer_2"  # OpenCLIP bigG; the first is OpenAI's CLIP ViT-L

    def single_file_pipeline_extras(self, index: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
            "add_watermarker": False,
        }

    # -- training: prompt encoding, noise, loss target, LoRA targets --------------------------------

    lora_oom_hint = " — the usual way to train SDXL on a T4"

    def kohya_lora_prefix(self, role: str) -> str:
        # kohya numbers SDXL's two text encoders.
        return {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}.get(role, "lora_unet")

    def encode_prompts(
        self,
        pipeline: Any,
        text_encoders: Sequence[Any],
        token_ids: Sequence[Any],
        captions: Sequence[str],
        *,
        max_sequence_length: int,
        device: Any,
    ) -> tuple[Any, Any | None]:
        # Both encoders' penultimate hidden states side by side, and the second's projected, pooled
        # output (text_embeds), as StableDiffusionXLPipeline conditions the UNet.
        import torch

        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, token_ids, strict=True):
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        return torch.cat(hidden, dim=-1), pooled

    def added_conditions(self, pooled: Any | None, time_ids: Any) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

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
    textual_inversion = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))

    def fits_controlnet_config(self, config: Mapping[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"  # SDXL's size/crop conditioning


FAMILY = SDXL()
