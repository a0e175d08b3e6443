"""The session lock: real processes contending, dead holders, stopped heartbeats."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from child_process import start_child, wait_for_line

from nbkit.errors import SessionLockedError
from nbkit.session.lock import LOCK_NAME, LockInfo, SessionLock, force_unlock, live_holder, read_lock

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def stamp(seconds_ago: float) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds")


def write_lock(folder, **fields) -> LockInfo:
    info = LockInfo(
        **{
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": "training",
            "started": stamp(1),
            "heartbeat": stamp(1),
            "token": "someone-else",
            **fields,
        }
    )
    (folder / LOCK_NAME).write_text(json.dumps(dataclasses.asdict(info)))
    return info


def test_lock_file_says_who_holds_it_and_goes_away_on_exit(tmp_path):
    with SessionLock(tmp_path, "training") as lock:
        data = json.loads((tmp_path / LOCK_NAME).read_text())
        assert data["pid"] == os.getpid()
        assert data["host"] == socket.gethostname()
        assert data["purpose"] == "training"
        assert data["started"] == data["heartbeat"]
        assert data["token"] == lock.info.token
        assert live_holder(tmp_path).pid == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    assert live_holder(tmp_path) is None


def test_second_holder_in_the_same_process_is_refused(tmp_path):
    with SessionLock(tmp_path, "training"), pytest.raises(SessionLockedError) as caught:
        SessionLock(tmp_path, "conversion").acquire()
    assert "this kernel" in str(caught.value)
    assert not (tmp_path / LOCK_NAME).exists()


def test_two_processes_contend_and_a_killed_holder_is_taken_over(tmp_path):
    child = start_child(
        f"""
        import time
        from nbkit.session.lock import SessionLock
        with SessionLock({str(tmp_path)!r}, "training"):
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    try:
        wait_for_line(child, "locked")
        with pytest.raises(SessionLockedError) as caught:
            SessionLock(tmp_path, "conversion").acquire()
        message = str(caught.value)
        assert f"pid {child.pid}" in message
        assert "'training'" in message
        assert "cannot start 'conversion'" in message
        assert f"nbkit session unlock {tmp_path.name}" in message
        assert read_lock(tmp_path).pid == child.pid  # the refused attempt left the holder's lock alone
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    with pytest.warns(UserWarning, match=f"process {child.pid} no longer runs"):
        lock = SessionLock(tmp_path, "conversion")
        lock.acquire()
    try:
        assert read_lock(tmp_path).pid == os.getpid()
        assert read_lock(tmp_path).purpose == "conversion"
    finally:
        lock.release()


def test_a_process_that_exits_without_releasing_frees_the_lock_at_exit(tmp_path):
    child = start_child(
        f"""
        from nbkit.session.lock import SessionLock
        SessionLock({str(tmp_path)!r}, "training").acquire()
        print("locked", flush=True)
        """
    )
    wait_for_line(child, "locked")
    assert child.wait(timeout=30) == 0
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_dead_pid_on_this_host_is_stale(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(finished.stdout)
    assert not psutil.pid_exists(dead) or psutil.Process(dead).create_time() > time.time() - 1
    write_lock(tmp_path, pid=dead)
    with pytest.warns(UserWarning, match="taking over a stale lock"), SessionLock(tmp_path, "training"):
        assert read_lock(tmp_path).pid == os.getpid()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # This process is alive, but it started long after the lock was taken: its pid was reused.
    write_lock(tmp_path, started=stamp(10 * 365 * 24 * 3600))
    assert read_lock(tmp_path).stale_reason() == f"process {os.getpid()} no longer runs on this host"


def test_lock_with_an_old_heartbeat_from_another_host_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=4242, host="colab-vm-elsewhere", started=stamp(3600), heartbeat=stamp(600))
    with pytest.warns(UserWarning, match=r"last heartbeat was 6\d\d s ago"):
        lock = SessionLock(tmp_path, "training", stale_after=300)
        lock.acquire()
    try:
        assert read_lock(tmp_path).host == socket.gethostname()
    finally:
        lock.release()


def test_lock_with_a_fresh_heartbeat_from_another_host_is_live(tmp_path):
    write_lock(tmp_path, pid=4242, host="colab-vm-elsewhere", heartbeat=stamp(20))
    with pytest.raises(SessionLockedError, match="pid 4242 on colab-vm-elsewhere"):
        SessionLock(tmp_path, "training").acquire()
    assert read_lock(tmp_path).pid == 4242


def test_heartbeat_thread_refreshes_the_lock(tmp_path):
    with SessionLock(tmp_path, "training", heartbeat_interval=0.05, stale_after=5) as lock:
        first = read_lock(tmp_path).heartbeat
        time.sleep(0.3)
        later = read_lock(tmp_path)
        assert later.heartbeat > first
        assert later.token == lock.info.token
        assert later.started == lock.info.started
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_holder_whose_lock_was_taken_over_leaves_the_new_lock_alone(tmp_path):
    lock = SessionLock(tmp_path, "training", heartbeat_interval=0.05, stale_after=5)
    lock.acquire()
    usurper = write_lock(tmp_path, pid=4242, host="colab-vm-elsewhere", token="usurper")
    with pytest.warns(UserWarning, match="the lock was taken over by pid 4242"):
        time.sleep(0.3)
        lock.release()
    assert read_lock(tmp_path) == usurper


def test_an_empty_lock_file_is_live_while_fresh_and_stale_when_old(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"")
    with pytest.raises(SessionLockedError, match="empty or half-written"):
        SessionLock(tmp_path, "training").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with pytest.warns(UserWarning, match="taking over"), SessionLock(tmp_path, "training"):
        assert read_lock(tmp_path).pid == os.getpid()


def test_force_unlock_removes_a_live_lock_and_reports_it(tmp_path):
    info = write_lock(tmp_path, pid=4242, host="colab-vm-elsewhere")
    assert force_unlock(tmp_path) == info
    assert not (tmp_path / LOCK_NAME).exists()
    assert force_unlock(tmp_path) is None


def test_bad_intervals_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_interval"):
        SessionLock(tmp_path, "training", heartbeat_interval=10, stale_after=5)
