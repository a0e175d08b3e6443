"""Loading the models a session exported (`session.manifest.models`) for generation.

`load_session_pipeline` loads one into `SESSION_PIPELINES`, a one-slot `PipelineCache` (the class the
web UI's service keeps its checkpoint in): asking for another model frees the previous one first, so a
notebook GPU never holds two. `infotext_fields` names it in infotexts as A1111 would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.device import default_device
from nbkit.errors import NbkitError
from nbkit.generation.cache import PipelineCache
from nbkit.generation.placement import apply_memory_option, generation_dtype, plan_generation_memory

if TYPE_CHECKING:
    from nbkit.session.core import Session
    from nbkit.session.manifest import ExportedModel


SESSION_PIPELINES = PipelineCache()  # `loaded`: the `ExportedModel` it holds


def find_model(session: Session, model: str | None = None) -> ExportedModel:
    """The exported model `model` of `session` (None: the newest).

    Args:
        session: an open session.
        model: an `ExportedModel.name`, or None.
    """
    models = session.manifest.models
    if not models:
        raise NbkitError(
            f"session {session.name!r} has no exported models yet",
            path=session.path,
            fix="train the session (its last step exports the model) or export a checkpoint",
        )
    if model is None:
        # The newest by creation time; the later entry wins a tie.
        return max(enumerate(models), key=lambda item: (item[1].created, item[0]))[1]
    for record in models:
        if record.name == model:
            return record
    names = ", ".join(record.name for record in models)
    raise NbkitError(
        f"session {session.name!r} has no model named {model!r}; its models are: {names}",
        path=session.path,
        fix="pick one of those names (or None for the newest)",
    )


def _session_file(session: Session, record: ExportedModel, role: str) -> Path | None:
    relative = record.files.get(role)
    return session.path / relative if relative else None


def _load_record(
    session: Session, record: ExportedModel, device: Any, dtype: Any, quantization: str | None = None
) -> Any:
    from nbkit.models.loading import load_pipeline

    if record.kind == "full":
        for role in ("folder", "single_file"):
            path = _session_file(session, record, role)
            if path is not None and path.exists():
                return load_pipeline(
                    path, family=record.family, torch_dtype=dtype, device=device, quantization=quantization
                )
        raise NbkitError(
            f"model {record.name!r} lists {', '.join(record.files.values()) or 'no files'}, "
            "but none of them exists",
            path=session.path / "models",
            fix="export the model again, or restore the missing files from Drive's trash",
        )
    if record.kind == "lora":
        paths = [_session_file(session, record, role) for role in ("diffusers", "kohya")]
        found = [path for path in paths if path is not None and path.is_file()]
        if not found:
            raise NbkitError(
                f"LoRA {record.name!r} lists {', '.join(record.files.values()) or 'no files'}, "
                "but none of them exists",
                path=session.path / "models",
                fix="export the LoRA again, or restore the missing files from Drive's trash",
            )
        pipeline = load_pipeline(
            record.base_model,
            family=record.family,
            torch_dtype=dtype,
            device=device,
            quantization=quantization,
        )
        pipeline.load_lora_weights(str(found[0]))
        return pipeline
    raise NbkitError(f"model {record.name!r} has unknown kind {record.kind!r}", path=session.path)


def _default_device_and_dtype(device: Any, dtype: Any, family: str | None = None) -> tuple[Any, Any]:
    device = default_device(device)
    return device, generation_dtype(family, device) if dtype is None else dtype


def load_session_pipeline(
    session: Session, model: str | None = None, *, device: Any = None, dtype: Any = None
) -> Any:
    """Load a model the session exported, through the one-slot cache `SESSION_PIPELINES`.

    The same model (and device and dtype) again returns the cached pipeline; another one frees the
    cached pipeline first. A `full` model loads from its diffusers folder (else its single file); a
    `lora` loads its base model (`ExportedModel.base_model`) and applies the LoRA with
    `load_lora_weights` (the diffusers file, else the kohya one).

    Args:
        session: an open session.
        model: an `ExportedModel.name` from `session.manifest.models`; None: the newest.
        device: where to run (default: CUDA when available, else the CPU).
        dtype: the weights' dtype (default: float16 on CUDA, bfloat16 for FLUX.1; float32 on the CPU).

    Returns:
        A diffusers pipeline.

    Raises:
        NbkitError: a FLUX.1 model on a GPU that cannot run it (no bf16, too little memory).
    """
    record = find_model(session, model)
    device, dtype = _default_device_and_dtype(device, dtype, record.family)
    key = (
        str(session.path),
        record.name,
        record.created,
        json.dumps(record.files, sort_keys=True),
        record.base_model,
        str(device),
        str(dtype),
    )
    # A GPU that cannot run it (a T4 for FLUX.1) is refused before the cached model is dropped.
    option = plan_generation_memory(record.family, device)

    def load() -> Any:
        # With a memory option the pipeline stays on the CPU until the option places it.
        quantization = option.quantization if option is not None else None
        pipeline = _load_record(session, record, None if option is not None else device, dtype, quantization)
        return apply_memory_option(pipeline, option, device) if option is not None else pipeline

    return SESSION_PIPELINES.get(key, load, loaded=record)


def infotext_fields(record: ExportedModel) -> dict[str, Any]:
    """The `model_name`, `model_hash` and `extra_parameters` that `generate` writes for a session model.

    A full model is named as A1111 names a checkpoint (its file's stem, hashed by its short hash); a
    LoRA names its base model and adds `Lora hashes` (A1111's 12-hex LoRA hash) when its kohya file
    has a recorded sha256.

    Args:
        record: an `ExportedModel`.
    """
    if record.kind == "lora":
        kohya = record.files.get("kohya")
        extra = {}
        if kohya and kohya in record.sha256:
            extra["Lora hashes"] = f"{Path(kohya).stem}: {record.sha256[kohya][:12]}"
        base = record.base_model.rstrip("/").rsplit("/", 1)[-1]
        return {"model_name": Path(base).stem or base, "model_hash": None, "extra_parameters": extra}
    single = record.files.get("single_file")
    digest = record.sha256.get(single) if single else None
    return {
        "model_name": Path(single).stem if single else record.name,
        "model_hash": digest[:10] if digest else None,
        "extra_parameters": {},
    }
