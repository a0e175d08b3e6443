"""What every tunnel provider shares: the `Tunnel` handle and the subprocess machinery.

A tunnel is a convenience on top of a UI that already works on its local URL, so a provider that fails
(no network, no token, binary missing) never raises: `Tunnel.open()` leaves `public_url` None and puts
one sentence in `error` naming the provider, the reason and the next thing to try. A link that drops
later (the provider's process exits) is noticed, and `reopen()` gets a new one without touching the UI.

`ProcessTunnel` runs a provider's command line (no shell), reads its output on a thread (no pipe ever
fills up and blocks it), takes the public URL from the first line that matches, gives up after a
startup timeout, and kills the whole process group on `close()` (`npx` starts node as a child).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from nbkit.errors import action, setting

# What the user does for a new link, in each interface's words (`nbkit.errors.render`).
REOPEN = action("reopen_tunnel")

DEFAULT_TIMEOUT = 30.0
LOG_LINES = 40  # the tail of a provider's output kept for error messages
_T = TypeVar("_T")
# Provider processes not stopped yet: the last resort at exit kills their process groups, for a path
# no close() ran on (an interrupt between starting one and recording it).
_LIVE: set[subprocess.Popen] = set()


class TunnelFailure(Exception):
    """A provider could not open a link: `reason` (what happened) and `fix` (the next thing to try)."""

    def __init__(self, reason: str, fix: str):
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason}. {fix}")


def local_host(host: str) -> str:
    """The address a tunnel connects to for a server bound to `host` (a wildcard bind means loopback)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return host


