"""`--tunnel auto` and the watchdog, with fake providers: no network, no processes, no timing races.

Each fake provider opens to the next link of its script (None: it fails), and a test drops a link by
flipping its `up` flag, as a provider process that exits would. `Watchdog.check()` is one round of the
thread's loop, called directly; one test runs the real thread with a short interval and waits on an
event, never on a sleep.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest

import nbkit.tunnel as tunnel_package
from nbkit.tunnel import AUTO_ORDER, AutoTunnel, Tunnel, TunnelFailure, Watchdog, make_tunnel, open_tunnel
from nbkit.tunnel.none import NoTunnel

PORT = 7861


def fake_provider(name: str, *links: str | None, options: tuple[str, ...] = ()) -> type[Tunnel]:
    """A provider class whose successive opens give `links` in turn (None: that open fails)."""
    script = list(links)

    class Fake(Tunnel):
        provider = name
        option_names = options
        opened: ClassVar[list[Tunnel]] = []

        def __init__(self, port, *, host="127.0.0.1", timeout=30.0, **kwargs):
            super().__init__(port, host=host, timeout=timeout)
            self.kwargs = kwargs
            self.up = False

        def describe(self) -> str:
            return f"the fake {name}"

        def _open(self):
            type(self).opened.append(self)
            link = script.pop(0) if script else None
            if link is None:
                raise TunnelFailure(f"{name} could not connect", "try another")
            self.up = True
            return link

        def _stop(self):
            self.up = False

        def _running(self):
            return self.up

    return Fake


@pytest.fixture
def providers(monkeypatch):
    """`providers(a=[...], b=[...])` registers fake providers (and only them) for `auto`."""

    def register(**scripts) -> dict[str, type[Tunnel]]:
        fakes = {name: fake_provider(name, *links) for name, links in scripts.items()}
        monkeypatch.setattr(tunnel_package, "PROVIDERS", {"none": NoTunnel, **fakes})
        return fakes

    return register


def drop(tunnel: AutoTunnel) -> None:
    """The current provider's link goes away: its process exited, which its reader thread records."""
    tunnel.current.up = False
    tunnel.current._dropped("the fake process exited with code 1")


def watch(tunnel: Tunnel, **kwargs) -> tuple[Watchdog, list[str | None]]:
    changes: list[str | None] = []
    return Watchdog(tunnel, interval=0.01, on_change=changes.append, **kwargs), changes


def test_the_order_is_stated_once_and_ngrok_comes_last():
    assert AUTO_ORDER == ("gradio", "cloudflared", "localtunnel", "ngrok")
    assert make_tunnel("auto", PORT).order == AUTO_ORDER
    text = make_tunnel("auto", PORT).describe()
    assert text.index("gradio") < text.index("cloudflared") < text.index("localtunnel") < text.index("ngrok")
    assert "only with an auth token" in text


def test_auto_options_go_to_the_provider_that_takes_them():
    auto = make_tunnel("auto", PORT, binary="/opt/cloudflared", token="tok", timeout=5)
    assert isinstance(auto, AutoTunnel)
    assert auto._make("cloudflared").binary == "/opt/cloudflared"
    assert auto._make("ngrok")._token == "tok" and auto._make("gradio").timeout == 5
    with pytest.raises(ValueError, match="'serveo'"):
        make_tunnel("auto", PORT, order=["gradio", "serveo"])
    with pytest.raises(ValueError, match="no option colour"):
        make_tunnel("auto", PORT, colour="red")
    with pytest.raises(ValueError, match="auto"):
        make_tunnel("tor", PORT)


def test_auto_falls_back_to_the_next_provider_that_opens(providers):
    fakes = providers(a=[None], b=["https://b.example/1"], c=["https://c.example/1"])
    auto = open_tunnel("auto", PORT, order=["a", "b", "c"])
    assert auto.public_url == "https://b.example/1" and auto.active == "b" and auto.error is None
    assert len(fakes["a"].opened) == 1 and len(fakes["c"].opened) == 0
    auto.close()
    assert auto.public_url is None and not fakes["b"].opened[0].up


def test_auto_with_every_provider_failing_says_why_for_each(providers):
    providers(a=[None], b=[None])
    auto = open_tunnel("auto", PORT, order=["a", "b"])
    assert auto.public_url is None and auto.active is None and not auto.alive
    assert auto.error.startswith("auto: no provider gave a link")
    assert "a could not connect" in auto.error and "b could not connect" in auto.error
    # each provider's reason, not its own advice (moot once every provider was tried)
    assert "try another" not in auto.error


def test_ngrok_is_tried_only_with_a_token(providers, monkeypatch):
    fakes = providers(a=[None], ngrok=["https://n.example"])
    monkeypatch.setattr("nbkit.tunnel.ngrok.find_token", lambda: (None, "not in the environment"))
    auto = open_tunnel("auto", PORT, order=["a", "ngrok"])
    assert auto.public_url is None and "ngrok: skipped, no auth token" in auto.error
    assert fakes["ngrok"].opened == []
    monkeypatch.setattr("nbkit.tunnel.ngrok.find_token", lambda: ("tok", "the environment variable X"))
    assert auto.reopen() == "https://n.example"


