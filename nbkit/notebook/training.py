"""The notebooks' training cells: train (with a live view), scores, export, the Hub, disconnect."""

from __future__ import annotations

from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.notebook.cells import backbone, bucket_choice
from nbkit.notebook.progress import LiveTraining
from nbkit.notebook.state import friendly, need_session, need_trained, state
from nbkit.notebook.widgets import show_image
from nbkit.session.concepts import concept_prompts

# The form's number fields: "auto" (or "") keeps the session's setting, which starts at the family's.
NUMBERS = {
    "resolution": ("RESOLUTION", int),
    "text_encoder_steps": ("TEXT_ENCODER_STEPS", int),
    "unet_steps": ("UNET_STEPS", int),
    "text_encoder_lr": ("TEXT_ENCODER_LR", float),
    "unet_lr": ("UNET_LR", float),
    "lora_rank": ("LORA_RANK", int),
    "checkpoint_every": ("CHECKPOINT_EVERY", int),
    "sample_steps": ("SAMPLE_STEPS", int),
    "caption_dropout": ("CAPTION_DROPOUT", float),
    "mask_background": ("MASK_BACKGROUND", float),
}


def form_settings(values: dict) -> dict:
    """`TrainConfig` fields from the form's values: "auto", "" and None are left out, text is read as a
    number, and anything else is refused naming the form field."""
    settings = {}
    for key, value in values.items():
        field, kind = NUMBERS[key]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
            continue
        try:
            number = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise NbkitError(
                f"{field} = {value!r} is not a number",
                fix=f'write a number for {field} in Settings, or "auto" for the session\'s setting',
            ) from None
        if kind is int and number != float(value):
            raise NbkitError(
                f"{field} = {value!r} is not a whole number", fix=f"use a whole number in {field}"
            )
        settings[key] = number
    return settings


def _stopped_training() -> str:
    from nbkit.session.core import Session

    opened = state.session
    if opened is None:
        return "Nothing was trained."
    saved = Session.open(opened.name, root=state.root).manifest.state  # as saved, not as held
    if not saved.last_checkpoint:
        return (
            "No checkpoint of this run was saved yet. To start it again: tick RESUME_TRAINING in Settings "
            "and run all."
        )
    return (
        f"The session keeps checkpoint {Path(saved.last_checkpoint).name} ({saved.stage} step {saved.step}); "
        "nothing else is lost. To continue from it: tick RESUME_TRAINING in Settings and run all."
    )


@friendly(_stopped_training)
def train(
    *,
    resume: bool = False,
    restart: bool = False,
    more: bool = False,
    sample_prompt: str = "",
    buckets: str = "auto",
    **numbers,
) -> None:
    """Train (text encoder, then UNet or transformer), showing the step, the time left, each
    checkpoint's sample grid and the loss plot as they come.

    A finished session is left as it is (with a note naming the fields that train it again), so "Run
    all" goes on to the export and the web UI.

    Args:
        resume: continue from the last checkpoint after a disconnect or a stop.
        restart: start over (an unfinished run's checkpoints are deleted).
        more: train a finished session further, to the new UNET_STEPS.
        sample_prompt: the prompt sampled at each checkpoint ("" uses the first caption of each
            concept's photos).
        buckets: `on`/`off` trains in aspect-ratio buckets or squares (photos cropped again to suit);
            `auto` keeps the session's setting.
        numbers: the form's numbers (`resolution`, `unet_steps`, `unet_lr`, ... as in `NUMBERS`).
    """
    from nbkit.images import check_captions
    from nbkit.train import train as run_training

    opened = need_session()
    check_captions(opened)
    if opened.manifest.state.stage == "done" and not (restart or more):
        model = opened.manifest.models[-1].name if opened.manifest.models else "none"
        print(
            f"Session '{opened.name}' is trained already (model {model}). To train it further, tick "
            "TRAIN_MORE with a larger UNET_STEPS; to train it again from scratch, tick RESTART_TRAINING."
        )
        return
    settings = form_settings(numbers)
    if (wanted := bucket_choice(buckets)) is not None:
        settings["buckets"] = wanted
    prompts = [sample_prompt] if sample_prompt else concept_prompts(opened.manifest)
    if prompts:
        settings["sample_prompts"] = prompts
    live = LiveTraining()
    state.result = run_training(opened, settings, resume=resume, restart=restart, more=more, on_progress=live)
    result = state.result
    print(f"{live.status}. Model: {result.single_file or ', '.join(map(str, result.lora_files.values()))}")


@friendly()
def scores() -> None:
    """Score every checkpoint's samples (likeness, prompt fit, copies of a photo) and suggest one."""
    from nbkit.vision.scoring import format_table, kept_checkpoints, score_session

    opened = need_session()
    dino, clip = backbone("dino"), backbone("clip")
    if dino is None:
        print("Scoring is off (NBKIT_VISION_MODELS=off)")
        return
    table, paths = score_session(opened, dino=dino, clip=clip)
    print(format_table(table, kept_checkpoints(opened)))
    show_image(paths.get("plot"))
    print('EXPORT = "suggested" in the Export cell exports the suggested checkpoint')


@friendly("the export was not finished; the session is as before: run the cell again")
def export(which: str = "last", *, file_format: str = "safetensors") -> None:
    """Export the final model, the suggested checkpoint, or a named one, as a single file.

    Args:
        which: `last` (the final model, written by training), `suggested` (the Scores cell's pick) or
            a checkpoint folder's name (`unet-000500`).
        file_format: `safetensors` or `ckpt` (a full fine-tune only; a LoRA is .safetensors).
    """
    from nbkit.convert import convert_to_single_file
    from nbkit.train.export_checkpoint import export_checkpoint

    opened = need_trained()
    record = opened.manifest.models[-1] if which in ("", "last") else export_checkpoint(opened, which)
    if which not in ("", "last"):
        print(f"Exported the checkpoint at {record.stage} step {record.step} as model {record.name}")
    for role, path in record.files.items():
        print(f"{role}: {opened.path / path}")
    if file_format == "ckpt" and record.kind == "full":
        out = (opened.path / record.files["single_file"]).with_suffix(".ckpt")
        convert_to_single_file(opened.path / record.files["folder"], out, family=record.family)
        print(f"ckpt: {out}")


@friendly("nothing was uploaded in part: a Hub commit is all or nothing; run the cell again")
def upload(repo_id: str, *, public: bool = False) -> None:
    """Upload the session's model, samples and a model card to the Hugging Face Hub ("" skips).

    The token comes from Colab's `HF_TOKEN` secret (or `$HF_TOKEN`) and is never shown.

    Args:
        repo_id: `you/model-name`.
        public: make a new repository public (private by default).
    """
    from nbkit.session.hub_upload import upload_to_hub

    if not repo_id.strip():
        return
    opened = need_trained()
    url = upload_to_hub(opened, repo_id.strip(), private=not public)
    print(f"Uploaded to {url}")


@friendly()
def disconnect(when: bool) -> None:
    """Give the Colab runtime back (saves compute units) once the session is safely on Drive.

    Args:
        when: the form's `DISCONNECT_AFTER_TRAINING`; False does nothing.
    """
    if not when:
        return
    opened = need_trained()
    try:
        from google.colab import drive, runtime  # type: ignore[import-not-found]
    except ImportError:
        print("Not on Colab: there is no runtime to disconnect")
        return
    if str(opened.path).startswith("/content/drive"):
        drive.flush_and_unmount()  # Drive writes are asynchronous: everything reaches Drive first
    print("The session is on Drive; disconnecting the runtime")
    runtime.unassign()


__all__ = ["disconnect", "export", "scores", "train", "upload"]
