"""Tell a checkpoint's family and prediction type from its keys, shapes and metadata.

Never from the file size (pruned, fp16 and EMA files of one model differ in size) and never from a
forward pass. The text encoder's layout names the architecture (each family's `single_file.signature`,
asked most specific first): OpenAI CLIP under `cond_stage_model.transformer` is SD 1.x, OpenCLIP under
`cond_stage_model.model` is SD 2.x, two `conditioner.embedders` is SDXL. Families with the same layout
have the same weights' names and shapes: whether an SD 2.x file is the 512 px epsilon model or the
768 px v-prediction model is only said by metadata (ours, or the SAI model spec) or a `v_pred` marker
key. Without either, the guess says it is ambiguous and the user chooses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbkit.convert.keymaps_unet import LDM_UNET_PREFIX
from nbkit.convert.metadata import METADATA_FAMILY, METADATA_PREDICTION, METADATA_RESOLUTION
from nbkit.convert.tensor_sources import open_tensor_file
from nbkit.errors import NbkitError
from nbkit.families import FAMILIES, Family, detect_family_from_config, most_specific_first

# Keys some trainers add to mark a v-prediction model (ComfyUI and kohya's scripts read them).
V_PREDICTION_MARKERS = ("v_pred",)


@dataclass(frozen=True)
class FamilyGuess:
    """What a checkpoint is, as far as its keys, shapes and metadata tell.

    Args:
        family: the family's name; None when it cannot be told apart (see candidates).
        prediction_type: `epsilon` or `v_prediction`; None when unknown.
        native_resolution: the square size it was trained at, in pixels, when known.
        candidates: the families it may be (one when decided).
        evidence: what the guess rests on, in words.
    """

    family: str | None
    prediction_type: str | None
    native_resolution: int | None
    candidates: tuple[str, ...]
    evidence: str

    @property
    def ambiguous(self) -> bool:
        return self.family is None


def detect_family(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
    path: str | os.PathLike | None = None,
) -> FamilyGuess:
    """Guess the family of a single-file checkpoint, a diffusers folder, or a {key: shape} mapping.

    Args:
        source: a .safetensors/.ckpt path, a diffusers folder, or a mapping of original-layout keys to
            shapes (tuples) or tensors.
        metadata: the file's header metadata, when `source` is a mapping.
        path: the file a mapping came from, for messages.

    Raises:
        NbkitError: when it is not a Stable Diffusion checkpoint nbkit can handle (a LoRA, a VAE alone,
            an inpainting or refiner model), naming what it looks like.
    """
    path = Path(path) if path is not None else None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _from_folder(path)
        with open_tensor_file(path) as tensors:
            shapes = {key: info.shape for key, info in tensors.infos.items()}
            metadata = tensors.metadata
    else:
        shapes = {key: tuple(getattr(value, "shape", value)) for key, value in source.items()}
    return _from_shapes(shapes, dict(metadata or {}), path)


def _from_folder(folder: Path) -> FamilyGuess:
    detected = detect_family_from_config(folder)
    return FamilyGuess(
        detected.family,
        detected.prediction_type,
        detected.native_resolution,
        (detected.family,),
        "the diffusers configs (model_index.json, unet, text encoder, scheduler)",
    )


def _single_file_families() -> list[Family]:
    """The families with a single-file layout, most specific first."""
    ordered = most_specific_first()
    return [family for family in ordered if family.single_file is not None]


def _same_weights(family: Family) -> tuple[str, ...]:
    """The families whose files have the same keys and shapes as `family`'s (itself included)."""
    if family.single_file is None:
        return (family.name,)
    return tuple(name for name, other in FAMILIES.items() if other.single_file == family.single_file)


