"""The end of a run: the trained model into the session's `models/` folder.

A full fine-tune becomes a diffusers folder `models/<name>/` and a single-file fp16 checkpoint
`models/<name>.safetensors` (through `nbkit.convert`, which also checks it loads), carrying the
training config in its header. A LoRA run becomes `models/<name>-lora/` with the LoRA in diffusers
format and in the kohya format A1111 and ComfyUI load (for FLUX.1, the format ComfyUI and Forge load,
written by `nbkit.convert.flux_lora`; its role is still `kohya`, the file the web UI lists).
"""

from __future__ import annotations

import json
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nbkit.fsio import atomic_directory, sha256_of
from nbkit.session.manifest import ExportedModel
from nbkit.train.components import Components, cast_to

if TYPE_CHECKING:
    from nbkit.convert.report import ConversionReport
    from nbkit.session.core import Session

# What a model records it was trained with, so a problem report can name the stack.
RECORDED_PACKAGES = ("nbkit", "torch", "diffusers", "transformers", "accelerate", "peft")


def package_versions() -> dict[str, str]:
    """The installed versions of `RECORDED_PACKAGES` (those present)."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: Path) -> str:
    return sha256_of(path).hexdigest()


def training_metadata(
    config: dict[str, Any], *, session: str, base_model: dict[str, Any], steps: dict[str, int]
) -> dict[str, str]:
    """Header metadata recording how the model was trained (all values are strings, as safetensors wants)."""
    return {
        "nbkit.session.core": session,
        "nbkit.base_model": json.dumps(base_model, sort_keys=True),
        "nbkit.training": json.dumps(config, sort_keys=True),
        "nbkit.steps": json.dumps(steps, sort_keys=True),
    }


def export_full_model(
    components: Components,
    models_dir: Path,
    name: str,
    *,
    dtype: torch.dtype,
    metadata: dict[str, str],
    base_checkpoint: Path | None = None,
) -> tuple[Path, ConversionReport]:
    """Save the pipeline as `models_dir/name/` and `models_dir/name.safetensors`.

    Args:
        components: the trained models (their pipeline is saved as is, after a cast to `dtype`).
        models_dir: the session's `models/` folder.
        name: the model's name.
        dtype: the folder's weight dtype (fp16 after a GPU run, fp32 after a CPU one).
        metadata: header metadata for the single file.
        base_checkpoint: the base model's own single file, when it came as one: SD 2.x exports take the
            text encoder's last block from it, as the original checkpoints carry it.

    Returns:
        (the diffusers folder, the conversion report of the single file: its path, hashes, size).
    """
    from nbkit.convert import convert_to_single_file

    pipeline = components.pipeline
    for model in (components.unet, components.vae, *components.text_encoders):
        cast_to(model, dtype)
    folder = models_dir / name
    with atomic_directory(folder) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    report = convert_to_single_file(
        folder,
        models_dir / f"{name}.safetensors",
        dtype="fp16",
        metadata=metadata,
        verify=True,
        family=components.family,
        base_checkpoint=base_checkpoint,
        description=f"DreamBooth fine-tune of {components.family} by nbkit (session {name})",
    )
    return folder, report


def export_lora(
    components: Components,
    trained_roles: dict[str, str],
    models_dir: Path,
    name: str,
    *,
    metadata: dict[str, str],
    resolution: int,
) -> dict[str, Path]:
    """Save the LoRA adapters of the trained components in diffusers and kohya formats.

    Args:
        resolution: the size the LoRA trained at (its `modelspec.resolution`).
    """
    from nbkit.train.lora_export import save_lora

    unet = components.unet if components.denoiser_role in trained_roles else None
    text_encoders = [
        components.model(role) if role in trained_roles else None for role in components.text_encoder_roles
    ]
    if not any(text_encoders):
        text_encoders = None
    return save_lora(
        unet,
        text_encoders,
        models_dir / f"{name}-lora",
        family=components.family,
        metadata=metadata,
        name=name,
        resolution=resolution,
    )


def export_session_model(
    session: Session,
    components: Components,
    trained_roles: dict[str, str],
    *,
    name: str,
    config: dict[str, Any],
    base_model: dict[str, Any],
    steps: dict[str, int],
    stage: str,
    step: int,
    dtype: torch.dtype,
) -> tuple[ExportedModel, dict[str, Path]]:
    """Export trained components as the session's model `name` and record it in `session.json`'s
    `models` (the caller saves): a full fine-tune as a diffusers folder and a single file, a LoRA in
    diffusers and kohya formats.

    Args:
        session: the open session (its lock held).
        components: the trained models.
        trained_roles: the components training changed, mapped to `lora` or `full`.
        name: the model's name in the session.
        config: the training config (as a dict) the weights were trained with.
        base_model: the base model record (as a dict).
        steps: the steps recorded in the file's metadata.
        stage: the stage the weights come from.
        step: the step of that stage.
        dtype: the diffusers folder's weight dtype (full fine-tunes).

    Returns:
        (the record, its files by role as absolute paths).
    """
    metadata = training_metadata(config, session=session.name, base_model=base_model, steps=steps)
    models_dir = session.dir("models")
    lora = config["lora_rank"] > 0
    if lora:
        files = export_lora(
            components, trained_roles, models_dir, name, metadata=metadata, resolution=config["resolution"]
        )
        sha256 = {files["kohya"]: file_sha256(files["kohya"])}
    else:
        source = Path(base_model["source"]).expanduser()
        base_file = source if source.suffix in (".safetensors", ".ckpt") and source.is_file() else None
        folder, report = export_full_model(
            components, models_dir, name, dtype=dtype, metadata=metadata, base_checkpoint=base_file
        )
        files = {"folder": folder, "single_file": Path(report.output)}
        sha256 = {files["single_file"]: report.sha256}

    def relative(path: Path) -> str:
        return Path(path).relative_to(session.path).as_posix()

    record = ExportedModel(
        name=name,
        kind="lora" if lora else "full",
        files={role: relative(path) for role, path in files.items()},
        family=base_model["family"],
        resolution=config["resolution"],
        base_model=base_model["source"],
        stage=stage,
        step=step,
        sha256={relative(path): digest for path, digest in sha256.items()},
        versions=package_versions(),
    )
    session.manifest.add_model(record)
    return record, files
