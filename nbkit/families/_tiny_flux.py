"""A tiny random-weight FLUX.1 pipeline with the real topology.

The real FLUX.1 [dev] is a rectified-flow transformer (19 double-stream blocks, where image and text
tokens keep their own weights and attend jointly, then 38 single-stream blocks over the concatenated
tokens), conditioned on T5-XXL token embeddings, CLIP ViT-L's pooled embedding and (dev only) an
embedded guidance scale, over a 16-channel VAE latent packed into 2x2 patches. The tiny model keeps
all of that with tiny widths: 2 double and 2 single blocks, 2 heads of 16, rotary axes (4, 6, 6) that
sum to the head width as (16, 56, 56) do to 128, a 3-layer CLIP and a 2-layer gated-GELU T5 (v1.1, as
T5-XXL), and a 4-level 16-channel VAE without quant convs, with FLUX.1's latent scale and shift. Its
T5 tokenizer is `nbkit.tokenizers.make_t5_tokenizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nbkit.families._tiny import text_encoder_config, vae
from nbkit.tokenizers import make_clip_tokenizer, make_t5_tokenizer


def _clip_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    # CLIP ViT-L (quick_gelu), as FLUX.1 uses; the same tiny shape as the SD families' encoder.
    return CLIPTextModel(
        text_encoder_config(tokenizer, hidden_size=32, hidden_act="quick_gelu", projection_dim=32)
    )


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, the family of T5-XXL
            tie_word_embeddings=False,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _transformer(*, guidance: bool, text_width: int, pooled_width: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels in 2x2 patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        pooled_projection_dim=pooled_width,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )


def _scheduler(*, guidance: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not guidance:  # schnell: no resolution-dependent shift
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux(*, sample_size: int, vae_latent: Mapping[str, Any], guidance: bool = True):
    """Build the tiny FLUX.1 pipeline (dev-like with `guidance`, schnell-like without) in fp32.

    The caller seeds torch (`Family.build_tiny_pipeline` does).

    Args:
        sample_size: the image size the VAE is made for, in pixels.
        vae_latent: FLUX.1's latent settings (`Flux1.vae_latent`).
        guidance: embed the guidance scale, as FLUX.1 [dev] does; False gives a schnell-like model.
    """
    from diffusers import FluxPipeline

    tokenizer = make_clip_tokenizer()
    tokenizer_2 = make_t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    return FluxPipeline(
        scheduler=_scheduler(guidance=guidance),
        vae=vae(sample_size, **vae_latent),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=_transformer(
            guidance=guidance,
            text_width=text_encoder_2.config.d_model,
            pooled_width=text_encoder.config.hidden_size,
        ),
    )
