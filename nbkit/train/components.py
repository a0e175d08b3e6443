"""The models a DreamBooth run trains, loaded with the training scheduler their family asks for.

What differs between families (which text encoders there are and whether they train, how prompts
become the denoiser's conditioning, the noise scheduler, the LoRA's target modules) is the family
adapter's (`nbkit.families`); `Components.family_adapter` is the run's. FLUX.1's denoiser is a
transformer (`pipeline.transformer`, the `unet` of these stages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.training_utils import cast_training_params

from nbkit.device import use_attention
from nbkit.families import Family, get_family


@dataclasses.dataclass
class Components:
    """A loaded base pipeline and the DDPM scheduler that noises training latents.

    Args:
        pipeline: the diffusers pipeline; training changes its own `unet` and text encoders in place,
            so it renders samples with the weights as they are.
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        noise_scheduler: the training scheduler the family asks for
            (`Family.training_noise_scheduler`).
    """

    pipeline: Any
    family: str
    noise_scheduler: Any

    @property
    def family_adapter(self) -> Family:
        """The family object, which says what training does differently for this model."""
        return get_family(self.family)

    @property
    def denoiser_role(self) -> str:
        """The denoiser's pipeline attribute: `unet`, or `transformer` for FLUX.1."""
        return self.family_adapter.denoiser

    @property
    def unet(self):
        """The denoiser (FLUX.1's transformer), which stage 2 trains."""
        return getattr(self.pipeline, self.denoiser_role)

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def text_encoder_roles(self) -> list[str]:
        return list(self.family_adapter.text_encoder_roles)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipeline, role) for role in self.text_encoder_roles]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self.pipeline, name) for name in self.family_adapter.tokenizer_roles]

    def model(self, role: str) -> torch.nn.Module:
        """The module called `role` (`unet`, `transformer`, `text_encoder` or `text_encoder_2`)."""
        return getattr(self.pipeline, role)

    def lora_targets(self, role: str) -> list[str] | str:
        """peft `target_modules` of a LoRA on component `role`."""
        return self.family_adapter.lora_target_modules(role)

    def encode_prompts(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        captions: Sequence[str],
        *,
        max_sequence_length: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embeddings or None) of `captions`, as the family's pipeline makes them.

        Args:
            text_encoders: the encoders in pipeline order; may be accelerate-wrapped (DDP) modules.
            token_ids: one id tensor per encoder, on the encoders' device.
            captions: the captions the ids are of.
            max_sequence_length: FLUX.1's T5 prompt length (other families use their tokenizer's).
            device: the encoders' device.
        """
        return self.family_adapter.encode_prompts(
            self.pipeline,
            text_encoders,
            token_ids,
            captions,
            max_sequence_length=max_sequence_length,
            device=device,
        )


def load_components(
    source: str, family: str, prediction_type: str, dtype: torch.dtype, *, quantization: str | None = None
) -> Components:
    """Load the base model and make its training scheduler.

    Args:
        source: what `nbkit.models.loading.load_pipeline` accepts (registry key, folder, file, ...).
        family: the session's model family; a model of another family is an error.
        prediction_type: `epsilon` or `v_prediction`; overrides what the scheduler config says, since
            some SD 2.x 768 uploads ship an epsilon scheduler config.
        dtype: the weights' dtype for frozen parts (trained parts are upcast to float32 later).
        quantization: `8bit` or `4bit`: FLUX.1's transformer loads quantized and frozen, and its LoRA
            trains on top (QLoRA, as diffusers' Flux examples); the text encoders only encode the
            captions once, then wait on the CPU, so they load as saved.
    """
    from nbkit.models.loading import load_pipeline

    pipeline = load_pipeline(
        source,
        family=family,
        torch_dtype=dtype,
        quantization=quantization,
        quantized_components=[get_family(family).denoiser],
    )
    pipeline.set_progress_bar_config(disable=True)
    noise_scheduler = get_family(family).training_noise_scheduler(pipeline.scheduler.config, prediction_type)
    components = Components(pipeline, family, noise_scheduler)
    for model in [components.unet, pipeline.vae, *components.text_encoders]:
        model.requires_grad_(False)
    return components


def tokenize(components: Components, captions: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of `captions`, one (len(captions), max_length) tensor per tokenizer."""
    return [
        tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in components.tokenizers
    ]


def add_lora(
    model: torch.nn.Module, *, rank: int, alpha: float | None, targets: list[str] | str, seed: int
) -> None:
    """Add a trainable LoRA adapter to `model` (diffusers' or transformers' `add_adapter`).

    The adapter's random initialisation is seeded so that a resumed run builds the same one.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config)


def has_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def trained_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a trained model: its LoRA weights, or its full state dict."""
    if has_lora(model):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trained_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Put `trained_state_dict`'s output back into `model` (which must have the same adapters)."""
    if has_lora(model):
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise ValueError(f"{where}: LoRA weights do not fit the model: {result.unexpected_keys[:3]}")
        return
    model.load_state_dict(state, strict=True)


def trainable_parameters(models: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [parameter for model in models for parameter in model.parameters() if parameter.requires_grad]


def make_trainable(model: torch.nn.Module, *, lora: bool) -> None:
    """Unfreeze a model for its stage: the LoRA weights only, or everything; trained weights in fp32."""
    if lora:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    else:
        model.requires_grad_(True)
    # Mixed precision keeps the master copy of what trains in float32 (autocast runs the math in fp16).
    cast_training_params(model, dtype=torch.float32)
    model.train()


def freeze(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Freeze a model after (or instead of) its stage and store it in the frozen-weight dtype."""
    model.requires_grad_(False)
    cast_to(model, dtype)
    model.eval()


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded with quantized weights (bitsandbytes or torchao through diffusers)."""
    return getattr(model, "hf_quantizer", None) is not None


def cast_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point weights to `dtype`, skipping models already there.

    A quantized model keeps its quantized weights (they cannot be cast); its LoRA weights are cast.
    """
    if is_quantized(model):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)
        return
    if any(parameter.dtype != dtype for parameter in model.parameters()):
        # torch's own `to`: diffusers' override warns about fp32-only modules even when a model has none.
        torch.nn.Module.to(model, dtype=dtype)


def enable_memory_savers(
    components: Components, *, gradient_checkpointing: bool, device: torch.device
) -> str:
    """Turn on gradient checkpointing and the fastest attention available; returns the attention's name.

    PyTorch's scaled_dot_product_attention is diffusers' default; xformers is used for families that
    train with it where it is installed, CUDA is there, and it runs (`nbkit.device.use_attention`).
    """
    if gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        # Text encoders that never train (FLUX.1's) only encode each caption once.
        trained_encoders = components.text_encoders if components.family_adapter.trains_text_encoders else ()
        for encoder in trained_encoders:
            # transformers 5 renamed it; older releases only have the gradient_ name.
            if hasattr(encoder, "activation_checkpointing_enable"):
                encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wanted = "xformers" if components.family_adapter.xformers_training else "sdpa"
    attention, _ = use_attention(components.unet, device, wanted)  # SDPA when xformers is absent or fails
    return attention
