"""The `nbkit` command line.

Each subcommand lives in its own module with a `register(subparsers)` function that adds its parser
and sets `func` to the command that runs it (accelerate's layout). Errors a user can fix are printed
as one paragraph, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nbkit import __version__
from nbkit.errors import NbkitError

# Module names under nbkit.cli, in the order `nbkit --help` lists them.
SUBCOMMANDS = ["session", "model", "convert", "images", "train", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbkit", description="Personal Stable Diffusion models, end to end."
    )
    parser.add_argument("--version", action="version", version=f"nbkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"nbkit.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"nbkit.cli.{name}":
                continue  # that part is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args) or 0
    except NbkitError as error:
        print(f"nbkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nbkit: interrupted", file=sys.stderr)
        return 130
