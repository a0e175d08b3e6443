"""Tiny random-weight Stable Diffusion pipelines with the real topologies, built offline.

Each family has the block layout, attention flavour, text encoder shape, scheduler and VAE scaling of
the real checkpoint it stands for, only with tiny widths, so that every loader, converter and training
path nbkit runs on them is the real one, on CPU, in seconds:

- `sd1`: runwayml/stable-diffusion-v1-5 (CLIP ViT-L text encoder, 4-level UNet, PNDM).
- `sd2`: stabilityai/stable-diffusion-2-1-base (OpenCLIP text encoder, linear projections, epsilon).
- `sd2-v`: stabilityai/stable-diffusion-2-1, the 768-v model (as `sd2`, with v-prediction and DDIM).
- `sdxl`: stabilityai/stable-diffusion-xl-base-1.0 (two text encoders, 3-level UNet, text_time).
- `flux`: black-forest-labs/FLUX.1-dev (rectified-flow transformer, CLIP + T5, 16-channel VAE), built
  by `nbkit.models.tiny_flux`.

The tiny "native resolution" (the registry's `TINY_NATIVE_RESOLUTION`, also importable here as
`TINY_RESOLUTION`) plays the part of 512/768/1024 px: it is the pipeline's default image size
(`unet.config.sample_size * 8`, as in the real models), a size that goes through every VAE and UNet
level without odd feature maps. sd2-v keeps a larger native size than sd2, as 768 is to 512. The real
models' sizes are the registry's `FAMILIES[family].native_resolution`.

diffusers and transformers are imported inside the functions so that importing this module (for
`TINY_FAMILIES` in a CLI parser) stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory
from nbkit.models.registry import TINY_NATIVE_RESOLUTION
from nbkit.models.tokenizer import make_clip_tokenizer, write_clip_vocab_files

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

TINY_FAMILIES = tuple(TINY_NATIVE_RESOLUTION)
# Pixels; each is a multiple of 8 (VAE) * 2**(UNet levels - 1). The registry's table, not a copy.
TINY_RESOLUTION = TINY_NATIVE_RESOLUTION

_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def check_family(family: str) -> None:
    """Raise `NbkitError` unless `family` is one of `TINY_FAMILIES`.

    Args:
        family: the tiny family name to check.
    """
    if family not in TINY_FAMILIES:
        raise NbkitError(
            f"Unknown tiny model family {family!r}.",
            fix=f"Use one of: {', '.join(TINY_FAMILIES)}.",
        )


def _text_encoder_config(tokenizer, *, hidden_size: int, hidden_act: str, projection_dim: int):
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


def _vae(family: str):
    from diffusers import AutoencoderKL

    if family == "flux":  # FLUX.1's VAE: 16 latent channels, no quant convs, latents scaled and shifted
        latent = {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
        latent.update(use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    else:  # SD's: 4 latent channels; SDXL's overflows in fp16, and the flag travels with the config
        latent = {"latent_channels": 4, "scaling_factor": 0.13025 if family == "sdxl" else 0.18215}
        latent.update(force_upcast=family == "sdxl")
    # 4 levels (3 downsamplings = factor 8), as every family's real VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION[family],
        **latent,
    )


def _sd_unet(family: str, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    sd2 = family in ("sd2", "sd2-v")
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION[family] // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=2,
        # At 64 px the deepest level is 1x1; 8 groups (real models: 32 at 8x8) keep more than one value
        # per group there, which group norm needs to train at batch size 1.
        norm_num_groups=8,
        # SD1 has 8 heads everywhere; SD2 has as many as keep heads 64 wide (5, 10, 20, 20), here 16.
        attention_head_dim=(2, 2, 2, 4) if sd2 else 8,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=sd2,
        upcast_attention=family == "sd2-v",
    )


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION["sdxl"] // 8,
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


def _scheduler(family: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = {**_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    if family == "sdxl":
        return EulerDiscreteScheduler(
            **_BETAS,
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        )
    if family == "sd2-v":
        return DDIMScheduler(**common, prediction_type="v_prediction")
    return PNDMScheduler(**_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def _build(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family == "flux":
        from nbkit.models.tiny_flux import build_tiny_flux

        return build_tiny_flux()
    if family == "sdxl":
        tokenizer = make_clip_tokenizer()
        tokenizer_2 = make_clip_tokenizer(pad_token="!")
        # CLIP ViT-L (quick_gelu) + OpenCLIP bigG (gelu, wider, projected pooled output).
        text_encoder = CLIPTextModel(
            _text_encoder_config(tokenizer, hidden_size=32, hidden_act="quick_gelu", projection_dim=32)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_encoder_config(tokenizer_2, hidden_size=64, hidden_act="gelu", projection_dim=64)
        )
        return StableDiffusionXLPipeline(
            vae=_vae(family),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_sdxl_unet(cross_attention_dim=32 + 64, pooled_dim=64),
            scheduler=_scheduler(family),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    sd2 = family in ("sd2", "sd2-v")
    tokenizer = make_clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    text_encoder = CLIPTextModel(
        _text_encoder_config(
            tokenizer,
            hidden_size=32,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=32,
        )
    )
    return StableDiffusionPipeline(
        vae=_vae(family),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_sd_unet(family, cross_attention_dim=32),
        scheduler=_scheduler(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(family: str, *, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of `family` in memory.

    The same `family` and `seed` give bit-identical weights; the global torch RNG is left as it was.

    Args:
        family: one of `TINY_FAMILIES`.
        seed: seed for the weight initialisation.

    Returns:
        A `StableDiffusionPipeline` (sd1, sd2, sd2-v), `StableDiffusionXLPipeline` (sdxl) or
        `FluxPipeline` (flux) in fp32 on CPU.
    """
    import torch

    check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(family)


