"""`nbkit train SESSION`: two-stage DreamBooth on a session.

Options left out keep the session's stored settings; the ones given are saved back into
`session.json`. The same command runs on several GPUs under `accelerate launch --num_processes N -m
nbkit train SESSION ...`. On a base model of a family that trains a LoRA only (FLUX.1, Z-Image,
FLUX.2 [klein]: `Family.trains_full_denoiser` is False) it trains a LoRA of the transformer only.
"""

from __future__ import annotations

import argparse
from typing import Any

from nbkit.families import FAMILIES
from nbkit.session.settings import TrainConfig

# CLI option -> TrainConfig field, for the plain one-value options.
FIELDS = {
    "resolution": "resolution",
    "te_steps": "text_encoder_steps",
    "te_lr": "text_encoder_lr",
    "unet_steps": "unet_steps",
    "unet_lr": "unet_lr",
    "batch_size": "batch_size",
    "gradient_accumulation": "gradient_accumulation",
    "lr_schedule": "lr_schedule",
    "warmup_steps": "lr_warmup_steps",
    "seed": "seed",
    "offset_noise": "offset_noise",
    "caption_dropout": "caption_dropout",
    "min_snr_gamma": "min_snr_gamma",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "training_mode": "training_mode",
    "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha",
    "mixed_precision": "mixed_precision",
    "sample_steps": "sample_steps",
    "sample_seed": "sample_seed",
    "score": "score",
    "random_flip": "random_flip",
    "buckets": "buckets",
    "mask_background": "mask_background",
    "gradient_checkpointing": "gradient_checkpointing",
    "use_8bit_adam": "use_8bit_adam",
    "deterministic": "deterministic",
    "flux_guidance": "flux_guidance",
    "flux_max_sequence_length": "flux_max_sequence_length",
    "flux_timestep_sampling": "flux_timestep_sampling",
    "quantize_base": "quantize_base",
}
PRIOR_FIELDS = {
    "prior_class_prompt": "class_prompt",
    "prior_images": "num_images",
    "prior_loss_weight": "loss_weight",
}


def _default(field: str) -> str:
    """A new session's value of a TrainConfig field (or `prior.` field), for the help text."""
    config = TrainConfig()
    value = (
        getattr(config.prior, field.removeprefix("prior."))
        if field.startswith("prior.")
        else getattr(config, field)
    )
    if field == "resolution":
        return "the base model's native size"
    if field == "buckets":
        squares = [family.title for family in FAMILIES.values() if not family.buckets_by_default]
        return f"on; {', '.join(squares)}: off"
    if value is None or value == "" or value == []:
        return "none"
    # Families that start from their own value (the transformer families' LoRA settings) say so after
    # it, those with the same value together.
    own: dict[str, list[str]] = {}
    for family in FAMILIES.values():
        if field in family.training_defaults:
            own.setdefault(str(family.training_defaults[field]), []).append(family.title)
    return "; ".join(
        [str(value), *(f"{', '.join(titles)}: {own_value}" for own_value, titles in own.items())]
    )


def _family_defaults() -> str:
    """What a session of each family with its own starting settings trains with, as flags."""
    flags = {field: "--" + option.replace("_", "-") for option, field in FIELDS.items()}
    settings: dict[str, list[str]] = {}
    for family in FAMILIES.values():
        if family.training_defaults:
            as_flags = " ".join(
                f"{flags[field]} {value}" for field, value in family.training_defaults.items()
            )
            settings.setdefault(as_flags, []).append(family.title)
    return "".join(
        f" A {', '.join(titles)} session still at the defaults trains with {as_flags}."
        for as_flags, titles in settings.items()
    )


