"""`nbkit train SESSION`: two-stage DreamBooth on a session.

Options left out keep the session's stored settings; the ones given are saved back into
`session.json`. The same command runs on several GPUs under `accelerate launch --num_processes N -m
nbkit train SESSION ...`.
"""

from __future__ import annotations

import argparse
from typing import Any

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
    "min_snr_gamma": "min_snr_gamma",
    "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints",
    "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha",
    "mixed_precision": "mixed_precision",
    "sample_steps": "sample_steps",
    "sample_seed": "sample_seed",
    "random_flip": "random_flip",
    "gradient_checkpointing": "gradient_checkpointing",
    "use_8bit_adam": "use_8bit_adam",
}
PRIOR_FIELDS = {
    "prior_class_prompt": "class_prompt",
    "prior_images": "num_images",
    "prior_loss_weight": "loss_weight",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a session's model (text encoder, then UNet) and export it",
        description="Two-stage DreamBooth. Options not given keep the session's stored settings.",
    )
    parser.add_argument("session", metavar="SESSION", help="the session name")
    parser.add_argument("--root", help="the storage root (default: Google Drive on Colab, else NBKIT_HOME)")
    parser.add_argument("--model", help="switch the base model (registry key, hub id or diffusers folder)")
    parser.add_argument("--resolution", type=int, metavar="PX", help="square training size in pixels")
    parser.add_argument("--te-steps", type=int, metavar="N", help="stage 1 (text encoder) steps; 0 skips it")
    parser.add_argument("--te-lr", type=float, metavar="LR", help="stage 1 learning rate")
    parser.add_argument("--unet-steps", type=int, metavar="N", help="stage 2 (UNet) steps; 0 skips it")
    parser.add_argument("--unet-lr", type=float, metavar="LR", help="stage 2 learning rate")
    parser.add_argument("--batch-size", type=int, metavar="N")
    parser.add_argument("--gradient-accumulation", type=int, metavar="N")
    parser.add_argument(
        "--lr-schedule", choices=["constant", "constant_with_warmup", "linear", "cosine", "polynomial"]
    )
    parser.add_argument("--warmup-steps", type=int, metavar="N")
    parser.add_argument(
        "--seed", type=int, metavar="S", help="random seed (default: the stored one, else random)"
    )
    parser.add_argument(
        "--offset-noise", type=float, metavar="X", help="offset noise strength, e.g. 0.1 (0: off)"
    )
    parser.add_argument("--min-snr-gamma", type=float, metavar="G", help="Min-SNR loss weighting, e.g. 5")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="save a checkpoint every N steps")
    parser.add_argument("--keep-checkpoints", type=int, metavar="K", help="how many checkpoints to keep")
    parser.add_argument("--prior-class-prompt", metavar="TEXT", help="class prompt for prior preservation")
    parser.add_argument("--prior-images", type=int, metavar="N", help="number of class images (0: off)")
    parser.add_argument("--prior-loss-weight", type=float, metavar="W")
    parser.add_argument(
        "--lora-rank", type=int, metavar="R", help="train a LoRA of this rank (0: full fine-tune)"
    )
    parser.add_argument("--lora-alpha", type=float, metavar="A")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"])
    parser.add_argument(
        "--sample-prompt",
        action="append",
        metavar="TEXT",
        help="render this prompt at every checkpoint (repeatable)",
    )
    parser.add_argument("--sample-steps", type=int, metavar="N")
    parser.add_argument("--sample-seed", type=int, metavar="S")
    parser.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    mode.add_argument(
        "--restart", action="store_true", help="delete an unfinished run's checkpoints and start over"
    )
    parser.add_argument(
        "--max-steps-this-run", type=int, metavar="N", help="stop after N steps (resume later)"
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
    from accelerate import PartialState

    from nbkit.train import train

    result = train(
        args.session,
        overrides_from_args(args),
        resume=args.resume,
        restart=args.restart,
        max_steps_this_run=args.max_steps_this_run,
        root=args.root,
    )
    if not PartialState().is_main_process:
        return 0  # under `accelerate launch` one process reports
    if not result.finished:
        print(
            f"stopped at {result.stage} step {result.step}; continue with: nbkit train {args.session} --resume"
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