def local_url(host: str, port: int) -> str:
    """`http://host:port` for the address a tunnel forwards to (IPv6 literals in brackets)."""
    host = local_host(host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def tail(lines: collections.abc.Iterable[str], count: int = 6, width: int = 300) -> str:
    """The last `count` non-empty lines of a provider's output, joined with ' | ' for one message."""
    kept = [line.strip()[:width] for line in lines if line.strip()]
    return " | ".join(kept[-count:])


def run_with_timeout(
    fn: Callable[[], _T],
    timeout: float,
    *,
    abandon: Callable[[], None] | None = None,
    check: Callable[[], None] | None = None,
) -> _T:
    """Call `fn` on a daemon thread and wait at most `timeout` seconds for it.

    A library call that blocks on the network (gradio's and pyngrok's reads have no overall deadline)
    must not hold the UI's launch forever.

    Args:
        fn: the call.
        timeout: seconds to wait.
        abandon: run on that thread if `fn` finishes after the caller gave up, to undo what it did (a
            tunnel process that came up too late).
        check: called every 0.1 s while waiting; what it raises ends the wait (a helper process that
            died while the library still waits for its output).

    Raises:
        TimeoutError: when `fn` is still running after `timeout` seconds.
        Exception: whatever `fn` raised.
    """
    result: dict[str, Any] = {}
    lock = threading.Lock()

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e
        with lock:
            result["done"] = True
            late = "abandoned" in result
        if late and abandon is not None:
            abandon()

    thread = threading.Thread(target=call, name="nbkit-tunnel-open", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
            if check is not None and thread.is_alive():
                check()
    except BaseException:
        with lock:
            result["abandoned"] = True
        raise
    with lock:
        if "done" not in result:
            result["abandoned"] = True
            raise TimeoutError(f"still waiting after {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class Tunnel:
    """A public link to a local port, or the reason there is none.

    Made by `nbkit.tunnel.open_tunnel`; a provider module subclasses it and implements `_open`, `_stop`,
    `_running` and `describe`.

    Args:
        port: the local port the UI listens on.
        host: the address the UI is bound to (a wildcard bind is reached on 127.0.0.1).
        timeout: seconds to wait for the provider's link before giving up.

    Attributes:
        provider: the provider's name (`none`, `gradio`, `ngrok`, `localtunnel`, `cloudflared`).
        public_url: the public link, or None (not open, failed, dropped or closed).
        error: why there is no link: provider, reason, next thing to try; None when none failed.
        note: something the user must know to use the link (localtunnel's tunnel password), or None.
    """

    provider: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()  # provider options accepted besides `timeout`

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT):
        self.port = port
        self.host = host
        self.timeout = timeout
        self.public_url: str | None = None
        self.error: str | None = None
        self.reason: str | None = None  # why the last open failed, without the advice (`error` has both)
        self.note: str | None = None
        self._lock = threading.Lock()
        # set by close(): an open() under way on another thread stops and leaves nothing running
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.provider} port={self.port} url={self.public_url!r}>"

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_url(self) -> str:
        """The local address the link forwards to."""
        return local_url(self.host, self.port)

    @property
    def alive(self) -> bool:
        """Whether the link is up; a link found dropped sets `error` so the caller can `reopen()`."""
        if self.public_url is None:
            return False
        if not self._running():
            self._dropped("the provider stopped")
            return False
        return True

    def open(self) -> str | None:
        """Open the link; returns `public_url` (None on failure, with `error` set).

        Never raises for a provider's failure; a KeyboardInterrupt (Ctrl+C, or SIGTERM in `nbkit ui`)
        stops what was starting before it goes on.
        """
        with self._lock:
            self._quiet_stop()  # a second open() replaces the link rather than leaking it
            self._closing = threading.Event()  # a close() from now on stops this open
            self.public_url = self.error = self.reason = self.note = None
            try:
                self.public_url = self._open()
            except TunnelFailure as e:
                self.error = f"{self.provider}: {e}"
                self.reason = e.reason
            except Exception as e:  # a provider library's surprise must not take the UI down
                self.reason = f"unexpected {type(e).__name__}: {self._scrub(str(e))}"
                self.error = (
                    f"{self.provider}: unexpected {type(e).__name__}: {self._scrub(str(e))}. "
                    f"To try again, {REOPEN}, or use another tunnel ({setting('tunnel', self._fallback())})"
                )
            except BaseException:  # Ctrl+C or exit mid-open: nothing may keep running behind it
                self.public_url = None
                self._quiet_stop()
                raise
            if self.public_url is None:
                self._quiet_stop()
            return self.public_url

    def reopen(self) -> str | None:
        """Close the link (if any) and open a new one; the UI keeps running. Returns the new link."""
        self.close()
        return self.open()

    def recover(self, cancel: threading.Event | None = None) -> str | None:
        """Get a link back after it dropped or failed (what `Watchdog` calls); returns it, or None.

        A single provider reopens itself; `auto` then falls back to the next providers.

        Args:
            cancel: set when the caller is closing: stop trying as soon as possible.
        """
        if cancel is not None and cancel.is_set():
            return None
        return self.reopen()

    def close(self) -> None:
        """Take the link down (kill the provider's process), also while another thread opens it.
        Safe to call twice; never raises."""
        self._closing.set()
        self.public_url = None
        self._quiet_stop()

    def describe(self) -> str:
        """What opening this tunnel would do (command, service, downloads), for the notebook and tests."""
        raise NotImplementedError

    # -- for subclasses --------------------------------------------------------------------------

    def _open(self) -> str | None:
        """Open the link and return it, or raise `TunnelFailure`."""
        raise NotImplementedError

    def _stop(self) -> None:
        """Release whatever `_open` started."""

    def _running(self) -> bool:
        """Whether what `_open` started is still running."""
        return True

    def _fallback(self) -> str:
        """The provider to suggest when this one fails."""
        return "gradio" if self.provider == "cloudflared" else "cloudflared"

    def _scrub(self, text: str) -> str:
        """`text` with any secret this provider holds blanked out (ngrok's token)."""
        return text

    def _dropped(self, reason: str) -> None:
        """Record that a link that was up went away."""
        if self.public_url is None:
            return
        self.public_url = None
        self.error = (
            f"{self.provider}: the public link dropped ({self._scrub(reason)}). The UI is still up on "
            f"{self.local_url}: {REOPEN} for a new link, or use another tunnel "
            f"({setting('tunnel', self._fallback())})"
        )

    def _quiet_stop(self) -> None:
        # closing must always succeed; the process is gone or going either way
        with contextlib.suppress(Exception):
            self._stop()


class ProcessTunnel(Tunnel):
    """A tunnel run as a child process that prints its public URL (cloudflared, localtunnel).

    Subclasses give `command()`, `url_pattern` and the provider-specific explanations
    (`missing_binary`, `explain_exit`, `explain_timeout`); `after_open` may add a `note`.
    """

    url_pattern: ClassVar[re.Pattern[str]]

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT):
        super().__init__(port, host=host, timeout=timeout)
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

    def command(self) -> list[str]:
        """The command line this provider runs (argv, no shell)."""
        raise NotImplementedError

    def parse_url(self, line: str) -> str | None:
        """The public URL in one line of the provider's output, or None."""
        match = self.url_pattern.search(line)
        if match is None:
            return None
        return match.group(1) if match.groups() else match.group(0)

    def missing_binary(self, program: str) -> TunnelFailure:
        """The failure when `program` (the command's first word) is not installed."""
        raise NotImplementedError

    def explain_exit(self, code: int, log: list[str]) -> TunnelFailure:
        """The failure when the process exits before printing a URL."""
        return TunnelFailure(
            f"{self.command()[0]} exited with code {code} before printing a link (output: {tail(log)})",
            f"To try again, {REOPEN}, or use another tunnel ({setting('tunnel', self._fallback())})",
        )

    def explain_timeout(self, log: list[str]) -> TunnelFailure:
        """The failure when no URL came within the startup timeout (the process is killed)."""
        seen = f" (output so far: {tail(log)})" if tail(log) else " (no output)"
        return TunnelFailure(
            f"no public link after {self.timeout:g} s, so it was stopped{seen}",
            f"Check the runtime's internet connection and {REOPEN}, or use another tunnel "
            f"({setting('tunnel', self._fallback())})",
        )

    def after_open(self, url: str) -> None:
        """Called once the link is up (set `note` here)."""

    def _open(self) -> str | None:
        argv = self.command()
        program = shutil.which(argv[0])
        if program is None:
            raise self.missing_binary(argv[0])
        self.log.clear()
        found = threading.Event()
        state: dict[str, str] = {}
        try:
            proc = subprocess.Popen(
                [program, *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # cloudflared logs on stderr; one pipe, one reader
                text=True,
                encoding="utf-8",
                errors="replace",
                # its own process group, so close() also ends the children (npx runs node)
                start_new_session=os.name == "posix",
            )
        except OSError as e:
            raise self.missing_binary(argv[0]) from e
        _LIVE.add(proc)
        self._proc = proc  # before anything waits, so a close() or an interrupt reaches it
        if self._closing.is_set():  # a close() came while it started: it saw no process to stop
            self._stop()
            raise TunnelFailure("closed while opening", f"For a link, {REOPEN}")
        reader = self._reader = threading.Thread(
            target=self._read, args=(proc, found, state), name=f"nbkit-tunnel-{self.provider}", daemon=True
        )
        reader.start()
        if not found.wait(self.timeout):
            self._stop()
            raise self.explain_timeout(list(self.log))
        if self._closing.is_set():
            self._stop()
            raise TunnelFailure("closed while opening", f"For a link, {REOPEN}")
        if "url" not in state:
            reader.join(5)
            code = proc.wait()
            self._proc = None
            _LIVE.discard(proc)
            raise self.explain_exit(code, list(self.log))
        self.after_open(state["url"])
        return state["url"]

    def _read(self, proc: subprocess.Popen[str], found: threading.Event, state: dict[str, str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.log.append(line.rstrip())
            if "url" not in state:
                url = self.parse_url(line)
                if url is not None:
                    state["url"] = url
                    found.set()
        found.set()  # end of output: the process exited (or was killed)
        code = proc.wait()
        if self._proc is proc:  # not a close(): the link went away by itself
            _LIVE.discard(proc)  # reaped: its process group id may be reused
            last = tail(self.log, count=2)
            self._dropped(f"{self.command()[0]} exited with code {code}" + (f": {last}" if last else ""))

    def _running(self) -> bool:
        proc = self._proc
        if proc is None:
            return False
        if proc.poll() is None:
            return True
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(1)  # let it record the exit code and last words before `alive` says "stopped"
        return False

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, group=True)
            _LIVE.discard(proc)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)


def stop_process(proc: subprocess.Popen, *, group: bool = False, grace: float = 3.0) -> None:
    """Stop `proc`: SIGTERM, then SIGKILL after `grace` seconds.

    Args:
        proc: the process.
        group: signal its whole process group (POSIX; only for a process started with
            `start_new_session=True`): a child that outlives the leader (node under npx) would keep the
            link up.
        grace: seconds to wait after each signal.
    """
    if not (group and os.name == "posix"):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    except (ProcessLookupError, PermissionError):
        pass
    finally:
        # always, even when a second Ctrl+C cuts the grace short: npm ignores SIGTERM, and a child
        # that outlived its parent is still in the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@atexit.register
def _kill_live_groups() -> None:
    """At exit, kill the process groups of provider processes nothing stopped (the last resort)."""
    if os.name != "posix":
        return
    for proc in list(_LIVE):
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
