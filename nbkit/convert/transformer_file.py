"""A transformer family's transformer <-> its original single file (the one ComfyUI and Forge read).

A transformer family (FLUX.1, Z-Image, FLUX.2) ships its transformer alone as one file in the layout of
its authors' code, which fuses what diffusers keeps apart (q, k and v as one `qkv`) and renames the
rest. The family's `transformer_layout` lists that correspondence module by module; this module writes
the file from it and reads it back.

nbkit writes diffusers -> original itself, streamed tensor by tensor (a 12B transformer never sits in
memory twice); original -> diffusers is diffusers' own `<TransformerClass>.from_single_file`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.checkpoint_io import sniff_format
from nbkit.convert.hashes import MODELSPEC_HASH_KEY, MODELSPEC_HASH_PLACEHOLDER
from nbkit.convert.metadata import (
    METADATA_CONFIGS,
    METADATA_FAMILY,
    METADATA_PREDICTION,
    METADATA_RESOLUTION,
    MODELSPEC_VERSION,
    as_metadata_value,
    stored_configs,
)
from nbkit.convert.safetensors_stream import StreamingSafetensorsWriter, byte_view, read_header
from nbkit.convert.tensor_sources import StateDictSource, TensorSource, open_component
from nbkit.convert.verify import verify_single_file
from nbkit.errors import NbkitError
from nbkit.families import Family, detect_family_from_config, most_specific_first
from nbkit.families.facts import FusedModule
from nbkit.fsio import atomic_path, atomic_write_json, read_json

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Metadata the caller may not set: it is derived from the model (or is the hash of what is written).
DERIVED_KEYS = ("modelspec.architecture", MODELSPEC_HASH_KEY, METADATA_FAMILY, METADATA_CONFIGS)
# The prefix ComfyUI's checkpoint files put before a diffusion model's keys.
CHECKPOINT_PREFIX = "model.diffusion_model."


def transformer_family(config: Mapping[str, Any]) -> Family | None:
    """The family whose transformer layout describes a diffusers transformer config, or None."""
    for family in most_specific_first():
        if family.transformer_layout(config) is not None:
            return family
    return None


def transformer_layout(
    config: Mapping[str, Any], path: str | os.PathLike | None = None, family: Family | None = None
) -> tuple[Family, list[FusedModule]]:
    """(family, modules) of a diffusers transformer config.

    Args:
        config: the transformer's config (`_class_name` and sizes).
        path: where it comes from, for messages.
        family: the family it must be (None: any family with a transformer layout).

    Raises:
        NbkitError: when no family (or not `family`) lays out this transformer.
    """
    found = transformer_family(config) if family is None else family
    modules = found.transformer_layout(config) if found is not None else None
    if found is None or modules is None:
        what = (
            f"a {family.title} transformer"
            if family is not None
            else "a transformer nbkit writes as one file"
        )
        raise NbkitError(
            f"not {what} ({config.get('_class_name', 'no _class_name')} config)",
            path=path,
            fix="give a diffusers pipeline folder of a transformer family (FLUX.1, Z-Image, FLUX.2), its "
            "transformer folder, or its transformer model",
        )
    return found, modules


@dataclass(frozen=True)
class TensorStep:
    """How one original tensor is made: its diffusers sources concatenated, the halves maybe swapped."""

    key: str
    sources: tuple[str, ...]
    swap_halves: bool = False


def plan_tensors(
    modules: list[FusedModule],
    available: Collection[str],
    path: str | os.PathLike | None = None,
    title: str = "the",
) -> list[TensorStep]:
    """The original tensors to write, checked against the diffusers tensors there are.

    Args:
        modules: the family's `transformer_layout`.
        available: the diffusers state dict's keys.
        path: where they come from, for messages.
        title: the family's title, for messages.

    Raises:
        NbkitError: when a tensor the layout needs is missing, or one would be left out.
    """
    steps = []
    for module in modules:
        for original_param, param in module.params:
            sources = tuple(module.part_key(part, param) for part in module.parts)
            present = [name in available for name in sources]
            if param == "bias" and not any(present):
                continue  # a bias-free linear: none in either layout
            if not all(present):
                missing = sources[present.index(False)]
                raise NbkitError(
                    f"the {title} transformer has no {missing!r}; its weights do not fit its config",
                    path=path,
                    fix="save the transformer again (save_pretrained); the folder is incomplete",
                )
            steps.append(TensorStep(module.key(original_param), sources, module.swap_halves))
    used = {name for step in steps for name in step.sources}
    unused = sorted(name for name in available if name not in used)
    if unused:
        raise NbkitError(
            f"the {title} transformer has {len(unused)} weights the original layout has no place for, "
            f"e.g. {unused[0]!r}",
            path=path,
            fix="this is not a standard transformer of its family (a LoRA not merged? a ControlNet?); keep it "
            "as a diffusers folder",
        )
    return steps


def build_tensor(step: TensorStep, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The original tensor of `step` from its diffusers sources (in `step.sources` order)."""
    tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    if step.swap_halves:
        first, second = tensor.chunk(2, dim=0)
        tensor = torch.cat([second, first], dim=0)
    return tensor.contiguous()


