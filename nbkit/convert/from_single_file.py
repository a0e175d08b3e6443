"""Single-file checkpoint -> diffusers pipeline, with diffusers' own converters and local configs.

The UNet and VAE go through diffusers' `from_single_file` (given a state dict and a local config
folder, so no hub access), the text encoders through diffusers' `single_file_utils` key converters,
called with the exact prefix of each encoder and loaded strictly, so a missing weight is an error and
not a silently random layer. Configs come from, in order: the `config` folder the caller gives; the
configs nbkit stored in the file's own metadata (exact, tiny models included); the real model's
configs shipped in `nbkit/configs/<family>/`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.convert.checkpoint_io import load_pickled_checkpoint, sniff_format
from nbkit.convert.detect import FamilyGuess, detect_family, resolve_family
from nbkit.convert.layout import ComponentLayout, single_file_layout
from nbkit.convert.metadata import stored_configs
from nbkit.convert.safetensors_stream import read_header
from nbkit.convert.tokenizers import load_tokenizer
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.fsio import atomic_write_json, read_json

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "configs"


def shipped_config_dir(family: str) -> Path:
    """The folder of the real `family` model's diffusers configs that nbkit ships."""
    return CONFIGS_ROOT / family


@contextlib.contextmanager
def config_folder(
    family: str, metadata: Mapping[str, str], config: str | os.PathLike | None
) -> Iterator[Path]:
    """Yield the diffusers config folder to build the pipeline from (see the module docstring)."""
    if config is not None:
        folder = Path(config)
        if not (folder / "model_index.json").is_file():
            raise NbkitError("not a diffusers config folder (no model_index.json)", path=folder)
        yield folder
        return
    configs = stored_configs(metadata)
    if not configs or "model_index" not in configs:
        yield shipped_config_dir(family)
        return
    with tempfile.TemporaryDirectory(prefix="nbkit-configs-") as temporary:
        folder = Path(temporary)
        for name, values in configs.items():
            if name == "model_index":
                target = folder / "model_index.json"
            elif name == "scheduler":
                target = folder / "scheduler" / "scheduler_config.json"
            else:
                target = folder / name / "config.json"
            atomic_write_json(target, values)
        yield folder


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata; its format is told from its bytes, not its suffix."""
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file

        metadata = read_header(path).metadata  # validates the file before safetensors maps it
        return load_file(path), metadata
    return load_pickled_checkpoint(path)


class _EmptyFp32ListWarning(logging.Filter):
    """diffusers warns on every dtype cast that modules 'should be kept in float32: []' (an empty list)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _load_diffusers_model(
    cls: type, state_dict: dict, folder: Path, name: str, dtype: torch.dtype, path: Path
):
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _EmptyFp32ListWarning()
    logger.addFilter(quiet)
    try:
        model = cls.from_single_file(
            state_dict, config=str(folder), subfolder=name, torch_dtype=dtype, local_files_only=True
        )
    except (ValueError, RuntimeError, KeyError) as error:
        raise _mismatch(path, name, folder, error) from error
    finally:
        logger.removeFilter(quiet)
    _check_loaded(model, name, path)
    return model


def _mismatch(path: Path, name: str, folder: Path, error: Exception) -> NbkitError:
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return NbkitError(
        f"the {name} weights do not fit the {name} config in {folder} ({detail})",
        path=path,
        fix="check --family; a model with a non-standard architecture needs its own diffusers folder "
        "(pass config=<folder>)",
    )


def _check_loaded(model: torch.nn.Module, name: str, path: Path) -> None:
    missing = [key for key, value in model.state_dict().items() if value.device.type == "meta"]
    if missing:
        raise NbkitError(
            f"the file lacks {len(missing)} {name} weights, e.g. {missing[0]!r}",
            path=path,
            fix="the checkpoint is incomplete or of another architecture; check --family",
        )


