"""The parts of nbkit's tiny random-weight models that families share: CLIP text encoders, the VAE, the
Stable Diffusion UNets and schedulers, seeding and saving.

Each family's `make_tiny_pipeline` puts these together with the block layout, attention flavour, text
encoder shape, scheduler and VAE scaling of the real checkpoint it stands for, only with tiny widths, so
that every loader, converter and training path nbkit runs on them is the real one, on CPU, in seconds.
The tiny "native resolution" (`Family.tiny_native_resolution`) plays the part of 512/768/1024 px: it is
the pipeline's default image size, a size that goes through every VAE and UNet level without odd
feature maps.

diffusers and transformers are imported inside the functions, so importing this module stays instant.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory
from nbkit.tokenizers import write_clip_vocab_files

T = TypeVar("T")

BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def seeded(seed: int, build: Callable[[], T]) -> T:
    """Call `build` with torch seeded by `seed`, leaving the global torch RNG as it was.

    Args:
        seed: the seed.
        build: makes the model; the same seed gives bit-identical weights.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_replaceable(out_dir: Path, marker: str) -> None:
    """Raise `NbkitError` if `out_dir` holds files that are not a model saved earlier (no `marker`).

    Saving replaces the whole folder, which must never swallow unrelated files.

    Args:
        out_dir: the folder about to be written.
        marker: the file every saved model of this kind has at its top (model_index.json, config.json).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NbkitError(
            "This is a file, not a folder to save a model into.", path=out_dir, fix="Choose a folder."
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise NbkitError(
            f"The folder is not empty and holds no {marker}, so it is not a saved model to replace.",
            path=out_dir,
            fix="Choose an empty or new folder.",
        )


def save_pipeline(
    pipeline: Any, out_dir: str | os.PathLike, *, clip_tokenizers: Iterable[str], safe_serialization: bool
) -> Path:
    """Save a tiny pipeline as an ordinary diffusers folder, replacing `out_dir` atomically.

    Args:
        pipeline: the pipeline.
        out_dir: new, empty or an earlier saved pipeline.
        clip_tokenizers: the pipeline's CLIP tokenizer folders, which also get vocab.json and merges.txt.
        safe_serialization: save weights as .safetensors (True) or pickled .bin (False, the legacy
            format some old repositories still ship), for every component.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "model_index.json")
    with atomic_directory(out_dir) as temporary:
        pipeline.save_pretrained(temporary, safe_serialization=safe_serialization)
        # Slow (pure-Python) CLIP tokenizers of older transformers read these files, not tokenizer.json.
        for name in clip_tokenizers:
            if (temporary / name).is_dir():
                write_clip_vocab_files(temporary / name)
        if not safe_serialization:
            for name in ("text_encoder", "text_encoder_2"):
                if (temporary / name).is_dir():
                    _pickle_transformers_weights(temporary / name)
    return out_dir


def _pickle_transformers_weights(folder: Path) -> None:
    # transformers 5 always writes model.safetensors; old repositories ship pytorch_model.bin instead.
    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()


def text_encoder_config(tokenizer, *, hidden_size: int, hidden_act: str, projection_dim: int):
    """A tiny `CLIPTextConfig` for `tokenizer` (3 layers: "clip skip" then differs from the last)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        projection_dim=projection_dim,
        num_hidden_layers=3,  # enough for "clip skip" (penultimate layer) to differ from the last
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vae(sample_size: int, **latent: Any):
    """The tiny VAE: 4 levels (3 downsamplings = factor 8), as every family's real VAE.

    Args:
        sample_size: the image size it is made for, in pixels.
        latent: the family's latent settings (`latent_channels`, `scaling_factor`, ...).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=sample_size,
        **latent,
    )


def sd_unet(
    sample_size: int,
    *,
    cross_attention_dim: int,
    attention_head_dim: int | tuple[int, ...],
    linear_projection: bool,
    upcast_attention: bool,
):
    """The tiny SD 1.x / 2.x UNet: 4 levels, cross-attention in the first three.

    Args:
        sample_size: the latent size (pixels / 8).
        cross_attention_dim: the text embedding width.
        attention_head_dim: the heads' width (one per level, or one for all).
        linear_projection: linear (SD 2.x) rather than 1x1 convolution projections into attention.
        upcast_attention: compute attention in fp32 (SD 2.x 768-v overflows in fp16 otherwise).
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=2,
        # At 64 px the deepest level is 1x1; 8 groups (real models: 32 at 8x8) keep more than one value
        # per group there, which group norm needs to train at batch size 1.
        norm_num_groups=8,
        attention_head_dim=attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=linear_projection,
        upcast_attention=upcast_attention,
    )


def sdxl_unet(sample_size: int, *, cross_attention_dim: int, pooled_dim: int):
    """The tiny SDXL UNet: 3 levels, no attention in the first, size/crop conditioning (`text_time`).

    Args:
        sample_size: the latent size (pixels / 8).
        cross_attention_dim: the two text encoders' widths together.
        pooled_dim: the second text encoder's pooled (projected) width.
    """
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 32),
        layers_per_block=2,
        attention_head_dim=(2, 2, 2),  # 16-wide heads, as SDXL's (5, 10, 20) are 64-wide
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (original size, crop, target size), each embedded, + pooled text
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    )


def euler_scheduler(prediction_type: str):
    """SDXL's scheduler."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        **BETAS,
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def pndm_scheduler():
    """SD 1.x's and SD 2.x base's scheduler."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(**BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def ddim_scheduler(prediction_type: str):
    """SD 2.x 768-v's scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def controlnet_from_unet(unet: Any, *, seed: int):
    """A ControlNet copied from `unet` (`ControlNetModel.from_unet`), with small random zero convolutions.

    A fresh ControlNet's zero convolutions make it do nothing; here they get small random weights, so
    that a control map visibly changes the image, as a trained ControlNet's does.

    Args:
        unet: the tiny UNet it copies.
        seed: seed for the zero convolutions' weights.
    """
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            for name, parameter in controlnet.named_parameters():
                if name.startswith(
                    ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
                ):
                    parameter.copy_(torch.randn_like(parameter) * 0.2)
    return controlnet


def qwen3_config(tokenizer: Any, *, layers: int) -> Any:
    """The tiny Qwen3 text encoder's config: grouped-query attention (2 query heads share 1 key/value
    head, as Qwen3-4B's 32 share 8), q/k norms, tied embeddings, the width the tiny transformers take.

    Args:
        tokenizer: the tiny Qwen tokenizer (`nbkit.tokenizers.make_qwen_tokenizer`).
        layers: hidden layers (FLUX.2 reads layers 9, 18 and 27, so its encoder needs 28 or more).
    """
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