def _architecture_group(
    shapes: Mapping[str, tuple[int, ...]], path: Path | None
) -> tuple[Family | None, str]:
    """(the first family of the layout, or None; evidence) from the text encoder's layout, else the
    UNet's context width."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in shapes)

    # A transformer family's transformer alone, in its original layout (`Family.transformer_layout`).
    transformers = (
        ("double_stream_modulation_img.", "a FLUX.2 transformer in the Black Forest Labs layout"),
        ("double_blocks.", "a FLUX.1 transformer in the Black Forest Labs layout (double_blocks.*)"),
        ("noise_refiner.", "a Z-Image transformer in its original layout (noise_refiner.*, layers.*)"),
    )
    for marker, what in transformers:
        if has(marker) or has(f"{LDM_UNET_PREFIX}{marker}"):
            raise NbkitError(
                f"this is {what}, not a Stable Diffusion checkpoint; it holds no VAE or text encoders, so it "
                "loads only with its base pipeline folder",
                path=path,
                fix="load it with nbkit.convert.transformer_file.load_transformer_file(file, base_folder) "
                "(for FLUX.1 also nbkit.convert.flux.load_flux_transformer) and pass it to the pipeline's "
                "from_pretrained(base_folder, transformer=...), or use the file as is in ComfyUI or Forge",
            )
    if not has(LDM_UNET_PREFIX):
        if has("lora_") or any(".lora_" in key for key in shapes):
            looks_like = "a LoRA"
        elif has("encoder.") or has("first_stage_model."):
            looks_like = "a VAE"
        else:
            looks_like = "something else"
        raise NbkitError(
            f"not a full Stable Diffusion checkpoint: it has no UNet (model.diffusion_model.*); it looks like {looks_like}",
            path=path,
            fix="pick a full model checkpoint (UNet, VAE and text encoder in one file)",
        )
    conv_in = shapes.get(f"{LDM_UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise NbkitError(
            f"its UNet takes {conv_in[1]} input channels, not 4: an inpainting or instruct-pix2pix model, "
            "which nbkit does not load",
            path=path,
            fix="use the ordinary (non-inpainting) version of this model",
        )
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1.model."):
        raise NbkitError(
            "this is an SDXL refiner (one OpenCLIP encoder under conditioner.embedders.0), which nbkit does not load",
            path=path,
            fix="use an SDXL base model",
        )
    families = _single_file_families()
    for family in families:
        if has(family.single_file.signature):
            return family, family.single_file.evidence
    widths = {shape[-1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")}
    if len(widths) == 1:
        width = next(iter(widths))
        for family in families:
            if family.cross_attention_dim == width:
                return family, f"no text encoder; the UNet attends to {width}-wide text embeddings"
    return None, "the file has no text encoder and its UNet is not one of the standard sizes"


def _family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    family = metadata.get(METADATA_FAMILY)
    if family in FAMILIES:
        return family
    by_architecture = {spec.modelspec_architecture: name for name, spec in FAMILIES.items()}
    return by_architecture.get(metadata.get("modelspec.architecture", ""))


def _prediction_from(metadata: Mapping[str, str], shapes: Mapping[str, Any]) -> tuple[str | None, str]:
    ours = metadata.get(METADATA_PREDICTION)
    if ours in ("epsilon", "v_prediction"):
        return ours, "nbkit's metadata"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("epsilon", "v", "v_prediction", "v-prediction"):
        return ("epsilon" if spec == "epsilon" else "v_prediction"), "the model spec metadata"
    if any(marker in shapes for marker in V_PREDICTION_MARKERS):
        return "v_prediction", "a v_pred marker key"
    return None, ""


def _resolution_from(metadata: Mapping[str, str], family: str | None) -> int | None:
    for key in (METADATA_RESOLUTION, "modelspec.resolution"):
        text = metadata.get(key, "")
        width = text.lower().split("x")[0].strip()
        if width.isdigit():
            return int(width)
    return FAMILIES[family].native_resolution if family else None


def _from_shapes(
    shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: Path | None
) -> FamilyGuess:
    leader, evidence = _architecture_group(shapes, path)
    if leader is None:
        return FamilyGuess(None, None, None, tuple(FAMILIES), evidence)
    members = _same_weights(leader)
    recorded = _family_from_metadata(metadata)
    if recorded is not None and recorded not in members:
        evidence += f"; the metadata says {recorded}, which the weights contradict, so it is ignored"
        recorded = None
    prediction, told_by = _prediction_from(metadata, shapes)
    if len({FAMILIES[name].prediction_type for name in members}) == 1:
        # Only metadata tells families with the same weights and prediction apart (a model fine-tuned
        # as another family); without it the file is the layout's first family's.
        family = recorded or leader.name
        prediction = prediction or FAMILIES[family].prediction_type
        return FamilyGuess(family, prediction, _resolution_from(metadata, family), (family,), evidence)
    if prediction is not None:
        matching = [name for name in members if FAMILIES[name].prediction_type == prediction] or [leader.name]
        family = recorded if recorded in matching else matching[0]
        evidence += f"; {told_by} says {prediction}"
    elif recorded is not None:
        family, prediction = recorded, FAMILIES[recorded].prediction_type
        evidence += f"; the metadata says {recorded}"
    else:
        titles = " and ".join(FAMILIES[name].title for name in members)
        evidence += f"; {titles} models have the same keys and shapes, and this file does not say which it is"
        return FamilyGuess(None, None, None, members, evidence)
    return FamilyGuess(family, prediction, _resolution_from(metadata, family), (family,), evidence)


def resolve_family(guess: FamilyGuess, choice: str | None, path: str | os.PathLike | None = None) -> str:
    """Settle the family from a guess and the user's `--family` choice.

    Args:
        guess: from `detect_family`.
        choice: the family the user asked for, or None.
        path: the file, for messages.

    Raises:
        NbkitError: when the choice contradicts the weights, or the file is ambiguous and no choice
            was given (the message names the `--family` option and the candidates).
    """
    if choice is not None:
        if choice not in FAMILIES:
            raise NbkitError(f"unknown family {choice!r}", fix=f"use one of: {', '.join(FAMILIES)}")
        # Families with the same weights (SD 2.x 512 and 768-v): the user may always say which a file is.
        if not any(choice in _same_weights(FAMILIES[name]) for name in guess.candidates):
            raise NbkitError(
                f"this checkpoint is {' or '.join(guess.candidates)} ({guess.evidence}), not {choice}",
                path=path,
                fix=f"drop --family, or pass --family {guess.candidates[0]}",
            )
        return choice
    if guess.family is None:
        fix = "pass " + " or ".join(f"--family {name}" for name in guess.candidates) + " (family= in Python)"
        hints = [
            f"{name} for {FAMILIES[name].choice_hint}"
            for name in guess.candidates
            if FAMILIES[name].choice_hint
        ]
        if hints and len({FAMILIES[name].single_file for name in guess.candidates}) == 1:  # same weights
            fix += ": " + ", ".join(hints)
        raise NbkitError(f"cannot tell which family this checkpoint is: {guess.evidence}", path=path, fix=fix)
    return guess.family
