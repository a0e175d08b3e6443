"""`nbkit ui`: the A1111-like web UI and API on one server, until Ctrl+C."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from nbkit.tunnel import CHOICES
    from nbkit.webui.queue import DEFAULT_MAX_PENDING

    parser = subparsers.add_parser(
        "ui",
        help="start the web UI and the A1111-compatible API",
        description="Serve an AUTOMATIC1111-like web UI and its REST API (/sdapi/v1) on one port, until "
        "Ctrl+C. Reachable beyond this machine (a tunnel or a non-loopback --host) only with a password: "
        "--auth, or a generated one that is printed.",
    )
    parser.add_argument("--session", default=None, help="session whose models and outputs folder to use")
    parser.add_argument(
        "--model", default=None, help="checkpoint to load first: title, name, hash, path or URL"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument(
        "--tunnel",
        default="none",
        choices=list(CHOICES),
        help="public link provider (default: none); auto tries gradio, cloudflared, localtunnel, then ngrok "
        "when a token is present, and falls back when a link drops",
    )
    parser.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASS",
        help="login for the UI and the API (HTTP Basic); or set NBKIT_AUTH=USER:PASS, which keeps the "
        "password out of the process list",
    )
    parser.add_argument("--lowvram", action="store_true", help="attention slicing, VAE tiling, CPU offload")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--root", type=Path, default=None, help="storage root (default: $NBKIT_HOME or ~/nbkit)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_PENDING,
        help=f"requests that may wait; one more gets 503 (default: {DEFAULT_MAX_PENDING})",
    )
    parser.add_argument(
        "--extra-model",
        action="append",
        default=[],
        metavar="PATH",
        help="also offer this checkpoint (repeatable)",
    )
    parser.add_argument(
        "--no-base-models", action="store_true", help="do not list the registry's base models"
    )
    parser.set_defaults(func=command, loads_models=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def command(args: argparse.Namespace) -> int:
    import signal
    import threading

    from nbkit.webui import launch

    if args.max_queue < 1:
        raise SystemExit("nbkit ui: error: --max-queue must be at least 1")
    # SIGTERM (`kill`, a notebook's stop button) stops the UI like Ctrl+C from the very start, so the
    # cleanup runs: a tunnel being opened is closed rather than left running without its UI (its
    # processes are in their own process group, which no signal to this one reaches).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ui = launch(
            session=args.session,
            model=args.model,
            host=args.host,
            port=args.port,
            tunnel=args.tunnel,
            auth=args.auth or os.environ.get("NBKIT_AUTH") or None,
            low_vram=args.lowvram,
            root=args.root,
            device=args.device,
            max_queue=args.max_queue,
            include_base_models=not args.no_base_models,
            extra_models=args.extra_model,
            interface="cli",
        )
        try:
            print("Press Ctrl+C to stop.", flush=True)
            ui.wait()  # it handles SIGTERM itself while it waits, then puts `_interrupt` back
        finally:
            ui.close()  # a signal between launch and wait; otherwise already closed
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print("nbkit web UI stopped.", flush=True)
    return 0
