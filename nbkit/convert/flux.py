"""FLUX.1 transformer: diffusers <-> the Black Forest Labs (BFL) single file that ComfyUI and Forge read.

The BFL layout (that of `flux1-dev.safetensors`) fuses what diffusers keeps apart: each double
block's image and text q, k, v are one `qkv` each, and each single block's q, k, v and MLP input are
one `linear1`. The final adaLN stores (shift, scale) where diffusers' `norm_out` has (scale, shift).
Everything else is a rename. `flux_modules` lists that correspondence module by module; the
transformer file (here) and the ComfyUI LoRA (`nbkit.convert.flux_lora`) are both written from it.

nbkit writes diffusers -> BFL itself, streamed tensor by tensor (a 12B transformer never sits in
memory twice); BFL -> diffusers is diffusers' own `FluxTransformer2DModel.from_single_file`.
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
from nbkit.families.flux1 import FAMILY as FLUX
from nbkit.families.flux1 import SCHNELL_ARCHITECTURE as FLUX_SCHNELL_ARCHITECTURE
from nbkit.families.flux1 import Flux1, is_flux_schnell
from nbkit.fsio import atomic_path, atomic_write_json, read_json

TRANSFORMER_CLASS = "FluxTransformer2DModel"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# diffusers' single-file converter cuts `single_blocks.N.linear1` at FLUX.1's sizes (3072 wide, MLP
# 4x), whatever the config says; see `_convert_other_width`.
DIFFUSERS_SPLIT_WIDTH = 3072
DIFFUSERS_SPLIT_MLP = 4 * DIFFUSERS_SPLIT_WIDTH
# Metadata the caller may not set: it is derived from the model (or is the hash of what is written).
DERIVED_KEYS = ("modelspec.architecture", MODELSPEC_HASH_KEY, METADATA_FAMILY, METADATA_CONFIGS)
LINEAR_PARAMS = (("weight", "weight"), ("bias", "bias"))
NORM_PARAMS = (("scale", "weight"),)


@dataclass(frozen=True)
class FluxModule:
    """One module of the BFL layout and the diffusers modules it is made of.

    Args:
        bfl: its name in the BFL layout, e.g. `double_blocks.0.img_attn.qkv`.
        parts: the diffusers modules, concatenated along the output dimension, in that order.
        params: (BFL parameter, diffusers parameter) names; a norm's `scale` is diffusers' `weight`.
        swap_halves: the output's two halves are swapped (BFL's final (shift, scale) modulation).
    """

    bfl: str
    parts: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = LINEAR_PARAMS
    swap_halves: bool = False

    @property
    def is_linear(self) -> bool:
        return self.params == LINEAR_PARAMS


def _norm(bfl: str, part: str) -> FluxModule:
    return FluxModule(bfl, (part,), NORM_PARAMS)


def flux_modules(num_layers: int, num_single_layers: int, guidance: bool) -> list[FluxModule]:
    """The BFL modules of a FLUX.1 transformer, in BFL's order, with their diffusers parts.

    Args:
        num_layers: double-stream blocks (19 in FLUX.1).
        num_single_layers: single-stream blocks (38 in FLUX.1).
        guidance: the model embeds the guidance scale (dev; schnell does not).
    """
    embedder = "time_text_embed."
    modules = [
        FluxModule("img_in", ("x_embedder",)),
        FluxModule("time_in.in_layer", (embedder + "timestep_embedder.linear_1",)),
        FluxModule("time_in.out_layer", (embedder + "timestep_embedder.linear_2",)),
        FluxModule("vector_in.in_layer", (embedder + "text_embedder.linear_1",)),
        FluxModule("vector_in.out_layer", (embedder + "text_embedder.linear_2",)),
    ]
    if guidance:
        modules.append(FluxModule("guidance_in.in_layer", (embedder + "guidance_embedder.linear_1",)))
        modules.append(FluxModule("guidance_in.out_layer", (embedder + "guidance_embedder.linear_2",)))
    modules.append(FluxModule("txt_in", ("context_embedder",)))
    for i in range(num_layers):
        bfl, ours = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        streams = (
            ("img", "norm1.linear", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k"), "ff"),
            (
                "txt",
                "norm1_context.linear",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                "to_add_out",
                ("norm_added_q", "norm_added_k"),
                "ff_context",
            ),
        )
        for stream, modulation, qkv, proj, (norm_q, norm_k), mlp in streams:
            modules += [
                FluxModule(f"{bfl}{stream}_mod.lin", (ours + modulation,)),
                FluxModule(f"{bfl}{stream}_attn.qkv", tuple(f"{ours}attn.{name}" for name in qkv)),
                _norm(f"{bfl}{stream}_attn.norm.query_norm", f"{ours}attn.{norm_q}"),
                _norm(f"{bfl}{stream}_attn.norm.key_norm", f"{ours}attn.{norm_k}"),
                FluxModule(f"{bfl}{stream}_attn.proj", (f"{ours}attn.{proj}",)),
                FluxModule(f"{bfl}{stream}_mlp.0", (f"{ours}{mlp}.net.0.proj",)),
                FluxModule(f"{bfl}{stream}_mlp.2", (f"{ours}{mlp}.net.2",)),
            ]
    for i in range(num_single_layers):
        bfl, ours = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        modules += [
            FluxModule(
                bfl + "linear1",
                tuple(ours + name for name in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
            ),
            FluxModule(bfl + "linear2", (ours + "proj_out",)),
            _norm(bfl + "norm.query_norm", ours + "attn.norm_q"),
            _norm(bfl + "norm.key_norm", ours + "attn.norm_k"),
            FluxModule(bfl + "modulation.lin", (ours + "norm.linear",)),
        ]
    modules += [
        FluxModule("final_layer.linear", ("proj_out",)),
        FluxModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    return modules


def modules_for_config(config: Mapping[str, Any]) -> list[FluxModule]:
    """`flux_modules` for a `FluxTransformer2DModel` config."""
    check_transformer_config(config)
    return flux_modules(
        int(config["num_layers"]),
        int(config["num_single_layers"]),
        bool(config.get("guidance_embeds", False)),
    )


def check_transformer_config(config: Mapping[str, Any], path: str | os.PathLike | None = None) -> None:
    """Raise `NbkitError` unless `config` is a FLUX.1 transformer's config."""
    missing = [key for key in ("num_layers", "num_single_layers") if key not in config]
    if config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS or missing:
        raise NbkitError(
            f"not a FLUX.1 transformer config ({config.get('_class_name', 'no _class_name')}"
            + (f", no {missing[0]}" if missing else "")
            + ")",
            path=path,
            fix="give a FLUX.1 diffusers pipeline folder, its transformer folder, or a FluxTransformer2DModel",
        )


