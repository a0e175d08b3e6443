"""Crash safety of nbkit.fsio, with real processes killed by SIGKILL half way through a write."""

from __future__ import annotations

import errno
import json
import signal
import time
from pathlib import Path

import pytest
from child_process import kill, start_child, wait_for_line

from nbkit.errors import DriveDisconnectedError
from nbkit.fsio import (
    OLD_PREFIX,
    TEMP_PREFIX,
    atomic_directory,
    atomic_path,
    atomic_write_json,
    clean_temporaries,
    read_json,
    retry_io,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((TEMP_PREFIX, OLD_PREFIX)))


def test_atomic_write_json_round_trip_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "session.json"
    data = {"name": "dög", "values": [1, 2.5, None, True], "nested": {"a": "b"}}
    atomic_write_json(target, data)
    assert read_json(target) == data
    assert temporaries(target.parent) == []


def test_atomic_path_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old weights")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old weights"
    assert temporaries(tmp_path) == []


def test_sigkill_inside_atomic_path_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoints" / "step-500.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"A" * 100_000)
    child = start_child(
        f"""
        import sys, time
        from nbkit.fsio import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"B" * 60_000)
                handle.flush()
                print("writing", flush=True)
                time.sleep(60)
                handle.write(b"B" * 40_000)
        """
    )
    wait_for_line(child, "writing")
    kill(child)
    assert target.read_bytes() == b"A" * 100_000
    assert len(temporaries(target.parent)) == 1  # the killed writer's half file
    assert len(clean_temporaries(target.parent)) == 1
    assert temporaries(target.parent) == []
    assert target.read_bytes() == b"A" * 100_000


def test_sigkill_while_rewriting_a_manifest_in_a_loop_never_leaves_a_broken_file(tmp_path):
    target = tmp_path / "session.json"
    atomic_write_json(target, {"version": -1, "payload": ""})
    # Big manifests make each write take long enough that kills land mid-write.
    child = start_child(
        f"""
        from nbkit.fsio import atomic_write_json
        payload = "x" * 2_000_000
        print("started", flush=True)
        version = 0
        while True:
            atomic_write_json({str(target)!r}, {{"version": version, "payload": payload}})
            version += 1
        """
    )
    wait_for_line(child, "started")
    seen = set()
    for _ in range(5):
        data = json.loads(target.read_text())  # never a half-written file, even while the child writes
        seen.add(data["version"])
        time.sleep(0.05)
    kill(child)
    data = json.loads(target.read_text())
    assert data["version"] >= max(seen)
    assert data["payload"] in ("", "x" * 2_000_000)
    clean_temporaries(tmp_path)
    assert temporaries(tmp_path) == []


def test_sigkill_inside_atomic_directory_keeps_the_old_directory(tmp_path):
    target = tmp_path / "checkpoint-500"
    target.mkdir()
    (target / "unet.safetensors").write_bytes(b"old unet")
    child = start_child(
        f"""
        import time
        from nbkit.fsio import atomic_directory
        with atomic_directory({str(target)!r}) as tmp:
            (tmp / "unet.safetensors").write_bytes(b"new unet, half")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    wait_for_line(child, "writing")
    kill(child)
    assert sorted(p.name for p in target.iterdir()) == ["unet.safetensors"]
    assert (target / "unet.safetensors").read_bytes() == b"old unet"
    clean_temporaries(tmp_path)
    assert temporaries(tmp_path) == []


def test_sigkill_between_the_two_renames_of_atomic_directory_is_repaired(tmp_path):
    target = tmp_path / "checkpoint-500"
    target.mkdir()
    (target / "unet.safetensors").write_bytes(b"old unet")
    # The child stalls right after moving the old directory aside, before the new one is renamed in.
    child = start_child(
        f"""
        import os, time
        import nbkit.fsio
        real_replace = os.replace
        def stalling_replace(source, destination):
            real_replace(source, destination)
            if os.path.basename(str(destination)).startswith(nbkit.fsio.OLD_PREFIX):
                print("aside", flush=True)
                time.sleep(60)
        os.replace = stalling_replace
        with nbkit.fsio.atomic_directory({str(target)!r}) as tmp:
            (tmp / "unet.safetensors").write_bytes(b"new unet")
        """
    )
    wait_for_line(child, "aside")
    kill(child)
    assert not target.exists()
    assert (tmp_path / f"{OLD_PREFIX}checkpoint-500").is_dir()
    clean_temporaries(tmp_path)
    assert (target / "unet.safetensors").read_bytes() == b"old unet"
    assert temporaries(tmp_path) == []


def test_atomic_directory_replaces_a_directory_completely(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    with atomic_directory(target) as tmp:
        (tmp / "fresh.bin").write_bytes(b"new")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.bin"]
    assert temporaries(tmp_path) == []


def test_clean_temporaries_leaves_ordinary_files_alone(tmp_path):
    (tmp_path / "session.json").write_text("{}")
    (tmp_path / f"{TEMP_PREFIX}1234-session.json").write_text("{")
    (tmp_path / f"{TEMP_PREFIX}dir").mkdir()
    removed = clean_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [f"{TEMP_PREFIX}1234-session.json", f"{TEMP_PREFIX}dir"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session.json"]


class FlakyMount:
    """Raises ENOTCONN for the first `failures` calls, like a Drive FUSE mount that drops out."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", "/content/drive/MyDrive/x")
        return "data"


def test_retry_io_recovers_from_a_drive_dropout():
    sleeps: list[float] = []
    flaky = FlakyMount(failures=2)
    assert retry_io(flaky, attempts=5, first_delay=0.5, sleep=sleeps.append) == "data"
    assert flaky.calls == 3
    assert sleeps == [0.5, 1.0]


def test_retry_io_gives_up_with_drive_disconnected_error():
    sleeps: list[float] = []
    flaky = FlakyMount(failures=100)
    with pytest.raises(DriveDisconnectedError) as caught:
        retry_io(flaky, what="saving session.json", attempts=4, first_delay=0.25, sleep=sleeps.append)
    assert flaky.calls == 4
    assert sleeps == [0.25, 0.5, 1.0]
    message = str(caught.value)
    assert "saving session.json failed 4 times" in message
    assert "/content/drive/MyDrive/x" in message
    assert "force_remount=True" in message


def test_retry_io_does_not_retry_ordinary_errors():
    sleeps: list[float] = []

    def missing():
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")

    with pytest.raises(FileNotFoundError):
        retry_io(missing, sleep=sleeps.append)
    assert sleeps == []
