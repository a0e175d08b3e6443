"""`nbkit.wheels.install`: the notebook's first cell.

What the runtime already has at the locked version is skipped; the rest comes from the wheelhouse,
offline and hash-checked, after any missing wheel has been downloaded into it (so the next runtime
needs no registry). The wheels are installed by nbkit itself (`nbkit.wheels.unpack`: each verified wheel
unpacked into the interpreter's site-packages), so the speed does not depend on whether uv is on PATH.
The runtime's torch, torchvision, torchaudio, triton and CUDA libraries are never touched: they are left
out of what is installed (and of what is removed), and the plain resolve pins them with a constraints
file.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from nbkit.errors import NbkitError
from nbkit.wheels.house import (
    candidates,
    default_wheelhouse,
    download,
    run_quiet,
    wheels_in,
)
from nbkit.wheels.lockfile import Pin
from nbkit.wheels.profiles import (
    SETS,
    Profile,
    RuntimeSpec,
    get_profile,
    is_protected,
    probe_runtime,
    select_profile,
)
from nbkit.wheels.unpack import install_wheels


@dataclasses.dataclass
class InstallReport:
    """What `install` did.

    Args:
        profile: the profile used, or None (plain resolve).
        already: packages already installed at the locked version.
        from_wheelhouse: installed from wheels that were in the wheelhouse.
        downloaded: installed after being downloaded into the wheelhouse.
        kept: the runtime's torch stack, left as it is (name -> version).
        skipped: left out, with the reason (xformers without a matching torch, say).
        seconds: wall time.
    """

    profile: str | None
    already: list[str] = dataclasses.field(default_factory=list)
    from_wheelhouse: list[str] = dataclasses.field(default_factory=list)
    downloaded: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def installed(self) -> list[str]:
        return self.from_wheelhouse + self.downloaded

    def summary(self) -> str:
        lines = [f"nbkit wheels: profile {self.profile or '(none: plain resolve)'}"]
        lines.append(f"  already there: {len(self.already)} package(s)")
        if self.installed:
            lines.append(
                f"  installed: {len(self.installed)} ({len(self.from_wheelhouse)} from the wheelhouse, "
                f"{len(self.downloaded)} downloaded into it first)"
            )
        if self.kept:
            kept = ", ".join(f"{name} {version}" for name, version in sorted(self.kept.items()))
            lines.append(f"  kept the runtime's {kept} (never changed)")
        lines += [f"  skipped {name}: {why}" for name, why in sorted(self.skipped.items())]
        lines.append(f"  done in {self.seconds:.2f} s")
        return "\n".join(lines)


def plan(pins: Sequence[Pin], runtime: RuntimeSpec) -> tuple[list[Pin], list[str], dict[str, str]]:
    """Split `pins` into (to install, already there, kept torch stack) for `runtime`."""
    keep_stack = runtime.torch is not None
    todo, already, kept = [], [], {}
    for pin in pins:
        if keep_stack and is_protected(pin.name):
            kept[pin.name] = runtime.installed.get(pin.name, "absent")
            continue
        have = runtime.installed.get(pin.name)
        if have is not None and Version(have) == Version(pin.version):
            already.append(pin.name)
        else:
            todo.append(pin)
    if keep_stack:
        kept.update({name: version for name, version in runtime.installed.items() if is_protected(name)})
    return todo, already, kept


def xformers_fits(wheel: Path, torch_version: str) -> bool:
    """Whether an xformers wheel was built for exactly this torch (its `Requires-Dist: torch==X`)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if canonicalize_name(requirement.name) == "torch":
                pinned = [s for s in requirement.specifier if s.operator == "=="]
                return bool(pinned) and Version(pinned[0].version).public == Version(torch_version).public
    return False


def _constraints(kept: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(kept.items()) if version != "absent")


