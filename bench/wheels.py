"""Benchmark: cold install from the registry vs warm install from the wheelhouse vs a plain copy.

Uses the network (PyPI through pip). The project's real `ui` + `train` sets of the profile that fits
this runtime are installed into fresh venvs that all see this runtime's torch (its package folders
linked in through a .pth file, so nothing installs torch):

- cold: plain `pip install --no-cache-dir --no-deps` of the locked versions from the registry;
- warm: `nbkit.wheels.install` from a wheelhouse filled beforehand (`nbkit wheels build`, not timed),
  run as its own process twice: with PATH stripped of every folder holding `uv`, and with uv on PATH
  (this runtime's, or one pip-installed into the work folder). The wheelhouse is on the venvs'
  filesystem here, so `build` also keeps each wheel unpacked beside it and the install hard-links those
  files (`nbkit.wheels.trees`); a wheelhouse on another filesystem (Drive on Colab) is unpacked from
  the zips instead: `--wheelhouse` on another filesystem (`/dev/shm`, a tmpfs) times that path;
- copy: `cp -r` of the files the warm install wrote (site-packages and bin), into a fresh venv: the
  floor for putting those files there.

Each of warm (both ways) and copy runs `--repeat` times, each into a fresh venv; the best time counts.
The last line is one JSON object with the times and ratios. Goals: warm <= 1.5x copy with and without
uv on PATH, and warm <= 0.25x cold.

    python bench/wheels.py [--sets ui train] [--work /tmp/nbkit-bench-wheels] [--repeat 3]
                           [--wheelhouse DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from nbkit.wheels.build import build
from nbkit.wheels.house import requirements_text
from nbkit.wheels.profiles import Profile, is_protected, probe_runtime, select_profile

WARM = (
    "import sys; from nbkit.wheels import install; "
    "r = install(sys.argv[1].split(','), sys.argv[2], sys.argv[3], python=sys.argv[4], log=lambda _: None); "
    "print(len(r.installed))"
)


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


def _path_without_uv() -> str:
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and shutil.which("uv", path=f) is None)


def _path_with_uv(work: Path) -> str:
    """PATH with uv on it: this runtime's, or one pip installs into the work folder."""
    if shutil.which("uv"):
        return os.environ["PATH"]
    tool = work / "uv-tool"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", str(tool), "uv"], check=True)  # fmt: skip
    return os.pathsep.join([str(tool / "bin"), os.environ.get("PATH", "")])


def _warm(profile: Profile, sets: list[str], house: Path, python: str, path: str, count: int) -> float:
    """Seconds for `nbkit.wheels.install` in its own process, with `path` as PATH."""
    env = {**os.environ, "PATH": path}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", WARM, ",".join(sets), str(house), profile.name, python],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert int(result.stdout.split()[-1]) == count, result.stdout + result.stderr
    return seconds


def _copy(entries: list[Path], site: Path, bin_entries: list[Path], bin_dir: Path) -> float:
    start = time.perf_counter()
    for entry in entries:
        subprocess.run(["cp", "-r", str(entry), str(site / entry.name)], check=True)
    for entry in bin_entries:
        subprocess.run(["cp", str(entry), str(bin_dir / entry.name)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["ui", "train"])
    parser.add_argument("--work", default="/tmp/nbkit-bench-wheels")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wheelhouse", help="where the wheelhouse goes (default: inside --work)")
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

    cold_python, _ = _venv(work / "cold", torch_site)
    start = time.perf_counter()
    subprocess.run(
        [cold_python, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps",
         "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )  # fmt: skip
    cold = time.perf_counter() - start
    print(f"cold (pip from the registry): {cold:.1f} s, {len(pins)} packages", flush=True)

    house = Path(args.wheelhouse) if args.wheelhouse else work / "wheelhouse"
    shutil.rmtree(house, ignore_errors=True)
    build(profile, house, args.sets)
    paths = {"no_uv": _path_without_uv(), "uv": _path_with_uv(work)}
    assert shutil.which("uv", path=paths["no_uv"]) is None and shutil.which("uv", path=paths["uv"])
    times: dict[str, list[float]] = {"no_uv": [], "uv": [], "copy": []}
    for round_ in range(args.repeat):
        for label, path in paths.items():
            python, site = _venv(work / f"warm-{label}-{round_}", torch_site)
            times[label].append(_warm(profile, args.sets, house, python, path, len(pins)))
            print(f"warm, {label.replace('_', ' ')} on PATH: {times[label][-1]:.2f} s", flush=True)
        bare_python, bare_site = _venv(work / f"bare-{round_}", torch_site)
        new = sorted(set(site.iterdir()) - {bare_site / e.name for e in bare_site.iterdir()})
        bin_dir = Path(python).parent
        new_bin = sorted(e for e in bin_dir.iterdir() if not (Path(bare_python).parent / e.name).exists())
        times["copy"].append(_copy(new, bare_site, new_bin, Path(bare_python).parent))
        print(f"copy (cp -r of the same files): {times['copy'][-1]:.2f} s", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", WARM, ",".join(args.sets), str(house), profile.name, python],
                   check=True, capture_output=True)  # fmt: skip
    noop = time.perf_counter() - start
    best = {label: min(values) for label, values in times.items()}
    print(
        json.dumps(
            {
                "packages": len(pins),
                "sets": args.sets,
                "profile": profile.name,
                "linked_trees": (house / "unpacked").is_dir(),
                "cold_s": round(cold, 2),
                "warm_no_uv_s": round(best["no_uv"], 2),
                "warm_uv_s": round(best["uv"], 2),
                "copy_s": round(best["copy"], 2),
                "second_call_s": round(noop, 3),
                "warm_no_uv_over_copy": round(best["no_uv"] / best["copy"], 2),
                "warm_uv_over_copy": round(best["uv"] / best["copy"], 2),
                "warm_over_cold": round(max(best["no_uv"], best["uv"]) / cold, 3),
                "runs": {label: [round(v, 2) for v in values] for label, values in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
