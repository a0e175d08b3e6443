"""The wheelhouse: a flat folder of wheels under the storage root (on Drive on Colab).

Every wheel is checked against the sha256 hashes of a lock before it is used; one that does not match
is removed with its unpacked tree (and fetched again by whoever needs it). Reads go through `retry_io`, so a Drive hiccup is
retried instead of failing the setup.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import Version

from nbkit.errors import NbkitError
from nbkit.fsio import DISK_FULL_TEXTS, TEMP_PREFIX, atomic_path, disk_full_error, retry_io, sha256_of
from nbkit.wheels.lockfile import Pin
from nbkit.wheels.trees import UNPACKED, remove_tree


def default_wheelhouse() -> Path:
    """`<storage root>/wheelhouse`: on Drive on Colab, so it outlives the runtime."""
    from nbkit.env import storage_root

    return storage_root() / "wheelhouse"


def sha256_file(path: Path) -> str:
    """`sha256:<hex>` of a file, retried on transient mount errors."""

    return retry_io(lambda: f"sha256:{sha256_of(path).hexdigest()}", what=f"reading {path.name}")


@dataclasses.dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    tags: frozenset[str]
    size: int


def wheels_in(wheelhouse: Path) -> list[Wheel]:
    """The wheels in `wheelhouse` (files whose names are not wheel names are left alone)."""
    if not wheelhouse.is_dir():
        return []
    found = []
    for path in sorted(retry_io(lambda: list(wheelhouse.glob("*.whl")), what=f"listing {wheelhouse}")):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        found.append(Wheel(path, str(name), str(version), frozenset(map(str, tags)), path.stat().st_size))
    return found


def candidates(wheels: Iterable[Wheel], pin: Pin, tags: Sequence[str] | None) -> list[Wheel]:
    """The wheels of `pin`'s exact version that this runtime can install (any, when tags are unknown)."""
    wanted = Version(pin.version)
    accepted = None if tags is None else set(tags)
    return [
        wheel
        for wheel in wheels
        if wheel.name == pin.name
        and Version(wheel.version) == wanted
        and (accepted is None or wheel.tags & accepted)
    ]


def checked_wheel(
    wheels: Iterable[Wheel], pin: Pin, tags: Sequence[str] | None, log: Callable[[str], None] = print
) -> Wheel | None:
    """A wheel for `pin` whose sha256 is one of the lock's; mismatching ones are removed, saying so."""
    for wheel in candidates(wheels, pin, tags):
        digest = sha256_file(wheel.path)
        if digest in pin.hashes:
            return wheel
        refuse(wheel.path, digest, pin, log)
    return None


def refuse(path: Path, digest: str, pin: Pin, log: Callable[[str], None] = print) -> None:
    """Say that the wheel at `path` (sha256 `digest`) is not one `pin` allows, and remove it (and its tree).

    Args:
        path: the wheel file.
        digest: its `sha256:<hex>`.
        pin: the lock's pin it was meant to be.
        log: where the message goes.
    """
    log(
        f"nbkit wheels: {path} does not match the lock ({digest[:19]}... is not a hash the lock "
        f"allows for {pin.name}=={pin.version}): the file is corrupted or was replaced; removed, it "
        "will be fetched again"
    )
    retry_io(lambda: path.unlink(missing_ok=True), what=f"removing {path.name}")
    remove_tree(path)


def requirements_text(pins: Iterable[Pin]) -> str:
    """A `--require-hashes` requirements file of exact pins."""
    lines = []
    for pin in pins:
        hashes = " ".join(f"--hash={h}" for h in pin.hashes)
        lines.append(f"{pin.name}=={pin.version} {hashes}")
    return "\n".join(lines) + "\n"


def run_quiet(command: list[str], what: str, *, writes_to: Path | None = None) -> None:
    """Run a pip/uv command; on failure raise NbkitError with the tail of its output.

    Args:
        command: the command line.
        what: what it does, for the message.
        writes_to: the folder it fills, named when the disk runs out of space.
    """
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if any(words in output.lower() for words in DISK_FULL_TEXTS):
            raise disk_full_error(writes_to, what=what, error=OSError(output[-300:]), then="run this again")
        if "DO NOT MATCH THE HASHES" in output:
            raise NbkitError(
                f"{what}: a downloaded file does not match the lock's sha256 (tampered, corrupted, or "
                f"the lock is wrong); nothing was installed: {output[-1200:]}",
                fix="retry once (a broken download); if it persists, regenerate the profile's lock "
                "(`nbkit wheels lock`) from a trusted registry",
            )
        raise NbkitError(
            f"{what} failed (exit {result.returncode}): {output[-1500:]}",
            fix="check the network (or the --find-links folder) and rerun; the wheelhouse keeps what "
            "was already fetched",
        )


