"""`nbkit demo`: every stage end to end on the embedded tiny model."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbkit.families import DEFAULT_FAMILY, FAMILIES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the whole flow on the tiny offline model")
    parser.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        choices=list(FAMILIES),
        help="tiny model family (FLUX.1, Z-Image, FLUX.2: a LoRA of the transformer, no text-encoder stage)",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="storage root (default: $NBKIT_HOME or ~/nbkit)"
    )
    parser.add_argument("--session", default=None, help="session name (default: demo-<family>-<timestamp>)")
    parser.add_argument(
        "--te-steps",
        type=int,
        default=4,
        help="text-encoder steps (ignored where the family trains a LoRA of its transformer only)",
    )
    parser.add_argument(
        "--unet-steps", type=int, default=8, help="stage 2 steps (the UNet, or the transformer's LoRA)"
    )
    parser.add_argument(
        "--keep-ui", action="store_true", help="keep the web UI running at the end (until Ctrl+C)"
    )
    parser.add_argument("--no-ui", action="store_true", help="skip the web UI step at the end")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from nbkit.demo import run_demo

    run_demo(
        family=args.family,
        root=args.root,
        session_name=args.session,
        text_encoder_steps=args.te_steps,
        unet_steps=args.unet_steps,
        web_ui=not args.no_ui,
        keep_ui=args.keep_ui,
    )
    return 0
