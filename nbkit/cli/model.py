"""`nbkit model`: list the base models, build tiny or full-size random ones, fetch models into the cache,
inspect a model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from nbkit.families import FAMILIES

    parser = subparsers.add_parser("model", help="base models: list, fetch, inspect, build tiny ones")
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="the base models nbkit offers")
    listing.set_defaults(func=list_command)

    tiny = actions.add_parser(
        "tiny",
        help="save a tiny random-weight model (offline) as a diffusers folder, or (esrgan) a tiny 4x "
        "ESRGAN upscaler file into OUT_DIR (an upscalers folder)",
    )
    tiny.add_argument(
        "family", metavar="FAMILY", help=f"{', '.join(FAMILIES)} (tiny-FAMILY also accepted), or esrgan"
    )
    tiny.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    tiny.set_defaults(func=tiny_command, loads_models=True)

    random = actions.add_parser(
        "random",
        help="save a full-size random-weight model (offline, from nbkit's shipped configs) as a diffusers "
        "folder, for benchmarks and memory checks",
    )
    random.add_argument("family", metavar="FAMILY", help=", ".join(FAMILIES))
    random.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="a new or empty folder")
    random.add_argument("--seed", type=int, default=0, help="the seed every weight derives from")
    random.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default=None,
        help="default: bf16 where the family needs it",
    )
    random.set_defaults(func=random_command, loads_models=True)

    fetch = actions.add_parser("fetch", help="download a model into the cache and print its local path")
    fetch.add_argument("source", metavar="SOURCE", help="registry key, owner/name[@revision], path or URL")
    fetch.add_argument("--revision", default=None, help="hub branch, tag or commit")
    precision = fetch.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", dest="fp16", action="store_true", default=None, help="the hub's fp16 files"
    )
    precision.add_argument("--full", dest="fp16", action="store_false", help="the hub's full-precision files")
    fetch.add_argument("--sha256", default=None, help="expected sha256 of a URL download")
    fetch.set_defaults(func=fetch_command)

    info = actions.add_parser("info", help="tell a model's family, prediction type and resolution")
    info.add_argument("source", metavar="PATH", help="a diffusers folder (or any source `fetch` takes)")
    info.set_defaults(func=info_command)


def list_command(args: argparse.Namespace) -> int:
    from nbkit.models.registry import MODELS

    rows = [("KEY", "FAMILY", "PREDICTION", "NATIVE", "RANGE", "SOURCE")]
    for spec in MODELS.values():
        allowed = spec.allowed_resolutions
        source = spec.repo_id if spec.source == "hub" else "built offline by nbkit"
        rows.append(
            (spec.key, spec.family, spec.prediction_type, str(spec.native_resolution),
             f"{allowed[0]}-{allowed[-1]}", source)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def tiny_command(args: argparse.Namespace) -> int:
    from nbkit.models.tiny import save_tiny_pipeline

    family = args.family.removeprefix("tiny-")
    if family == "esrgan":
        from nbkit.generation.upscalers import save_tiny_esrgan

        print(save_tiny_esrgan(args.out_dir))
        return 0
    print(save_tiny_pipeline(family, args.out_dir))
    return 0


def random_command(args: argparse.Namespace) -> int:
    from nbkit.families import get_family
    from nbkit.realsize.random_models import describe, save_random_model

    family = get_family(args.family)  # an unknown name is refused with the known ones
    counts = ", ".join(f"{name} {millions:,.1f} M" for name, millions in describe(family.name).items())
    print(f"{family.title} at full size, random weights ({counts} parameters)", flush=True)
    print(save_random_model(family.name, args.out_dir, seed=args.seed, dtype=args.dtype))
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    from nbkit.models.sources import resolve_source

    resolved = resolve_source(
        args.source, revision=args.revision, fp16=args.fp16, expected_sha256=args.sha256
    )
    print(resolved.path)
    return 0


def info_command(args: argparse.Namespace) -> int:
    from nbkit.families import FAMILIES, detect_family_from_config
    from nbkit.models.sources import resolve_source

    resolved = resolve_source(args.source)
    print(f"path:       {resolved.path}")
    if resolved.kind == "single_file":
        from nbkit.convert.checkpoint_io import check_pickled_checkpoint

        # The same check loading runs: a pickle that would run code is refused here too, saying why.
        file_format = check_pickled_checkpoint(resolved.path)
        described = "safetensors" if file_format == "safetensors" else "PyTorch pickle of plain tensors"
        print(f"kind:       single file, {described}")
        from nbkit.convert.detect import detect_family
        from nbkit.errors import NbkitError

        try:
            guess = detect_family(resolved.path)  # the header's keys, shapes and metadata only
        except NbkitError as error:  # a LoRA, a FLUX.1 transformer, a VAE alone...: what it is, in words
            print(f"contents:   {error.message}")
            return 0
        families = guess.family or " or ".join(guess.candidates)
        print(f"family:     {families} (from {guess.evidence})")
        print(f"prediction: {guess.prediction_type or 'unknown (pass --family to nbkit convert)'}")
        print(f"resolution: {guess.native_resolution or 'unknown'}")
        return 0
    detected = detect_family_from_config(resolved.path)
    print("kind:       diffusers folder" + (f" ({resolved.variant} weights)" if resolved.variant else ""))
    print(f"family:     {detected.family} ({FAMILIES[detected.family].title})")
    print(f"prediction: {detected.prediction_type}")
    print(f"resolution: {detected.native_resolution}")
    return 0