def install(
    sets: Sequence[str] = ("train",),
    wheelhouse: str | Path | None = None,
    profile: str | Profile | None = None,
    *,
    python: str | None = None,
    index_args: Sequence[str] = (),
    profiles_dir: str | Path | None = None,
    runtime: RuntimeSpec | None = None,
    log: Callable[[str], None] = print,
) -> InstallReport:
    """Make the packages of `sets` importable, from the wheelhouse when it has them.

    Args:
        sets: package sets (`train`, `ui`, `images`, `vision`).
        wheelhouse: the wheel folder (default `<storage root>/wheelhouse`).
        profile: a profile (or its name) to use instead of the one matching the runtime.
        python: the interpreter to install into (default: this one).
        index_args: pip's index options for downloads (default PyPI), e.g. `["--no-index",
            "--find-links", DIR]`.
        profiles_dir: where the profiles are (default: nbkit's own).
        runtime: the runtime description (default: probed from `python`); tests fake it.
        log: where messages go (default print).
    """
    start = time.perf_counter()
    unknown = [name for name in sets if name not in SETS]
    if unknown:
        raise NbkitError(f"unknown package set(s) {', '.join(unknown)}", fix=f"use {', '.join(SETS)}")
    python = python or sys.executable
    runtime = runtime or probe_runtime(python)
    if isinstance(profile, str):
        profile = get_profile(profile, profiles_dir)
    if profile is None:
        profile, why = select_profile(runtime, profiles_dir)
        if profile is None:
            log(f"nbkit wheels: {why}")
            return _plain_install(sets, python, runtime, index_args, start, log)
    pins = profile.pins(sets)
    todo, already, kept = plan(pins, runtime)
    report = InstallReport(profile.name, already=already, kept=kept)
    if not todo:
        report.seconds = time.perf_counter() - start
        log(report.summary())
        return report
    house = Path(wheelhouse) if wheelhouse is not None else default_wheelhouse()
    wheels = wheels_in(house)
    paths = {pin.name: [w.path for w in candidates(wheels, pin, runtime.tags)] for pin in todo}
    fetched = [pin for pin in todo if not paths[pin.name]]
    if fetched:
        paths.update(_fetch(fetched, house, runtime, python, index_args, log))
    xformers = paths.get("xformers")
    if xformers and (runtime.torch is None or not xformers_fits(xformers[0], runtime.torch)):
        todo = [pin for pin in todo if pin.name != "xformers"]
        report.skipped["xformers"] = (
            f"no wheel built for torch {runtime.torch}; nbkit uses PyTorch's SDPA attention"
        )
    # each wheel is checked against the lock as it is read for unpacking; one that does not match is
    # removed, fetched again and installed after the others
    refused = install_wheels([(pin, paths[pin.name]) for pin in todo], python, log=log)
    if refused:
        paths.update(_fetch(refused, house, runtime, python, index_args, log))
        still = install_wheels([(pin, paths[pin.name]) for pin in refused], python, log=log)
        if still:
            raise _no_wheel([pin.name for pin in still], house)
        fetched += refused
    names = {pin.name for pin in fetched}
    report.downloaded = [pin.name for pin in todo if pin.name in names]
    report.from_wheelhouse = [pin.name for pin in todo if pin.name not in names]
    report.seconds = time.perf_counter() - start
    log(report.summary())
    return report


def _fetch(
    pins: Sequence[Pin],
    house: Path,
    runtime: RuntimeSpec,
    python: str,
    index_args: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, list[Path]]:
    """Download `pins`' wheels into `house` (hash-checked there); returns each pin's wheel files."""
    download(pins, house, python=python, index_args=index_args, log=log)
    wheels = wheels_in(house)
    found = {pin.name: [w.path for w in candidates(wheels, pin, runtime.tags)] for pin in pins}
    still = [name for name, paths in found.items() if not paths]
    if still:
        raise _no_wheel(still, house)
    return found


def _no_wheel(names: list[str], house: Path) -> NbkitError:
    return NbkitError(
        f"no wheel that matches the lock for {', '.join(names)} after downloading",
        path=house,
        fix="check the network, then run `nbkit wheels build` to fill the wheelhouse",
    )


def _plain_install(
    sets: Sequence[str],
    python: str,
    runtime: RuntimeSpec,
    index_args: Sequence[str],
    start: float,
    log: Callable[[str], None],
) -> InstallReport:
    """No profile fits: install nbkit's requirements for `sets` from the registry, torch kept."""
    from importlib import metadata

    wanted = []
    for text in metadata.requires("nbkit") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": name}) for name in sets):
            requirement.marker = None
            if canonicalize_name(requirement.name) != "nbkit" and not (
                runtime.torch is not None and is_protected(canonicalize_name(requirement.name))
            ):
                wanted.append(str(requirement))
    _, _, kept = plan([], runtime)
    report = InstallReport(None, kept=kept)
    with tempfile.TemporaryDirectory(prefix="nbkit-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(_constraints(kept), encoding="utf-8")
        run_quiet(
            [python, "-m", "pip", "install", "--disable-pip-version-check", *wanted, "-c", str(constraints),
             *index_args],
            "pip install",
        )  # fmt: skip
    report.downloaded = wanted
    report.seconds = time.perf_counter() - start
    log(report.summary())
    return report
