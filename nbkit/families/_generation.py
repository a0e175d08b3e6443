"""Small types and helpers the families' generation sections share (no torch, no diffusers at import)."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple


class HubControlNet(NamedTuple):
    """A ControlNet on the Hugging Face hub made for a family's models.

    Args:
        key: the name the UI and API show (the repository's name).
        repo_id: the hub repository (diffusers layout).
        preprocessor: the preprocessor that makes its control maps (`canny`, `depth`).
    """

    key: str
    repo_id: str
    preprocessor: str


def accepts(pipeline: Any, name: str) -> bool:
    """Whether `pipeline(...)` takes the keyword `name`."""
    parameters = inspect.signature(pipeline.__call__).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def config_dict(config: Any) -> dict[str, Any]:
    """A diffusers or transformers config (or a model holding one) as a plain dict ({} for None)."""
    config = getattr(config, "config", config)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dict(config).items()}
