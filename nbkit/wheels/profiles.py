"""Wheel profiles: a runtime (Python, platform, torch, CUDA) and, per package set, a hashed lock.

A profile is a folder with `profile.json` and one lock per set (`train.txt`, `ui.txt`, ...), each made
by `uv pip compile --generate-hashes` (`nbkit wheels lock`) and parsed with `nbkit.wheels.lockfile.read_lock`,
the same mechanism as the dev/CI lock. The profiles live in the repo's `wheels/profiles/` and ship
inside the package as `nbkit.wheel_profiles`. JSON rather than TOML: Python 3.10 has no tomllib, and
this runs before anything else is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from packaging.markers import default_environment
from packaging.version import InvalidVersion, Version

from nbkit.errors import NbkitError
from nbkit.wheels.lockfile import Pin, read_lock

SETS = ("train", "ui", "images", "vision")
# The runtime's own torch stack: never installed, upgraded or downgraded where torch is present.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton")
PROTECTED_PREFIXES = ("nvidia-", "cuda-")
PROBE_SCRIPT = Path(__file__).with_name("_probe.py")


def is_protected(name: str) -> bool:
    """Whether `name` (canonical) belongs to the runtime's torch/CUDA stack."""
    return name in PROTECTED or name.startswith(PROTECTED_PREFIXES)


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    """What a Python environment is, as profile selection sees it.

    Args:
        python: `major.minor`.
        platform: `sysconfig.get_platform()`, e.g. `linux-x86_64`.
        torch: the installed torch's version (with its local label, `2.8.0+cu126`), or None.
        cuda: the CUDA version torch is built for (`12.6`), or None for a CPU build or no torch.
        installed: every installed distribution, canonical name -> version.
        tags: the wheel tags it accepts (`cp311-cp311-manylinux_2_17_x86_64`, ...), or None if unknown.
    """

    python: str
    platform: str
    torch: str | None = None
    cuda: str | None = None
    installed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: tuple[str, ...] | None = None

    def describe(self) -> str:
        torch = "no torch" if self.torch is None else f"torch {self.torch}"
        cuda = f"CUDA {self.cuda}" if self.cuda else "no CUDA"
        return f"Python {self.python} · {self.platform} · {torch} · {cuda}"


