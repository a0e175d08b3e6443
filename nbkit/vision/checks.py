"""Dataset checks: near-duplicate photo pairs and photos far from the rest (likely off-subject).

Two photos are near-duplicates when their embeddings are almost the same (cosine >= `duplicate`, also
comparing one with the other mirrored) or their difference hashes almost agree (>= `hash_duplicate`
of the 64 bits, also mirrored): copies, flips, re-encodes and slight shifts or crops of one shot
teach the model that one shot twice. A photo is an outlier when its mean cosine to the others is far
below the set's typical one: more than `outlier_z` robust deviations (1.4826 x the median absolute
deviation, at least `min_spread`) under the median. Nothing is removed: `nbkit images remove` does that.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import statistics
from collections.abc import Sequence

from PIL import Image, ImageOps

from nbkit.vision.embeddings import dhash, hash_similarity

DUPLICATE_COSINE = 0.95
DUPLICATE_HASH = 0.9
OUTLIER_Z = 3.0
MIN_SPREAD = 0.01


@dataclasses.dataclass
class DuplicatePair:
    first: str
    second: str
    cosine: float
    hash_similarity: float
    flipped: bool


@dataclasses.dataclass
class Outlier:
    file: str
    mean_cosine: float
    z: float


@dataclasses.dataclass
class DatasetReport:
    """The findings of `check_dataset`; `flags` maps a file to its short flags for the contact sheet."""

    files: list[str]
    duplicates: list[DuplicatePair]
    outliers: list[Outlier]
    mean_cosine: dict[str, float]
    thresholds: dict[str, float]

    @property
    def flags(self) -> dict[str, list[str]]:
        flags: dict[str, list[str]] = {file: [] for file in self.files}
        for pair in self.duplicates:
            flags[pair.first].append(f"near-duplicate of {pair.second}")
            flags[pair.second].append(f"near-duplicate of {pair.first}")
        for outlier in self.outliers:
            flags[outlier.file].append("far from the others (off-subject?)")
        return flags

    def explanation(self) -> str:
        t = self.thresholds
        return (
            f"Near-duplicates: embedding cosine >= {t['duplicate']:.2f} or difference-hash agreement >= "
            f"{t['hash_duplicate']:.2f} (either photo mirrored too); 1.00 is the same picture. "
            f"Outliers: mean cosine to the other photos more than {t['outlier_z']:g} robust deviations "
            f"under the median ({t['median']:.3f}, deviation {t['spread']:.3f}). "
            "Nothing was removed; use `nbkit images remove SESSION FILE` for photos you do not want."
        )

    def __str__(self) -> str:
        lines = [
            f"{len(self.files)} photos, {len(self.duplicates)} near-duplicate pairs, {len(self.outliers)} outliers"
        ]
        for pair in self.duplicates:
            how = " (mirrored)" if pair.flipped else ""
            lines.append(
                f"  near-duplicate{how}: {pair.first} ~ {pair.second} "
                f"(cosine {pair.cosine:.3f}, hash {pair.hash_similarity:.2f})"
            )
        for outlier in self.outliers:
            lines.append(
                f"  outlier: {outlier.file} (mean cosine {outlier.mean_cosine:.3f}, {outlier.z:.1f} deviations under)"
            )
        lines.append(self.explanation())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(file)}</td><td>{self.mean_cosine.get(file, float('nan')):.3f}</td>"
            f"<td>{html.escape('; '.join(flags)) or 'ok'}</td></tr>"
            for file, flags in self.flags.items()
        )
        return (
            "<table><tr><th>photo</th><th>mean cosine</th><th>flags</th></tr>"
            f"{rows}</table><p>{html.escape(self.explanation())}</p>"
        )


def check_dataset(
    files: Sequence[str],
    images: Sequence[Image.Image],
    embeddings,
    flipped_embeddings,
    *,
    duplicate: float = DUPLICATE_COSINE,
    hash_duplicate: float = DUPLICATE_HASH,
    outlier_z: float = OUTLIER_Z,
    min_spread: float = MIN_SPREAD,
) -> DatasetReport:
    """Find near-duplicate pairs and outliers.

    Args:
        files: a name per photo.
        images: the photos (for the difference hash).
        embeddings: `(N, D)` L2-normalised embeddings of the photos.
        flipped_embeddings: the same of the mirrored photos.
        duplicate: cosine at or above which two photos are near-duplicates.
        hash_duplicate: difference-hash agreement at or above which two photos are near-duplicates.
        outlier_z: robust deviations under the median mean-cosine that make an outlier.
        min_spread: the smallest deviation used, so a set of near-identical photos does not flag noise.
    """
    count = len(files)
    if not (len(images) == count == len(embeddings) == len(flipped_embeddings)):
        raise ValueError("files, images and embeddings must have the same length")
    cosine = (embeddings @ embeddings.T).tolist()
    mirrored = (embeddings @ flipped_embeddings.T).tolist()
    hashes = [dhash(image) for image in images]
    flipped_hashes = [dhash(ImageOps.mirror(image)) for image in images]
    duplicates = []
    for i, j in itertools.combinations(range(count), 2):
        flip_cos = max(mirrored[i][j], mirrored[j][i])
        flip_hash = max(
            hash_similarity(hashes[i], flipped_hashes[j]), hash_similarity(flipped_hashes[i], hashes[j])
        )
        same_hash = hash_similarity(hashes[i], hashes[j])
        if cosine[i][j] >= duplicate or same_hash >= hash_duplicate:
            duplicates.append(DuplicatePair(files[i], files[j], cosine[i][j], same_hash, False))
        elif flip_cos >= duplicate or flip_hash >= hash_duplicate:
            duplicates.append(DuplicatePair(files[i], files[j], flip_cos, flip_hash, True))
    mean_cosine = {}
    for i in range(count):
        others = [cosine[i][j] for j in range(count) if j != i]
        mean_cosine[files[i]] = sum(others) / len(others) if others else 1.0
    values = list(mean_cosine.values())
    median = statistics.median(values) if values else 1.0
    spread = (
        max(1.4826 * statistics.median(abs(v - median) for v in values), min_spread) if values else min_spread
    )
    outliers = []
    if count >= 4:  # with fewer photos "the rest" is no reference
        for file, value in mean_cosine.items():
            z = (median - value) / spread
            if z > outlier_z:
                outliers.append(Outlier(file, value, z))
        outliers.sort(key=lambda outlier: -outlier.z)
    thresholds = {
        "duplicate": duplicate,
        "hash_duplicate": hash_duplicate,
        "outlier_z": outlier_z,
        "median": median,
        "spread": spread,
    }
    return DatasetReport(list(files), duplicates, outliers, mean_cosine, thresholds)


def write_dataset_report(logs_dir, report: DatasetReport) -> dict[str, object]:
    """Write the report as `vision_check.txt`, `.html` and `.json` (flags per photo) into `logs/`, atomically.

    Args:
        logs_dir: the session's `logs` folder.
        report: `check_dataset`'s result.

    Returns:
        `{"text": path, "html": path, "json": path}`.
    """
    from pathlib import Path

    from nbkit.fsio import atomic_write_json, atomic_write_text

    logs_dir = Path(logs_dir)
    paths = {kind: logs_dir / f"vision_check.{kind}" for kind in ("txt", "html", "json")}
    atomic_write_text(paths["txt"], str(report) + "\n")
    atomic_write_text(paths["html"], report._repr_html_())
    data = {
        "flags": report.flags,
        "duplicates": [dataclasses.asdict(pair) for pair in report.duplicates],
        "outliers": [dataclasses.asdict(outlier) for outlier in report.outliers],
        "mean_cosine": report.mean_cosine,
        "thresholds": report.thresholds,
    }
    atomic_write_json(paths["json"], data)
    return paths