def diffusers_to_original(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers transformer's state dict in its family's original layout (exact, same dtypes).

    Args:
        state_dict: the transformer's state dict (diffusers names).
        config: the transformer's config dict.

    Raises:
        NbkitError: when no family lays it out, or the state dict does not fit the config.
    """
    family, modules = transformer_layout(config)
    steps = plan_tensors(modules, state_dict.keys(), title=family.title)
    return {step.key: build_tensor(step, [state_dict[name] for name in step.sources]) for step in steps}


def _clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without where it was loaded from (diffusers' bookkeeping keys start with `_`)."""
    kept = ("_class_name", "_diffusers_version")
    return {key: value for key, value in config.items() if not key.startswith("_") or key in kept}


def transformer_modelspec(
    family: Family, *, architecture: str, title: str, description: str, resolution: int | None = None
) -> dict[str, str]:
    """The SAI model spec keys of a transformer family's file (a transformer or a LoRA).

    Args:
        family: the family.
        architecture: `Family.transformer_architecture`, with `/lora` for a LoRA.
        title: `modelspec.title`.
        description: `modelspec.description`.
        resolution: the square size in pixels (default: the family's native size).
    """
    size = resolution or family.native_resolution
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        MODELSPEC_HASH_KEY: MODELSPEC_HASH_PLACEHOLDER,
    }


def merge_metadata(header: dict[str, str], extra: Mapping[str, Any] | None) -> dict[str, str]:
    """`header` with the caller's `extra` keys (non-strings as JSON); derived keys may not change."""
    for key, value in (extra or {}).items():
        text = as_metadata_value(value)
        if key in DERIVED_KEYS and header.get(key) != text:
            raise NbkitError(
                f"metadata {key}={text[:80]!r} contradicts the model's {header.get(key, '(computed)')!r}",
                fix=f"leave {key} out of the metadata; nbkit derives it",
            )
        header[str(key)] = text
    return header


