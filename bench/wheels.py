"""Benchmark: cold install from the registry vs warm install from the wheelhouse vs a plain copy.

Uses the network (PyPI through pip). The project's real `ui` + `train` sets of the profile that fits
this runtime are installed into three fresh venvs that all see this runtime's torch (its package
folders linked in through a .pth file, so nothing installs torch):

- cold: plain `pip install --no-cache-dir --no-deps` of the locked versions from the registry;
- warm: `nbkit.wheels.install` from a wheelhouse filled beforehand (`nbkit wheels build`, not timed);
- copy: `cp -r` of the files the cold install put into site-packages (the floor).

The last line is one JSON object with the three times and the ratios. Goals: warm <= 1.5x copy and
warm <= 0.25x cold.

    python bench/wheels.py [--sets ui train] [--work /tmp/nbkit-bench-wheels]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from nbkit.wheels.build import build
from nbkit.wheels.house import requirements_text
from nbkit.wheels.install import install
from nbkit.wheels.profiles import is_protected, probe_runtime, select_profile


def _venv(path: Path, torch_site: Path) -> tuple[str, Path]:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "zz-runtime-torch.pth").write_text(f"{torch_site}\n")
    return python, Path(purelib)


def _torch_only(target: Path) -> Path:
    """A folder with links to this runtime's torch (and its CUDA libraries), nothing else."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].lower().replace("_", "-")
        if is_protected(stem) or stem in ("functorch", "torchgen"):
            link = target / entry.name
            if not link.exists():
                link.symlink_to(entry)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["ui", "train"])
    parser.add_argument("--work", default="/tmp/nbkit-bench-wheels")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    profile, why = select_profile(probe_runtime())
    print(why, flush=True)
    if profile is None:
        sys.exit("no profile fits this runtime")
    torch_site = _torch_only(work / "torch-site")
    pins = [pin for pin in profile.pins(args.sets) if not is_protected(pin.name)]
    requirements = work / "requirements.txt"
    requirements.write_text(requirements_text(pins))

    cold_python, cold_site = _venv(work / "cold", torch_site)
    before = set(cold_site.iterdir())
    start = time.perf_counter()
    subprocess.run(
        [cold_python, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps",
         "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )  # fmt: skip
    cold = time.perf_counter() - start
    print(f"cold (pip from the registry): {cold:.1f} s, {len(pins)} packages", flush=True)

    house = work / "wheelhouse"
    build(profile, house, args.sets)
    warm_python, _ = _venv(work / "warm", torch_site)
    start = time.perf_counter()
    report = install(args.sets, house, profile, python=warm_python)
    warm = time.perf_counter() - start
    assert len(report.installed) == len(pins), report.summary()
    print(f"warm (nbkit wheels install from the wheelhouse): {warm:.1f} s", flush=True)
    start = time.perf_counter()
    again = install(args.sets, house, profile, python=warm_python, log=lambda _: None)
    noop = time.perf_counter() - start
    assert not again.installed

    _, copy_site = _venv(work / "copy", torch_site)
    added = [entry for entry in cold_site.iterdir() if entry not in before]
    start = time.perf_counter()
    for entry in added:
        subprocess.run(["cp", "-r", str(entry), str(copy_site / entry.name)], check=True)
    copy = time.perf_counter() - start
    print(f"copy (cp -r of the installed files): {copy:.1f} s", flush=True)
    print(
        json.dumps(
            {
                "packages": len(pins),
                "sets": args.sets,
                "profile": profile.name,
                "cold_s": round(cold, 2),
                "warm_s": round(warm, 2),
                "copy_s": round(copy, 2),
                "second_call_s": round(noop, 3),
                "warm_over_copy": round(warm / copy, 2),
                "warm_over_cold": round(warm / cold, 3),
                "installer": "uv" if shutil.which("uv") else "pip",
            }
        )
    )


if __name__ == "__main__":
    main()
