"""A tiny random-weight FLUX.2 [klein] pipeline with the real topology.

The real FLUX.2 [klein] 4B is a rectified-flow transformer of 5 double-stream and 20 single-stream
blocks (FLUX.1's design with shared modulation, SwiGLU MLPs and no biases), conditioned on the hidden
states of layers 9, 18 and 27 of a Qwen3 encoder stacked into one 3x-wide token embedding, over the
FLUX.2 VAE's 32-channel latent patched 2x2 into 128 channels and normalised by the VAE's batch-norm
statistics; the distilled models have no guidance input. The tiny model keeps all of that with tiny
widths: 2 double and 2 single blocks, 2 heads of 16 with 4 rotary axes of 4, a 28-layer Qwen3 of width 32
(so layers 9, 18, 27 exist) and a 4-level 32-channel FLUX.2 VAE whose batch-norm statistics are seeded
away from 0 and 1, so that a missing normalisation shows. Its tokenizer is
`nbkit.tokenizers.make_qwen_tokenizer`.
"""

from __future__ import annotations

from nbkit.families._tiny import qwen3_config
from nbkit.tokenizers import make_qwen_tokenizer

LATENT_CHANNELS = 32  # the FLUX.2 VAE's


def _vae(sample_size: int):
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=sample_size,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(std=0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _transformer(text_width: int):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 latent patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,  # the distilled [klein] models have no guidance input
    )


def build_tiny_flux2(*, sample_size: int):
    """Build the tiny FLUX.2 [klein] pipeline (distilled) in fp32; the caller seeds torch.

    Args:
        sample_size: the image size the VAE is made for, in pixels.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    tokenizer = make_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(qwen3_config(tokenizer, layers=28))
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(sample_size),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(3 * text_encoder.config.hidden_size),
        is_distilled=True,
    )