@dataclass(frozen=True)
class TensorStep:
    """How one BFL tensor is made: its diffusers sources concatenated, the halves maybe swapped."""

    key: str
    sources: tuple[str, ...]
    swap_halves: bool = False


def plan_tensors(
    modules: list[FluxModule], available: Collection[str], path: str | os.PathLike | None = None
) -> list[TensorStep]:
    """The BFL tensors to write, checked against the diffusers tensors there are.

    Args:
        modules: from `flux_modules`.
        available: the diffusers state dict's keys.
        path: where they come from, for messages.

    Raises:
        NbkitError: when a tensor the layout needs is missing, or one would be left out.
    """
    steps = []
    for module in modules:
        for bfl_param, param in module.params:
            sources = tuple(f"{part}.{param}" for part in module.parts)
            present = [name in available for name in sources]
            if param == "bias" and not any(present):
                continue  # a bias-free linear: none in either layout
            if not all(present):
                missing = sources[present.index(False)]
                raise NbkitError(
                    f"the FLUX.1 transformer has no {missing!r}; its weights do not fit its config",
                    path=path,
                    fix="save the transformer again (FluxTransformer2DModel.save_pretrained); the folder is incomplete",
                )
            steps.append(TensorStep(f"{module.bfl}.{bfl_param}", sources, module.swap_halves))
    used = {name for step in steps for name in step.sources}
    unused = sorted(name for name in available if name not in used)
    if unused:
        raise NbkitError(
            f"the FLUX.1 transformer has {len(unused)} weights the BFL layout has no place for, e.g. {unused[0]!r}",
            path=path,
            fix="this is not a standard FLUX.1 transformer (a LoRA not merged? a ControlNet?); keep it as a "
            "diffusers folder",
        )
    return steps


