"""The precompiled-wheel cache, offline: tiny local packages built into wheels, a profile over them,
a wheelhouse filled from a local folder index and installed into a fresh venv."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nbkit.errors import NbkitError
from nbkit.wheels import RuntimeSpec, install, load_profiles, prune, select_profile, verify
from nbkit.wheels.house import wheels_in
from nbkit.wheels.install import plan, xformers_fits
from nbkit.wheels.lockfile import Pin
from nbkit.wheels.profiles import get_profile, is_protected, probe_runtime

REPO = Path(__file__).resolve().parents[1]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
PLATFORM = sysconfig.get_platform()
LOCAL = ["--no-index", "--find-links"]


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _project(root: Path, name: str, version: str, requires: list[str], extra: str = "") -> Path:
    folder = root / f"{name}-{version}"
    module = name.replace("-", "_")
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(
        f"VERSION = {version!r}\n\ndef main():\n    print(VERSION)\n"
    )
    if extra:  # a module only this version has
        (folder / module / f"{extra}.py").write_text("")
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "{version}"
        dependencies = {json.dumps(requires)}
        scripts = {{ "{name}" = "{module}:main" }}
        """)
    )
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """A folder 'index' with nbk-alpha 1.0 (needs nbk-beta) and nbk-beta 1.0 and 0.9, as real wheels."""
    root = tmp_path_factory.mktemp("projects")
    folder = tmp_path_factory.mktemp("index")
    projects = [
        _project(root, "nbk-alpha", "1.0", ["nbk-beta==1.0"]),
        _project(root, "nbk-beta", "1.0", []),
        _project(root, "nbk-beta", "0.9", [], extra="only_in_0_9"),
    ]
    for batch in (projects[:2], projects[2:]):  # pip builds one version of a name per call
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-w", str(folder), *map(str, batch)],
            check=True, capture_output=True,
        )  # fmt: skip
    return folder


def _wheel(index: Path, name: str, version: str) -> Path:
    return next(index.glob(f"{name.replace('-', '_')}-{version}-*.whl"))


def _profile(root: Path, index: Path, *, torch: str | None = None, bad_hash: bool = False) -> Path:
    """A profile `test` over the tiny packages (set `train`) with their real sha256s."""
    folder = root / "test"
    folder.mkdir(parents=True)
    (folder / "profile.json").write_text(
        json.dumps(
            {
                "python": PYTHON,
                "platform": PLATFORM,
                "torch": torch,
                "cuda": "",
                "sets": {"train": "train.txt"},
            }
        )
    )
    lines = []
    for name in ("nbk-alpha", "nbk-beta"):
        digest = (
            "sha256:" + "0" * 64 if bad_hash and name == "nbk-beta" else _sha256(_wheel(index, name, "1.0"))
        )
        lines.append(f"{name}==1.0 \\\n    --hash={digest}\n")
    (folder / "train.txt").write_text("# made for the test\n" + "".join(lines))
    return root


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    return str(folder / "bin" / "python")


