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


class GenerationDefaults(NamedTuple):
    """The sampling settings a model starts from (`Family.generation_defaults`).

    Args:
        steps: sampling steps.
        cfg_scale: A1111's "CFG scale" (1: no classifier-free guidance).
        sampler: an A1111 sampler name the family takes.
        schedule: an A1111 schedule type.
        own: the model's own settings (its model card's: a few-step distilled model's, say), which an
            API request that omits them gets too; False: A1111's web UI defaults, and the API keeps
            A1111's declared ones.
    """

    steps: int
    cfg_scale: float
    sampler: str
    schedule: str = "Automatic"
    own: bool = False