def transformer_folder(path: str | os.PathLike) -> Path | None:
    """The transformer folder of a pipeline folder or a transformer folder a family lays out, else None."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return folder if transformer_family(read_json(config)) is not None else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


@contextlib.contextmanager
def _open_source(
    source: Any, family: Family | None
) -> Iterator[tuple[TensorSource, dict[str, Any], int | None, str, Family, list[FusedModule]]]:
    """(tensors, transformer config, native resolution or None, name, family, layout) of a model or a folder."""
    what = family.title if family is not None else "transformer family"
    if isinstance(source, torch.nn.Module):
        config = dict(getattr(source, "config", {}))
        config["_class_name"] = type(source).__name__
        found, modules = transformer_layout(config, family=family)
        tensors = {name: tensor.detach() for name, tensor in source.state_dict().items()}
        name = type(source).__name__
        yield StateDictSource(tensors, f"<{name}>"), config, None, f"a {name}", found, modules
        return
    folder = Path(source)
    name = folder.name
    resolution = None
    if (folder / "model_index.json").is_file():
        detected = detect_family_from_config(folder)
        from nbkit.families import get_family

        detected_family = get_family(detected.family)
        if family is not None and not isinstance(detected_family, type(family)):
            raise NbkitError(
                f"this diffusers model is {detected.family}, not {family.title}",
                path=folder,
                fix="convert it with nbkit.convert.convert_to_single_file (nbkit convert does)",
            )
        resolution = detected.native_resolution
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise NbkitError(
            f"not a {what} diffusers folder (no model_index.json with a transformer, nor config.json)",
            path=folder,
            fix="give the pipeline folder or its transformer folder",
        )
    config = read_json(folder / "config.json")
    found, modules = transformer_layout(config, folder, family)
    with open_component(folder) as tensors:
        yield tensors, config, resolution, name, found, modules


def _target_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NbkitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", fix="use fp16, bf16 or fp32")
    return DTYPES[dtype]


def save_transformer_file(
    source: Any,
    out_file: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    family: Family | None = None,
) -> Path:
    """Write a transformer as one .safetensors file in its family's original layout (ComfyUI, Forge, diffusers).

    Streamed: one tensor at a time is read, fused, cast and written, then the file is read back and
    checked before it replaces `out_file`.

    Args:
        source: a diffusers transformer model, a pipeline folder of a transformer family, or its
            transformer folder.
        out_file: the `.safetensors` file to write.
        dtype: the floating-point weights' dtype (`torch.bfloat16` or "bf16", ...); None keeps the source's.
        metadata: extra header metadata (non-strings stored as JSON); it may set the title, description,
            resolution or author, not the architecture.
        family: the family the source must be (None: the one whose layout fits it).

    Returns:
        The path written.

    Raises:
        NbkitError: for a source no family lays out, a bad name or dtype, or a failed check.
    """
    out = Path(out_file)
    title = family.title if family is not None else "transformer"
    if out.suffix.lower() != ".safetensors":
        raise NbkitError(
            f"a {title} file is written as .safetensors, not {out.suffix or 'no suffix'}",
            path=out,
            fix="name the output .safetensors",
        )
    if out.is_dir():
        raise NbkitError("the output is an existing folder", path=out, fix="give a file name")
    target = _target_dtype(dtype)
    with _open_source(source, family) as (tensors, config, resolution, name, found, modules):
        steps = plan_tensors(modules, tensors.infos.keys(), tensors.path, found.title)
        header = {
            "format": "pt",
            **transformer_modelspec(
                found,
                architecture=found.transformer_architecture(config),
                title=out.stem,
                description=f"{found.title} transformer (original layout), converted by nbkit from {name}",
                resolution=resolution,
            ),
            METADATA_FAMILY: found.name,
            METADATA_PREDICTION: found.prediction_type,
            METADATA_RESOLUTION: str(resolution or found.native_resolution),
            METADATA_CONFIGS: json.dumps(
                {"transformer": _clean_config(config)}, sort_keys=True, default=list
            ),
        }
        header = merge_metadata(header, metadata)

        def out_dtype(step: TensorStep) -> torch.dtype:
            source_dtype = tensors.infos[step.sources[0]].dtype
            return target if target is not None and source_dtype.is_floating_point else source_dtype

        layout = []
        for step in steps:
            shapes = [tensors.infos[name].shape for name in step.sources]
            layout.append((step.key, out_dtype(step), (sum(s[0] for s in shapes), *shapes[0][1:])))
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as handle:
                writer = StreamingSafetensorsWriter(handle, layout, header)
                for step in steps:
                    tensor = build_tensor(step, [tensors.load(name) for name in step.sources])
                    writer.write(step.key, byte_view(tensor.to(out_dtype(step)).contiguous()))
                writer.close()
            verify_single_file(tmp, writer.records)
    return out


def _config_location(
    config_folder: str | os.PathLike | None,
    metadata: Mapping[str, str],
    stack: contextlib.ExitStack,
    path: Path,
    loader: str,
) -> tuple[Path, str | None]:
    """(folder, subfolder) of the transformer config to build the model from."""
    if config_folder is not None:
        folder = Path(config_folder)
        if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
            return folder, "transformer"
        if (folder / "config.json").is_file():
            return folder, None
        raise NbkitError(
            "not a transformer family's diffusers folder (no transformer/config.json, nor config.json)",
            path=folder,
            fix="give the base model's pipeline folder (or its transformer folder)",
        )
    stored = (stored_configs(metadata) or {}).get("transformer")
    if not stored:
        raise NbkitError(
            "a transformer file does not say its architecture; it needs its base pipeline folder",
            path=path,
            fix=f"pass the base model's diffusers folder as config_folder ({loader}(file, base_folder))",
        )
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbkit-transformer-config-")))
    atomic_write_json(folder / "config.json", stored)
    return folder, None


def read_original_file(
    path: Path, title: str = "transformer"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors without ComfyUI's checkpoint prefix, metadata) of an original-layout .safetensors file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise NbkitError("no such file", path=path, fix="check the path")
    if sniff_format(path) != "safetensors":
        raise NbkitError(f"a {title} file must be .safetensors", path=path, fix="convert it to safetensors")
    metadata = read_header(path).metadata  # validates the header before safetensors maps the file
    tensors = {key.removeprefix(CHECKPOINT_PREFIX): value for key, value in load_file(path).items()}
    return tensors, metadata


def check_original_keys(
    state_dict: Mapping[str, torch.Tensor], modules: list[FusedModule], path: Path, family: Family
) -> None:
    """Raise `NbkitError` unless `state_dict` holds every tensor of the original layout (others, such as a
    quantized file's scales, are diffusers' to judge)."""
    expected = {module.key(original): param for module in modules for original, param in module.params}
    missing = sorted(key for key, param in expected.items() if key not in state_dict and param != "bias")
    if missing:
        raise NbkitError(
            f"not a {family.title} transformer in the original layout of its config: it lacks {missing[0]!r}"
            f" ({len(missing)} of {len(expected)} tensors missing)",
            path=path,
            fix=f"give a {family.title} transformer file, with the folder of the model it was made from",
        )


def load_transformer_file(
    single_file: str | os.PathLike,
    config_folder: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    family: Family | None = None,
    loader: str = "nbkit.convert.transformer_file.load_transformer_file",
):
    """Load an original-layout transformer file with diffusers' own single-file loader, offline.

    Args:
        single_file: the `.safetensors` file (original keys, optionally under `model.diffusion_model.`).
        config_folder: the base model's diffusers pipeline folder, or its transformer folder, whose
            transformer config describes the file; None uses the config nbkit stored in the file.
        torch_dtype: the model's dtype (default: the file's).
        family: the family the file must be (None: the one whose layout fits the config).
        loader: the function's name as messages give it.

    Returns:
        The diffusers transformer model on the CPU, in eval mode.

    Raises:
        NbkitError: for a file that is not a safetensors transformer of the config, no config, or
            missing weights.
    """
    import diffusers

    path = Path(single_file)
    title = family.title if family is not None else "transformer"
    state_dict, metadata = read_original_file(path, title)
    if torch_dtype is None:  # the file's own precision, not diffusers' fp32 default
        torch_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    with contextlib.ExitStack() as stack:
        folder, subfolder = _config_location(config_folder, metadata, stack, path, loader)
        config = read_json(folder / (subfolder or ".") / "config.json")
        found, modules = transformer_layout(config, folder, family)
        check_original_keys(state_dict, modules, path, found)
        model_class = getattr(diffusers, config["_class_name"])
        checkpoint = found.single_file_checkpoint(state_dict, config)
        try:
            model = model_class.from_single_file(
                checkpoint,
                config=str(folder),
                subfolder=subfolder,
                torch_dtype=torch_dtype,
                local_files_only=True,
            )
        except (ValueError, RuntimeError, KeyError, IndexError) as error:
            raise NbkitError(
                f"the weights do not fit the {found.title} transformer config in {folder} ({str(error)[:200]})",
                path=path,
                fix="give the folder of the model this file was made from (same variant, same size)",
            ) from error
    missing = [key for key, value in model.state_dict().items() if value.device.type == "meta"]
    if missing:
        raise NbkitError(
            f"the file lacks {len(missing)} transformer weights, e.g. {missing[0]!r}",
            path=path,
            fix="the file is incomplete, or of another model variant; check the config folder",
        )
    return model