def _imports(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import nbk_alpha, nbk_beta; print(nbk_alpha.VERSION, nbk_beta.VERSION)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip() if result.returncode == 0 else result.stderr


def _uninstall(python: str, *names: str) -> None:
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", *names], check=True, capture_output=True)


def test_install_into_a_fresh_venv_offline_then_no_op_then_from_the_wheelhouse(tmp_path, index, venv):
    profiles, house, messages = _profile(tmp_path / "profiles", index), tmp_path / "wh", []
    kwargs = dict(python=venv, profiles_dir=profiles, log=messages.append)
    report = install(["train"], house, index_args=[*LOCAL, str(index)], **kwargs)
    assert report.profile == "test"
    assert sorted(report.downloaded) == ["nbk-alpha", "nbk-beta"] and report.from_wheelhouse == []
    assert _imports(venv) == "1.0 1.0"
    assert sorted(w.path.name for w in wheels_in(house)) == sorted(
        _wheel(index, n, "1.0").name for n in ("nbk-alpha", "nbk-beta")
    )
    assert "downloaded into it first" in messages[-1]

    again = install(["train"], house, index_args=[*LOCAL, str(tmp_path / "nowhere")], **kwargs)
    assert again.installed == [] and sorted(again.already) == ["nbk-alpha", "nbk-beta"]

    # a new runtime (the package gone) installs from the wheelhouse alone: the index is unreachable
    _uninstall(venv, "nbk-alpha")
    third = install(["train"], house, index_args=[*LOCAL, str(tmp_path / "nowhere")], **kwargs)
    assert third.from_wheelhouse == ["nbk-alpha"] and third.already == ["nbk-beta"] and third.downloaded == []
    assert _imports(venv) == "1.0 1.0"


def test_a_tampered_wheel_is_refused_removed_and_fetched_again(tmp_path, index, venv):
    profiles, house, messages = _profile(tmp_path / "profiles", index), tmp_path / "wh", []
    house.mkdir()
    tampered = house / _wheel(index, "nbk-alpha", "1.0").name
    tampered.write_bytes(_wheel(index, "nbk-alpha", "1.0").read_bytes() + b"tampered")
    (house / _wheel(index, "nbk-beta", "1.0").name).write_bytes(_wheel(index, "nbk-beta", "1.0").read_bytes())
    _uninstall(venv, "nbk-alpha", "nbk-beta")
    report = install(
        ["train"], house, python=venv, profiles_dir=profiles, index_args=[*LOCAL, str(index)],
        log=messages.append,
    )  # fmt: skip
    assert report.downloaded == ["nbk-alpha"] and report.from_wheelhouse == ["nbk-beta"]
    refusal = next(m for m in messages if "does not match the lock" in m)
    assert str(tampered) in refusal and "fetched again" in refusal
    assert _sha256(tampered) == _sha256(_wheel(index, "nbk-alpha", "1.0"))
    assert _imports(venv) == "1.0 1.0"


def _run(python: str, code: str) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_warm_install_needs_nothing_on_path_and_replaces_another_version(tmp_path, index):
    """PATH holds neither uv nor pip: nbkit unpacks the wheels itself, over an older nbk-beta."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, capture_output=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *LOCAL, str(index),
         "nbk-beta==0.9"], check=True, capture_output=True,
    )  # fmt: skip
    site = Path(_run(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    assert (site / "nbk_beta" / "only_in_0_9.py").is_file()
    profiles, house = _profile(tmp_path / "profiles", index), tmp_path / "wh"
    house.mkdir()
    for name in ("nbk-alpha", "nbk-beta"):
        (house / _wheel(index, name, "1.0").name).write_bytes(_wheel(index, name, "1.0").read_bytes())
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "nbkit", "wheels", "install", "--profiles-dir", str(profiles),
         "--wheelhouse", str(house), "--python", python, "--set", "train",
         "--find-links", str(tmp_path / "nowhere")],
        capture_output=True, text=True, check=False, env={"PATH": str(empty), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed: 2 (2 from the wheelhouse, 0 downloaded" in result.stdout
    assert _imports(python) == "1.0 1.0"
    assert not (site / "nbk_beta" / "only_in_0_9.py").exists()  # the old version's files are gone
    versions = "from importlib.metadata import version as v; print(v('nbk-alpha'), v('nbk-beta'))"
    assert _run(python, versions) == "1.0 1.0"
    script = tmp_path / "venv" / "bin" / "nbk-alpha"  # the entry point's launcher
    assert subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout == "1.0\n"
    dist_info = next(site.glob("nbk_alpha-1.0.dist-info"))
    assert (dist_info / "INSTALLER").read_text() == "nbkit\n"
    # RECORD lists every file, so pip (or nbkit) can remove the package again
    _uninstall(python, "nbk-alpha", "nbk-beta")
    assert not (site / "nbk_alpha").exists() and not script.exists() and not dist_info.exists()


def _bare_venv(folder: Path) -> tuple[str, Path]:
    """A venv without pip (made in a blink), and its site-packages."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True
    )
    python = str(folder / "bin" / "python")
    return python, Path(_run(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))


def _remove(python: str, *names: str) -> None:
    """Uninstall through nbkit's own RECORD reader (pip takes a second per call)."""
    from nbkit.wheels.unpack import installed_metadata, remove_installed, target_scheme

    scheme = target_scheme(python)
    present = installed_metadata(scheme)
    for name in names:
        assert name not in present or remove_installed(present[name], scheme)


