"""Score the samples of each training checkpoint against the instance photos, and suggest one.

Per checkpoint, as in the DreamBooth paper: DINO and CLIP-I subject fidelity (mean cosine of each
sample to the instance photos), CLIP-T prompt fidelity (cosine of sample and prompt), diversity (mean
pairwise 1 - DINO cosine among the samples of one prompt, averaged over prompts with two or more), and
memorisation (a sample whose DINO cosine to a training photo, either mirrored, is >= `memorised`).
The suggested checkpoint has the best mean of DINO and CLIP-I fidelity among those not memorising.

Samples are read from `outputs/samples/`: per-image folders `<checkpoint>/*.png` (each with its A1111
infotext), or the grids `<checkpoint>.png` training saves (cut back into tiles with the prompts of their
`nbkit-samples` infotexts).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text
from nbkit.generation.infotext import parse_infotext
from nbkit.session.concepts import concept_for_prompt, concepts
from nbkit.vision.embeddings import embed_cached, image_content_key

MEMORISED_COSINE = 0.95
SAMPLES_KEY = "nbkit-samples"
MAX_COLUMNS = 4


@dataclasses.dataclass
class Sample:
    prompt: str
    image: Image.Image


@dataclasses.dataclass
class CheckpointScore:
    """One row of the score table (None where the backbone or enough samples were missing)."""

    checkpoint: str
    samples: int
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    diversity: float | None
    max_similarity: float
    memorised: bool
    concept: str = ""

    @property
    def fidelity(self) -> float:
        values = [value for value in (self.dino, self.clip_i) if value is not None]
        return sum(values) / len(values) if values else float("-inf")


def split_grid(path: str | os.PathLike) -> list[Sample]:
    """Cut a training sample grid (`nbkit.train.samples.make_grid`) back into its tiles.

    Args:
        path: the grid PNG with its `nbkit-samples` text chunk.
    """
    with Image.open(path) as grid:
        grid.load()
        text = grid.info.get(SAMPLES_KEY)
        if not text:
            raise NbkitError(
                "This sample grid has no nbkit-samples text, so its tiles are unknown.", path=path
            )
        infos = [parse_infotext(info) for info in json.loads(text)]
        width, height = (int(part) for part in infos[0].parameters["Size"].split("x"))
        columns = min(MAX_COLUMNS, len(infos))
        rows = math.ceil(len(infos) / columns)
        row_height = grid.height // rows
        samples = []
        for index, info in enumerate(infos):
            left, top = (index % columns) * width, (index // columns) * row_height
            samples.append(
                Sample(info.prompt, grid.crop((left, top, left + width, top + height)).convert("RGB"))
            )
    return samples


def read_image_sample(path: Path) -> Sample:
    with Image.open(path) as image:
        image.load()
        text = image.info.get("parameters", "")
        return Sample(parse_infotext(text).prompt if text else "", image.convert("RGB"))


def collect_samples(samples_dir: str | os.PathLike) -> dict[str, list[Sample]]:
    """Read every checkpoint's samples under `samples_dir` (per-image folders win over grids).

    Args:
        samples_dir: the session's `outputs/samples`.

    Returns:
        checkpoint name -> samples, in name order.
    """
    samples_dir = Path(samples_dir)
    found: dict[str, list[Sample]] = {}
    if not samples_dir.is_dir():
        return found
    for entry in sorted(samples_dir.iterdir()):
        if entry.is_dir():
            files = sorted(entry.glob("*.png"))
            if files:
                found[entry.name] = [read_image_sample(file) for file in files]
        elif entry.suffix == ".png" and entry.stem not in found and not (samples_dir / entry.stem).is_dir():
            found[entry.stem] = split_grid(entry)
    return dict(sorted(found.items()))


def _embed(backbone, images: Sequence[Image.Image], cache_dir, *, flip: bool = False):
    keys = [image_content_key(image) for image in images]
    return embed_cached(backbone, images, keys, cache_dir, flip=flip)


def score_checkpoints(
    samples: dict[str, list[Sample]],
    instance_images: Sequence[Image.Image],
    *,
    dino=None,
    clip=None,
    memorised: float = MEMORISED_COSINE,
    cache_dir: str | os.PathLike | None = None,
) -> list[CheckpointScore]:
    """Score each checkpoint's samples.

    Args:
        samples: checkpoint name -> samples (`collect_samples`).
        instance_images: the training photos.
        dino: the DINO backbone (or any image embedder); None skips DINO and memorisation by DINO.
        clip: the CLIP backbone; None skips CLIP-I and CLIP-T.
        memorised: cosine to a training photo at or above which a sample counts as a copy of it.
        cache_dir: embedding cache folder.
    """
    if not instance_images:
        raise NbkitError(
            "The session has no instance images to compare samples with.", fix="Add photos first."
        )
    if dino is None and clip is None:
        raise ValueError("give a DINO or a CLIP backbone (or both)")
    memory_model = dino or clip
    references = {}
    for name, backbone in (("dino", dino), ("clip", clip)):
        if backbone is not None:
            references[name] = _embed(backbone, instance_images, cache_dir)
    flipped_reference = _embed(memory_model, instance_images, cache_dir, flip=True)
    scores = []
    for checkpoint, items in samples.items():
        images = [item.image for item in items]
        values: dict[str, float | None] = {"dino": None, "clip_i": None, "clip_t": None, "diversity": None}
        if dino is not None:
            embedded = _embed(dino, images, cache_dir)
            values["dino"] = float((embedded @ references["dino"].T).mean())
            values["diversity"] = _diversity(embedded, [item.prompt for item in items])
        if clip is not None:
            embedded_clip = _embed(clip, images, cache_dir)
            values["clip_i"] = float((embedded_clip @ references["clip"].T).mean())
            texts = clip.embed_texts([item.prompt for item in items])
            values["clip_t"] = float((embedded_clip * texts).sum(-1).mean())
            if dino is None:
                values["diversity"] = _diversity(embedded_clip, [item.prompt for item in items])
        memory = embedded if dino is not None else embedded_clip
        nearest = max(
            float((memory @ references["dino" if dino is not None else "clip"].T).max()),
            float((memory @ flipped_reference.T).max()),
        )
        scores.append(
            CheckpointScore(
                checkpoint, len(items), **values, max_similarity=nearest, memorised=nearest >= memorised
            )
        )
    return scores


def _diversity(embedded, prompts: Sequence[str]) -> float | None:
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    per_prompt = []
    for indices in groups.values():
        if len(indices) < 2:
            continue
        group = embedded[indices]
        similarity = group @ group.T
        count = len(indices)
        off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1))
        per_prompt.append(1.0 - float(off_diagonal))
    return sum(per_prompt) / len(per_prompt) if per_prompt else None


def suggest_checkpoint(scores: Sequence[CheckpointScore], kept: Collection[str] | None = None) -> str | None:
    """The checkpoint with the best fidelity (mean of DINO and CLIP-I) that memorises no photo.

    Ties go to the earlier checkpoint (less training, less overfitting). None when all memorise.

    Args:
        scores: `score_checkpoints`' rows.
        kept: the checkpoints still in the session (None: all); the others were pruned and cannot be
            exported, so they are never suggested.
    """
    # With several concepts a checkpoint has a row each: it memorises if one does, and its fidelity
    # is their mean; one without a row for every concept is not compared with those that have.
    rows: dict[str, list[CheckpointScore]] = {}
    for score in scores:
        rows.setdefault(score.checkpoint, []).append(score)
    every = {score.concept for score in scores}
    fidelity = {
        name: sum(row.fidelity for row in group) / len(group)
        for name, group in rows.items()
        if not any(row.memorised for row in group)
        and {row.concept for row in group} == every
        and (kept is None or name in kept)
    }
    if not fidelity:
        return None
    best = max(fidelity.values())
    return next(name for name, value in fidelity.items() if value == best)


COLUMNS = ("checkpoint", "samples", "dino", "clip_i", "clip_t", "diversity", "max_similarity", "memorised")


def _columns(scores: Sequence[CheckpointScore]) -> tuple[str, ...]:
    """The table's columns: with a `concept` column after the checkpoint when the rows are per concept."""
    if any(score.concept for score in scores):
        return (COLUMNS[0], "concept", *COLUMNS[1:])
    return COLUMNS