def python_json(python: str, args: list[str], what: str) -> dict:
    """Run another interpreter and read the JSON it prints.

    Args:
        python: the interpreter.
        args: its arguments (a script, or `-c` and code).
        what: what it was asked, for the error (`describe the Python at`).

    Raises:
        NbkitError: when it fails, with the end of what it said.
    """
    result = subprocess.run([python, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NbkitError(
            f"could not {what} {python}: {result.stderr.strip()[-500:]}",
            path=python,
            fix="pass the path of a working Python interpreter",
        )
    return json.loads(result.stdout)


def probe_runtime(python: str | None = None) -> RuntimeSpec:
    """Describe `python` (default: this interpreter, in-process) without importing torch.

    Args:
        python: another interpreter to describe (a venv's `bin/python`); it needs only the stdlib.
    """
    if python is None or Path(python) == Path(sys.executable):
        from nbkit.wheels._probe import probe

        data = probe()
    else:
        data = python_json(python, [str(PROBE_SCRIPT)], "describe the Python at")
    tags = data.pop("tags", None)
    return RuntimeSpec(**data, tags=None if tags is None else tuple(tags))


@dataclasses.dataclass(frozen=True)
class Profile:
    """One runtime's locks.

    Args:
        name: the folder's name, e.g. `local-cpu-py311`.
        path: the folder.
        python: `major.minor` it is for.
        platform: `sysconfig.get_platform()` it is for.
        torch: the torch version (public part) the locks are resolved against.
        cuda: the CUDA version of that torch build, or None for the CPU build.
        sets: set name -> lock file name inside the folder.
        uv_platform: uv's `--python-platform` for `nbkit wheels lock`.
        description: one line for people.
    """

    name: str
    path: Path
    python: str
    platform: str
    torch: str | None
    cuda: str | None
    sets: Mapping[str, str]
    uv_platform: str = ""
    description: str = ""

    def lock_path(self, set_name: str) -> Path:
        if set_name not in self.sets:
            raise NbkitError(
                f"profile {self.name} has no package set {set_name!r}",
                path=self.path / "profile.json",
                fix=f"use one of {', '.join(self.sets)}",
            )
        return self.path / self.sets[set_name]

    def pins(
        self, sets: Iterable[str] | None = None, environment: Mapping[str, str] | None = None
    ) -> list[Pin]:
        """The pins of `sets` (default: all) that apply to `environment`, one per package.

        Two sets that pin one package at different versions make the profile unusable for that pair:
        that is an error naming both, not a silent choice.
        """
        if environment is None:
            # markers are evaluated for the profile's Python, wherever this runs (`nbkit wheels build`)
            environment = default_environment()
            if environment["python_version"] != self.python:
                environment.update(python_version=self.python, python_full_version=f"{self.python}.0")
        environment = dict(environment)
        chosen: dict[str, tuple[Pin, str]] = {}
        for set_name in self.sets if sets is None else sets:
            for pin in read_lock(self.lock_path(set_name)):
                if not pin.applies(environment):
                    continue
                if pin.name in chosen and chosen[pin.name][0].version != pin.version:
                    other, other_set = chosen[pin.name]
                    raise NbkitError(
                        f"profile {self.name} pins {pin.name}=={other.version} in {other_set} and "
                        f"=={pin.version} in {set_name}",
                        path=self.path,
                        fix="regenerate the profile's locks together (`nbkit wheels lock "
                        f"{self.name}`) so the sets agree",
                    )
                if not pin.hashes:
                    raise NbkitError(
                        f"{pin.name}=={pin.version} has no sha256 hash in {self.lock_path(set_name)}",
                        path=self.lock_path(set_name),
                        fix=f"regenerate it with hashes: `nbkit wheels lock {self.name}`",
                    )
                chosen.setdefault(pin.name, (pin, set_name))
        return [pin for pin, _ in chosen.values()]

    def mismatches(self, runtime: RuntimeSpec) -> list[str]:
        """Why this profile does not fit `runtime` (empty when it does)."""
        problems = []
        if runtime.python != self.python:
            problems.append(f"Python {runtime.python}, not {self.python}")
        if runtime.platform != self.platform:
            problems.append(f"platform {runtime.platform}, not {self.platform}")
        if _public(runtime.torch) != _public(self.torch):
            problems.append(f"torch {runtime.torch or 'absent'}, not {self.torch or 'absent'}")
        elif (runtime.cuda or None) != (self.cuda or None):
            problems.append(f"CUDA {runtime.cuda or 'none'}, not {self.cuda or 'none'}")
        return problems


def _public(version: str | None) -> str | None:
    if version is None:
        return None
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def profiles_root() -> Path:
    """The profiles folder: the checkout's `wheels/profiles`, else the installed `nbkit.wheel_profiles`."""
    checkout = Path(__file__).resolve().parents[2] / "wheels" / "profiles"
    if checkout.is_dir():
        return checkout
    try:
        return Path(str(importlib.resources.files("nbkit.wheel_profiles")))
    except ModuleNotFoundError as error:
        raise NbkitError(
            "nbkit's wheel profiles (the package nbkit.wheel_profiles) are not installed",
            fix="reinstall nbkit (`pip install --force-reinstall nbkit`, or `pip install -e .` in a checkout)",
        ) from error


def load_profile(path: str | Path) -> Profile:
    """Read the profile in folder `path`."""
    path = Path(path)
    source = path / "profile.json"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        return Profile(
            name=path.name,
            path=path,
            python=data["python"],
            platform=data["platform"],
            torch=data.get("torch") or None,
            cuda=data.get("cuda") or None,
            sets=dict(data["sets"]),
            uv_platform=data.get("uv_platform", ""),
            description=data.get("description", ""),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise NbkitError(
            f"the wheel profile {source} is unreadable ({type(error).__name__}: {error})",
            path=source,
            fix="restore it from the repository, or fix the JSON (python, platform, torch, cuda, sets)",
        ) from error


def load_profiles(root: str | Path | None = None) -> list[Profile]:
    """Every profile under `root` (default `profiles_root()`), sorted by name."""
    root = Path(root) if root is not None else profiles_root()
    if not root.is_dir():
        return []
    return [load_profile(folder) for folder in sorted(root.iterdir()) if (folder / "profile.json").is_file()]


def get_profile(name: str, root: str | Path | None = None) -> Profile:
    """The profile called `name`."""
    profiles = load_profiles(root)
    for profile in profiles:
        if profile.name == name:
            return profile
    raise NbkitError(
        f"there is no wheel profile {name!r}",
        fix=f"use one of {', '.join(p.name for p in profiles) or '(none found)'} (`nbkit wheels status`)",
    )


def select_profile(runtime: RuntimeSpec, root: str | Path | None = None) -> tuple[Profile | None, str]:
    """The profile that fits `runtime`, or None, and a sentence saying which and why.

    Args:
        runtime: the runtime to match (`probe_runtime()`).
        root: the profiles folder (default `profiles_root()`).
    """
    profiles = load_profiles(root)
    for profile in profiles:
        if not profile.mismatches(runtime):
            return profile, f"profile {profile.name} fits this runtime ({runtime.describe()})"
    closest = "; ".join(f"{p.name}: {', '.join(p.mismatches(runtime))}" for p in profiles)
    return None, (
        f"no wheel profile fits this runtime ({runtime.describe()}), so the packages are resolved "
        f"from the registry without a lock" + (f" (profiles: {closest})" if closest else "")
    )
