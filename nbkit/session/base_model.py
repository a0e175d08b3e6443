"""A session's base model: how a source string becomes a `BaseModelRef`, and its registry facts.

Cheap (no torch, no diffusers): sessions and the CLI use it before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

from nbkit.errors import NbkitError, setting
from nbkit.families import FAMILIES, detect_family_from_config, get_family
from nbkit.models.registry import MODELS, ModelSpec, find_model
from nbkit.models.sources import resolve_source
from nbkit.session.manifest import BaseModelRef


def base_model_ref(source: str) -> BaseModelRef:
    """Describe a base model given as a registry key, hub repo id or diffusers folder."""
    spec = find_model(source)
    if spec is not None:
        return BaseModelRef(
            source=spec.key, family=spec.family, prediction_type=spec.prediction_type, revision=spec.revision
        )
    resolved = resolve_source(source)
    if resolved.kind != "diffusers":
        example, family = next(iter(FAMILIES.items()))
        raise NbkitError(
            "a single-file checkpoint does not say which model family it is",
            path=resolved.path,
            fix=f"give its family with it ({setting('family', example)} for an {family.title} file; the "
            f"families are {', '.join(FAMILIES)}), or convert it to a diffusers folder first",
        )
    detected = detect_family_from_config(resolved.path)
    return BaseModelRef(source=source, family=detected.family, prediction_type=detected.prediction_type)


def model_spec(base_model: BaseModelRef) -> ModelSpec:
    """The registry entry of the base model, or one made from its family for other models.

    A local folder whose native size is below its family's range is one of nbkit's tiny test models
    and gets the tiny models' resolution range.
    """
    spec = find_model(base_model.source)
    if spec is not None:
        return spec
    family = get_family(base_model.family)
    native = family.native_resolution
    folder = Path(base_model.source).expanduser()
    if (folder / "model_index.json").is_file():
        native = detect_family_from_config(folder).native_resolution
    if native < family.allowed_resolutions[0]:
        return MODELS[f"tiny-{base_model.family}"]
    return ModelSpec(
        key=base_model.source,
        family=base_model.family,
        title=base_model.source,
        repo_id=None,
        source="hub",
        native_resolution=native,
        allowed_resolutions=family.allowed_resolutions,
    )


def native_resolution(base_model: BaseModelRef) -> int:
    """The square size the base model was trained at: a new session's training resolution."""
    return model_spec(base_model).native_resolution
