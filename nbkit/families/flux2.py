"""FLUX.2 [klein] (Black Forest Labs): 4B and 9B rectified-flow transformers of FLUX.1's design,
conditioned on three stacked hidden layers of a Qwen3 encoder, over the FLUX.2 VAE's 32-channel latent
patched 2x2 and normalised by the VAE's batch-norm statistics. The distilled models render in 4 steps
without guidance; the base models take classifier-free guidance over 50."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from nbkit.families._generation import GenerationDefaults
from nbkit.families._training import NoisyLatents
from nbkit.families.facts import FusedModule, HubModel
from nbkit.families.flow_transformer import FlowTransformerFamily, transformer_memory_options

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Attention and MLP projections of both stream kinds, as diffusers' FLUX.2 [klein] DreamBooth LoRA
# example's defaults plus the single blocks' fused projections and the double blocks' MLPs.
LORA_TARGETS = (
    r".*(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)"
    r"|(ff|ff_context)\.(linear_in|linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.to_out)"
)

# The model cards' settings: the distilled models take 4 steps unguided, the base models 50 at CFG 4.
DISTILLED_STEPS = 4
BASE_STEPS = 50
BASE_CFG = 4.0

_GATED = "gated, non-commercial licence: accept it on the hub, then set HF_TOKEN"


def _pipeline_class() -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


class Flux2Klein(FlowTransformerFamily):
    name = "flux2"
    title = "FLUX.2 [klein]"
    allowed_resolutions = range(512, 2049, 16)
    pipeline_class = "Flux2KleinPipeline"
    pipeline_prefix = "Flux2"
    transformer_class = "Flux2Transformer2DModel"
    text_encoder_count = 1
    cross_attention_dim = 7680  # 3 stacked Qwen3-4B layers of 2560 (the 9B: 3 x 4096)
    modelspec_architecture = "flux-2-klein"
    modelspec_implementation = "https://github.com/black-forest-labs/flux2"
    tiny_native_resolution = 64
    # bf16 weights only. The 4B models are Apache 2.0; the 9B ones are gated under the FLUX
    # Non-Commercial License. The base models are undistilled: 50 steps with CFG.
    hub_models = (
        HubModel("flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", "FLUX.2 [klein] 4B (4 steps; Apache 2.0)", variant=None),
        HubModel("flux2-klein-9b", "black-forest-labs/FLUX.2-klein-9B", f"FLUX.2 [klein] 9B (4 steps; {_GATED})", variant=None, gated=True),
        HubModel("flux2-klein-base-4b", "black-forest-labs/FLUX.2-klein-base-4B", "FLUX.2 [klein] base 4B (50 steps with CFG; Apache 2.0)", variant=None),
        HubModel("flux2-klein-base-9b", "black-forest-labs/FLUX.2-klein-base-9B", f"FLUX.2 [klein] base 9B (50 steps with CFG; {_GATED})", variant=None, gated=True),
    )  # fmt: skip
    detection_priority = 110  # asked before FLUX.1, whose `Flux` prefix covers FLUX.2's pipelines too

    # -- models: the tiny model, memory figures ---------------------------------------------------

    vae_latent = MappingProxyType({"latent_channels": 32})
    clip_tokenizers = ()
    ways = transformer_memory_options("Qwen3", ("text_encoder",))

    def make_tiny_pipeline(self) -> DiffusionPipeline:
        from nbkit.families._tiny_flux2 import build_tiny_flux2

        return build_tiny_flux2(sample_size=self.tiny_native_resolution)

    def latent_normalizer(self, vae: Any) -> Callable[[Any], Any]:
        """2x2 patches, then the VAE's batch-norm statistics: the space the transformer works in."""
        import torch

        patchify = _pipeline_class()._patchify_latents
        mean = vae.bn.running_mean.detach().float().cpu().view(1, -1, 1, 1)
        std = torch.sqrt(
            vae.bn.running_var.detach().float().cpu().view(1, -1, 1, 1) + vae.config.batch_norm_eps
        )

        def normalize(latents: Any) -> Any:
            patched = patchify(latents)
            return (patched - mean.to(patched.device, patched.dtype)) / std.to(patched.device, patched.dtype)

        return normalize

    # -- conversion: its single file holds the transformer alone, in its original layout --------------
    lora_network_module = "networks.lora_flux_2"

    def transformer_layout(self, config: Mapping[str, Any]) -> list[FusedModule] | None:
        from nbkit.families._layout_flux2 import flux2_modules

        return flux2_modules(config)

    # -- training: a LoRA of the transformer, the Qwen3 encoder frozen ------------------------------
    # The loss of diffusers' FLUX.2 [klein] DreamBooth LoRA example: flow matching on the velocity of
    # the normalised, patched latents, packed into tokens with 4-axis position ids.

    lora_targets = LORA_TARGETS

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
        # The stacked hidden layers, padded to the prompt length; the text ids it also returns are
        # rebuilt per batch.
        embeds, _ = pipeline.encode_prompt(
            list(captions), device=device, max_sequence_length=max_sequence_length
        )
        return embeds, None

    def denoise(
        self,
        pipeline: Any,
        denoiser: Any,
        batch: NoisyLatents,
        embeds: Any,
        pooled: Any | None,
        time_ids: Any,
        config: Any,
    ) -> Any:
        pipeline_class = _pipeline_class()
        device = batch.noisy.device
        noisy = batch.noisy.to(embeds.dtype)
        packed = pipeline_class._pack_latents(noisy)
        image_ids = pipeline_class._prepare_latent_ids(noisy).to(device)
        text_ids = pipeline_class._prepare_text_ids(embeds).to(device)
        prediction = denoiser(
            hidden_states=packed,
            timestep=batch.timesteps.to(device) / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        # The grid size given, not read back from the ids (a device sync per step).
        height, width = noisy.shape[-2:]
        return pipeline_class._unpack_latents_with_ids(
            prediction[:, : packed.shape[1]], image_ids, height=height, width=width
        )

    # -- generation: distilled (4 steps, unguided) or base (CFG) --------------------------------------
    # img2img (and the hires fix's second pass) runs `Flux2KleinInpaintPipeline` with the whole picture
    # masked: diffusers' AutoPipelineForImage2Image maps [klein] to Flux2KleinPipeline, which edits
    # after reference images without a denoising strength. That pipeline also conditions on the picture
    # as a reference (FLUX.2's editing tokens), so even strength 1 keeps to it, and it shrinks a picture
    # above 1 megapixel (hence `image_input_max_pixels`).
    image_input_max_pixels = 1024 * 1024

    def generation_defaults(self, pipeline: Any) -> GenerationDefaults:
        """The distilled models' 4 steps without guidance, or the base models' 50 steps at CFG 4 (their
        model cards'). Before a model loads, the distilled ones' (all the hub models nbkit lists)."""
        if pipeline is None or _distilled(pipeline):
            return GenerationDefaults(DISTILLED_STEPS, 1.0, "Euler", own=True)
        return GenerationDefaults(BASE_STEPS, BASE_CFG, "Euler", own=True)

    def image_pipeline_class(self, pipeline: Any, mode: Literal["txt2img", "img2img", "inpaint"]) -> Any:
        if mode == "txt2img":
            return type(pipeline)
        from diffusers import Flux2KleinInpaintPipeline

        return Flux2KleinInpaintPipeline if mode == "inpaint" else _img2img_class()

    def call_arguments(
        self, pipeline: Any, *, guidance_scale: float | None, distilled_guidance: float | None, negative: bool
    ) -> tuple[dict[str, Any], float | None]:
        """FLUX.2's CFG is A1111's (`neg + s * (pos - neg)`, off at 1); a distilled model ignores it."""
        if _distilled(pipeline):
            return {"guidance_scale": 1.0}, None
        return {"guidance_scale": BASE_CFG if guidance_scale is None else guidance_scale}, None

    def cfg_used(self, call_arguments: dict[str, Any], guidance_scale: float | None, pipeline: Any) -> Any:
        return call_arguments["guidance_scale"]

    def needs_negative_pass(self, call_arguments: dict[str, Any]) -> bool:
        return call_arguments["guidance_scale"] > 1

    def negative_arguments(
        self, pipeline: Any, negative_prompts: list[str] | None, call_arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """[klein]'s pipelines take no `negative_prompt` (they encode "" themselves): a negative prompt
        goes in encoded, as `negative_prompt_embeds`."""
        if not self.needs_negative_pass(call_arguments) or negative_prompts is None:
            return {}
        embeds, _ = pipeline.encode_prompt(list(negative_prompts), device=pipeline._execution_device)
        return {"negative_prompt_embeds": embeds}

    def preview_latents(self, pipeline: Any, latents: Any, width: int, height: int) -> Any:
        return None  # packed, normalised 128-channel tokens: no cheap preview


def _distilled(pipeline: Any) -> bool:
    return bool(getattr(getattr(pipeline, "config", None), "is_distilled", False))


@functools.cache
def _img2img_class() -> Any:
    """`Flux2KleinInpaintPipeline` as img2img: without a mask, the whole picture is redrawn."""
    import torch
    from diffusers import Flux2KleinInpaintPipeline
    from PIL import Image

    class Flux2KleinImg2ImgPipeline(Flux2KleinInpaintPipeline):
        def __call__(
            self, prompt: Any = None, image: Any = None, mask_image: Any = None, **kwargs: Any
        ) -> Any:
            if mask_image is None and image is not None:
                first = image[0] if isinstance(image, list) else image
                if isinstance(first, Image.Image):
                    mask_image = Image.new("L", first.size, 255)
                else:  # a (batch, channels, height, width) or (channels, height, width) tensor
                    mask_image = torch.ones((1, 1, *first.shape[-2:]))
            return super().__call__(prompt=prompt, image=image, mask_image=mask_image, **kwargs)

    return Flux2KleinImg2ImgPipeline


FAMILY = Flux2Klein()
