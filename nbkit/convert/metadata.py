"""The safetensors header metadata nbkit writes: the SAI model spec keys A1111 and ComfyUI read, and ours.

`modelspec.*` follows the SAI model spec 1.0.0. `nbkit.*` records the family, prediction type and
native resolution exactly, plus the diffusers configs of the components, so that nbkit can load the
file back into exactly the pipeline it came from (tiny models, changed sample sizes and all).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from nbkit.errors import NbkitError

ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
IMPLEMENTATIONS = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sd2-v": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}
MODELSPEC_VERSION = "1.0.0"
METADATA_FAMILY = "nbkit.family"
METADATA_PREDICTION = "nbkit.prediction_type"
METADATA_RESOLUTION = "nbkit.resolution"
METADATA_CONFIGS = "nbkit.diffusers_configs"
# Keys the conversion derives from the model; callers' extra metadata may not contradict them.
DERIVED_KEYS = (
    METADATA_FAMILY,
    METADATA_PREDICTION,
    METADATA_RESOLUTION,
    "modelspec.architecture",
    "modelspec.prediction_type",
    "modelspec.sai_model_spec",
)


def as_metadata_value(value: Any) -> str:
    """Header metadata values must be strings; anything else is stored as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def build_metadata(
    *,
    family: str,
    prediction_type: str,
    resolution: int,
    title: str,
    configs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Return the header metadata for a converted checkpoint.

    Args:
        family: `sd1`, `sd2`, `sd2-v` or `sdxl`.
        prediction_type: `epsilon` or `v_prediction`.
        resolution: the native square size in pixels.
        title: `modelspec.title`, usually the output file's stem.
        configs: component name -> diffusers config (and `model_index`), stored as JSON.
        extra: more keys from the caller (training stores its settings here); values that are not
            strings are stored as JSON. They may override the title, description or date.

    Raises:
        NbkitError: when `extra` contradicts a key derived from the model.
    """
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURES[family],
        "modelspec.implementation": IMPLEMENTATIONS[family],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
        METADATA_FAMILY: family,
        METADATA_PREDICTION: prediction_type,
        METADATA_RESOLUTION: str(resolution),
    }
    if configs:
        metadata[METADATA_CONFIGS] = json.dumps(configs, sort_keys=True, separators=(",", ":"))
    for key, value in (extra or {}).items():
        text = as_metadata_value(value)
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
