"""The `nbkit` command line.

Each subcommand lives in its own module with a `register(subparsers)` function that adds its parser
and sets `func` to the command that runs it (accelerate's layout); the modules import their heavy
libraries inside the commands, so `nbkit --help` stays fast. Errors a user can fix are printed as one
paragraph, without a traceback, and exit with status 2. Library warnings and loader progress bars are
quiet unless `--verbose` is given (`nbkit.quiet`); nbkit's own warnings are one `nbkit: warning:` line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nbkit import __version__
from nbkit.errors import NbkitError

# Module names under nbkit.cli, in the order `nbkit --help` lists them.
SUBCOMMANDS = ["session", "model", "convert", "images", "train", "vision", "ui", "demo", "wheels"]
# Subcommands that load models anyway, so quieting diffusers/transformers up front costs no time
# (others can set `loads_models=True` in their parser's defaults). `train` quiets them itself, after
# its inputs are checked, so an input error comes in a second.
LOADS_MODELS = {"convert", "demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbkit", description="Personal Stable Diffusion models, end to end."
    )
    parser.add_argument("--version", action="version", version=f"nbkit {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' warnings, log messages and progress bars (for bug reports)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        # Every listed subcommand exists: a module that fails to import is a bug, shown as one.
        importlib.import_module(f"nbkit.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from nbkit.quiet import quiet_libraries

    loads_models = getattr(args, "loads_models", False) or args.command in LOADS_MODELS
    quiet_libraries(args.verbose, import_libraries=loads_models)
    try:
        return args.func(args) or 0
    except NbkitError as error:
        print(f"nbkit: error: {error.render('cli')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nbkit: interrupted", file=sys.stderr)
        return 130
