"""The DreamBooth training settings stored in `session.json`.

Defaults follow the fast-DreamBooth notebook that users know (UNet 1500 steps at 2e-6, text encoder
350 steps at 1e-6, 512 px, fp16 on GPU); everything else is what diffusers' and kohya's trainers
consider a sound default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from nbkit.config import StrictConfig

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
FluxTimestepSampling = Literal["logit_normal", "none"]
QuantizeBase = Literal["auto", "none", "8bit", "4bit"]
TrainingMode = Literal["auto", "full", "lora"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "polynomial"]


@dataclasses.dataclass
class PriorPreservation(StrictConfig):
    """Class images that keep the model's idea of the class word (prior preservation).

    `num_images == 0` turns it off.
    """

    class_prompt: str = ""
    num_images: int = 0
    loss_weight: float = 1.0
    generation_steps: int = 25


@dataclasses.dataclass
class TrainConfig(StrictConfig):
    """Settings for one two-stage DreamBooth run (stage 1: text encoder, stage 2: UNet).

    `resolution` is the session's one training size (images are cropped at it). `seed` is the run's
    seed, drawn at random and stored here when the first run starts. `deterministic` makes a killed and
    resumed run bit-exact with an uninterrupted one: one CPU thread, and on a GPU deterministic kernels
    (`torch.use_deterministic_algorithms`, `CUBLAS_WORKSPACE_CONFIG`); slower, so off by default, when a
    resume still continues with the same steps, data order, optimizer and schedule state, but the last
    bits of the weights may differ from an uninterrupted run.
    `score` scores each checkpoint's samples with `nbkit.vision` (DINO, CLIP) into `logs/`.
    `caption_dropout` is the share of instance images trained on the empty prompt instead of their
    caption (kohya's caption dropout: the model learns the subject's look beyond the token); each
    image's draw comes from its step's seeded generator, so a resumed run drops the same ones.

    `buckets` crops and trains each photo at the aspect-ratio bucket nearest its shape (about the
    square training size's area, `nbkit.images.buckets`) instead of a square; None follows the
    family (`Family.buckets_by_default`: on except for SD 1.x/2.x).

    `mask_background` turns on masked loss: pixels outside the photos' subject masks
    (`nbkit.images.masks`) count this much (0: not at all, 1: as the subject); None: off.

    `training_mode` `auto` fine-tunes the full model (`lora_rank` 0) where the GPU holds it and trains
    a rank-16 LoRA where it does not (SDXL on a T4 or L4), saying why; `full` refuses a GPU that cannot
    hold it before the run, with the figure; `lora` always trains a LoRA (`lora_rank`, or 16). The
    figures are computed (`nbkit.models.memory`); on a CPU nothing is checked.

    FLUX.1, Z-Image and FLUX.2 [klein] train a LoRA of their transformer only (stage 2;
    `text_encoder_steps` must be 0 and `lora_rank` above 0: full fine-tuning of them is not
    supported). `flux_guidance` is the distilled guidance the transformer is conditioned on while
    training (FLUX.1-dev; ignored by the others, which have none), `flux_max_sequence_length` the prompt
    length of the text encoder that has none of its own (FLUX.1's T5, Z-Image's and FLUX.2's Qwen3; the
    names keep their first family's prefix so that older sessions load), `flux_timestep_sampling` the
    density training timesteps are drawn from (`logit_normal` or `none`: uniform), as in diffusers' Flux
    DreamBooth LoRA examples. `quantize_base` loads the frozen transformer with 8-bit or 4-bit
    weights and trains the LoRA on top (QLoRA): `auto` does what the GPU memory check picks
    (`nbkit.models.memory`; never on the CPU), `none` never, `8bit`/`4bit` always (bitsandbytes on CUDA,
    else torchao for 8-bit).
    """

    resolution: int = 512
    text_encoder_steps: int = 350
    text_encoder_lr: float = 1e-6
    unet_steps: int = 1500
    unet_lr: float = 2e-6
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr_schedule: LrSchedule = "linear"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int | None = None
    offset_noise: float = 0.0
    caption_dropout: float = 0.0
    buckets: bool | None = None
    mask_background: float | None = None
    min_snr_gamma: float | None = None
    random_flip: bool = False
    prior: PriorPreservation = dataclasses.field(default_factory=PriorPreservation)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_prompts: list[str] = dataclasses.field(default_factory=list)
    sample_steps: int | None = None
    sample_seed: int = 1234
    score: bool = False
    mixed_precision: MixedPrecision = "auto"
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True
    training_mode: TrainingMode = "auto"
    lora_rank: int = 0
    lora_alpha: float | None = None
    deterministic: bool = False
    flux_guidance: float = 1.0
    flux_max_sequence_length: int = 512
    flux_timestep_sampling: FluxTimestepSampling = "logit_normal"
    quantize_base: QuantizeBase = "auto"
