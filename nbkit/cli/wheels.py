"""`nbkit wheels ...`: lock, build, install, verify, prune and show the precompiled-wheel cache.

Works before any optional package is installed: nothing here (or in nbkit.wheels) imports torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nbkit.errors import NbkitError


def _house(args: argparse.Namespace) -> Path:
    from nbkit.wheels.house import default_wheelhouse

    return Path(args.wheelhouse) if args.wheelhouse else default_wheelhouse()


def _index_args(args: argparse.Namespace) -> list[str]:
    return ["--no-index", "--find-links", args.find_links] if args.find_links else []


def _profiles(args: argparse.Namespace, names: list[str] | None = None):
    from nbkit.wheels.profiles import get_profile, load_profiles

    if names:
        return [get_profile(name, args.profiles_dir) for name in names]
    return load_profiles(args.profiles_dir)


def _chosen_profile(args: argparse.Namespace):
    from nbkit.wheels.profiles import get_profile, probe_runtime, select_profile

    if args.profile:
        return get_profile(args.profile, args.profiles_dir)
    profile, why = select_profile(probe_runtime(args.python), args.profiles_dir)
    if profile is None:
        raise NbkitError(why, fix="name a profile with --profile (see `nbkit wheels status`)")
    print(f"nbkit wheels: {why}")
    return profile


def lock_(args: argparse.Namespace) -> int:
    from nbkit.wheels.build import lock

    for profile in _profiles(args, args.profiles):
        lock(profile, args.set, upgrade=args.upgrade)
    return 0


def build_(args: argparse.Namespace) -> int:
    from nbkit.wheels.build import build

    profile = _chosen_profile(args)
    there, fetched = build(profile, _house(args), args.set, python=args.python, index_args=_index_args(args))
    print(f"nbkit wheels: {profile.name}: {there} wheel(s) already in the wheelhouse, {fetched} downloaded")
    return 0


def install_(args: argparse.Namespace) -> int:
    from nbkit.wheels.install import install

    install(
        args.set or ["train"],
        _house(args),
        args.profile,
        python=args.python,
        index_args=_index_args(args),
        profiles_dir=args.profiles_dir,
    )
    return 0


def verify_(args: argparse.Namespace) -> int:
    from nbkit.wheels.house import verify
    from nbkit.wheels.profiles import is_protected

    profile = _chosen_profile(args)
    pins = [pin for pin in profile.pins(args.set) if not is_protected(pin.name)]
    report = verify(_house(args), pins, remove_bad=args.remove_bad)
    print(
        f"nbkit wheels: {profile.name}: {len(report.good)} wheel(s) match the lock, {len(report.bad)} do "
        f"not, {len(report.missing)} missing, {len(report.unknown)} not in this profile"
    )
    for path in report.bad:
        print(f"  DOES NOT MATCH THE LOCK: {path}" + (" (removed)" if args.remove_bad else ""))
    for pin in report.missing:
        print(f"  missing: {pin.name}=={pin.version}")
    return 1 if report.bad else 0


def prune_(args: argparse.Namespace) -> int:
    from nbkit.session.store import format_size
    from nbkit.wheels.house import prune

    keep = [pin for profile in _profiles(args, args.keep) for pin in profile.pins()]
    removed, freed = prune(_house(args), keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"  {verb} {path.name}")
    print(f"nbkit wheels: {verb} {len(removed)} wheel(s), {format_size(freed)} freed")
    return 0


def status_(args: argparse.Namespace) -> int:
    from nbkit.session.store import format_size
    from nbkit.wheels.house import wheels_in
    from nbkit.wheels.profiles import is_protected, probe_runtime, select_profile

    house = _house(args)
    wheels = wheels_in(house)
    print(f"wheelhouse {house}: {len(wheels)} wheel(s), {format_size(sum(w.size for w in wheels))}")
    held = {(w.name, w.version) for w in wheels}
    runtime = probe_runtime(args.python)
    print(f"runtime: {runtime.describe()}")
    print(f"  {select_profile(runtime, args.profiles_dir)[1]}")
    for profile in _profiles(args):
        pins = [pin for pin in profile.pins() if not is_protected(pin.name)]
        have = sum((pin.name, pin.version) in held for pin in pins)
        print(f"profile {profile.name}: {have}/{len(pins)} wheels present  ({profile.description})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("wheels", help="the precompiled-wheel cache: fast, verified installs")
    commands = parser.add_subparsers(dest="wheels_command", metavar="ACTION", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--profiles-dir", help=argparse.SUPPRESS)
        sub.add_argument("--wheelhouse", help="the wheel folder (default: <storage root>/wheelhouse)")
        sub.add_argument("--python", help="the interpreter to act for (default: this one)")
        sub.set_defaults(func=func)
        return sub

    sets_help = "a package set: train, ui, images, vision (repeat it; default: all the profile has)"
    lock = add("lock", lock_, "regenerate profiles' locks with uv (maintainers; needs the registry)")
    lock.add_argument("profiles", nargs="*", help="profile names (default: all)")
    lock.add_argument("--set", action="append", help=sets_help)
    lock.add_argument("--upgrade", action="store_true", help="take the newest allowed versions")
    for name, func, help in [
        ("build", build_, "download every wheel a profile needs into the wheelhouse"),
        ("install", install_, "install package sets from the wheelhouse (downloading what is missing)"),
        ("verify", verify_, "check every wheel of a profile against its lock's hashes"),
    ]:
        sub = add(name, func, help)
        sub.add_argument("--profile", help="the profile (default: the one that fits this runtime)")
        sub.add_argument(
            "--set",
            action="append",
            help=sets_help if name != "install" else sets_help.replace("all the profile has", "train"),
        )
        if name != "verify":
            sub.add_argument("--find-links", help="fetch from this folder of wheels instead of PyPI")
        else:
            sub.add_argument("--remove-bad", action="store_true", help="delete wheels that fail")
    prune = add("prune", prune_, "remove wheels of versions no profile needs")
    prune.add_argument("--keep", action="append", help="keep only these profiles' wheels (default: all)")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    add("status", status_, "what the wheelhouse holds, its size, and the profile for this runtime")