def test_watchdog_reopens_the_same_provider_when_its_link_drops(providers):
    fakes = providers(a=["https://a.example/1", "https://a.example/2"], b=["https://b.example/1"])
    auto = open_tunnel("auto", PORT, order=["a", "b"])
    watchdog, changes = watch(auto)
    assert watchdog.check() == "https://a.example/1" and changes == []  # up: nothing to do
    drop(auto)
    assert auto.public_url is None  # the link in use is never a dead one
    assert watchdog.check() == "https://a.example/2"
    assert changes == [None, "https://a.example/2"] and auto.active == "a"
    assert len(fakes["a"].opened) == 2 and fakes["b"].opened == []


def test_watchdog_falls_back_when_reopening_fails_and_wraps_around(providers):
    fakes = providers(a=["https://a.example/1", None, "https://a.example/3"], b=["https://b.example/1", None])
    auto = open_tunnel("auto", PORT, order=["a", "b"])
    watchdog, changes = watch(auto)
    drop(auto)
    assert watchdog.check() == "https://b.example/1" and auto.active == "b"
    drop(auto)  # b drops and cannot come back: a (before it in the order) works again
    assert watchdog.check() == "https://a.example/3" and auto.active == "a"
    assert changes == [None, "https://b.example/1", None, "https://a.example/3"]
    assert [len(fakes[name].opened) for name in "ab"] == [3, 2]


def test_watchdog_gets_a_link_that_failed_at_start(providers):
    providers(a=[None, None, "https://a.example/late"])
    auto = open_tunnel("auto", PORT, order=["a"])
    watchdog, changes = watch(auto)
    assert auto.public_url is None and auto.error
    assert watchdog.check() is None and changes == []  # still nothing: no change to report
    assert watchdog.check() == "https://a.example/late" and changes == ["https://a.example/late"]
    assert auto.error is None


def test_watchdog_reopens_a_single_provider(providers):
    fakes = providers(a=["https://a.example/1", "https://a.example/2"])
    single = open_tunnel("a", PORT)
    watchdog, changes = watch(single)
    single.up = False  # not seen by a reader: the check's `alive` finds it
    assert watchdog.check() == "https://a.example/2" and changes == [None, "https://a.example/2"]
    assert len(fakes["a"].opened) == 2


def test_a_link_that_stops_answering_counts_as_dropped_after_some_misses(providers):
    providers(a=["https://a.example/1", "https://a.example/2"])
    auto = open_tunnel("auto", PORT, order=["a"])
    answers = iter([False, True, False, False, False])
    watchdog, changes = watch(auto, probe=lambda url: next(answers), misses=3)
    for _ in range(4):  # a miss, an answer, two misses: still the same link
        assert watchdog.check() == "https://a.example/1"
    assert watchdog.check() == "https://a.example/2"  # the third miss in a row
    assert changes == [None, "https://a.example/2"]


def test_a_probe_that_breaks_does_not_move_the_link(providers):
    providers(a=["https://a.example/1"])
    auto = open_tunnel("auto", PORT, order=["a"])

    def broken(url):
        raise RuntimeError("no")

    watchdog, changes = watch(auto, probe=broken, misses=1)
    assert watchdog.check() == "https://a.example/1" and changes == []


def test_the_watchdog_thread_recovers_a_drop_and_stops_cleanly(providers):
    providers(a=["https://a.example/1", "https://a.example/2"])
    auto = open_tunnel("auto", PORT, order=["a"])
    relinked = threading.Event()
    changes: list[str | None] = []

    def on_change(url):
        changes.append(url)
        if url is not None:
            relinked.set()

    watchdog = Watchdog(auto, interval=0.01, on_change=on_change).start()
    try:
        drop(auto)
        assert relinked.wait(10), changes
        assert auto.public_url == "https://a.example/2"
    finally:
        watchdog.stop()
    assert watchdog.stopped and not watchdog._thread.is_alive()


def test_a_recovery_under_way_when_closing_leaves_nothing_open(providers):
    fakes = providers(a=["https://a.example/1", "https://a.example/2"])
    auto = open_tunnel("auto", PORT, order=["a"])
    watchdog, _ = watch(auto)
    drop(auto)
    original = auto.recover

    def recover_while_closing(cancel=None):
        watchdog._stop.set()  # close() begins while the provider is being reopened
        return original(None)

    auto.recover = recover_while_closing
    assert watchdog.check() is None
    assert auto.public_url is None and not any(t.up for t in fakes["a"].opened)


def test_watchdog_refuses_a_bad_interval(providers):
    providers(a=["https://a.example/1"])
    with pytest.raises(ValueError, match="interval 0"):
        Watchdog(open_tunnel("a", PORT), interval=0)
