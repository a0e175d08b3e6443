"""Stopping while a tunnel opens leaves none of its processes running (`nbkit ui --tunnel auto`, then
Ctrl+C or SIGTERM during startup used to leave npm and node behind, reparented to init).

The provider here is a fake `ProcessTunnel`: a python child that starts a grandchild (as npx starts node)
and prints no link. Its "started" line triggers the stop, so nothing depends on timing; a process's end
is awaited on its pidfd (readable once it exited), never polled.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import ClassVar

import pytest

import nbkit.tunnel as tunnel_package
from nbkit.tunnel import AutoTunnel, Tunnel, TunnelFailure
from nbkit.tunnel.base import ProcessTunnel

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds")

CHILD = r"""
import signal, subprocess, sys, time
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as npm does
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"started {grandchild.pid}", flush=True)
time.sleep(600)
"""


class Hanging(ProcessTunnel):
    """A provider whose process starts a grandchild and never prints a link."""

    provider = "hanging"
    url_pattern = re.compile(r"your url is: (\S+)")
    ignore_term = False
    # called on the reader thread with the tunnel once both processes run (the test's stop)
    on_started: Callable[[Hanging], None] = staticmethod(lambda tunnel: None)
    pidfds: ClassVar[list[int]] = []  # the child's and the grandchild's, opened while they run

    def __init__(self, port: int, **options):
        super().__init__(port, timeout=60)

    def command(self) -> list[str]:
        return [sys.executable, "-c", CHILD, *(["--ignore-term"] if self.ignore_term else [])]

    def missing_binary(self, program: str) -> TunnelFailure:
        return TunnelFailure(f"{program} missing", "install it")

    def describe(self) -> str:
        return "a child that hangs"

    def parse_url(self, line: str) -> str | None:
        if line.startswith("started "):
            proc = self._proc
            assert proc is not None
            Hanging.pidfds += [os.pidfd_open(proc.pid), os.pidfd_open(int(line.split()[1]))]
            type(self).on_started(self)
        return super().parse_url(line)


class Recorder(Tunnel):
    """A provider that would give a link: it must not be opened once the tunnel is closing."""

    provider = "recorder"
    opened = 0

    def __init__(self, port: int, **options):
        super().__init__(port)

    def _open(self) -> str:
        Recorder.opened += 1
        return "https://recorded.example/"

    def describe(self) -> str:
        return "records opens"


@pytest.fixture
def hanging(monkeypatch):
    """Registers `hanging` and `recorder` for `auto`; after the test, closes the pidfds."""
    monkeypatch.setattr(Hanging, "pidfds", [])
    monkeypatch.setattr(Recorder, "opened", 0)
    monkeypatch.setattr(
        tunnel_package, "PROVIDERS", {**tunnel_package.PROVIDERS, "hanging": Hanging, "recorder": Recorder}
    )
    yield Hanging
    for fd in Hanging.pidfds:
        os.close(fd)


@pytest.fixture
def interrupt_main(monkeypatch):
    """`on_started` that interrupts the main thread (a KeyboardInterrupt where it waits for the link)."""
    main = threading.main_thread().ident
    assert main is not None

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, raise_interrupt)
    yield lambda tunnel: signal.pthread_kill(main, signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, previous)


def assert_all_gone() -> None:
    assert len(Hanging.pidfds) == 2, "the fake provider never started"
    for fd in Hanging.pidfds:
        # readable once the process exited; 10 s is only a bound for a broken build, not a wait
        assert select.select([fd], [], [], 10)[0] == [fd], "a tunnel process outlived the stop"


@pytest.mark.parametrize("provider", ["hanging", "auto"])
def test_an_interrupt_while_opening_stops_the_process_group(hanging, interrupt_main, monkeypatch, provider):
    monkeypatch.setattr(Hanging, "on_started", staticmethod(interrupt_main))
    tunnel = tunnel_package.make_tunnel(
        provider, 7865, **({"order": ["hanging"]} if provider == "auto" else {})
    )
    with pytest.raises(KeyboardInterrupt):
        tunnel.open()
    assert_all_gone()
    assert tunnel.public_url is None


def test_a_process_that_ignores_sigterm_is_killed(hanging, interrupt_main, monkeypatch):
    monkeypatch.setattr(Hanging, "on_started", staticmethod(interrupt_main))
    monkeypatch.setattr(Hanging, "ignore_term", True)
    with pytest.raises(KeyboardInterrupt):
        Hanging(7865).open()
    assert_all_gone()


def test_closing_auto_while_a_provider_opens_stops_it_and_tries_no_other(hanging, monkeypatch):
    auto = AutoTunnel(7865, order=("hanging", "recorder"))
    closer: list[threading.Thread] = []

    def close_from_another_thread(tunnel: Hanging) -> None:
        closer.append(threading.Thread(target=auto.close))
        closer[0].start()

    monkeypatch.setattr(Hanging, "on_started", staticmethod(close_from_another_thread))
    assert auto.open() is None
    closer[0].join(10)
    assert_all_gone()
    assert Recorder.opened == 0 and auto.current is None and auto._opening is None
    assert "closed while opening" in (auto.error or "")
    # a later open is a new request: it works again
    monkeypatch.setattr(Hanging, "on_started", staticmethod(lambda tunnel: None))
    assert AutoTunnel(7865, order=("recorder",)).open() == "https://recorded.example/"


def test_launch_interrupted_while_the_tunnel_opens_leaves_nothing_running(
    hanging, interrupt_main, monkeypatch, tmp_path
):
    import nbkit.webui as webui
    from nbkit.webui import server as server_module

    servers = []

    class RecordedServer(server_module.Server):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(server_module, "Server", RecordedServer)
    monkeypatch.setattr(Hanging, "on_started", staticmethod(interrupt_main))
    with pytest.raises(KeyboardInterrupt):
        webui.launch(
            tunnel="auto",
            tunnel_options={"order": ["hanging"]},
            root=tmp_path,
            include_base_models=False,
            device="cpu",
            quiet=True,
        )
    assert_all_gone()
    assert len(servers) == 1 and not servers[0].running


def test_nbkit_ui_turns_sigterm_into_an_interrupt_from_the_start(monkeypatch):
    """A SIGTERM during launch runs its cleanup (as Ctrl+C does); the handler is put back after."""
    import nbkit.webui as webui
    from nbkit.cli import ui as ui_command

    main = threading.main_thread().ident
    assert main is not None

    def launch(**kwargs):
        signal.pthread_kill(main, signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the launch")

    def ignore(signum, frame):  # what sees SIGTERM if `nbkit ui` left it alone (not the test run's end)
        pass

    args = argparse.Namespace(
        max_queue=1,
        session=None,
        model=None,
        host="127.0.0.1",
        port=None,
        tunnel="none",
        auth=None,
        lowvram=False,
        root=None,
        device="cpu",
        no_base_models=True,
        extra_model=[],
    )
    closed = []

    class Handle:  # a UI whose wait is interrupted before it takes over the signals
        def wait(self):
            raise KeyboardInterrupt

        def close(self):
            closed.append(True)

    previous = signal.signal(signal.SIGTERM, ignore)
    try:
        monkeypatch.setattr(webui, "launch", launch)
        with pytest.raises(KeyboardInterrupt):
            ui_command.command(args)
        assert signal.getsignal(signal.SIGTERM) is ignore

        monkeypatch.setattr(webui, "launch", lambda **kwargs: Handle())
        with pytest.raises(KeyboardInterrupt):
            ui_command.command(args)
        assert closed == [True] and signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, previous)
