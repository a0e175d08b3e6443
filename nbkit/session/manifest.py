"""`session.json`: the manifest of one session, as dataclasses.

The manifest is the single source of truth about a session: which base model it trains, which images
and captions it uses, the training settings, how far training got, and what was run. It carries a
`schema_version`; `upgrade` turns any older manifest into the current shape, and `Manifest.from_dict`
rejects unknown keys so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from nbkit.config import StrictConfig
from nbkit.errors import NbkitError
from nbkit.families import DEFAULT_FAMILY
from nbkit.session.settings import TrainConfig

SCHEMA_VERSION = 5

Stage = Literal["idle", "text_encoder", "unet", "done"]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class BaseModelRef(StrictConfig):
    """The base model a session trains on.

    Args:
        source: a registry key (e.g. `sd15`), a hub repo id, a local folder or file, or a URL.
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        prediction_type: `epsilon` or `v_prediction`; `flow` for FLUX.1.
        revision: a hub revision, if pinned.

    The training size is not here: it is `training.resolution`, the one place it lives (the model's
    native size is a registry fact, `nbkit.train.inputs.native_resolution`).
    """

    source: str
    family: str
    prediction_type: str = "epsilon"
    revision: str | None = None


@dataclasses.dataclass
class ImageRecord(StrictConfig):
    """One instance image the session trains on (paths are relative to the session folder).

    `file` is the processed copy training reads (`width` x `height`); `original` the upload as it was.
    `sha256` hashes the decoded upright RGB pixels of the original (`nbkit.images.checks.pixel_sha256`),
    so a renamed or re-saved copy of the same photo is recognised. `caption` is the full caption
    training uses; `token` the instance token from the file name (what fast-DreamBooth trains on
    without external captions). Boxes are `[left, top, right, bottom]` in pixels of the upright original.
    `caption_source` says who wrote the caption: the file name's token, a .txt file, the editor, or a
    captioning model (`auto`, the model in `caption_model`; `nbkit.images.autocaption`).
    `mask` is the subject mask cropped like `file`, `mask_original` the mask as given ("" without one;
    `nbkit.images.masks`); `mask_source` says where it came from: a file, or CLIPSeg (`auto`;
    `nbkit.images.automask`).
    `concept` names the concept the photo shows ("": the session's first; `nbkit.session.concepts`).
    """

    file: str
    original: str
    sha256: str
    caption: str
    width: int
    height: int
    notes: list[str] = dataclasses.field(default_factory=list)
    source: str = ""
    token: str = ""
    caption_source: Literal["filename", "txt", "editor", "auto"] = "filename"
    caption_model: str = ""
    original_width: int = 0
    original_height: int = 0
    crop: Literal["smart", "center", "none"] = "smart"
    focus: Literal["face", "saliency", "center", "none", "manual"] = "center"
    crop_box: list[int] | None = None
    face_box: list[int] | None = None
    mask: str = ""
    mask_original: str = ""
    mask_source: Literal["file", "auto"] = "file"
    concept: str = ""


@dataclasses.dataclass
class Concept(StrictConfig):
    """A subject (or style) a session trains beside its first one (`nbkit.session.concepts`).

    The first concept ("") has no record: its class word and class images are `training.prior`'s and
    its repeats 1.

    Args:
        name: the concept's name, also its class images' folder (`class_images/<name>/`).
        class_prompt: its class word or prompt ("dog"), what its class images show ("" for none).
        class_images: class images made of it for prior preservation (0: none).
        repeats: how often each of its photos is drawn per epoch, relative to the first concept's 1.
    """

    name: str
    class_prompt: str = ""
    class_images: int = 0
    repeats: int = 1


@dataclasses.dataclass
class TrainingState(StrictConfig):
    """How far training got: the stage, its step, and the last good checkpoint (relative to the session
    folder), which a resume starts from. The seed is `training.seed`."""

    stage: Stage = "idle"
    step: int = 0
    last_checkpoint: str | None = None


@dataclasses.dataclass
class RunRecord(StrictConfig):
    """One entry of the session's history: a training run, a conversion, an import."""

    kind: str
    started: str
    finished: str | None = None
    status: Literal["running", "ok", "failed", "interrupted"] = "running"
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExportedModel(StrictConfig):
    """A model the session exported; every path is relative to the session folder.

    The web UI's model list and the notebooks read these records instead of globbing `models/`.

    Args:
        name: unique in the session (the session name for the final export).
        kind: `full` (a diffusers folder and a single file) or `lora` (adapters applied on `base_model`).
        files: role -> path: `folder` and `single_file` for a full model; `diffusers` and `kohya` for a LoRA.
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        resolution: the size it was trained at, in pixels.
        base_model: the source it was trained from (what a LoRA is applied on).
        stage: the training stage it came from (`unet`, `text_encoder`).
        step: the optimizer step of that stage.
        created: when it was written.
        sha256: path -> sha256 of each single file (A1111's full hash; the short hash is its first 10 hex).
        versions: package -> version of nbkit, torch, diffusers, transformers, peft, accelerate used.
    """

    name: str
    kind: Literal["full", "lora"]
    files: dict[str, str]
    family: str
    resolution: int
    base_model: str
    stage: str = "unet"
    step: int = 0
    created: str = dataclasses.field(default_factory=now_iso)
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def prompt_tag(self, weight: float = 1.0) -> str:
        """What a prompt adds to use this model in the web UI: `<lora:name:1>` for a LoRA, else ""."""
        if self.kind != "lora" or "kohya" not in self.files:
            return ""
        return f"<lora:{PurePosixPath(self.files['kohya']).stem}:{weight:g}>"


@dataclasses.dataclass
class Manifest(StrictConfig):
    name: str
    schema_version: int = SCHEMA_VERSION
    created: str = dataclasses.field(default_factory=now_iso)
    updated: str = dataclasses.field(default_factory=now_iso)
    base_model: BaseModelRef | None = None
    training: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    state: TrainingState = dataclasses.field(default_factory=TrainingState)
    images: list[ImageRecord] = dataclasses.field(default_factory=list)
    concepts: list[Concept] = dataclasses.field(default_factory=list)
    history: list[RunRecord] = dataclasses.field(default_factory=list)
    models: list[ExportedModel] = dataclasses.field(default_factory=list)

    def record_run(
        self, kind: str, status: str, detail: dict[str, Any] | None = None, *, started: str | None = None
    ) -> RunRecord:
        """Append a finished entry to the history (the one way runs are recorded); the caller saves.

        Args:
            kind: what ran, e.g. `train`, `images`, `import`.
            status: `ok`, `failed`, `interrupted` (or `running`).
            detail: JSON-serialisable facts about the run.
            started: when it started (default: now).
        """
        stamp = now_iso()
        record = RunRecord.from_dict(
            {
                "kind": kind,
                "started": started or stamp,
                "finished": stamp,
                "status": status,
                "detail": dict(detail or {}),
            },
            where="run record",
        )
        self.history.append(record)
        return record

    def close_stale_runs(self) -> list[RunRecord]:
        """Mark runs still `running` as `interrupted`: called with the session's lock held, when no run
        can still be going (a killed kernel never closes its record)."""
        stale = [record for record in self.history if record.status == "running"]
        for record in stale:
            record.status, record.finished = "interrupted", now_iso()
            record.detail.setdefault("note", "the process stopped without closing this run (killed?)")
        return stale

    def add_model(self, model: ExportedModel) -> None:
        """Record an exported model, replacing an earlier record of the same name."""
        self.models = [known for known in self.models if known.name != model.name] + [model]


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 (nbkit 0.0) kept a flat layout: model id, resolution and step counts at the top level."""
    data = dict(data)
    upgraded: dict[str, Any] = {"name": data.pop("name"), "schema_version": 2}
    for key in ("created", "updated"):
        if key in data:
            upgraded[key] = data.pop(key)
    model = data.pop("model", None)
    resolution = data.pop("resolution", 512)
    if model:
        upgraded["base_model"] = {
            "source": model,
            "family": data.pop("family", DEFAULT_FAMILY),
            "prediction_type": "v_prediction" if data.pop("v_prediction", False) else "epsilon",
            "resolution": resolution,
        }
    training = {"resolution": resolution}
    for old, new in (
        ("unet_steps", "unet_steps"),
        ("unet_lr", "unet_lr"),
        ("text_encoder_steps", "text_encoder_steps"),
        ("text_encoder_lr", "text_encoder_lr"),
        ("seed", "seed"),
    ):
        if old in data:
            training[new] = data.pop(old)
    upgraded["training"] = training
    if "step" in data:
        upgraded["state"] = {"step": data.pop("step"), "stage": data.pop("stage", "idle")}
    data.pop("schema_version", None)
    if data:
        raise NbkitError(f"unknown key '{sorted(data)[0]}' in a schema 1 session.json")
    return upgraded


def _upgrade_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 kept the resolution twice (base model and training) and the seed twice (state and training)."""
    data = {**data, "schema_version": 3}
    training = dict(data.get("training") or {})
    base = data.get("base_model")
    if base is not None:
        base = dict(base)
        resolution = base.pop("resolution", None)
        training.setdefault("resolution", resolution or 512)
        data["base_model"] = base
    state = dict(data.get("state") or {})
    seed = state.pop("seed", None)
    if training.get("seed") is None and seed is not None:
        training["seed"] = seed
    training.pop("external_captions", None)  # nothing ever read it
    data["training"], data["state"] = training, state
    return data


def _upgrade_v3(data: dict[str, Any]) -> dict[str, Any]:
    """v3 had no aspect-ratio buckets: a session with images keeps its square crops (`buckets` false);
    one without takes its family's default when it gets some."""
    data = {**data, "schema_version": 4}
    if data.get("images"):
        data["training"] = {**(data.get("training") or {}), "buckets": False}
    return data


def _upgrade_v4(data: dict[str, Any]) -> dict[str, Any]:
    """v4 had one concept per session: every photo is the first concept's, as before."""
    return {**data, "schema_version": 5}


_UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2, 3: _upgrade_v3, 4: _upgrade_v4}


def upgrade(data: dict[str, Any], *, where: str = "session.json") -> dict[str, Any]:
    """Bring a manifest dict of any known schema version up to `SCHEMA_VERSION`."""
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise NbkitError(f"{where} has no integer schema_version", fix="restore it from a backup or export")
    if version > SCHEMA_VERSION:
        raise NbkitError(
            f"{where} has schema_version {version}, newer than this nbkit understands ({SCHEMA_VERSION})",
            fix="upgrade nbkit (pip install -U nbkit)",
        )
    while version < SCHEMA_VERSION:
        data = _UPGRADES[version](data)
        version = data["schema_version"]
    return data


def load_manifest(data: dict[str, Any], *, where: str = "session.json") -> Manifest:
    return Manifest.from_dict(upgrade(data, where=where), where=where)