def _load_text_encoder(
    layout: ComponentLayout, class_name: str, state_dict: dict, folder: Path, dtype: torch.dtype, path: Path
):
    import transformers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    cls = getattr(transformers, class_name)
    config = transformers.CLIPTextConfig.from_pretrained(folder / layout.name)
    with init_empty_weights():
        model = cls(config)
    own = {key: value for key, value in state_dict.items() if key.startswith(layout.prefix)}
    if not own:
        raise NbkitError(f"the file has no {layout.name} weights (no {layout.prefix}* keys)", path=path)
    if layout.open_clip:
        converted = convert_open_clip_checkpoint(model, own, prefix=layout.prefix)
    else:
        converted = convert_ldm_clip_checkpoint(own, remove_prefix=layout.prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in converted]
    if missing:
        raise NbkitError(
            f"the file lacks {len(missing)} {layout.name} weights, e.g. {missing[0]!r}",
            path=path,
            fix="the checkpoint is incomplete or of another architecture; check --family",
        )
    try:
        # Weights already in the target dtype stay the file's tensors, as the UNet's and VAE's do: they
        # are private (copy-on-write) maps of the file, so training may change them in place, and a copy
        # would hold an SDXL's 1.6 GB of text encoders in host RAM twice.
        model.load_state_dict({key: converted[key].to(dtype) for key in expected}, strict=True, assign=True)
    except RuntimeError as error:
        raise _mismatch(path, layout.name, folder, error) from error
    _check_loaded(model, layout.name, path)
    return model.eval()


def _scheduler(folder: Path, index: Mapping[str, Any], prediction_type: str):
    import diffusers

    cls = getattr(diffusers, index["scheduler"][1])
    scheduler = cls.from_pretrained(folder, subfolder="scheduler")
    if scheduler.config.get("prediction_type", "epsilon") != prediction_type:
        scheduler = cls.from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


def _prediction_type(guess: FamilyGuess, family: str) -> str:
    if guess.family == family and guess.prediction_type:
        return guess.prediction_type
    return FAMILIES[family].prediction_type


def load_single_file(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    **components: Any,
):
    """Load a single-file checkpoint (.safetensors or .ckpt, original layout) as a diffusers pipeline.

    Args:
        path: the checkpoint; its format is told from its bytes, so a misnamed file still loads.
        family: a family with a single-file layout; required only when the file cannot tell (an SD 2.x
            file without metadata), and it must agree with the weights otherwise.
        torch_dtype: the pipeline's dtype (default float32).
        config: a diffusers folder whose configs (and tokenizers) to use instead of nbkit's.
        **components: pipeline components to use as given instead of loading them (`tokenizer=...`).

    Returns:
        A `StableDiffusionPipeline` or `StableDiffusionXLPipeline` on the CPU.

    Raises:
        NbkitError: for unreadable, unsafe or ambiguous files and weights that do not fit the family.
    """
    path = Path(path)
    dtype = torch_dtype or torch.float32
    state_dict, metadata = _read_checkpoint(path)
    guess = detect_family(state_dict, metadata=metadata, path=path)
    chosen = resolve_family(guess, family, path)
    with config_folder(chosen, metadata, config) as folder:
        index = read_json(folder / "model_index.json")
        layouts = single_file_layout(FAMILIES[chosen])
        missing = [layout.name for layout in layouts if not isinstance(index.get(layout.name), list)]
        if missing:
            raise NbkitError(
                f"the config folder is not a {chosen} pipeline: model_index.json has no {missing[0]}",
                path=folder,
                fix=f"give the folder of a {chosen} model as config, or leave config out",
            )
        loaded: dict[str, Any] = {}
        for layout in layouts:
            if layout.name in components:
                continue
            class_name = index[layout.name][1]
            if layout.name in ("unet", "vae"):
                cls = getattr(importlib.import_module("diffusers"), class_name)
                loaded[layout.name] = _load_diffusers_model(cls, state_dict, folder, layout.name, dtype, path)
            else:
                loaded[layout.name] = _load_text_encoder(layout, class_name, state_dict, folder, dtype, path)
        del state_dict
        if "scheduler" not in components:
            loaded["scheduler"] = _scheduler(folder, index, _prediction_type(guess, chosen))
        for name, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            if name in index and name not in components:
                vocab_size = (components.get(encoder) or loaded[encoder]).config.vocab_size
                loaded[name] = load_tokenizer(name, chosen, folder, vocab_size)
        loaded.update(components)
        pipeline_class = getattr(importlib.import_module("diffusers"), index["_class_name"])
        return pipeline_class(**loaded, **FAMILIES[chosen].single_file_pipeline_extras(index))
