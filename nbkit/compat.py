"""Is the installed ML stack a combination nbkit supports?

Colab and Kaggle runtimes bring their own transformers, diffusers, accelerate and peft, and a pip
install can pull a release nbkit has never met. A bad pairing otherwise surfaces as a traceback deep in
a run (transformers 5.24 with peft 0.21: "The version of PEFT you are using is not compatible").
`check_versions("train")` finds it up front, from package metadata alone (nothing heavy is imported),
and says in one paragraph what to install.

The supported ranges are not repeated here: they are read from nbkit's own requirements (its installed
metadata, or `pyproject.toml` in a source checkout), so `pyproject.toml` stays the one place they live.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from nbkit.errors import NbkitError

# The parts of nbkit that check their stack at import, and the extra that lists what each needs.
PART_EXTRAS = {"train": "train", "ui": "ui", "models": "models"}
# Only these are checked: the rest (Pillow, tqdm, ...) do not break nbkit between releases.
CHECKED = ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface-hub", "gradio")


class IncompatibleVersionsError(NbkitError):
    """The installed ML libraries are not a combination nbkit supports."""


@dataclass(frozen=True)
class Problem:
    """One package that is missing, outside nbkit's range, or too old for another installed package."""

    package: str
    installed: str | None
    wanted: str  # a requirement string: what to install
    reason: str


def nbkit_requirements() -> list[Requirement]:
    """nbkit's declared requirements: installed metadata, else the source checkout's pyproject.toml."""
    try:
        return [Requirement(text) for text in metadata.requires("nbkit") or []]
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
    except ImportError:  # Python 3.10 reads no TOML; an uninstalled checkout there goes unchecked
        return []
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    for extra, texts in project["optional-dependencies"].items():
        requirements += [Requirement(f'{text}; extra == "{extra}"') for text in texts]
    return requirements


def requirements_for(extra: str, requirements: list[Requirement] | None = None) -> dict[str, Requirement]:
    """The requirements of one extra, following nbkit's references to its own extras (`nbkit[models]`)."""
    requirements = nbkit_requirements() if requirements is None else requirements
    found: dict[str, Requirement] = {}
    pending, seen = [extra], set()
    while pending:
        current = pending.pop()
        seen.add(current)
        for requirement in requirements:
            if not requirement.marker or not requirement.marker.evaluate({"extra": current}):
                continue
            if canonicalize_name(requirement.name) == "nbkit":
                pending += [name for name in requirement.extras if name not in seen]
            else:
                found[canonicalize_name(requirement.name)] = requirement
    return found


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def transformers_min_peft(transformers_version: str) -> str | None:
    """The peft version the installed transformers demands at run time, read from its source file.

    transformers checks `MIN_PEFT_VERSION` when a LoRA is attached but does not declare it in its
    metadata, so pip happily installs a pair that fails later. Reading the file avoids importing
    transformers (seconds) just to learn one constant.
    """
    try:
        source = metadata.distribution("transformers").locate_file("transformers/integrations/peft.py")
        text = Path(source).read_text(encoding="utf-8")
    except (metadata.PackageNotFoundError, OSError):
        return None
    match = re.search(r'^MIN_PEFT_VERSION\s*=\s*["\']([^"\']+)["\']', text, re.M)
    return match.group(1) if match else None


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def find_problems(
    part: str, versions: dict[str, str | None] | None = None, peft_minimum: str | None = None
) -> list[Problem]:
    """What is wrong with the stack for one part of nbkit (`train`, `ui` or `models`).

    Args:
        part: which part is about to run.
        versions: package -> installed version (None: not installed) for a faked runtime in tests;
            packages left out are read from the environment.
        peft_minimum: the peft version transformers demands; read from the installed transformers
            when not given.
    """
    if part not in PART_EXTRAS:
        raise ValueError(f"part must be one of {sorted(PART_EXTRAS)}, not {part!r}")
    wanted = requirements_for(PART_EXTRAS[part])
    versions = versions or {}

    def version_of(package: str) -> str | None:
        return versions[package] if package in versions else installed_version(package)

    problems = []
    for package in CHECKED:
        requirement = wanted.get(package)
        if requirement is None:
            continue
        installed = version_of(package)
        wanted_text = f"{requirement.name}{requirement.specifier}"
        if installed is None:
            problems.append(Problem(package, None, wanted_text, f"{package} is not installed"))
            continue
        parsed = _version(installed)
        # Local builds (torch 2.13.0+cpu) and pre-releases count as the release they belong to.
        if parsed is not None and not requirement.specifier.contains(parsed.public, prereleases=True):
            problems.append(
                Problem(package, installed, wanted_text, f"{package} {installed} is outside {wanted_text}")
            )
    transformers, peft = version_of("transformers"), version_of("peft")
    if "peft" in wanted and transformers and peft and not any(p.package == "transformers" for p in problems):
        # transformers is within nbkit's range but demands a newer peft than the one installed.
        minimum = peft_minimum or transformers_min_peft(transformers)
        parsed_peft, parsed_minimum = _version(peft), _version(minimum or "")
        if parsed_peft and parsed_minimum and parsed_peft < parsed_minimum:
            problems.append(
                Problem(
                    "peft",
                    peft,
                    f"peft>={minimum}",
                    f"transformers {transformers} refuses peft {peft} (it needs peft >= {minimum})",
                )
            )
    return problems


def describe(part: str, problems: list[Problem]) -> str:
    """One paragraph: what is wrong, and the one pip command that fixes it."""
    reasons = "; ".join(problem.reason for problem in problems)
    install = " ".join(f'"{problem.wanted}"' for problem in _unique(problems))
    return (
        f"nbkit's {part} part cannot run with the installed packages: {reasons}. "
        f"Install a supported combination with `pip install {install}` (keep the runtime's torch), "
        "then restart the runtime (Colab: Runtime > Restart session) and run the cells again."
    )


def _unique(problems: list[Problem]) -> list[Problem]:
    by_package: dict[str, Problem] = {}
    for problem in problems:
        by_package.setdefault(problem.package, problem)
    return list(by_package.values())


def check_versions(
    part: str, versions: dict[str, str | None] | None = None, peft_minimum: str | None = None
) -> None:
    """Raise `IncompatibleVersionsError` when the stack does not suit `part`; return quietly when it does.

    Args:
        part: `train`, `ui` or `models`.
        versions: a faked runtime (package -> version) for tests; the real one when omitted.
        peft_minimum: the peft version transformers demands (faked in tests).
    """
    problems = find_problems(part, versions, peft_minimum)
    if problems:
        raise IncompatibleVersionsError(describe(part, problems))
