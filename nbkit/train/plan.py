"""Where a training run starts, decided before anything heavy is imported and before anything is written.

`plan_run` reads the session and checks every input (settings, photos, resolution, the state of an
earlier run, the checkpoint a resume would start from). It writes nothing: a run that fails before it
really starts (a model that cannot be downloaded, say) leaves `session.json` as it was. `start_run`
writes the plan into the session once the model is loaded.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError, setting
from nbkit.families import get_family
from nbkit.images.buckets import Sizing
from nbkit.images.importing import fits
from nbkit.models.memory import DEFAULT_LORA_RANK
from nbkit.session.base_model import base_model_ref, native_resolution
from nbkit.session.concepts import check_concepts, concept_settings, counting_class_images
from nbkit.session.core import Session
from nbkit.session.manifest import BaseModelRef, TrainingState
from nbkit.session.settings import TrainConfig
from nbkit.train import checkpointing
from nbkit.train.inputs import (
    check_config,
    check_family_config,
    check_images,
    check_resolution,
    check_resume,
    family_overrides,
    merge_config,
    plan_gpu_memory,
)
from nbkit.train.more import plan_more


@dataclasses.dataclass
class RunPlan:
    """What a run will do.

    Args:
        base_model: the model it trains from.
        config: the effective settings (the seed drawn when there was none).
        resume_from: the checkpoint it continues from, or None for a fresh start.
        clear_checkpoints: delete earlier checkpoints when the run starts (`restart`).
        skipped: checkpoints newer than `resume_from` that failed their check, with the reason.
        recrop: instance images to crop again because the resolution or the bucket setting changed.
        notes: what the GPU memory plan decided and why (`nbkit.models.memory.plan_training`).
        from_model: training more without the last checkpoint: the exported model it starts from, as
            `{"name", "stage", "step"}` (`nbkit.train.more`).
    """

    base_model: BaseModelRef
    config: TrainConfig
    resume_from: checkpointing.Checkpoint | None = None
    clear_checkpoints: bool = False
    skipped: list[tuple[Path, str]] = dataclasses.field(default_factory=list)
    recrop: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    from_model: dict[str, Any] | None = None

    @property
    def sizing(self) -> Sizing:
        """How the run sizes its photos: its resolution, the family's step, buckets or squares."""
        step = get_family(self.base_model.family).resolution_step
        return Sizing(self.config.resolution, step, bool(self.config.buckets))

    def to_dict(self) -> dict[str, Any]:
        """A plain form to broadcast to the other processes of a multi-GPU run."""
        return {
            "base_model": self.base_model.to_dict(),
            "config": self.config.to_dict(),
            "resume_from": None if self.resume_from is None else str(self.resume_from.path),
            "clear_checkpoints": self.clear_checkpoints,
            "skipped": [[str(path), why] for path, why in self.skipped],
            "recrop": list(self.recrop),
            "notes": list(self.notes),
            "from_model": self.from_model,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        resume_from = data["resume_from"]
        return cls(
            base_model=BaseModelRef.from_dict(data["base_model"], where="run plan"),
            config=TrainConfig.from_dict(data["config"], where="run plan"),
            resume_from=None if resume_from is None else checkpointing.checkpoint_at(Path(resume_from)),
            clear_checkpoints=data["clear_checkpoints"],
            skipped=[(Path(path), why) for path, why in data["skipped"]],
            recrop=list(data["recrop"]),
            notes=list(data.get("notes", [])),
            from_model=data.get("from_model"),
        )


def plan_run(
    session: Session,
    config_overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    restart: bool = False,
    force_resolution: bool = False,
    more: bool = False,
) -> RunPlan:
    """Check everything a run needs and decide where it starts; writes nothing.

    Args:
        session: the open session.
        config_overrides: `TrainConfig` fields to change, plus `model` to switch the base model.
        resume: continue from the last good checkpoint.
        restart: start over, deleting earlier checkpoints (and, on a finished session, replacing its model).
        force_resolution: accept a resolution outside the model's sensible range.
        more: train a finished session further: its last stage continues from its last checkpoint (or
            its exported model) to the stage's new, larger step count (`nbkit.train.more`).

    Raises:
        NbkitError: naming the bad setting, photo, or earlier run, and what to do.
    """
    if resume and restart:
        raise NbkitError(
            "resume and restart both set",
            fix=f"use one of them: {setting('resume')} continues, {setting('restart')} starts over",
        )
    if more and (resume or restart):
        raise NbkitError(
            f"{'resume' if resume else 'restart'} and more both set",
            fix=f"use {setting('more')} alone to train a finished session further",
        )
    overrides = dict(config_overrides or {})
    model_source = overrides.pop("model", None)
    base_model = base_model_ref(model_source) if model_source else session.manifest.base_model
    if base_model is None:
        raise NbkitError(
            "the session has no base model",
            path=session.path,
            fix="choose one with --model (e.g. --model sd15)",
        )
    if model_source and "resolution" not in overrides and base_model != session.manifest.base_model:
        overrides["resolution"] = native_resolution(base_model)  # the stored size belongs to the old model
    overrides = family_overrides(base_model.family, session.manifest.training, overrides)
    config = merge_config(session.manifest.training, overrides)
    family = get_family(base_model.family)
    if config.buckets is None:  # the session follows its family; the run records what that meant
        config = config.replace(buckets=family.buckets_by_default)
    check_family_config(base_model.family, config)  # first: it says what the family cannot train at all
    check_config(config)
    check_images(session.path, session.manifest.images, masked=config.mask_background is not None)
    check_concepts(session.manifest)
    check_resolution(base_model, config.resolution, force=force_resolution)
    if config.training_mode == "lora" and config.lora_rank == 0:
        config = config.replace(lora_rank=DEFAULT_LORA_RANK)
    # before anything is written; other concepts' class images double the batch as the first's do
    memory_plan = plan_gpu_memory(base_model, counting_class_images(session.manifest, config))
    config = config.replace(**memory_plan.changes)
    quantization = memory_plan.quantization

    state = session.manifest.state
    checkpoints_dir = session.path / "checkpoints"
    found, damaged = checkpointing.scan_checkpoints(checkpoints_dir)
    if state.stage == "done" and not restart and not more:
        exported = ", ".join(
            model.files.get("single_file") or model.name for model in session.manifest.models
        )
        raise NbkitError(
            f"session '{session.name}' has finished training"
            + (f" (its model: {exported})" if exported else "")
            + "; training it again would start from the base model and replace that model",
            path=session.path,
            fix=f"to train again from scratch, run it with {setting('restart')}; to use the model, open it "
            "in the web UI or convert it (`nbkit convert`)",
        )
    plan = RunPlan(
        base_model=base_model, config=config, clear_checkpoints=restart, notes=list(memory_plan.notes)
    )
    if restart:
        found = []
    elif more:
        plan.resume_from, plan.from_model, note = plan_more(session, config, found)
        plan.notes += [note] if note else []
    elif found or damaged or state.last_checkpoint:
        if not resume:
            newest = found[-1].path.name if found else state.last_checkpoint
            raise NbkitError(
                f"the session has an unfinished run (last checkpoint {newest})",
                path=checkpoints_dir,
                fix=f"continue it with {setting('resume')}, or start over with {setting('restart')} "
                "(which deletes its checkpoints)",
            )
        plan.resume_from = found[-1] if found else None
        newest = plan.resume_from.order if plan.resume_from else (-1, -1)
        plan.skipped = [
            (path, why)
            for path, why in damaged
            if (checkpoint := checkpointing.checkpoint_at(path)) and checkpoint.order > newest
        ]
        if plan.resume_from is None and state.last_checkpoint and not plan.skipped:
            missing = session.path / state.last_checkpoint
            plan.skipped = [(missing, "the folder is gone")]
    if plan.resume_from is not None:
        saved = plan.resume_from.state()
        if config.seed is None:
            config = config.replace(seed=saved["config"]["seed"])
        check_resume(
            config,
            base_model,
            saved,
            plan.resume_from.path,
            quantization=quantization,
            concepts=concept_settings(session.manifest),
        )
    if config.seed is None:  # a random one, as fast-DreamBooth; shown and saved, so runs can be repeated
        config = config.replace(seed=random.SystemRandom().randint(1, 999_999))
    plan.config = config
    plan.recrop = [record.file for record in session.manifest.images if not fits(record, plan.sizing)]
    return plan


def describe_skipped(plan: RunPlan) -> list[str]:
    """One line per checkpoint a resume passes over, saying why and where it resumes instead."""
    target = plan.resume_from.path.name if plan.resume_from else "the start (no good checkpoint is left)"
    return [
        f"checkpoint {path.name} was skipped: {why}; resuming from {target}" for path, why in plan.skipped
    ]


def start_run(session: Session, plan: RunPlan) -> None:
    """Write the plan into the session as the run really starts (main process, lock held)."""
    checkpoints_dir = session.path / "checkpoints"
    if plan.clear_checkpoints:
        checkpointing.prune(checkpoints_dir, keep=0)
    manifest = session.manifest
    manifest.base_model = plan.base_model
    manifest.training = plan.config
    if plan.from_model is not None:
        pass  # training more from the exported model: the session stays `done` until its first checkpoint
    elif plan.resume_from is None:
        manifest.state = TrainingState()
    else:
        manifest.state = TrainingState(
            stage=plan.resume_from.stage,
            step=plan.resume_from.step,
            last_checkpoint=plan.resume_from.path.relative_to(session.path).as_posix(),
        )