def build_tensor(step: TensorStep, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The BFL tensor of `step` from its diffusers sources (in `step.sources` order)."""
    tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    if step.swap_halves:
        first, second = tensor.chunk(2, dim=0)
        tensor = torch.cat([second, first], dim=0)
    return tensor.contiguous()


def diffusers_to_bfl(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel` state dict in the BFL layout (exact, same dtypes).

    Args:
        state_dict: the transformer's state dict (diffusers names).
        config: the transformer's config dict (`num_layers`, `num_single_layers`, `guidance_embeds`).

    Raises:
        NbkitError: when the state dict does not fit the config.
    """
    steps = plan_tensors(modules_for_config(config), state_dict.keys())
    return {step.key: build_tensor(step, [state_dict[name] for name in step.sources]) for step in steps}


def _clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without where it was loaded from (diffusers' bookkeeping keys start with `_`)."""
    kept = ("_class_name", "_diffusers_version")
    return {key: value for key, value in config.items() if not key.startswith("_") or key in kept}


def flux_modelspec(
    *, architecture: str, title: str, description: str, resolution: int | None = None
) -> dict[str, str]:
    """The SAI model spec keys of a FLUX.1 file (a transformer or a LoRA).

    Args:
        architecture: `flux-1-dev`, `flux-1-schnell`, or either with `/lora`.
        title: `modelspec.title`.
        description: `modelspec.description`.
        resolution: the square size in pixels (default: FLUX.1's native 1024).
    """
    size = resolution or FLUX.native_resolution
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": FLUX.modelspec_implementation,
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


@contextlib.contextmanager
def _open_source(source: Any) -> Iterator[tuple[TensorSource, dict[str, Any], int | None, str]]:
    """(tensors, transformer config, native resolution or None, name) of a model or a diffusers folder."""
    if isinstance(source, torch.nn.Module):
        config = dict(getattr(source, "config", {}))
        if type(source).__name__ != TRANSFORMER_CLASS:
            config["_class_name"] = type(source).__name__
        check_transformer_config(config)
        tensors = {name: tensor.detach() for name, tensor in source.state_dict().items()}
        yield StateDictSource(tensors, f"<{TRANSFORMER_CLASS}>"), config, None, f"a {TRANSFORMER_CLASS}"
        return
    folder = Path(source)
    name = folder.name
    resolution = None
    if (folder / "model_index.json").is_file():
        from nbkit.families import detect_family_from_config, get_family

        detected = detect_family_from_config(folder)
        if not isinstance(get_family(detected.family), Flux1):  # FLUX.1 or a family built on it
            raise NbkitError(
                f"this diffusers model is {detected.family}, not FLUX.1",
                path=folder,
                fix="convert it with nbkit.convert.convert_to_single_file (nbkit convert does)",
            )
        resolution = detected.native_resolution
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise NbkitError(
            "not a FLUX.1 diffusers folder (no model_index.json with a transformer, nor config.json)",
            path=folder,
            fix="give the pipeline folder or its transformer folder",
        )
    config = read_json(folder / "config.json")
    check_transformer_config(config, folder)
    with open_component(folder) as tensors:
        yield tensors, config, resolution, name


def is_flux_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a FLUX.1 diffusers pipeline folder or a FLUX.1 transformer folder."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        folder = folder / "transformer"
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("_class_name") == TRANSFORMER_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _target_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NbkitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", fix="use fp16, bf16 or fp32")
    return DTYPES[dtype]


def save_flux_transformer(
    source: Any,
    out_file: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a FLUX.1 transformer as one .safetensors file in the BFL layout (ComfyUI, Forge, diffusers).

    Streamed: one tensor at a time is read, fused, cast and written, then the file is read back and
    checked before it replaces `out_file`.

    Args:
        source: a `FluxTransformer2DModel`, a FLUX.1 diffusers pipeline folder, or its transformer folder.
        out_file: the `.safetensors` file to write.
        dtype: the floating-point weights' dtype (`torch.bfloat16` or "bf16", ...); None keeps the source's.
        metadata: extra header metadata (non-strings stored as JSON); it may set the title, description,
            resolution or author, not the architecture.

    Returns:
        The path written.

    Raises:
        NbkitError: for a source that is not a FLUX.1 transformer, a bad name or dtype, or a failed check.
    """
    out = Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise NbkitError(
            f"a FLUX.1 transformer file is written as .safetensors, not {out.suffix or 'no suffix'}",
            path=out,
            fix="name the output .safetensors",
        )
    if out.is_dir():
        raise NbkitError("the output is an existing folder", path=out, fix="give a file name")
    target = _target_dtype(dtype)
    with _open_source(source) as (tensors, config, resolution, name):
        steps = plan_tensors(modules_for_config(config), tensors.infos.keys(), tensors.path)
        architecture = FLUX_SCHNELL_ARCHITECTURE if is_flux_schnell(config) else FLUX.modelspec_architecture
        header = {
            "format": "pt",
            **flux_modelspec(
                architecture=architecture,
                title=out.stem,
                description=f"FLUX.1 transformer (BFL layout), converted by nbkit from {name}",
                resolution=resolution,
            ),
            METADATA_FAMILY: FLUX.name,
            METADATA_PREDICTION: FLUX.prediction_type,
            METADATA_RESOLUTION: str(resolution or FLUX.native_resolution),
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
) -> tuple[Path, str | None]:
    """(folder, subfolder) of the transformer config to build the model from."""
    if config_folder is not None:
        folder = Path(config_folder)
        if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
            return folder, "transformer"
        if (folder / "config.json").is_file():
            return folder, None
        raise NbkitError(
            "not a FLUX.1 diffusers folder (no transformer/config.json, nor config.json)",
            path=folder,
            fix="give the base model's pipeline folder (or its transformer folder)",
        )
    stored = (stored_configs(metadata) or {}).get("transformer")
    if not stored:
        raise NbkitError(
            "a FLUX.1 transformer file does not say its architecture; it needs its base pipeline folder",
            path=path,
            fix="pass the base model's diffusers folder (FLUX.1-dev or -schnell) as config_folder",
        )
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbkit-flux-config-")))
    atomic_write_json(folder / "config.json", stored)
    return folder, None


def _convert_other_width(
    state_dict: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Run diffusers' converter on a transformer narrower or wider than FLUX.1's (a tiny test model).

    The converter cuts each `linear1` at FLUX.1's sizes whatever the config says. It is given zero
    stand-ins of those sizes (expanded views: no memory), and the real q, k, v, MLP split of each
    `linear1` then replaces what it made of them; every other tensor is converted by diffusers.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    real = {key: state_dict.pop(key) for key in list(state_dict) if ".linear1." in key}
    stand_in_rows = 3 * DIFFUSERS_SPLIT_WIDTH + DIFFUSERS_SPLIT_MLP
    for key, tensor in real.items():
        state_dict[key] = tensor.new_zeros(()).expand(stand_in_rows, *tensor.shape[1:])
    converted = convert_flux_transformer_checkpoint_to_diffusers(state_dict)
    for key, tensor in real.items():
        block, param = key.split(".")[1], key.rsplit(".", 1)[1]
        ours = f"single_transformer_blocks.{block}."
        names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        pieces = tensor.split((width, width, width, tensor.shape[0] - 3 * width), dim=0)
        for name, piece in zip(names, pieces, strict=True):
            converted[f"{ours}{name}.{param}"] = piece.contiguous()
    return converted


def load_flux_transformer(
    single_file: str | os.PathLike,
    config_folder: str | os.PathLike | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
):
    """Load a BFL-layout FLUX.1 transformer file with diffusers' own single-file loader, offline.

    Args:
        single_file: the `.safetensors` file (BFL keys, optionally under `model.diffusion_model.`).
        config_folder: the base model's diffusers pipeline folder, or its transformer folder, whose
            transformer config describes the file; None uses the config nbkit stored in the file.
        torch_dtype: the model's dtype (default: the file's).

    Returns:
        A `FluxTransformer2DModel` on the CPU, in eval mode.

    Raises:
        NbkitError: for a file that is not a safetensors FLUX.1 transformer, no config, or missing weights.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    path = Path(single_file)
    if not path.is_file():
        raise NbkitError("no such file", path=path, fix="check the path")
    if sniff_format(path) != "safetensors":
        raise NbkitError(
            "a FLUX.1 transformer file must be .safetensors", path=path, fix="convert it to safetensors"
        )
    metadata = read_header(path).metadata  # validates the header before safetensors maps the file
    state_dict = {key.removeprefix("model.diffusion_model."): value for key, value in load_file(path).items()}
    if not any(key.startswith("double_blocks.") for key in state_dict):
        raise NbkitError(
            "not a FLUX.1 transformer in the BFL layout (no double_blocks.* weights)",
            path=path,
            fix="give a FLUX.1 transformer file such as flux1-dev.safetensors",
        )
    if torch_dtype is None:  # the file's own precision, not diffusers' fp32 default
        torch_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    with contextlib.ExitStack() as stack:
        folder, subfolder = _config_location(config_folder, metadata, stack, path)
        config = read_json(folder / (subfolder or ".") / "config.json")
        check_transformer_config(config, folder)
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        linear1 = state_dict.get("single_blocks.0.linear1.weight")
        standard = width == DIFFUSERS_SPLIT_WIDTH and (
            linear1 is None or linear1.shape[0] == 3 * DIFFUSERS_SPLIT_WIDTH + DIFFUSERS_SPLIT_MLP
        )
        checkpoint = state_dict if standard else _convert_other_width(state_dict, config)
        try:
            model = FluxTransformer2DModel.from_single_file(
                checkpoint,
                config=str(folder),
                subfolder=subfolder,
                torch_dtype=torch_dtype,
                local_files_only=True,
            )
        except (ValueError, RuntimeError, KeyError, IndexError) as error:
            raise NbkitError(
                f"the weights do not fit the FLUX.1 transformer config in {folder} ({str(error)[:200]})",
                path=path,
                fix="give the folder of the model this file was made from (dev or schnell, same size)",
            ) from error
    missing = [key for key, value in model.state_dict().items() if value.device.type == "meta"]
    if missing:
        raise NbkitError(
            f"the file lacks {len(missing)} transformer weights, e.g. {missing[0]!r}",
            path=path,
            fix="the file is incomplete, or of another model (dev vs schnell); check the config folder",
        )
    return model
