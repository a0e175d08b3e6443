"""The committed lock covers pyproject.toml, and nbkit names a bad ML stack before a run starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbkit.compat import IncompatibleVersionsError, check_versions, find_problems, requirements_for
from nbkit.wheels.lockfile import DEV_LOCK, check_lock, read_lock

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / DEV_LOCK
PYPROJECT = REPO / "pyproject.toml"


def test_the_committed_lock_covers_pyproject_for_this_python():
    assert check_lock(LOCK, PYPROJECT) == []


def test_every_pin_has_hashes_and_torch_is_left_to_the_runtime():
    pins = read_lock(LOCK)
    assert len(pins) > 100
    assert all(pin.hashes and all(h.startswith("sha256:") for h in pin.hashes) for pin in pins)
    names = {pin.name for pin in pins}
    assert "torch" not in names
    assert not [name for name in names if name.startswith(("nvidia-", "triton", "cuda-"))]


def _lock_without(tmp_path: Path, package: str) -> Path:
    """The committed lock with one package's block cut out."""
    lines = LOCK.read_text().splitlines(keepends=True)
    kept, skipping = [], False
    for line in lines:
        if line[:1].isalnum():
            skipping = line.lower().startswith(f"{package}==")
        if not skipping:
            kept.append(line)
    path = tmp_path / "lock.txt"
    path.write_text("".join(kept))
    return path


def test_a_lock_missing_a_direct_dependency_fails(tmp_path):
    problems = check_lock(_lock_without(tmp_path, "safetensors"), PYPROJECT)
    assert any("safetensors" in p and "not in the lock" in p for p in problems), problems


def test_a_lock_missing_a_transitive_dependency_fails(tmp_path):
    # regex is needed by transformers only, not by nbkit itself
    problems = check_lock(_lock_without(tmp_path, "regex"), PYPROJECT)
    assert any(p.startswith("regex") and "transformers" in p for p in problems), problems


def test_a_pin_outside_the_pyproject_range_fails(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(PYPROJECT.read_text().replace('"peft>=0.13"', '"peft>=99"'))
    problems = check_lock(LOCK, pyproject)
    assert any("peft" in p and "peft>=99" in p for p in problems), problems


def test_the_lock_check_command_exits_nonzero_on_a_stale_lock(tmp_path):
    stale = _lock_without(tmp_path, "safetensors")
    command = [sys.executable, "-m", "nbkit.wheels.check_lock"]
    assert subprocess.run([*command, str(LOCK)], capture_output=True).returncode == 0
    completed = subprocess.run([*command, str(stale)], capture_output=True, text=True)
    assert completed.returncode == 1
    assert "safetensors" in completed.stderr and "Refresh the lock" in completed.stderr


def test_the_installed_stack_is_supported():
    check_versions("train")
    check_versions("models")


def test_train_requirements_follow_nbkit_own_extras():
    wanted = requirements_for("train")
    assert {"peft", "transformers", "diffusers", "accelerate", "torch"} <= set(wanted)


SUPPORTED = {"torch": "2.13.0+cpu", "diffusers": "0.42.1", "transformers": "5.23.0", "accelerate": "1.15.0"}


def test_transformers_that_refuses_the_installed_peft_is_named_with_the_fix():
    runtime = {**SUPPORTED, "peft": "0.21.2"}
    with pytest.raises(IncompatibleVersionsError) as raised:
        check_versions("train", runtime, peft_minimum="0.22.0")
    message = str(raised.value)
    assert "transformers 5.23.0 refuses peft 0.21.2 (it needs peft >= 0.22.0)" in message
    assert 'pip install "peft>=0.22.0"' in message
    assert "\n" not in message  # one paragraph


def test_transformers_outside_the_range_is_pinned_back_into_it():
    # The real case on this machine's registry: transformers 5.24 with the newest peft, 0.21.2.
    runtime = {**SUPPORTED, "transformers": "5.24.0", "peft": "0.21.2"}
    problems = find_problems("train", runtime, peft_minimum="0.22.0")
    assert [p.package for p in problems] == ["transformers"]
    with pytest.raises(IncompatibleVersionsError) as raised:
        check_versions("train", runtime, peft_minimum="0.22.0")
    message = str(raised.value)
    assert "transformers 5.24.0 is outside transformers<5.24,>=4.45" in message
    assert 'pip install "transformers<5.24,>=4.45"' in message
    assert "restart the runtime" in message


def test_a_missing_package_is_named():
    problems = find_problems("train", {**SUPPORTED, "peft": None})
    assert [(p.package, p.reason) for p in problems] == [("peft", "peft is not installed")]


def test_the_models_part_does_not_need_peft():
    assert find_problems("models", {**SUPPORTED, "peft": None}) == []


@pytest.mark.parametrize(
    ("package", "start", "message"),
    [
        ("peft", "from nbkit.train import train", "peft 0.1.0 is outside peft>=0.13"),
        ("gradio", "from nbkit.webui import launch; launch()", "gradio 0.1.0 is outside gradio>=4.44"),
    ],
)
def test_an_unsupported_stack_stops_training_and_the_ui_with_the_message(tmp_path, package, start, message):
    """A faked site-packages with an old package in front of the real one: starting says so, in one line."""
    fake = tmp_path / "site"
    info = fake / f"{package}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1.0\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        f"try:\n    {start}\nexcept Exception as error:\n    print(type(error).__name__, error)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code, str(fake)], capture_output=True, text=True)
    assert "IncompatibleVersionsError" in completed.stdout
    assert message in completed.stdout


def test_catalog_modules_import_without_the_version_check():
    # The check belongs to the entry points (training, the web UI), not to importing a table.
    code = (
        "import nbkit.compat\n"
        "def refuse(*args, **kwargs): raise SystemExit('versions checked')\n"
        "nbkit.compat.check_versions = refuse\n"
        "import nbkit.train.oom, nbkit.train.plan, nbkit.webui.controlnet, nbkit.generation.samplers\n"
        "print('catalogs imported', flush=True)\n"
        "from nbkit.train import train\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert completed.stdout.strip() == "catalogs imported", completed.stderr
    assert completed.returncode == 1 and "versions checked" in completed.stderr
