"""Lock files: exact versions with sha256 hashes, as `uv pip compile --generate-hashes` writes them.

`read_lock` parses one; `check_lock` says whether it still covers what `pyproject.toml` asks for: every
requirement of the locked extras, followed through the installed packages' own metadata, must be pinned
in the lock at a version inside its range. The README's test command installs from the lock, so the
installed packages are the locked ones and their metadata is the lock's dependency graph.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# The dev/CI lock: what it covers, and what it leaves to the runtime (see pyproject's tool.uv section).
# torchvision (spandrel's) is the runtime's too: PyPI's Linux wheels are CUDA builds that fail to import
# beside the CPU torch, so the lock is installed with --no-deps and spandrel runs without it.
DEV_LOCK = "wheels/dev-lock.txt"
DEV_EXTRAS = ("all", "dev")
DEV_UNLOCKED = ("torch", "torchvision")


@dataclass(frozen=True)
class Pin:
    """One locked line: `name==version ; marker` with its hashes."""

    name: str
    version: str
    requirement: Requirement
    hashes: tuple[str, ...] = field(default=())

    def applies(self, environment: dict[str, str]) -> bool:
        return self.requirement.marker is None or self.requirement.marker.evaluate(environment)


def read_lock(path: str | Path) -> list[Pin]:
    """The pins of a `--generate-hashes` lock file; a line that is not `name==version` is an error."""
    text = Path(path).read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", re.sub(r"#.*", "", text))
    pins = []
    for number, line in enumerate(logical.splitlines(), 1):
        if not line.strip():
            continue
        hashes = tuple(re.findall(r"--hash=(\S+)", line))
        requirement = Requirement(re.sub(r"--hash=\S+", "", line).strip())
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"{path}: logical line {number} is not pinned with ==: {requirement}")
        pins.append(Pin(canonicalize_name(requirement.name), specifiers[0].version, requirement, hashes))
    return pins


def project_requirements(pyproject: str | Path, extras: tuple[str, ...]) -> list[tuple[Requirement, str]]:
    """(requirement, extra it came from) for the project's dependencies and the given extras."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the dev extra installs tomli on 3.10
        import tomli as tomllib
    project = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    found = [(Requirement(text), "") for text in project.get("dependencies", [])]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional.get(extra, []):
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                pending += sorted(requirement.extras)  # the project naming its own extras
            else:
                found.append((requirement, extra))
    return found


def check_lock(
    lock: str | Path,
    pyproject: str | Path,
    extras: tuple[str, ...] = DEV_EXTRAS,
    unlocked: tuple[str, ...] = DEV_UNLOCKED,
) -> list[str]:
    """Problems that make `lock` no longer a lock of `pyproject` (empty when it is one).

    Checked for this interpreter's environment (the lock is universal; each Python is checked where
    it runs): every requirement reached from the project is pinned, the pin is inside its range, and
    the installed version is the pinned one.

    Args:
        lock: the lock file.
        pyproject: the project's `pyproject.toml`.
        extras: the extras the lock covers.
        unlocked: packages deliberately left out of the lock (the runtime's torch); not followed.
    """
    environment = default_environment()
    pins: dict[str, Pin] = {}
    for pin in read_lock(lock):
        if pin.applies(environment):
            pins[pin.name] = pin
    skip = {canonicalize_name(name) for name in unlocked}
    problems: list[str] = []
    pending = [
        (requirement, "pyproject.toml", extra)
        for requirement, extra in project_requirements(pyproject, extras)
    ]
    visited: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, needed_by, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in skip:
            continue
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{requirement} (needed by {needed_by}) is not in the lock")
            continue
        if not requirement.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"the lock pins {name}=={pin.version}, but {needed_by} needs {requirement}")
        key = (name, frozenset(requirement.extras))
        if key in visited:
            continue
        visited.add(key)
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}=={pin.version} is locked but not installed; install from the lock first")
            continue
        if Version(installed.version) != Version(pin.version):
            problems.append(f"{name} {installed.version} is installed, the lock pins {pin.version}")
        for text in installed.requires or []:
            # the package's own extras the requirement asked for, then its plain requirements
            for wanted_extra in ["", *sorted(requirement.extras)]:
                dependency = Requirement(text)
                if dependency.marker and not dependency.marker.evaluate(
                    {**environment, "extra": wanted_extra}
                ):
                    continue
                pending.append((dependency, f"{name} {pin.version}", wanted_extra))
                break
    return sorted(set(problems))