def _house(folder: Path, index: Path) -> Path:
    folder.mkdir()
    for name in ("nbk-alpha", "nbk-beta"):
        (folder / _wheel(index, name, "1.0").name).write_bytes(_wheel(index, name, "1.0").read_bytes())
    return folder


def test_a_warm_install_links_the_unpacked_tree_and_a_damaged_tree_is_unpacked_again(tmp_path, index, venv):
    python, site = venv, Path(_run(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    _remove(python, "nbk-alpha", "nbk-beta")
    profiles, house, messages = _profile(tmp_path / "profiles", index), _house(tmp_path / "wh", index), []
    wheel = house / _wheel(index, "nbk-alpha", "1.0").name
    kwargs = dict(python=python, profiles_dir=profiles, index_args=[*LOCAL, str(index)], log=messages.append)
    assert sorted(install(["train"], house, **kwargs).from_wheelhouse) == ["nbk-alpha", "nbk-beta"]
    tree = house / "unpacked" / wheel.name.removesuffix(".whl")
    cached, installed = tree / "files" / "nbk_alpha" / "__init__.py", site / "nbk_alpha" / "__init__.py"
    assert installed.samefile(cached)  # a hard link: no bytes written
    assert (site / "nbk_alpha-1.0.dist-info" / "RECORD").is_file() and _imports(python) == "1.0 1.0"
    good = cached.read_bytes()

    def reinstall(damage) -> list[str]:
        _remove(python, "nbk-alpha")  # its files unlinked, the tree's stay
        damage()
        messages.clear()
        report = install(["train"], house, **kwargs)
        assert report.installed == ["nbk-alpha"] and _imports(python) == "1.0 1.0"
        assert cached.read_bytes() == good and installed.samefile(cached)
        return [m for m in messages if "is not the file unpacked" in m]

    # truncated, then one byte flipped in place (same size, a later mtime): caught, unpacked again
    for damage in (lambda: cached.write_bytes(good[:5]), lambda: cached.write_bytes(good.swapcase())):
        caught = reinstall(damage)
        assert len(caught) == 1 and str(cached) in caught[0] and f"unpacking {wheel.name} again" in caught[0]
    # only touched: its hash still matches, nothing said, and the new mtime is recorded
    assert reinstall(lambda: os.utime(cached, ns=(1, 1))) == []
    files = json.loads((tree / "manifest.json").read_text())["files"]
    assert next(f for f in files if f[0] == "nbk_alpha/__init__.py")[3] == 1
    # the tree damaged and the wheel too: the tree is dropped unread (its wheel changed), the wheel is
    # refused and fetched again, and the tree unpacked anew from it
    _remove(python, "nbk-alpha")
    cached.write_bytes(b"x")
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    messages.clear()
    assert install(["train"], house, **kwargs).downloaded == ["nbk-alpha"] and _imports(python) == "1.0 1.0"
    assert any("does not match the lock" in m and "fetched again" in m for m in messages)
    assert installed.samefile(cached) and cached.read_bytes() == good


def test_without_links_the_wheel_is_unpacked_or_the_tree_copied(tmp_path, index, monkeypatch):
    """Across filesystems (a wheelhouse on Drive) no tree is kept; where a link is refused, files are copied."""
    from nbkit.wheels import unpack

    python, site = _bare_venv(tmp_path / "venv")
    profiles, house = _profile(tmp_path / "profiles", index), _house(tmp_path / "wh", index)
    kwargs = dict(python=python, profiles_dir=profiles, log=lambda _: None)
    monkeypatch.setattr(unpack, "same_filesystem", lambda *_: False)
    assert sorted(install(["train"], house, **kwargs).from_wheelhouse) == ["nbk-alpha", "nbk-beta"]
    assert not (house / "unpacked").exists() and _imports(python) == "1.0 1.0"
    assert (site / "nbk_alpha" / "__init__.py").stat().st_nlink == 1
    monkeypatch.undo()

    def no_links(*_):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    _remove(python, "nbk-alpha", "nbk-beta")
    monkeypatch.setattr(os, "link", no_links)
    assert sorted(install(["train"], house, **kwargs).from_wheelhouse) == ["nbk-alpha", "nbk-beta"]
    assert (house / "unpacked").is_dir() and _imports(python) == "1.0 1.0"
    assert (site / "nbk_alpha" / "__init__.py").stat().st_nlink == 1


def _bad_wheel(path: Path, member: str, size: int = 10) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
        archive.writestr("evil-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
        archive.writestr(member, b"x" * size)
    return path.read_bytes()


def test_a_wheel_naming_a_path_outside_or_too_big_is_refused(tmp_path, monkeypatch):
    from nbkit.wheels import unpack

    site = tmp_path / "prefix" / "site"
    scheme = unpack.Scheme(site, site, tmp_path / "prefix" / "bin", tmp_path / "prefix",
                           tmp_path / "prefix" / "include", sys.executable)  # fmt: skip
    for member in ("../escape.py", "/abs.py", "evil-1.0.data/scripts/../../../escape.py", "a\\..\\b.py"):
        data = _bad_wheel(tmp_path / "evil-1.0-py3-none-any.whl", member)
        with pytest.raises(NbkitError, match="outside its install folder"):
            unpack.unpack_wheel(data, "evil-1.0-py3-none-any.whl", scheme)
        assert not (tmp_path / "escape.py").exists() and not list(site.rglob("*.py"))
        assert not list(site.glob("*.dist-info/RECORD"))  # what was written is removed again
        with pytest.raises(NbkitError, match="outside its install folder"):  # nor into a wheelhouse tree
            unpack.fill_tree(data, tmp_path / "evil-1.0-py3-none-any.whl", "sha256:0")
        assert not (tmp_path / "escape.py").exists() and not list((tmp_path / "unpacked").iterdir())
    monkeypatch.setattr(unpack, "MAX_UNPACKED", 1000)
    data = _bad_wheel(tmp_path / "big-1.0-py3-none-any.whl", "evil/big.py", size=2000)
    with pytest.raises(NbkitError, match="over nbkit's bound"):
        unpack.unpack_wheel(data, "evil-1.0-py3-none-any.whl", scheme)
    with pytest.raises(NbkitError, match="over nbkit's bound"):
        unpack.fill_tree(data, tmp_path / "big-1.0-py3-none-any.whl", "sha256:0")
    assert not list(site.rglob("big.py")) and not list((tmp_path / "unpacked").iterdir())


def test_a_lock_whose_hash_does_not_match_is_refused(tmp_path, index, venv):
    profiles = _profile(tmp_path / "profiles", index, bad_hash=True)
    _uninstall(venv, "nbk-alpha", "nbk-beta")
    with pytest.raises(NbkitError, match="does not match the lock"):
        install(
            ["train"], tmp_path / "wh", python=venv, profiles_dir=profiles,
            index_args=[*LOCAL, str(index)], log=lambda _: None,
        )  # fmt: skip
    assert "No module named" in _imports(venv)
    assert list((tmp_path / "wh").glob("*.whl")) == []  # nothing unverified lands in the wheelhouse


def test_verify_and_prune_keep_what_a_profile_needs(tmp_path, index):
    profile = get_profile("test", _profile(tmp_path / "profiles", index))
    house = tmp_path / "wh"
    house.mkdir()
    for name, version in [("nbk-alpha", "1.0"), ("nbk-beta", "1.0"), ("nbk-beta", "0.9")]:
        (house / _wheel(index, name, version).name).write_bytes(_wheel(index, name, version).read_bytes())
    report = verify(house, profile.pins())
    assert len(report.good) == 2 and report.bad == [] and report.missing == []
    assert [p.name for p in report.unknown] == [_wheel(index, "nbk-beta", "0.9").name]

    stale = house / _wheel(index, "nbk-beta", "0.9").name
    removed, freed = prune(house, profile.pins())
    assert removed == [stale] and freed == _wheel(index, "nbk-beta", "0.9").stat().st_size
    assert sorted(w.name for w in wheels_in(house)) == ["nbk-alpha", "nbk-beta"]

    kept = house / _wheel(index, "nbk-alpha", "1.0").name
    kept.write_bytes(b"not a wheel any more")
    report = verify(house, profile.pins(), remove_bad=True)
    assert report.bad == [kept] and not kept.exists() and [p.name for p in report.missing] == ["nbk-alpha"]


def _pin(name: str, version: str) -> Pin:
    return Pin(name, version, Requirement(f"{name}=={version}"), (f"sha256:{'1' * 64}",))


def test_torch_and_cuda_libraries_are_never_installed_where_torch_is_present():
    runtime = RuntimeSpec(
        python="3.12", platform="linux-x86_64", torch="2.8.0+cu126", cuda="12.6",
        installed={"torch": "2.8.0+cu126", "nvidia-cudnn-cu12": "9.10.2.21", "numpy": "2.0.2"},
    )  # fmt: skip
    pins = [_pin(n, v) for n, v in [("torch", "2.9.0"), ("torchvision", "0.24.0"), ("triton", "3.5.0"),
                                    ("nvidia-cudnn-cu12", "9.13.0.50"), ("numpy", "2.3.0"), ("tqdm", "4.67.1")]]  # fmt: skip
    todo, _, kept = plan(pins, runtime)
    assert [p.name for p in todo] == ["numpy", "tqdm"]
    assert kept["torch"] == "2.8.0+cu126" and kept["nvidia-cudnn-cu12"] == "9.10.2.21"
    # the real profile's sets, on a runtime that has torch and nothing else
    profile = get_profile("local-cpu-py311")
    todo, _, _ = plan(profile.pins(), runtime)
    assert todo and not [p.name for p in todo if is_protected(p.name)]
    # no torch at all: nothing is protected (there is nothing to protect)
    todo, _, kept = plan(pins, RuntimeSpec(python="3.12", platform="linux-x86_64"))
    assert len(todo) == len(pins) and kept == {}


def test_profile_selection_from_runtime_descriptions():
    local = RuntimeSpec(python="3.11", platform="linux-x86_64", torch="2.13.0+cpu")
    profile, why = select_profile(local)
    assert profile is not None and profile.name == "local-cpu-py311" and "fits" in why
    colab = RuntimeSpec(python="3.12", platform="linux-x86_64", torch="2.13.0+cu128", cuda="12.8")
    assert select_profile(colab)[0].name == "colab-py312-torch2.13-cu128"
    for runtime in [
        RuntimeSpec(python="3.12", platform="linux-x86_64", torch="2.13.0+cpu"),
        RuntimeSpec(python="3.11", platform="linux-x86_64", torch="2.12.0+cpu"),
        RuntimeSpec(python="3.11", platform="linux-x86_64", torch="2.13.0+cu128", cuda="12.8"),
        RuntimeSpec(python="3.11", platform="macosx-14.0-arm64", torch="2.13.0"),
        RuntimeSpec(python="3.11", platform="linux-x86_64"),
    ]:
        profile, why = select_profile(runtime)
        assert profile is None and "without a lock" in why and "local-cpu-py311" in why, runtime
    assert all(p.pins() for p in load_profiles())  # every shipped profile's sets agree and have hashes


def test_this_runtime_is_described_without_importing_torch(tmp_path):
    code = (
        "import sys, nbkit, nbkit.wheels, nbkit.cli.wheels; r = nbkit.wheels.probe_runtime(); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(r.torch)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == probe_runtime().torch


def test_xformers_only_with_a_wheel_built_for_that_exact_torch(tmp_path):
    wheel = tmp_path / "xformers-0.0.32-cp39-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(
            "xformers-0.0.32.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: xformers\nVersion: 0.0.32\nRequires-Dist: numpy\nRequires-Dist: torch==2.8.0\n",
        )
    assert xformers_fits(wheel, "2.8.0+cu126")
    assert not xformers_fits(wheel, "2.9.0+cu126")


def test_cli_status_and_verify(tmp_path, index):
    profiles = _profile(tmp_path / "profiles", index)
    house = tmp_path / "wh"
    house.mkdir()
    bad = house / _wheel(index, "nbk-alpha", "1.0").name
    bad.write_bytes(b"garbage")
    common = ["--profiles-dir", str(profiles), "--wheelhouse", str(house)]
    status = subprocess.run(
        [sys.executable, "-m", "nbkit", "wheels", "status", *common],
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert f"wheelhouse {house}: 1 wheel(s)" in status.stdout and "profile test: 1/2" in status.stdout
    checked = subprocess.run(
        [sys.executable, "-m", "nbkit", "wheels", "verify", "--profile", "test", *common],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 1 and f"DOES NOT MATCH THE LOCK: {bad}" in checked.stdout