def save_tiny_pipeline(
    family: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    safe_serialization: bool = True,
) -> Path:
    """Build a tiny pipeline of `family` and save it as an ordinary diffusers folder.

    Args:
        family: one of `TINY_FAMILIES`.
        out_dir: folder to save into, replaced atomically: new, empty or an earlier saved pipeline. It
            gets the usual model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (and
            text_encoder_2/, tokenizer_2/ for sdxl; transformer/ instead of unet/ for flux).
        seed: seed for the weight initialisation.
        safe_serialization: save weights as .safetensors (True) or pickled .bin (False, the legacy
            format some old repositories still ship), for every component.

    Returns:
        `out_dir` as a Path.
    """
    check_family(family)
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "model_index.json")
    pipeline = build_tiny_pipeline(family, seed=seed)
    with atomic_directory(out_dir) as temporary:
        pipeline.save_pretrained(temporary, safe_serialization=safe_serialization)
        # Slow (pure-Python) CLIP tokenizers of older transformers read these files, not tokenizer.json.
        for name in ("tokenizer", "tokenizer_2") if family != "flux" else ("tokenizer",):  # flux: T5 second
            if (temporary / name).is_dir():
                write_clip_vocab_files(temporary / name)
        if not safe_serialization:
            for name in ("text_encoder", "text_encoder_2"):
                if (temporary / name).is_dir():
                    _pickle_transformers_weights(temporary / name)
    return out_dir


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


def _pickle_transformers_weights(folder: Path) -> None:
    # transformers 5 always writes model.safetensors; old repositories ship pytorch_model.bin instead.
    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()


def build_tiny_controlnet(family: str, *, seed: int = 0):
    """A tiny ControlNet for the tiny `family` model, made from its UNet (`ControlNetModel.from_unet`).

    A fresh ControlNet's zero convolutions make it do nothing; here they get small random weights, so
    that a control map visibly changes the image, as a trained ControlNet's does.

    Args:
        family: one of `TINY_FAMILIES`.
        seed: seed for the tiny UNet it copies and for the zero convolutions' weights.
    """
    import torch
    from diffusers import ControlNetModel

    check_family(family)
    pipeline = build_tiny_pipeline(family, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        controlnet = ControlNetModel.from_unet(pipeline.unet)
        with torch.no_grad():
            for name, parameter in controlnet.named_parameters():
                if name.startswith(
                    ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")
                ):
                    parameter.copy_(torch.randn_like(parameter) * 0.2)
    return controlnet


def save_tiny_controlnet(family: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny ControlNet (`build_tiny_controlnet`) and save it as a diffusers folder.

    Args:
        family: one of `TINY_FAMILIES`.
        out_dir: the folder, replaced atomically (new, empty, or a model saved earlier).
        seed: as for `build_tiny_controlnet`.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    controlnet = build_tiny_controlnet(family, seed=seed)
    with atomic_directory(out_dir) as temporary:
        controlnet.save_pretrained(temporary)
    return out_dir


def save_tiny_depth_model(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny random DPT depth-estimation model with its image processor, loadable with
    `AutoModelForDepthEstimation` / `AutoImageProcessor` (stands in for a real depth model offline).

    Args:
        out_dir: the folder, replaced atomically (new, empty, or a model saved earlier).
        seed: seed for the weights.
    """
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(16, 16, 16, 16),
        fusion_hidden_size=16,
        use_auxiliary_head=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config)
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
    return out_dir