def _lora_only() -> str:
    """The families that train a LoRA of their denoiser only, by title."""
    return ", ".join(family.title for family in FAMILIES.values() if not family.trains_full_denoiser)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a session's model (text encoder, then UNet; or a LoRA of the transformer) and export it",
        description="Two-stage DreamBooth. Options left out keep the session's stored settings; the "
        "defaults shown are a new session's. Every input is checked before a model is loaded. "
        f"{_lora_only()}: a LoRA of the transformer only, text encoders frozen; full fine-tuning of them "
        "is not supported (use --lora-rank N)." + _family_defaults(),
    )
    parser.add_argument("session", metavar="SESSION", help="the session name")
    parser.add_argument("--root", help="the storage root (default: Google Drive on Colab, else NBKIT_HOME)")
    parser.add_argument(
        "--model", help="switch the base model: registry key (`nbkit model list`), hub id or diffusers folder"
    )

    def option(flag: str, field: str, text: str, **kwargs) -> None:
        parser.add_argument(flag, help=f"{text} (default: {_default(field)})", **kwargs)

    option(
        "--resolution",
        "resolution",
        "square training size in pixels; a change re-crops the photos",
        type=int,
        metavar="PX",
    )
    option(
        "--te-steps",
        "text_encoder_steps",
        "stage 1 (text encoder) steps; 0 skips it",
        type=int,
        metavar="N",
    )
    option("--te-lr", "text_encoder_lr", "stage 1 learning rate", type=float, metavar="LR")
    option(
        "--unet-steps",
        "unet_steps",
        "stage 2 steps (the UNet, or the transformer's LoRA); 0 skips it",
        type=int,
        metavar="N",
    )
    option("--unet-lr", "unet_lr", "stage 2 learning rate", type=float, metavar="LR")
    option("--batch-size", "batch_size", "images per step (per GPU)", type=int, metavar="N")
    option(
        "--gradient-accumulation",
        "gradient_accumulation",
        "micro-batches summed per optimizer step",
        type=int,
        metavar="N",
    )
    option(
        "--lr-schedule",
        "lr_schedule",
        "how the learning rate changes over a stage",
        choices=["constant", "constant_with_warmup", "linear", "cosine", "polynomial"],
    )
    option(
        "--warmup-steps", "lr_warmup_steps", "learning-rate warm-up steps per stage", type=int, metavar="N"
    )
    option(
        "--seed",
        "seed",
        "random seed; none draws one when the first run starts and stores it",
        type=int,
        metavar="S",
    )
    option(
        "--offset-noise", "offset_noise", "offset noise strength, e.g. 0.1 (0: off)", type=float, metavar="X"
    )
    option(
        "--caption-dropout",
        "caption_dropout",
        "share of photos trained on the empty prompt instead of their caption, e.g. 0.1 (0: off)",
        type=float,
        metavar="P",
    )
    option(
        "--mask-background",
        "mask_background",
        "masked loss: the weight of pixels outside the photos' subject masks, 0 (ignored) to 1 (none: off)",
        type=float,
        metavar="W",
    )
    option(
        "--min-snr-gamma",
        "min_snr_gamma",
        "Min-SNR loss weighting, e.g. 5 (none: off)",
        type=float,
        metavar="G",
    )
    option(
        "--checkpoint-every",
        "checkpoint_every",
        "save a checkpoint every N steps (0: stage ends only)",
        type=int,
        metavar="N",
    )
    option("--keep-checkpoints", "keep_checkpoints", "how many checkpoints to keep", type=int, metavar="K")
    option(
        "--prior-class-prompt", "prior.class_prompt", "class prompt for prior preservation", metavar="TEXT"
    )
    option(
        "--prior-images",
        "prior.num_images",
        "number of class images (0: no prior preservation)",
        type=int,
        metavar="N",
    )
    option(
        "--prior-loss-weight",
        "prior.loss_weight",
        "weight of the class images' loss",
        type=float,
        metavar="W",
    )
    option(
        "--training-mode",
        "training_mode",
        "auto: full fine-tuning where the GPU holds it, else a rank-16 LoRA (said before the run); full: "
        "refused before the run where it does not fit; lora: always a LoRA",
        choices=["auto", "full", "lora"],
    )
    option(
        "--lora-rank",
        "lora_rank",
        f"train a LoRA of this rank (0: full fine-tune, except {_lora_only()}, which train a LoRA only)",
        type=int,
        metavar="R",
    )
    option("--lora-alpha", "lora_alpha", "LoRA alpha (none: the rank)", type=float, metavar="A")
    option(
        "--flux-guidance",
        "flux_guidance",
        "FLUX.1-dev: the distilled guidance the transformer trains with",
        type=float,
        metavar="G",
    )
    option(
        "--flux-max-sequence-length",
        "flux_max_sequence_length",
        "FLUX.1: T5 prompt tokens (512 dev, 256 schnell); Z-Image, FLUX.2: Qwen3 prompt tokens (512)",
        type=int,
        metavar="N",
    )
    option(
        "--flux-timestep-sampling",
        "flux_timestep_sampling",
        "flow-matching families: training timestep density (none: uniform)",
        choices=["logit_normal", "none"],
    )
    option(
        "--quantize-base",
        "quantize_base",
        "LoRA-only families: load the frozen transformer with 8-bit or 4-bit weights and train the LoRA on top "
        "(auto: when the GPU needs it; needs bitsandbytes, or torchao for 8-bit)",
        choices=["auto", "none", "8bit", "4bit"],
    )
    option(
        "--mixed-precision",
        "mixed_precision",
        "auto: bf16 on Ampere+ GPUs, fp16 on older ones (refused by the bf16-only families), no on CPU",
        choices=["auto", "no", "fp16", "bf16"],
    )
    option(
        "--sample-prompt",
        "sample_prompts",
        "render this prompt at every checkpoint (repeatable)",
        action="append",
        metavar="TEXT",
    )
    option(
        "--sample-steps",
        "sample_steps",
        "denoising steps of the sample images (none: the model's own, e.g. Z-Image-Turbo 8, FLUX.2 [klein] 4; "
        "else 25)",
        type=int,
        metavar="N",
    )
    option("--sample-seed", "sample_seed", "seed of the sample images", type=int, metavar="S")
    option(
        "--score",
        "score",
        "score each checkpoint's samples (DINO, CLIP) into logs/vision_scores.* (needs the vision extra)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    option(
        "--random-flip",
        "random_flip",
        "mirror photos at random",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    option(
        "--buckets",
        "buckets",
        "train each photo at the aspect-ratio bucket nearest its shape, not a square "
        "(photos are cropped again from their originals)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    option(
        "--gradient-checkpointing",
        "gradient_checkpointing",
        "recompute activations to save GPU memory",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    option(
        "--use-8bit-adam",
        "use_8bit_adam",
        "bitsandbytes' 8-bit AdamW on CUDA (saves memory)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    option(
        "--deterministic",
        "deterministic",
        "bit-exact resume after a kill: one CPU thread, deterministic GPU kernels (slower)",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last good checkpoint")
    mode.add_argument(
        "--restart",
        action="store_true",
        help="start over: delete an unfinished run's checkpoints, or train a finished session again "
        "(replacing its exported model)",
    )
    mode.add_argument(
        "--more",
        action="store_true",
        help="train a finished session further: give the new, larger total with --unet-steps N (or "
        "--te-steps N when it trained the text encoder only); it continues from the last checkpoint, "
        "optimizer and schedule included (from the exported model with a fresh optimizer when that "
        "checkpoint is gone), and exports again, replacing the model",
    )
    parser.add_argument(
        "--force-resolution",
        action="store_true",
        help="accept a resolution outside the model's sensible range",
    )
    parser.add_argument(
        "--max-steps-this-run",
        type=int,
        metavar="N",
        help="stop after N steps with a checkpoint there; --resume continues (default: no limit)",
    )
    parser.set_defaults(func=command)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line changes, as `train()`'s `config_overrides`."""
    overrides: dict[str, Any] = {
        field: getattr(args, option) for option, field in FIELDS.items() if getattr(args, option) is not None
    }
    prior = {
        field: getattr(args, option)
        for option, field in PRIOR_FIELDS.items()
        if getattr(args, option) is not None
    }
    if prior:
        overrides["prior"] = prior
    if args.sample_prompt:
        overrides["sample_prompts"] = args.sample_prompt
    if args.model:
        overrides["model"] = args.model
    return overrides


def command(args: argparse.Namespace) -> int:
    from nbkit.session.core import Session
    from nbkit.train.plan import plan_run

    session = Session.open(args.session, root=args.root)
    options = {
        "resume": args.resume,
        "restart": args.restart,
        "force_resolution": args.force_resolution,
        "more": args.more,
    }
    overrides = overrides_from_args(args)
    plan_run(session, overrides, **options)  # every input error in a second, before torch and diffusers load

    from accelerate import PartialState

    from nbkit.quiet import quiet_libraries
    from nbkit.train import train

    quiet_libraries(args.verbose)

    result = train(session, overrides, max_steps_this_run=args.max_steps_this_run, **options)
    if not PartialState().is_main_process:
        return 0  # under `accelerate launch` one process reports
    if not result.finished:
        print(
            f"stopped at {result.stage} step {result.step} (checkpoint {result.last_checkpoint}); "
            f"continue with: nbkit train {args.session} --resume"
        )
        return 0
    for label, path in (
        ("model", result.model_dir),
        ("single file", result.single_file),
        *result.lora_files.items(),
    ):
        if path is not None:
            print(f"{label}: {path}")
    print(f"seed: {result.seed}")
    return 0