def write_scores(
    logs_dir: str | os.PathLike, scores: Sequence[CheckpointScore], kept: Collection[str] | None = None
) -> dict[str, Path]:
    """Write the table (`vision_scores.csv`, `vision_scores.json` with the suggestion) and the plot
    (`vision_scores.png`) into the session's `logs/`, atomically.

    Args:
        logs_dir: the session's `logs` folder.
        scores: the rows.
        kept: the checkpoints still in the session (see `suggest_checkpoint`).

    Returns:
        `{"csv": ..., "json": ..., "plot": ...}`.
    """
    logs_dir = Path(logs_dir)
    columns = _columns(scores)
    rows = [{column: getattr(score, column) for column in columns} for score in scores]
    suggested = suggest_checkpoint(scores, kept)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "csv": logs_dir / "vision_scores.csv",
        "json": logs_dir / "vision_scores.json",
        "plot": logs_dir / "vision_scores.png",
    }
    atomic_write_text(paths["csv"], text.getvalue())
    atomic_write_json(
        paths["json"],
        {"suggested_checkpoint": suggested, "memorised_cosine": MEMORISED_COSINE, "scores": rows},
    )
    atomic_write_bytes(paths["plot"], _plot(scores, suggested))
    return paths


def _plot(scores: Sequence[CheckpointScore], suggested: str | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    names = list(dict.fromkeys(score.checkpoint for score in scores))
    positions = list(range(len(names)))
    # A line per score and concept (one concept: its lines are named by the score alone).
    by_concept: dict[str, dict[str, CheckpointScore]] = {}
    for score in scores:
        by_concept.setdefault(score.concept, {})[score.checkpoint] = score
    for concept, rows in by_concept.items():
        for column, label in (
            ("dino", "DINO"),
            ("clip_i", "CLIP-I"),
            ("clip_t", "CLIP-T"),
            ("diversity", "diversity"),
        ):
            values = [getattr(rows[name], column) if name in rows else None for name in names]
            if any(value is not None for value in values):
                axes.plot(
                    positions,
                    [math.nan if v is None else v for v in values],
                    marker="o",
                    label=f"{label} ({concept})" if concept else label,
                )
    for position, name in enumerate(names):
        if any(score.memorised for score in scores if score.checkpoint == name):
            axes.axvspan(position - 0.4, position + 0.4, color="red", alpha=0.15)
    if suggested in names:
        axes.axvline(names.index(suggested), color="green", linestyle="--", label=f"suggested: {suggested}")
    axes.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("cosine")
    axes.set_title("Sample scores per checkpoint (red: memorised a photo)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def format_table(scores: Sequence[CheckpointScore], kept: Collection[str] | None = None) -> str:
    """The score table as aligned text, with the suggestion underneath.

    Args:
        scores: the rows.
        kept: the checkpoints still in the session (see `suggest_checkpoint`).
    """

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3f}"
        return "-" if value is None else str(value)

    columns = _columns(scores)
    rows = [columns] + [tuple(cell(getattr(score, column)) for column in columns) for score in scores]
    widths = [max(len(row[index]) for row in rows) for index in range(len(columns))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    suggested = suggest_checkpoint(scores, kept)
    lines.append(
        f"suggested checkpoint: {suggested}"
        if suggested
        else "suggested checkpoint: none (every one memorised a photo)"
    )
    return "\n".join(lines)


def instance_photos(session, concept: str | None = None) -> tuple[list[str], list[Image.Image], list[str]]:
    """The session's processed instance photos: `(files, images, content keys)`.

    Args:
        session: an open `nbkit.session.core.Session`.
        concept: only this concept's photos ("": the first's); None: all.
    """
    from nbkit.vision.embeddings import load_images

    records = session.manifest.images
    files = [record.file for record in records if concept is None or record.concept == concept]
    images, keys = load_images([session.path / file for file in files])
    return files, images, keys


def score_session(
    session, *, dino=None, clip=None, memorised: float = MEMORISED_COSINE
) -> tuple[list[CheckpointScore], dict[str, Path]]:
    """Score every checkpoint's samples in a session and write the table and plot into `logs/`.

    With several concepts (`nbkit.session.concepts`) each sample is scored against the photos of the
    concept whose token its prompt names, giving a row per checkpoint and concept; samples naming no
    concept's token (or several) are left out of those rows. When no sample names one, every sample is
    scored against all the photos, as in a session of one concept.

    Args:
        session: an open `nbkit.session.core.Session`.
        dino: DINO backbone (or None).
        clip: CLIP backbone (or None).
        memorised: see `score_checkpoints`.
    """
    samples = collect_samples(session.dir("outputs") / "samples")
    if not samples:
        raise NbkitError(
            "the session has no checkpoint samples to score",
            path=session.dir("outputs") / "samples",
            fix="train with a sample prompt (`nbkit train SESSION --sample-prompt TEXT`, with --restart for a "
            "finished session) so each checkpoint saves samples",
        )
    _, images, _ = instance_photos(session)
    cache_dir = session.dir("logs") / "vision_cache"
    options = {"dino": dino, "clip": clip, "memorised": memorised, "cache_dir": cache_dir}
    views = [view for view in concepts(session.manifest) if view.images]
    scores = []
    if len(views) > 1:
        for view in views:
            mine = {
                name: chosen
                for name, items in samples.items()
                if (chosen := [item for item in items if concept_for_prompt(views, item.prompt) == view])
            }
            if mine:
                rows = score_checkpoints(mine, [images[index] for index in view.images], **options)
                scores += [dataclasses.replace(row, concept=view.label) for row in rows]
        scores.sort(key=lambda row: row.checkpoint)
    if not scores:  # one concept, or no prompt names one concept's token: every sample against all photos
        scores = score_checkpoints(samples, images, **options)
    return scores, write_scores(session.dir("logs"), scores, kept_checkpoints(session))


def kept_checkpoints(session) -> set[str]:
    """The names of the checkpoint folders still in the session (older ones are pruned by training)."""
    folder = session.path / "checkpoints"
    return {entry.name for entry in folder.iterdir() if entry.is_dir()} if folder.is_dir() else set()


DINO_ENV = "NBKIT_VISION_DINO"
CLIP_ENV = "NBKIT_VISION_CLIP"
_BACKBONES: dict[tuple[str, str | None], Any] = {}


def scoring_backbones(device: str | None = None) -> tuple[Any, Any]:
    """The DINO and CLIP backbones training's `--score` uses, loaded once per process.

    `NBKIT_VISION_DINO` / `NBKIT_VISION_CLIP` name other models (hub id, folder, `tiny:dino`,
    `tiny:clip`) or `none`; the defaults are the registry's DINO ViT-S/16 and CLIP.

    Args:
        device: `cuda` or `cpu` (default: cuda when available).
    """
    from nbkit.vision.backbones import DEFAULT_CLIP, DEFAULT_DINO, load_backbone

    loaded = []
    for env, default in ((DINO_ENV, DEFAULT_DINO), (CLIP_ENV, DEFAULT_CLIP)):
        name = os.environ.get(env, default)
        if name == "none":
            loaded.append(None)
            continue
        if (name, device) not in _BACKBONES:
            _BACKBONES[name, device] = load_backbone(name, device=device)
        loaded.append(_BACKBONES[name, device])
    if loaded == [None, None]:
        raise NbkitError(
            f"{DINO_ENV} and {CLIP_ENV} are both 'none', which leaves nothing to score with.",
            fix=f"unset one of them (the defaults are {DEFAULT_DINO} and {DEFAULT_CLIP}).",
        )
    return loaded[0], loaded[1]


def score_after_checkpoint(
    session, *, device: str | None = None
) -> tuple[list[CheckpointScore], dict[str, Path]]:
    """Training's `--score` hook: score every checkpoint's samples so far and rewrite the table.

    Earlier checkpoints' embeddings come from the cache, so each call embeds only the new samples.

    Args:
        session: the training session (open).
        device: the training device.
    """
    dino, clip = scoring_backbones(device)
    scores, paths = score_session(session, dino=dino, clip=clip)
    print(format_table(scores, kept_checkpoints(session)), flush=True)
    return scores, paths
