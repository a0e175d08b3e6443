"""The safetensors header metadata nbkit writes: the SAI model spec keys A1111 and ComfyUI read, and ours.

`modelspec.*` follows the SAI model spec 1.0.0, for full models and LoRAs alike, from the family facts
in `nbkit.models.registry` (so a LoRA and a full model of one family never disagree on the architecture
or implementation). `modelspec.hash_sha256` is the spec's hash of the tensor data (see
`nbkit.convert.hashes`); it is written as a placeholder and filled in once the data is written.
`nbkit.*` records the family, prediction type and native resolution exactly, plus the diffusers configs
of the components, so that nbkit can load the file back into exactly the pipeline it came from (tiny
models, changed sample sizes and all).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from nbkit.convert.hashes import MODELSPEC_HASH_KEY, MODELSPEC_HASH_PLACEHOLDER
from nbkit.errors import NbkitError
from nbkit.families import get_family

MODELSPEC_VERSION = "1.0.0"
LORA_ARCHITECTURE_SUFFIX = "/lora"  # as kohya's trainers write it, which A1111 and ComfyUI read
METADATA_FAMILY = "nbkit.family"
METADATA_PREDICTION = "nbkit.prediction_type"
METADATA_RESOLUTION = "nbkit.resolution"
METADATA_CONFIGS = "nbkit.diffusers_configs"
# Which tensors the file carries beyond what the diffusers model has, and where they came from.
METADATA_TEXT_EXTRAS = "nbkit.text_encoder_extras"
# Keys the conversion derives from the model; callers' extra metadata may not contradict them.
DERIVED_KEYS = (
    METADATA_FAMILY,
    METADATA_PREDICTION,
    METADATA_RESOLUTION,
    "modelspec.architecture",
    "modelspec.prediction_type",
    "modelspec.sai_model_spec",
    MODELSPEC_HASH_KEY,
)


def modelspec_metadata(
    *,
    family: str,
    title: str,
    resolution: int,
    prediction_type: str,
    description: str,
    author: str | None = None,
    lora: bool = False,
) -> dict[str, str]:
    """The SAI model spec keys of a full model or a LoRA of `family`.

    Args:
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        title: `modelspec.title`.
        resolution: the square size in pixels: the model's native size, or the size a LoRA trained at.
        prediction_type: `epsilon` or `v_prediction`.
        description: `modelspec.description`.
        author: `modelspec.author`; left out when None (nbkit does not invent one).
        lora: a LoRA: the architecture gets `/lora`.
    """
    facts = get_family(family)
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": facts.modelspec_architecture + (LORA_ARCHITECTURE_SUFFIX if lora else ""),
        "modelspec.implementation": facts.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        MODELSPEC_HASH_KEY: MODELSPEC_HASH_PLACEHOLDER,
    }
    if author:
        metadata["modelspec.author"] = author
    return metadata


def as_metadata_value(value: Any) -> str:
    """Header metadata values must be strings; anything else is stored as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def build_metadata(
    *,
    family: str,
    prediction_type: str,
    resolution: int,
    title: str,
    description: str,
    configs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Return the header metadata for a converted checkpoint.

    Args:
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        prediction_type: `epsilon` or `v_prediction`.
        resolution: the native square size in pixels.
        title: `modelspec.title`, usually the output file's stem.
        description: `modelspec.description`, unless `extra` has one.
        configs: component name -> diffusers config (and `model_index`), stored as JSON.
        extra: more keys from the caller (training stores its settings here); values that are not
            strings are stored as JSON. They may override the title, description, author or date, not
            the keys derived from the model (`DERIVED_KEYS`).

    Raises:
        NbkitError: when `extra` contradicts a key derived from the model.
    """
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        **modelspec_metadata(
            family=family,
            title=title,
            resolution=resolution,
            prediction_type=prediction_type,
            description=description,
        ),
        METADATA_FAMILY: family,
        METADATA_PREDICTION: prediction_type,
        METADATA_RESOLUTION: str(resolution),
    }
    if configs:
        metadata[METADATA_CONFIGS] = json.dumps(configs, sort_keys=True, separators=(",", ":"))
    for key, value in (extra or {}).items():
        text = as_metadata_value(value)
        if key == MODELSPEC_HASH_KEY:
            raise NbkitError(
                f"metadata {key} cannot be given: it is the hash of the tensors the file will hold",
                fix=f"leave {key} out of the extra metadata; nbkit computes it while writing",
            )
        if key in DERIVED_KEYS and metadata[key] != text:
            raise NbkitError(
                f"metadata {key}={text!r} contradicts the model, which is {metadata[key]!r}",
                fix=f"leave {key} out of the extra metadata; nbkit derives it from the model",
            )
        metadata[str(key)] = text
    return metadata


def stored_configs(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The diffusers configs nbkit stored in a file's metadata, or None."""
    text = metadata.get(METADATA_CONFIGS)
    if not text:
        return None
    try:
        configs = json.loads(text)
    except json.JSONDecodeError:
        return None
    return configs if isinstance(configs, dict) else None