def download(
    pins: Sequence[Pin],
    wheelhouse: Path,
    *,
    python: str | None = None,
    index_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[Wheel]:
    """Download wheels of `pins` (no sdists, hashes required) into `wheelhouse`; returns the new wheels.

    pip downloads into a local temporary folder with `python` (so the wheels fit its platform); each
    wheel is checked against the lock again before it is moved into the wheelhouse.

    Args:
        pins: what to fetch.
        wheelhouse: where the wheels go.
        python: the interpreter whose platform the wheels are for (default: this one).
        index_args: pip's index options, e.g. `["--no-index", "--find-links", DIR]`; default PyPI.
        log: where messages go.
    """
    if not pins:
        return []
    wheelhouse.mkdir(parents=True, exist_ok=True)
    by_name = {pin.name: pin for pin in pins}
    with tempfile.TemporaryDirectory(prefix="nbkit-wheels-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(requirements_text(pins), encoding="utf-8")
        target = Path(tmp) / "wheels"
        log(f"nbkit wheels: downloading {len(pins)} wheel(s) into {wheelhouse}")
        run_quiet(
            [
                python or sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                "--no-deps", "--require-hashes", "--only-binary", ":all:", "-d", str(target),
                "-r", str(requirements), *index_args,
            ],
            "pip download",
            writes_to=target,
        )  # fmt: skip
        added = []
        for wheel in wheels_in(target):
            pin = by_name.get(wheel.name)
            if pin is None or sha256_file(wheel.path) not in pin.hashes:
                raise NbkitError(
                    f"pip downloaded {wheel.path.name}, which the lock does not allow",
                    fix="regenerate the profile's lock (`nbkit wheels lock`) and retry",
                )
            destination = wheelhouse / wheel.path.name
            retry_io(lambda wheel=wheel, destination=destination: _move(wheel.path, destination),
                     what=f"saving {wheel.path.name}")  # fmt: skip
            added.append(dataclasses.replace(wheel, path=destination))
    return added


def _move(source: Path, destination: Path) -> None:
    # copy beside the destination, then rename: a half-copied wheel never carries a wheel's name, and
    # one the disk had no room for is removed (a DiskFullError naming the wheelhouse)
    with atomic_path(destination, needed=source.stat().st_size) as partial:
        shutil.copyfile(source, partial)


@dataclasses.dataclass
class VerifyReport:
    good: list[Path] = dataclasses.field(default_factory=list)
    bad: list[Path] = dataclasses.field(default_factory=list)
    unknown: list[Path] = dataclasses.field(default_factory=list)
    missing: list[Pin] = dataclasses.field(default_factory=list)


def verify(wheelhouse: Path, pins: Sequence[Pin], *, remove_bad: bool = False) -> VerifyReport:
    """Check every wheel in `wheelhouse` against `pins`' hashes.

    Args:
        wheelhouse: the folder.
        pins: the locks' pins; a wheel of a pinned version whose hash is not the lock's is bad, a
            wheel of a version no pin names is unknown (`prune` removes those).
        remove_bad: delete the bad wheels.
    """
    report = VerifyReport()
    by_key = {(pin.name, Version(pin.version)): pin for pin in pins}
    present: set[str] = set()
    for wheel in wheels_in(wheelhouse):
        pin = by_key.get((wheel.name, Version(wheel.version)))
        if pin is None:
            report.unknown.append(wheel.path)
        elif sha256_file(wheel.path) in pin.hashes:
            report.good.append(wheel.path)
            present.add(pin.name)
        else:
            report.bad.append(wheel.path)
            if remove_bad:
                wheel.path.unlink(missing_ok=True)
                remove_tree(wheel.path)
    report.missing = [pin for pin in pins if pin.name not in present]
    return report


def prune(wheelhouse: Path, keep: Sequence[Pin], *, dry_run: bool = False) -> tuple[list[Path], int]:
    """Remove the wheels of versions no pin in `keep` names; returns (removed, bytes of those wheels).

    Their unpacked trees go with them, and so do trees whose wheel is gone and the temporary folders
    of an unpack that was killed.

    Args:
        wheelhouse: the folder.
        keep: the pins whose versions stay.
        dry_run: remove nothing; only say what would go.
    """
    wanted = {(pin.name, Version(pin.version)) for pin in keep}
    removed, freed = [], 0
    kept = set()
    for wheel in wheels_in(wheelhouse):
        if (wheel.name, Version(wheel.version)) not in wanted:
            removed.append(wheel.path)
            freed += wheel.size
            if not dry_run:
                wheel.path.unlink(missing_ok=True)
                remove_tree(wheel.path)
        else:
            kept.add(wheel.path.name.removesuffix(".whl"))
    trees = wheelhouse / UNPACKED
    if not dry_run and trees.is_dir():
        for entry in trees.iterdir():
            if entry.name not in kept and (entry.name.startswith(TEMP_PREFIX) or entry.is_dir()):
                shutil.rmtree(entry, ignore_errors=True)
    return removed, freed
