"""`nbkit convert SRC OUT`: diffusers folder <-> single-file checkpoint.

- SRC a diffusers folder, OUT a `.safetensors`/`.ckpt` name: one file in the original layout.
- SRC a checkpoint, OUT a `.safetensors`/`.ckpt` name: re-encoded (pickle -> safetensors, fp32 -> fp16).
- SRC a checkpoint, OUT any other name: a diffusers folder.
- SRC a FLUX.1, Z-Image or FLUX.2 diffusers folder (or its transformer folder), OUT a `.safetensors`
  name: the transformer in its original layout (Black Forest Labs', Tongyi's) that ComfyUI and Forge
  load (default bf16).
- `--lora FILE` (SRC a pipeline folder): that LoRA merged into the model first; any LoRA file nbkit
  writes (the diffusers file, or the A1111/ComfyUI file beside it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES

# Families whose full checkpoints are single files (a transformer family's file holds the transformer
# alone, which loads only with its pipeline folder).
FAMILY_CHOICES = tuple(name for name, family in FAMILIES.items() if family.single_file is not None)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert between a diffusers folder and a single .safetensors/.ckpt file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="a diffusers model folder, or a .safetensors/.ckpt file")
    parser.add_argument("out", metavar="OUT", help="the file (.safetensors/.ckpt) or folder to write")
    parser.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default=None,
        help="weights' precision (default: fp16 for a single file, bf16 for a transformer file (FLUX.1, Z-Image, "
        "FLUX.2), fp32 for a diffusers folder)",
    )
    parser.add_argument(
        "--format", choices=("safetensors", "ckpt"), default=None, help="default: from OUT's suffix"
    )
    parser.add_argument(
        "--family",
        choices=FAMILY_CHOICES,
        default=None,
        help="the model family, needed only for SD 2.x files that do not say whether they are "
        "512 px epsilon (sd2) or 768 px v-prediction (sd2-v)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip reading the output back to check it")
    parser.add_argument(
        "--lora",
        type=Path,
        default=None,
        help="a LoRA file to merge into the model (SRC a diffusers pipeline folder)",
    )
    parser.add_argument(
        "--lora-weight", type=float, default=1.0, help="the merged LoRA's strength (default: 1)"
    )
    parser.set_defaults(func=command)


def _to_folder(args: argparse.Namespace) -> int:
    import torch

    from nbkit.convert import load_single_file
    from nbkit.fsio import atomic_directory

    out = Path(args.out)
    if out.is_file():
        raise NbkitError(
            "the output is an existing file, not a folder", path=out, fix="give a new folder name"
        )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or "fp32"]
    pipeline = load_single_file(args.src, family=args.family, torch_dtype=dtype)
    with atomic_directory(out) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    print(f"Converted {args.src}\n       -> {out} (diffusers folder, {args.dtype or 'fp32'})")
    return 0


def _transformer_to_file(args: argparse.Namespace) -> int:
    from nbkit.convert.transformer_file import save_transformer_file, transformer_family, transformer_folder
    from nbkit.fsio import read_json

    config = read_json(transformer_folder(args.src) / "config.json")
    family = transformer_family(config)
    if args.format == "ckpt" or Path(args.out).suffix.lower() != ".safetensors":
        raise NbkitError(
            f"a {family.title} transformer is written as .safetensors only",
            path=args.out,
            fix="name the output .safetensors" + (" and drop --format ckpt" if args.format == "ckpt" else ""),
        )
    # bf16: the transformer families' own precision; fp16 overflows in FLUX.1's activations.
    dtype = args.dtype or "bf16"
    source, metadata = args.src, {}
    if args.lora is not None:
        from nbkit.convert.lora_merge import merged_pipeline

        source = getattr(
            merged_pipeline(args.src, args.lora, weight=args.lora_weight, denoiser_only=True), family.denoiser
        )
        metadata = {"nbkit.merged_lora": f"{args.lora.name}:{args.lora_weight:g}"}
    out = save_transformer_file(source, args.out, dtype=dtype, metadata=metadata, family=family)
    size = out.stat().st_size / 2**20
    print(
        f"Converted {args.src}\n       -> {out} ({family.title} transformer, original layout, {dtype}, {size:.1f} MiB)"
    )
    return 0


def _merged_to_single_file(args: argparse.Namespace):
    """`convert_to_single_file` of SRC with the LoRA merged into it (through a merged diffusers folder)."""
    import tempfile

    from nbkit.convert import convert_to_single_file
    from nbkit.convert.lora_merge import merged_pipeline

    if not (Path(args.src) / "model_index.json").is_file():
        raise NbkitError(
            "--lora merges a LoRA into a diffusers pipeline folder",
            path=args.src,
            fix="give the model's diffusers folder (convert a single file to a folder first)",
        )
    pipeline = merged_pipeline(args.src, args.lora, weight=args.lora_weight)
    out = Path(args.out)
    # Beside the output: the merged folder is as large as the model, and the system temp may be small.
    with tempfile.TemporaryDirectory(
        prefix=".nbkit-merged-", dir=out.parent if out.parent.is_dir() else None
    ) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        del pipeline
        return convert_to_single_file(
            tmp,
            args.out,
            dtype=args.dtype or "fp16",
            fmt=args.format,
            verify=not args.no_verify,
            family=args.family,
            metadata={"nbkit.merged_lora": f"{args.lora.name}:{args.lora_weight:g}"},
        )


def command(args: argparse.Namespace) -> int:
    src = Path(args.src)
    to_single_file = args.format is not None or Path(args.out).suffix.lower() in SINGLE_FILE_SUFFIXES
    if not src.exists():
        raise NbkitError("no such file or folder", path=src, fix="check the path")
    if not to_single_file:
        if args.lora is not None:
            raise NbkitError(
                "--lora merges a LoRA into the file written from a diffusers folder",
                path=args.out,
                fix="convert the file to a folder first, then convert the folder with --lora to a .safetensors",
            )
        if src.is_dir():
            raise NbkitError(
                f"{args.out!r} is not a .safetensors or .ckpt name, and SRC is already a diffusers folder",
                path=args.out,
                fix="name the output .safetensors (or .ckpt), or pass --format",
            )
        return _to_folder(args)
    from nbkit.convert.transformer_file import transformer_folder

    if src.is_dir() and transformer_folder(src) is not None:
        return _transformer_to_file(args)
    if args.lora is not None:
        print(_merged_to_single_file(args))
        return 0
    from nbkit.convert import convert_to_single_file

    report = convert_to_single_file(
        src,
        args.out,
        dtype=args.dtype or "fp16",
        fmt=args.format,
        verify=not args.no_verify,
        family=args.family,
    )
    print(report)
    return 0
