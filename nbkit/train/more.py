"""Training a finished session more: its last stage continues to a larger step count, then exports again.

A finished session keeps its last checkpoints (`keep_checkpoints`), the newest one at the stage's last
step, with the optimizer, learning-rate schedule and RNG states. Training more resumes from that
checkpoint as if the stage had been planned for the new total: the same data order and noise per step,
the optimizer's moments kept, the schedule's rate taken at the step it stopped at for the new length.
When that checkpoint is gone (deleted, or an import without checkpoints), the run starts from the
exported model's weights with a fresh optimizer, and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbkit.errors import NbkitError, setting
from nbkit.session.core import Session
from nbkit.session.settings import TrainConfig
from nbkit.train import checkpointing

if TYPE_CHECKING:
    from nbkit.train.stages import RunContext

STEP_FIELDS = {"text_encoder": "text_encoder_steps", "unet": "unet_steps"}


def plan_more(
    session: Session, config: TrainConfig, found: list[checkpointing.Checkpoint]
) -> tuple[checkpointing.Checkpoint | None, dict[str, Any] | None, str | None]:
    """Where training a finished session more starts; writes nothing.

    Args:
        session: the open session, whose training is done.
        config: the run's settings: the last stage's step count is the new, larger total.
        found: the session's complete checkpoints, oldest first.

    Returns:
        (the checkpoint at the last trained step, or None; else the exported model to start from, as
        `{"name", "stage", "step"}`; a note for the user when it starts from the exported model).

    Raises:
        NbkitError: the session is not finished, the new step count is not larger than the trained one,
            another stage's steps changed, or nothing is left to continue from.
    """
    manifest, stored = session.manifest, session.manifest.training
    state = manifest.state
    if state.stage != "done":
        raise NbkitError(
            f"session '{session.name}' has not finished training (it is at {state.stage} step {state.step}); "
            "training more continues a finished session",
            path=session.path,
            fix=f"finish the run with {setting('resume')} (or a larger step count with it), then train more",
        )
    models = [model for model in manifest.models if model.name == session.name]
    stage = models[0].stage if models else ("unet" if stored.unet_steps > 0 else "text_encoder")
    field, trained = STEP_FIELDS[stage], state.step
    total = getattr(config, field)
    if total <= trained:
        raise NbkitError(
            f"{field} is {total}, which is not more than the {trained} steps the session has trained",
            path=session.path,
            fix=f"set {field} to the new total, above {trained} (e.g. {trained + max(1, trained // 2)})",
        )
    for other, other_field in STEP_FIELDS.items():
        if other != stage and getattr(config, other_field) != getattr(stored, other_field):
            raise NbkitError(
                f"training more continues the last stage ({stage}) only, but {other_field} changed from "
                f"{getattr(stored, other_field)} to {getattr(config, other_field)}",
                path=session.path,
                fix=f"leave {other_field} at {getattr(stored, other_field)}, or train again from scratch "
                f"with {setting('restart')}",
            )
    at_end = [checkpoint for checkpoint in found if (checkpoint.stage, checkpoint.step) == (stage, trained)]
    if at_end:
        return at_end[-1], None, None
    if not models:
        raise NbkitError(
            f"session '{session.name}' keeps neither its last checkpoint ({stage} step {trained}) nor an "
            "exported model to continue from",
            path=session.path / "checkpoints",
            fix=f"train again from scratch with {setting('restart')}",
        )
    model = models[0]
    if (model.kind == "lora") != (config.lora_rank > 0):
        raise NbkitError(
            f"the exported model is a {'LoRA' if model.kind == 'lora' else 'full fine-tune'}, but the "
            f"settings ask for {'a LoRA' if config.lora_rank > 0 else 'a full fine-tune'}",
            path=session.path,
            fix=f"keep lora_rank at {stored.lora_rank}, or train again from scratch with {setting('restart')}",
        )
    note = (
        f"nbkit: the checkpoint of {stage} step {trained} is gone, so training more starts from the "
        f"exported model {model.name} with a fresh optimizer (its moments are not kept; the learning-rate "
        f"schedule continues at step {trained} of {total})"
    )
    return None, {"name": model.name, "stage": stage, "step": trained}, note


def load_exported_roles(context: RunContext, session_path: Path, model_name: str, manifest_models) -> None:
    """Put the weights of the session's exported model into the run's components, frozen, as the
    trained roles a continued stage starts from.

    Args:
        context: the run.
        session_path: the session folder.
        model_name: the exported model's name.
        manifest_models: the session's `models` records.
    """
    from nbkit.train.components import freeze, has_lora, load_trained_state_dict
    from nbkit.train.stages import _add_role_lora

    (model,) = [record for record in manifest_models if record.name == model_name]
    components, config = context.components, context.config
    roles = [*components.text_encoder_roles, components.denoiser_role]
    trained = {components.denoiser_role} | (
        set(components.text_encoder_roles) if config.text_encoder_steps else set()
    )
    if model.kind == "lora":
        weights = _read_safetensors([session_path / model.files["diffusers"]])
        for role in roles:
            prefix = f"{role}."
            state = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
            if not state:
                continue
            module = components.model(role)
            if not has_lora(module):
                _add_role_lora(context, role)
            load_trained_state_dict(module, state, where=model.files["diffusers"])
            freeze(module, context.weight_dtype)
            context.trained_roles[role] = "lora"
        return
    folder = session_path / model.files["folder"]
    for role in roles:
        files = sorted((folder / role).glob("*.safetensors"))
        if not files or role not in trained:
            continue
        module = components.model(role)
        state = _read_safetensors(files)
        module.load_state_dict({key: value.to(module.dtype) for key, value in state.items()}, strict=True)
        freeze(module, context.weight_dtype)
        context.trained_roles[role] = "full"


def _read_safetensors(files: list[Path]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state
