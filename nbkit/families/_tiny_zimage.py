"""A tiny random-weight Z-Image pipeline with the real topology.

The real Z-Image is a single-stream DiT (S3-DiT): the image patches and the caption's tokens each pass
their own refiner blocks, then 30 shared blocks over the joined sequence, all modulated by the
timestep, with 3-axis rotary positions; the caption features are the second-to-last hidden states of a
Qwen3-4B encoder over the prompt in Qwen's chat template; the latent is FLUX.1's 16-channel VAE's,
patched 2x2. The tiny model keeps all of that with tiny widths: 2 shared and 1 refiner block of each
kind, 2 heads of 16 with rotary axes (8, 4, 4) as (32, 48, 48) sum to 128, a 3-layer Qwen3 with
grouped-query attention, and the shared 4-level VAE with FLUX.1's latent scale and shift. Its tokenizer
is `nbkit.tokenizers.make_qwen_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._tiny import qwen3_config, vae
from nbkit.tokenizers import make_qwen_tokenizer


def _transformer(caption_width: int):
    import torch
    from diffusers import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=caption_width,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1536, 512, 512],
    )
    # The pad tokens are made with torch.empty: whatever memory held. Seeded values keep the model
    # deterministic (and free of NaN).
    with torch.no_grad():
        for pad in (transformer.x_pad_token, transformer.cap_pad_token):
            pad.normal_(std=0.02)
    return transformer


def build_tiny_zimage(*, sample_size: int, vae_latent: Mapping[str, Any]):
    """Build the tiny Z-Image pipeline in fp32; the caller seeds torch (`Family.build_tiny_pipeline`).

    Args:
        sample_size: the image size the VAE is made for, in pixels.
        vae_latent: the latent settings (`ZImage.vae_latent`, FLUX.1's).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Model

    tokenizer = make_qwen_tokenizer()
    text_encoder = Qwen3Model(qwen3_config(tokenizer, layers=3))
    return ZImagePipeline(
        # Z-Image-Turbo's scheduler: a fixed shift of 3, no resolution-dependent shift.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        ),
        vae=vae(sample_size, **vae_latent),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(text_encoder.config.hidden_size),
    )
