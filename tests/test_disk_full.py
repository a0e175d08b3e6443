"""A full disk or quota (ENOSPC, EDQUOT) ends in one clear `DiskFullError`, never a traceback, with the
last good state kept: in the atomic writers, mid-checkpoint, at a checkpoint boundary (training
pauses when the next checkpoint would not fit), mid-conversion, mid-import and in the wheelhouse.

The full disk is injected by patching a filesystem call to raise OSError(ENOSPC) (or what torch and
safetensors raise instead) at the layer that really fails on a full disk.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import make_session

from nbkit.errors import DiskFullError, DriveDisconnectedError, render
from nbkit.fsio import (
    TEMP_PREFIX,
    atomic_directory,
    atomic_write_bytes,
    is_disk_full,
    retry_io,
    storage_errors,
)
from nbkit.session.core import Session

Usage = collections.namedtuple("Usage", "total used free")
REAL_COPYFILE = shutil.copyfile


def enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if TEMP_PREFIX in path.name]


@pytest.fixture(autouse=True)
def _local_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))


# --- the atomic writers -----------------------------------------------------------------------------


def test_a_full_disk_in_an_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old", encoding="utf-8")

    def fsync(fd):  # where a delayed allocation failure surfaces
        raise enospc()

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError) as caught:
        atomic_write_bytes(target, b"x" * 5000)
    error = caught.value
    assert error.path == str(target) and error.needed == 5000
    assert "disk is full" in str(error) and "5.0 kB" in str(error)
    assert "NBKIT_SCRATCH" in error.fix and "df -h" in error.fix
    assert target.read_text(encoding="utf-8") == "old" and leftovers(tmp_path) == []


def test_a_full_disk_in_an_atomic_directory_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old", encoding="utf-8")
    with pytest.raises(DiskFullError) as caught, atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half", encoding="utf-8")
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp / "weights"))
    assert "storage quota is full" in str(caught.value)
    assert caught.value.path == str(target)  # not the temporary that is gone
    assert (target / "weights").read_text(encoding="utf-8") == "old" and leftovers(tmp_path) == []


def test_drive_gets_its_own_advice(tmp_path):
    with pytest.raises(DiskFullError) as caught, storage_errors("/content/drive/MyDrive/nbkit/x"):
        raise enospc()
    assert "Google Drive" in caught.value.fix and "trash" in caught.value.fix


def test_retry_io_does_not_retry_a_full_disk():
    calls = []

    def copy():
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device", "/src", None, "/dst/file")

    with pytest.raises(DiskFullError) as caught:
        retry_io(copy, what="saving file", sleep=lambda _: pytest.fail("slept"))
    assert calls == [1] and caught.value.path == "/dst/file"


def test_what_libraries_raise_for_a_full_disk_is_recognised(tmp_path, monkeypatch):
    # safetensors (Rust I/O) words it; torch's writer only says the write came up short.
    assert is_disk_full(
        Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_disk_full(short, tmp_path)  # plenty of room: some other failure
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    assert is_disk_full(short, tmp_path)
    assert not is_disk_full(RuntimeError("shapes do not match"), tmp_path)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = enospc()
    assert is_disk_full(wrapped)


def test_a_raw_enotconn_is_a_drive_disconnect():
    with pytest.raises(DriveDisconnectedError, match="remount"), storage_errors("/content/drive/x"):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


def test_storage_errors_leaves_other_errors_alone():
    with pytest.raises(ValueError), storage_errors("/tmp"):
        raise ValueError("not a disk problem")


def test_the_wheelhouse_removes_a_wheel_that_did_not_fit(tmp_path, monkeypatch):
    from nbkit.wheels.house import _move

    source = tmp_path / "pkg-1.0-py3-none-any.whl"
    source.write_bytes(b"w" * 1000)
    house = tmp_path / "house"
    house.mkdir()

    def copyfile(src, dst):
        Path(dst).write_bytes(b"w" * 10)
        raise enospc(dst)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    with pytest.raises(DiskFullError) as caught:
        _move(source, house / source.name)
    assert caught.value.path == str(house / source.name) and caught.value.needed == 1000
    assert list(house.iterdir()) == []


def test_pip_running_out_of_space_is_a_disk_full_error(tmp_path):
    from nbkit.wheels.house import run_quiet

    script = "import sys; sys.stderr.write('ERROR: [Errno 28] No space left on device'); sys.exit(1)"
    with pytest.raises(DiskFullError, match="pip download failed: the disk is full") as caught:
        run_quiet([sys.executable, "-c", script], "pip download", writes_to=tmp_path)
    assert caught.value.path == str(tmp_path)


# --- conversion -------------------------------------------------------------------------------------


def _fail_after(monkeypatch, owner, name: str, calls: int):
    """Make `owner.name` raise ENOSPC on its `calls`-th call (the ones before work)."""
    original = getattr(owner, name)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] >= calls:
            raise enospc()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_a_disk_that_fills_up_mid_conversion_keeps_the_old_output(tiny_model_dir, tmp_path, monkeypatch):
    from nbkit.convert import convert_to_single_file
    from nbkit.convert.safetensors_stream import StreamingSafetensorsWriter

    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the previous model")
    _fail_after(monkeypatch, StreamingSafetensorsWriter, "write", 5)  # a few tensors in
    with pytest.raises(DiskFullError) as caught:
        convert_to_single_file(tiny_model_dir("sd1"), out)
    assert caught.value.path == str(out) and caught.value.needed > 0
    assert "convert" not in caught.value.message and "disk is full" in caught.value.message
    assert out.read_bytes() == b"the previous model" and leftovers(out.parent) == []


def test_the_convert_command_prints_the_disk_full_error_without_a_traceback(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from nbkit.cli import main
    from nbkit.convert.safetensors_stream import StreamingSafetensorsWriter

    _fail_after(monkeypatch, StreamingSafetensorsWriter, "write", 3)
    out = tmp_path / "model.safetensors"
    code = main(["convert", str(tiny_model_dir("sd1")), str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and f"{out}: saving model.safetensors failed: the disk is full" in err
    assert "How to fix: free space" in err and not out.exists() and leftovers(tmp_path) == []


def test_not_enough_space_for_the_output_fails_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    from nbkit.convert import convert_to_single_file

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "model.safetensors"
    with pytest.raises(DiskFullError, match=r"not enough space for model\.safetensors") as caught:
        convert_to_single_file(tiny_model_dir("sd1"), out)
    assert caught.value.free == 1000 and caught.value.needed > 1000 and not out.exists()


# --- image import -----------------------------------------------------------------------------------


def test_a_disk_that_fills_up_mid_import_keeps_the_session_as_it_was(tmp_path, monkeypatch, capsys):
    from test_train_support import subject_image

    from nbkit.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        subject_image(index, 64).save(photos / f"zwx ({index}).png")
    root = tmp_path / "root"
    session = Session.create("dana", root=root)
    assert main(["images", "add", "dana", str(photos / "zwx (0).png"), "--root", str(root)]) == 0
    before = (session.path / "session.json").read_bytes()
    files = sorted(path.relative_to(session.path) for path in session.path.rglob("*"))
    capsys.readouterr()

    real_fsync, writes = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "instance_images" in name and TEMP_PREFIX in name:
            writes.append(name)
            if len(writes) == 3:  # the second photo's original is in, its processed copy does not fit
                raise enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = main(["images", "add", "dana", str(photos), "--root", str(root)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "the disk is full" in err and "instance_images" in err
    assert "How to fix: free space" in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (session.path / "session.json").read_bytes() == before
    assert sorted(path.relative_to(session.path) for path in session.path.rglob("*")) == files
    assert len(Session.open("dana", root=root).manifest.images) == 1


# --- training ---------------------------------------------------------------------------------------

STEPS = {"text_encoder_steps": 1, "unet_steps": 3, "checkpoint_every": 1}


def _fail_publishing(monkeypatch, checkpoint: str) -> None:
    """ENOSPC while `checkpoint` is copied into the session (a full Drive)."""

    def copyfile(src, dst, *args, **kwargs):
        if checkpoint in str(src) and "checkpoints" in str(dst):
            REAL_COPYFILE(src, dst, *args, **kwargs)  # some of it lands, as on a disk that fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
        return REAL_COPYFILE(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)


@pytest.mark.slow
def test_a_full_disk_mid_checkpoint_is_a_clear_error_and_the_previous_checkpoint_resumes(
    tiny_model_dir, tmp_path, monkeypatch
):
    from nbkit.train.scratch import session_scratch
    from nbkit.train.trainer import train

    session = make_session("full", tiny_model_dir("sd1"), "sd1", **STEPS)
    _fail_publishing(monkeypatch, "unet-000002")
    with pytest.raises(DiskFullError) as caught:
        train("full")
    error = caught.value
    assert error.path == str(session.path / "checkpoints" / "unet-000002")
    assert error.message.startswith("saving unet-000002/") and "failed: the disk is full" in error.message
    assert "--resume" in render(error.fix, "cli") and "unet-000001" in error.fix
    monkeypatch.setattr(shutil, "copyfile", REAL_COPYFILE)

    reopened = Session.open("full")
    state = reopened.manifest.state
    assert (state.stage, state.step, state.last_checkpoint) == ("unet", 1, "checkpoints/unet-000001")
    assert reopened.manifest.history[-1].status == "failed"
    assert "DiskFullError" in reopened.manifest.history[-1].detail["error"]
    assert leftovers(session.path) == []
    assert sorted(p.name for p in (session.path / "checkpoints").iterdir()) == [
        "text_encoder-000001",
        "unet-000001",
    ]
    assert not (session_scratch(reopened, create=False) / "checkpoints").exists()  # staging removed

    resumed = train("full", resume=True)
    assert resumed.finished and resumed.losses[0][:2] == ("unet", 2)


def test_torch_short_writes_on_a_full_scratch_disk_are_a_disk_full_error(
    tiny_model_dir, tmp_path, monkeypatch
):
    """torch.save to a full disk says only 'unexpected pos': with the scratch disk full, that is named."""
    from nbkit.train.trainer import train

    make_session("short", tiny_model_dir("sd1"), "sd1", text_encoder_steps=1, unet_steps=0)
    real_usage = shutil.disk_usage
    full = [False]

    def save(*args, **kwargs):
        full[0] = True
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8551808 vs 8551696")

    def disk_usage(path):
        return Usage(10**9, 10**9, 0) if full[0] and "scratch" in str(path) else real_usage(path)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(DiskFullError) as caught:
        train("short")
    assert str(tmp_path / "scratch") in caught.value.path and "NBKIT_SCRATCH" in caught.value.fix
    assert "no checkpoint had been saved yet" in caught.value.fix


@pytest.mark.slow
def test_training_pauses_at_a_checkpoint_when_the_next_one_would_not_fit(tiny_model_dir, monkeypatch):
    from nbkit.train.trainer import train

    session = make_session("tight", tiny_model_dir("sd1"), "sd1", **STEPS)
    checkpoints = session.path / "checkpoints"
    real_usage = shutil.disk_usage
    published = []

    def disk_usage(path):
        published[:] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        if "unet-000001" in published and Path(path) == checkpoints:
            return Usage(10**9, 10**9 - 10**6, 10**6)  # 1 MB left once the first UNet checkpoint is in
        return real_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(DiskFullError) as caught:
        train("tight")
    error = caught.value
    assert error.message.startswith("training paused at unet step 1 of 3, with checkpoint unet-000001 saved")
    assert "not enough space for the next checkpoint" in error.message and error.free == 10**6
    assert error.needed > 10**6 and error.path == str(checkpoints)
    assert "continue training with --resume" in render(error.fix, "cli")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    manifest = Session.open("tight").manifest
    assert (manifest.state.stage, manifest.state.step) == ("unet", 1)
    assert manifest.history[-1].status == "interrupted" and "paused" in manifest.history[-1].detail
    assert not (checkpoints / "unet-000002").exists()  # it stopped before taking the step

    resumed = train("tight", resume=True)
    assert resumed.finished and [loss[:2] for loss in resumed.losses] == [("unet", 2), ("unet", 3)]


CLI_WRAPPER = """
import errno, os, shutil, sys
real = shutil.copyfile
def copyfile(src, dst, *args, **kwargs):
    if "unet-000002" in str(src) and "checkpoints" in str(dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
    return real(src, dst, *args, **kwargs)
shutil.copyfile = copyfile
from nbkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_nbkit_train_on_a_full_disk_exits_2_with_the_fix_and_no_traceback(tiny_model_dir, tmp_path):
    session = make_session("cli", tiny_model_dir("sd1"), "sd1", **STEPS)
    completed = subprocess.run(
        [sys.executable, "-c", CLI_WRAPPER, "train", "cli"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    message = completed.stderr[completed.stderr.index("nbkit: error:") :]
    assert str(session.path / "checkpoints" / "unet-000002") in message and "disk is full" in message
    assert "How to fix: free space" in message and "continue training with --resume" in message
    assert Session.open("cli").manifest.state.last_checkpoint == "checkpoints/unet-000001"
