"""diffusers folder (or another checkpoint) -> one .safetensors / .ckpt file in the original layout.

The conversion is planned from names, shapes and configs alone (`keymaps_*`), then streamed: each
output tensor is read into a reused buffer, cast, checksummed, hashed and written, header first, in
one pass, so memory stays at about one tensor whatever the model's size. The file is written under a
temporary name, read back and checked (unless `verify=False`), and only then renamed into place.

What the original checkpoints carry and diffusers drops (SD 2.x's last text block) is written too, from
the base model's single file when there is one (`nbkit.convert.text_extras`). A file of a family
with an original config (SD 2.x 768-v: Stability's `v2-inference-v.yaml`) gets it beside it under its
own name, which A1111 reads first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.checkpoint_io import CKPT_METADATA_KEY
from nbkit.convert.detect import detect_family, resolve_family
from nbkit.convert.from_single_file import shipped_config_dir
from nbkit.convert.hashes import (
    MODELSPEC_HASH_KEY,
    MODELSPEC_HASH_PLACEHOLDER,
    model_hashes,
    modelspec_hash_value,
)
from nbkit.convert.layout import single_file_layout
from nbkit.convert.metadata import (
    DERIVED_KEYS,
    METADATA_CONFIGS,
    METADATA_TEXT_EXTRAS,
    build_metadata,
    stored_configs,
)
from nbkit.convert.plan import TensorRecipe
from nbkit.convert.report import ConversionReport
from nbkit.convert.safetensors_stream import StreamingSafetensorsWriter, TensorRecord, byte_view, checksum
from nbkit.convert.streaming import TensorMaker, background_fsync, output_dtype, overlapped, torch_threads
from nbkit.convert.tensor_sources import TensorSource, ZerosSource, open_component, open_tensor_file
from nbkit.convert.text_extras import BASE_SOURCE, IDENTITY_SOURCE, open_base, text_encoder_extras
from nbkit.convert.verify import verify_single_file
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.fsio import TRANSIENT_ERRNOS, atomic_path, atomic_write_text, disk_full_error, read_json

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt", ".pt": "ckpt", ".pth": "ckpt"}
# Config entries that describe where a model was loaded from, not what it is.
_LOCAL_CONFIG_KEYS = ("_name_or_path", "_commit_hash")


@dataclass
class ConversionPlan:
    """Everything a conversion needs before it writes a byte.

    Args:
        recipes: the output tensors, in writing order.
        sources: component name -> its open tensor source.
        family, prediction_type, native_resolution: what the model is.
        configs: diffusers configs to store in the metadata (so nbkit can load the file back exactly).
        carried_metadata: metadata of a source checkpoint worth keeping (training settings and the like).
        text_extras: tensors written beyond the diffusers model's, {where from: [keys]}.
    """

    recipes: list[TensorRecipe]
    sources: dict[str, TensorSource]
    family: str
    prediction_type: str
    native_resolution: int
    configs: dict[str, Any] | None = None
    carried_metadata: dict[str, str] = field(default_factory=dict)
    text_extras: dict[str, list[str]] = field(default_factory=dict)


def _clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _LOCAL_CONFIG_KEYS}


def _plan_folder(
    folder: Path, family: str | None, stack: contextlib.ExitStack, base_checkpoint: Path | None
) -> ConversionPlan:
    guess = detect_family(folder)
    chosen = resolve_family(guess, family, folder)
    if chosen != guess.family:
        raise NbkitError(
            f"this diffusers model is {guess.family} (from its configs), not {chosen}",
            path=folder,
            fix=f"drop --family, or pass --family {guess.family}",
        )
    if (
        FAMILIES[chosen].single_file is None
    ):  # a transformer family: a transformer file, not a full checkpoint
        raise NbkitError(
            f"a {FAMILIES[chosen].title} folder converts to a transformer file in the original layout, "
            "not a full checkpoint",
            path=folder,
            fix="use nbkit.convert.transformer_file.save_transformer_file(folder, out) (nbkit convert does this; "
            "for FLUX.1 also nbkit.convert.flux.save_flux_transformer)",
        )
    configs: dict[str, Any] = {"model_index": _clean_config(read_json(folder / "model_index.json"))}
    recipes: list[TensorRecipe] = []
    sources: dict[str, TensorSource] = {}
    text_extras: dict[str, list[str]] = {}
    layout = single_file_layout(FAMILIES[chosen])
    base = open_base(base_checkpoint, layout, stack)
    identity = ZerosSource(folder)
    for component in layout:
        if not (folder / component.name / "config.json").is_file():
            raise NbkitError(
                f"the model folder has no {component.name}/config.json",
                path=folder,
                fix="download or save the model again; the folder is incomplete",
            )
        config = _clean_config(read_json(folder / component.name / "config.json"))
        source = stack.enter_context(open_component(folder / component.name))
        shapes = {name: info.shape for name, info in source.infos.items()}
        planned = component.recipes(shapes, config)
        recipes += planned
        sources[component.name] = source
        configs[component.name] = config
        if component.open_clip:
            dtype = source.infos[planned[0].sources[0]].dtype
            extras, origins = text_encoder_extras(component, planned, config, dtype, base, identity)
            recipes += extras
            for origin, keys in origins.items():
                text_extras.setdefault(origin, []).extend(keys)
    if base is not None:
        sources[BASE_SOURCE] = base
    if identity.infos:
        sources[IDENTITY_SOURCE] = identity
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        configs["scheduler"] = _clean_config(read_json(scheduler_config))
    return ConversionPlan(
        recipes,
        sources,
        chosen,
        guess.prediction_type,
        guess.native_resolution,
        configs,
        text_extras=text_extras,
    )


def _plan_file(
    path: Path, family: str | None, stack: contextlib.ExitStack, base_checkpoint: Path | None
) -> ConversionPlan:
    if base_checkpoint is not None:
        raise NbkitError(
            "base_checkpoint is for converting a diffusers folder; a checkpoint file is re-encoded with "
            "its own tensors",
            path=path,
            fix="leave base_checkpoint out, or convert the model's diffusers folder",
        )
    source = stack.enter_context(open_tensor_file(path))
    shapes = {name: info.shape for name, info in source.infos.items()}
    guess = detect_family(shapes, metadata=source.metadata, path=path)
    chosen = resolve_family(guess, family, path)
    recipes = [TensorRecipe(name, "checkpoint", (name,), info.shape) for name, info in source.infos.items()]
    facts = FAMILIES[chosen]
    prediction = guess.prediction_type if chosen == guess.family else facts.prediction_type
    resolution = guess.native_resolution if chosen == guess.family else facts.native_resolution
    skipped = (*DERIVED_KEYS, METADATA_CONFIGS, "format")  # derived again for the new file
    carried = {key: value for key, value in source.metadata.items() if key not in skipped}
    configs = stored_configs(source.metadata)
    return ConversionPlan(
        recipes,
        {"checkpoint": source},
        chosen,
        prediction,
        resolution or facts.native_resolution,
        configs,
        carried,
    )


def _write_safetensors(plan: ConversionPlan, target: torch.dtype, metadata: dict[str, str], tmp: Path):
    maker = TensorMaker(plan.recipes, plan.sources, target)
    layout = [(recipe.key, maker.dtype_of(recipe), recipe.shape) for recipe in plan.recipes]
    with open(tmp, "wb") as handle, torch_threads(1):
        writer = StreamingSafetensorsWriter(handle, layout, metadata)

        def make(recipe: TensorRecipe, slot: int) -> tuple[memoryview, int]:
            data = byte_view(maker.make(recipe, slot))
            return data, checksum(data)  # here, so the worker only hashes and writes

        overlapped(plan.recipes, make, lambda recipe, made: writer.write(recipe.key, *made))
        writer.close()
    return writer.records, writer.modelspec_hash


def _write_ckpt(plan: ConversionPlan, target: torch.dtype, metadata: dict[str, str], tmp: Path):
    # torch.save needs every tensor at once: .ckpt output holds one copy of the (converted) model.
    maker = TensorMaker(plan.recipes, plan.sources, target)
    state_dict = {recipe.key: maker.make(recipe).clone() for recipe in plan.recipes}
    records = {}
    data_sha256 = hashlib.sha256()  # what the data section of the same tensors as .safetensors hashes to
    for key, tensor in state_dict.items():
        data = byte_view(tensor)
        records[key] = TensorRecord(tensor.dtype, tuple(tensor.shape), checksum(data))
        data_sha256.update(data)
    spec_hash = modelspec_hash_value(data_sha256)
    if metadata.get(MODELSPEC_HASH_KEY) == MODELSPEC_HASH_PLACEHOLDER:
        metadata[MODELSPEC_HASH_KEY] = spec_hash
    torch.save({"state_dict": state_dict, CKPT_METADATA_KEY: metadata}, tmp)
    del state_dict
    return records, spec_hash


def _check_inputs(src: Path, out: Path, dtype: str, fmt: str | None) -> tuple[torch.dtype, str, Path]:
    if dtype not in DTYPES:
        raise NbkitError(
            f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", fix="use --dtype fp16, bf16 or fp32"
        )
    if fmt is not None and fmt not in ("safetensors", "ckpt"):
        raise NbkitError(
            f"format {fmt!r} is not safetensors or ckpt", fix="use --format safetensors or --format ckpt"
        )
    if src.is_dir():
        if not (src / "model_index.json").is_file():
            raise NbkitError(
                "not a diffusers model folder (no model_index.json)", path=src, fix="give the model's folder"
            )
    elif not src.is_file():
        raise NbkitError("no such file or folder", path=src, fix="check the path")
    suffix_format = FORMATS.get(out.suffix.lower())
    if suffix_format is None:
        if fmt is None:
            raise NbkitError(
                f"cannot tell the output format from the name {out.name!r}",
                path=out,
                fix="name it .safetensors or .ckpt, or pass --format",
            )
        out = out.with_name(out.name + (".safetensors" if fmt == "safetensors" else ".ckpt"))
    elif fmt is not None and fmt != suffix_format:
        raise NbkitError(
            f"the output is named {out.suffix} but --format {fmt} was asked for",
            path=out,
            fix=f"name it {'.safetensors' if fmt == 'safetensors' else '.ckpt'} or drop --format",
        )
    if out.exists() and out.resolve() == src.resolve():
        raise NbkitError("the output would overwrite the source", path=out, fix="choose another output name")
    if out.is_dir():
        raise NbkitError("the output is an existing folder", path=out, fix="give a file name")
    return DTYPES[dtype], fmt or suffix_format, out


@contextlib.contextmanager
def open_plan(
    src: str | os.PathLike,
    *,
    family: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
) -> Iterator[ConversionPlan]:
    """Plan the conversion of a diffusers folder or a checkpoint file; sources stay open inside.

    Args:
        src: a diffusers pipeline folder, or a .safetensors/.ckpt checkpoint to re-encode.
        family: the user's family choice (needed for ambiguous SD 2.x checkpoints).
        base_checkpoint: the base model's single file, to copy what diffusers dropped from (folders only).
    """
    src = Path(src)
    base = Path(base_checkpoint) if base_checkpoint is not None else None
    with contextlib.ExitStack() as stack:
        yield (_plan_folder if src.is_dir() else _plan_file)(src, family, stack, base)


def convert_to_single_file(
    src_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    dtype: str = "fp16",
    fmt: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    verify: bool = True,
    family: str | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    description: str | None = None,
    author: str | None = None,
) -> ConversionReport:
    """Convert a diffusers model to one checkpoint file in the original (A1111/ComfyUI) layout.

    Args:
        src_dir: a diffusers pipeline folder; or a .safetensors/.ckpt checkpoint, which is re-encoded
            (.ckpt -> .safetensors, fp32 -> fp16) with its keys unchanged.
        out_path: the file to write; `.safetensors` (recommended) or `.ckpt` (`{"state_dict": ...}`).
        dtype: `fp16` (default), `bf16` or `fp32` for the floating-point weights.
        fmt: `safetensors` or `ckpt`; None takes it from `out_path`'s suffix.
        metadata: extra header metadata (training passes its settings); non-strings are stored as JSON.
        verify: read the file back and check every tensor's shape, dtype and checksum before it
            replaces `out_path` (the A1111 hashes come from that read; without it the file is read
            once more to hash it).
        family: a family with a single-file layout; needed only for SD 2.x checkpoints that do not say
            whether they are 512 px epsilon or 768 px v-prediction models.
        base_checkpoint: the single file of the model `src_dir` was trained from, when there is one:
            the text-encoder tensors the original layout has and diffusers drops (SD 2.x's last
            OpenCLIP block, `text_projection`, `logit_scale`) are copied from it. Without it, SD 2.x's
            last block is written as an identity block (see `nbkit.convert.text_extras`).
        description: `modelspec.description` (default: the source's, else a line saying what it is).
        author: `modelspec.author` (default: the source's, else none).

    Returns:
        A `ConversionReport` with the hashes A1111 shows; an SD 2.x 768-v file also gets `<out stem>.yaml`
        (its `Family.original_config`) beside it, for A1111.

    Raises:
        NbkitError: for a bad source, an ambiguous family, a bad output name, or a failed verification.
            No partial output is ever left at `out_path`.
    """
    started = time.perf_counter()
    src = Path(src_dir)
    target, fmt, out = _check_inputs(src, Path(out_path), dtype, fmt)
    with open_plan(src, family=family, base_checkpoint=base_checkpoint) as plan:
        extra = {**plan.carried_metadata, **(metadata or {})}
        if plan.text_extras:
            extra[METADATA_TEXT_EXTRAS] = plan.text_extras
        if description is not None:
            extra["modelspec.description"] = description
        if author is not None:
            extra["modelspec.author"] = author
        title = FAMILIES[plan.family].title
        header = build_metadata(
            family=plan.family,
            prediction_type=plan.prediction_type,
            resolution=plan.native_resolution,
            title=out.stem,
            description=f"{title} model, converted to a single file by nbkit from {src.name}",
            configs=plan.configs,
            extra=extra,
        )
        needed = _output_bytes(plan, target)
        _check_free_space(out, needed)
        try:
            # A disk that fills up anyway (Drive syncing, another writer) is a DiskFullError from here.
            with atomic_path(out, needed=needed) as tmp:
                if fmt == "safetensors":
                    records, spec_hash = _write_safetensors(plan, target, header, tmp)
                else:
                    records, spec_hash = _write_ckpt(plan, target, header, tmp)
                header[MODELSPEC_HASH_KEY] = spec_hash
                if verify:
                    with background_fsync(tmp):  # the disk writes while verification reads the page cache
                        hashes = verify_single_file(tmp, records)
                else:
                    hashes = model_hashes(tmp)
                size = tmp.stat().st_size
            config_file = _write_original_config(plan.family, out)
        except OSError as error:
            if error.errno not in TRANSIENT_ERRNOS:
                raise
            raise _write_failed(out, error) from error
    return ConversionReport(
        source=str(src),
        output=str(out),
        format=fmt,
        dtype=dtype,
        family=plan.family,
        prediction_type=plan.prediction_type,
        native_resolution=plan.native_resolution,
        tensor_count=len(records),
        parameter_count=sum(_numel(record.shape) for record in records.values()),
        file_size=size,
        sha256=hashes[0],
        short_hash=hashes[1],
        legacy_hash=hashes[2],
        verified=verify,
        seconds=time.perf_counter() - started,
        metadata=header,
        config_file=str(config_file) if config_file is not None else None,
    )


def _write_original_config(family: str, out: Path) -> Path | None:
    """Write the family's original config (`Family.original_config`) beside `out` as `<stem>.yaml`, or
    remove a stale one of ours.

    A1111 takes `<stem>.yaml` as the checkpoint's config before anything else (SD 2.x 768-v and 512
    models have the same weights' names and shapes, and without it A1111 guesses), so one left from an
    earlier SD 2.x 768-v file of the same name would make it treat another family's model as
    v-prediction. A .yaml that is not nbkit's is the user's and is left alone.
    """
    beside = out.with_suffix(".yaml")
    name = FAMILIES[family].original_config
    if name is None:
        ours = {
            (shipped_config_dir(other.name) / other.original_config).read_text(encoding="utf-8")
            for other in FAMILIES.values()
            if other.original_config is not None
        }
        if beside.is_file() and beside.read_text(encoding="utf-8", errors="replace") in ours:
            beside.unlink()
        return None
    atomic_write_text(beside, (shipped_config_dir(family) / name).read_text(encoding="utf-8"))
    return beside


def _output_bytes(plan: ConversionPlan, target: torch.dtype) -> int:
    """The tensor bytes of the output (its header is small beside them)."""
    return sum(
        _numel(recipe.shape)
        * output_dtype(plan.sources[recipe.component].infos[recipe.sources[0]].dtype, target).itemsize
        for recipe in plan.recipes
    )


def _check_free_space(out: Path, needed: int) -> None:
    """Fail before writing gigabytes when the output cannot fit (Colab disks and Drive fill up)."""
    folder = out.parent if out.parent.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise disk_full_error(out, needed=needed, free=free, what=out.name, then="convert again")


def _write_failed(out: Path, error: OSError) -> NbkitError:
    return NbkitError(
        f"reading or writing failed ({error.strerror or error}); nothing was left behind",
        path=out,
        fix="if this is Google Drive, remount it (drive.mount(..., force_remount=True)) and convert again",
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count
