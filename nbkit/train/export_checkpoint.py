"""Export one training checkpoint (a chosen one, or the suggested one) as a model of the session.

The checkpoint's weights go into the base model (`nbkit.train.grid.CheckpointLoader`) and are saved
as the final export is (`nbkit.train.export`): a full fine-tune as a diffusers folder and a single
file, a LoRA in diffusers and kohya formats. The record in `session.json`'s `models` is named
`<session>-<checkpoint>`, so it sits next to the final export instead of replacing it.
"""

from __future__ import annotations

import json

from nbkit.errors import NbkitError

SUGGESTED = "suggested"


def suggested_checkpoint(session) -> str:
    """The checkpoint `logs/vision_scores.json` suggests (written by `nbkit vision score` or `--score`).

    Args:
        session: an open `nbkit.session.core.Session`.
    """
    path = session.dir("logs") / "vision_scores.json"
    fix = (
        "score the checkpoints first (`nbkit vision score SESSION`, training with score on, or the "
        "notebook's Scores cell), or name a checkpoint."
    )
    try:
        suggested = json.loads(path.read_text(encoding="utf-8")).get("suggested_checkpoint")
    except FileNotFoundError:
        raise NbkitError(
            "there are no checkpoint scores to take a suggestion from.", path=path, fix=fix
        ) from None
    except (OSError, ValueError, AttributeError) as error:
        raise NbkitError(f"the checkpoint scores cannot be read: {error}.", path=path, fix=fix) from None
    if not suggested:
        raise NbkitError(
            "the scores suggest no checkpoint: every one memorised a training photo.",
            path=path,
            fix="name a checkpoint (one the score table lists), or train with fewer steps or more photos.",
        )
    return suggested


def export_checkpoint(session, checkpoint: str = SUGGESTED, *, device: str | None = None):
    """Export a checkpoint as the model `<session>-<checkpoint>` and record it in `session.json`.

    Args:
        session: an open `nbkit.session.core.Session` (its lock is held while exporting).
        checkpoint: a checkpoint folder name (`unet-000500`) or `suggested`.
        device: `cuda` or `cpu` for loading the weights.

    Returns:
        the `nbkit.session.manifest.ExportedModel` recorded.
    """
    from nbkit.train.export import export_session_model
    from nbkit.train.grid import CheckpointLoader, session_checkpoints

    name = suggested_checkpoint(session) if checkpoint == SUGGESTED else checkpoint
    (found,) = session_checkpoints(session, [name])
    state = found.state()
    with session.lock("export"):
        loader = CheckpointLoader(device)
        record, _ = export_session_model(
            session,
            loader.load(found),
            state["roles"],
            name=f"{session.name}-{name}",
            config=state["config"],
            base_model=state["base_model"],
            steps={found.stage: found.step},
            stage=found.stage,
            step=found.step,
            dtype=loader.dtype,
        )
        session.save()
    return record
