"""Maintainer and housekeeping commands: regenerate a profile's locks, fill a wheelhouse for it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.wheels.house import candidates, checked_wheel, download, wheels_in
from nbkit.wheels.lockfile import read_lock
from nbkit.wheels.profiles import Profile, is_protected, probe_runtime
from nbkit.wheels.trees import same_filesystem
from nbkit.wheels.unpack import default_workers, keep_tree, target_scheme


def find_uv() -> str | None:
    """uv on PATH, or beside this interpreter."""
    beside = Path(sys.executable).with_name("uv")
    return shutil.which("uv") or (str(beside) if beside.exists() else None)


def lock(
    profile: Profile,
    sets: Sequence[str] | None = None,
    *,
    pyproject: str | Path | None = None,
    uv: str | None = None,
    upgrade: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Regenerate `profile`'s locks with `uv pip compile --generate-hashes` (needs the registry).

    Each set's lock covers nbkit's dependencies plus that extra, for the profile's Python and platform,
    resolved against its torch; torch itself is left out (the runtime brings it).

    Args:
        profile: the profile to lock.
        sets: the sets to regenerate (default: all the profile has).
        pyproject: nbkit's `pyproject.toml` (default: the checkout's).
        uv: the uv executable (default: found on PATH).
        upgrade: take the newest allowed versions instead of keeping the current pins.
        log: where messages go.
    """
    uv = uv or find_uv()
    if uv is None:
        raise NbkitError("`nbkit wheels lock` needs uv", fix="pip install uv, then rerun")
    pyproject = Path(pyproject) if pyproject else Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        raise NbkitError("no pyproject.toml to lock", path=pyproject, fix="run it in an nbkit checkout")
    chosen = list(profile.sets if sets is None else sets)
    written = []
    with tempfile.TemporaryDirectory(prefix="nbkit-lock-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={profile.torch}\n" if profile.torch else "", encoding="utf-8")
        # All of the profile's sets resolved together first, then each set constrained to that
        # resolution: sets installed side by side must agree on every shared package.
        together = Path(tmp) / "together.txt"
        previous = [str(profile.lock_path(name)) for name in chosen if profile.lock_path(name).is_file()]
        _compile(uv, pyproject, profile, list(profile.sets), constraints, together, upgrade, previous)
        agreed = Path(tmp) / "agreed.txt"
        agreed.write_text(
            "".join(f"{pin.requirement}\n" for pin in read_lock(together))
            + constraints.read_text(encoding="utf-8"),
            encoding="utf-8",
        )
        for set_name in chosen:
            output = profile.lock_path(set_name)
            _compile(uv, pyproject, profile, [set_name], agreed, output, False, [])
            log(f"nbkit wheels: locked {profile.name}/{set_name} -> {output}")
            written.append(output)
    return written


def _compile(
    uv: str,
    pyproject: Path,
    profile: Profile,
    extras: list[str],
    constraints: Path,
    output: Path,
    upgrade: bool,
    previous: list[str],
) -> None:
    label = " ".join(f"--set {name}" for name in extras) if len(extras) == 1 else ""
    command = [uv, "pip", "compile", str(pyproject), "--python-version", profile.python, "--generate-hashes",
               "-c", str(constraints), "--no-emit-package", "torch", "-o", str(output), "--quiet",
               "--custom-compile-command", f"nbkit wheels lock {profile.name} {label}".strip()]  # fmt: skip
    for extra in extras:
        command += ["--extra", extra]
    if profile.uv_platform:
        command += ["--python-platform", profile.uv_platform]
    if upgrade:
        command.append("--upgrade")
    if previous and not output.exists():
        # keep the current pins (uv prefers what its output file already pins)
        output.write_text(
            "".join(Path(path).read_text(encoding="utf-8") for path in previous), encoding="utf-8"
        )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NbkitError(
            f"uv could not lock {', '.join(extras)} for {profile.name}: {result.stderr.strip()[-1500:]}",
            path=output,
            fix="fix the ranges in pyproject.toml (or the profile's torch) and rerun",
        )


def build(
    profile: Profile,
    wheelhouse: Path,
    sets: Sequence[str] | None = None,
    *,
    python: str | None = None,
    index_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> tuple[int, int]:
    """Fill `wheelhouse` with every wheel `profile`'s sets need (never torch's stack), each kept unpacked
    beside it too where the wheelhouse shares a filesystem with `python`'s site-packages (so installs
    there link files instead of unzipping: `nbkit.wheels.trees`).

    Run it on the profile's runtime (or with `python` of that runtime): pip picks the wheels for the
    interpreter it runs under. Returns (wheels already there, wheels downloaded).

    Args:
        profile: the profile whose locks say what to fetch.
        wheelhouse: the wheel folder.
        sets: the package sets (default: all the profile has).
        python: the interpreter of the runtime (default: this one).
        index_args: pip's index options for downloads (default PyPI).
        log: where messages go.
    """
    runtime = probe_runtime(python)
    if profile.mismatches(runtime):
        log(
            f"nbkit wheels: warning: this runtime does not fit {profile.name} "
            f"({', '.join(profile.mismatches(runtime))}); wheels are fetched for this runtime"
        )
    pins = [pin for pin in profile.pins(sets) if not is_protected(pin.name)]
    wheels = wheels_in(wheelhouse)
    missing = [pin for pin in pins if checked_wheel(wheels, pin, runtime.tags, log) is None]
    download(missing, wheelhouse, python=python, index_args=index_args, log=log)
    site = target_scheme(python or sys.executable).purelib
    wheels = wheels_in(wheelhouse)
    linked = [
        (wheel.path, pin)
        for pin in pins
        for wheel in candidates(wheels, pin, runtime.tags)[:1]
        if same_filesystem(wheel.path, site)
    ]
    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        list(pool.map(lambda item: keep_tree(*item, log), linked))
    return len(pins) - len(missing), len(missing)
