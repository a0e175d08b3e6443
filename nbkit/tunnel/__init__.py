"""Public links to the web UI: one interface, one small module per provider.

    tunnel = open_tunnel("cloudflared", 7860)
    print(tunnel.public_url or tunnel.error)
    tunnel.reopen()   # a new link when the old one dropped; the UI keeps running
    tunnel.close()

Providers: `none`, `gradio` (share link), `ngrok` (pyngrok, token), `localtunnel` (npx),
`cloudflared` (quick tunnel), and `auto`: the first of them that opens, in the order `AUTO_ORDER`
states (nbkit/tunnel/auto.py), falling back to the next when one fails later. A provider that fails
does not raise: the Tunnel comes back with `public_url` None and `error` naming the provider, the
reason and the next thing to try, so the UI stays up on its local URL. Only misuse (an unknown
provider, a bad port or option) raises ValueError. A `Watchdog` keeps a link up while the UI runs:

    watchdog = Watchdog(tunnel, interval=30, on_change=print).start()   # reopens / falls back
    watchdog.stop()
"""

from __future__ import annotations

from typing import Any

from nbkit.tunnel.auto import AUTO_ORDER, AutoTunnel
from nbkit.tunnel.base import DEFAULT_TIMEOUT, Tunnel, TunnelFailure
from nbkit.tunnel.cloudflared import CloudflaredTunnel
from nbkit.tunnel.gradio_share import GradioTunnel
from nbkit.tunnel.localtunnel import LocaltunnelTunnel
from nbkit.tunnel.ngrok import NgrokTunnel
from nbkit.tunnel.none import NoTunnel
from nbkit.tunnel.watchdog import Watchdog

PROVIDERS: dict[str, type[Tunnel]] = {
    "none": NoTunnel,
    "gradio": GradioTunnel,
    "ngrok": NgrokTunnel,
    "localtunnel": LocaltunnelTunnel,
    "cloudflared": CloudflaredTunnel,
}
AUTO = "auto"  # not a provider itself: the first of AUTO_ORDER that opens
CHOICES = (AUTO, *PROVIDERS)  # what `--tunnel` and `launch(tunnel=)` accept

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "CHOICES",
    "DEFAULT_TIMEOUT",
    "PROVIDERS",
    "AutoTunnel",
    "Tunnel",
    "TunnelFailure",
    "Watchdog",
    "describe",
    "make_tunnel",
    "open_tunnel",
]


def make_tunnel(provider: str, port: int, *, host: str = "127.0.0.1", **options: Any) -> Tunnel:
    """A Tunnel for `provider`, checked but not opened (`describe()` it, or `open()` it).

    Args:
        provider: `auto` or one of `PROVIDERS` (none, gradio, ngrok, localtunnel, cloudflared).
        port: the local port the UI listens on.
        host: the address the UI is bound to (a wildcard bind is reached on 127.0.0.1).
        **options: `timeout` (seconds, default 30) and the provider's own options (see its class).

    Raises:
        ValueError: an unknown provider, a port outside 1-65535, a non-positive timeout, or an option
            the provider does not take; each message names the bad value and the valid ones.
    """
    name = provider.strip().lower() if isinstance(provider, str) else provider
    if name != AUTO and name not in PROVIDERS:
        raise ValueError(f"unknown tunnel provider {provider!r}: use one of {', '.join((AUTO, *PROVIDERS))}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"tunnel port {port!r}: use a port number from 1 to 65535")
    cls = AutoTunnel if name == AUTO else PROVIDERS[name]
    unknown = sorted(set(options) - {"timeout", *cls.option_names})
    if unknown:
        valid = ", ".join(("timeout", *cls.option_names))
        raise ValueError(f"the {name} tunnel takes no option {', '.join(unknown)}: its options are {valid}")
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"tunnel timeout {timeout!r}: use a number of seconds above 0")
    return cls(port, host=host, **options)


def open_tunnel(
    provider: str, port: int, *, host: str = "127.0.0.1", auth: str | None = None, **options: Any
) -> Tunnel:
    """Open a public link to `host:port` with `provider`; never raises for a provider's failure.

    Args:
        provider: auto, none, gradio, ngrok, localtunnel or cloudflared.
        port: the local port the UI listens on.
        host: the address the UI is bound to (a wildcard bind is reached on 127.0.0.1).
        auth: the UI's own `user:password`. nbkit's server checks it on every route, so no provider
            needs it; it is accepted for the interface's sake and never sent, logged or stored.
        **options: `timeout` (seconds to wait for the link, default 30) and the provider's options:
            gradio `share_server_address`; ngrok `token`, `region`, `domain`, `ngrok_path`;
            localtunnel `npx`, `subdomain`, `fetch_password`; cloudflared `binary`; auto `order`
            and any of these (each goes to the provider that takes it).

    Returns:
        The Tunnel: `public_url` set, or None with `error` saying why and what to try next.

    Raises:
        ValueError: an unknown provider (the message lists the valid ones), a bad port or option.
    """
    del auth  # see Args: the password protects the app itself, whatever the tunnel
    tunnel = make_tunnel(provider, port, host=host, **options)
    tunnel.open()
    return tunnel


def describe(provider: str, port: int, *, host: str = "127.0.0.1", **options: Any) -> str:
    """What `open_tunnel` would do for these arguments (the command, the service, what it downloads),
    without doing it: for the notebook's "what will happen" text.

    Args:
        provider: auto, none, gradio, ngrok, localtunnel or cloudflared.
        port: the local port.
        host: the address the UI is bound to.
        **options: as for `open_tunnel`.

    Raises:
        ValueError: as `open_tunnel`.
    """
    return make_tunnel(provider, port, host=host, **options).describe()
