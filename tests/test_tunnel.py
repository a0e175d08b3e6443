"""nbkit.tunnel offline: each provider's failure message, the command or settings it would use, URL
parsing from real-looking output, and the subprocess machinery end to end with fake provider programs.

No test reaches the network: provider programs are small Python scripts that print what the real
ones print, and the libraries' network calls (gradio's, pyngrok's) are replaced by ones that fail or
answer the way they do.
"""

from __future__ import annotations

import json
import re
import sys
import time
import types
from pathlib import Path

import pytest

from nbkit.errors import render
from nbkit.tunnel import PROVIDERS, describe, make_tunnel, open_tunnel
from nbkit.tunnel import localtunnel as localtunnel_module
from nbkit.tunnel.cloudflared import CloudflaredTunnel
from nbkit.tunnel.localtunnel import LocaltunnelTunnel

PORT = 7861

# What cloudflared 2024.x prints on stderr for a quick tunnel, online and offline.
CLOUDFLARED_ONLINE = """\
2024-05-01T10:00:00Z INF Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a quick way to experiment and try it out.
2024-05-01T10:00:00Z INF Requesting new quick Tunnel on trycloudflare.com...
2024-05-01T10:00:01Z INF +--------------------------------------------------------------------------------------------+
2024-05-01T10:00:01Z INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |
2024-05-01T10:00:01Z INF |  https://lazy-river-calm-beach.trycloudflare.com                                           |
2024-05-01T10:00:01Z INF +--------------------------------------------------------------------------------------------+
2024-05-01T10:00:02Z INF Registered tunnel connection connIndex=0 connection=abc event=0 ip=198.41.192.7 location=ams01 protocol=quic
"""
CLOUDFLARED_OFFLINE = """\
2024-05-01T10:00:00Z INF Requesting new quick Tunnel on trycloudflare.com...
2024-05-01T10:00:00Z ERR Error unmarshaling QuickTunnel response: error="failed to request quick Tunnel: Post \\"https://api.trycloudflare.com/tunnel\\": dial tcp: lookup api.trycloudflare.com on 8.8.8.8:53: no such host" status_code="0 "
failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: lookup api.trycloudflare.com on 8.8.8.8:53: no such host
"""
NPM_OFFLINE = """\
npm ERR! code EAI_AGAIN
npm ERR! syscall getaddrinfo
npm ERR! errno EAI_AGAIN
npm ERR! request to https://registry.npmjs.org/localtunnel failed, reason: getaddrinfo EAI_AGAIN registry.npmjs.org
"""


def fake_program(folder: Path, name: str, body: str) -> str:
    """An executable Python script standing in for a provider's program; returns its path."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport json, os, subprocess, sys, time\n{body}")
    path.chmod(0o755)
    return str(path)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(") ", 1)[1][0] not in "ZX"


def wait_for(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_pids(path: Path) -> list[int]:
    wait_for(path.exists)
    return [int(line) for line in path.read_text().split()]


# -- the interface ------------------------------------------------------------------------------


def test_unknown_provider_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'serveo'") as info:
        open_tunnel("serveo", PORT)
    for name in ("none", "gradio", "ngrok", "localtunnel", "cloudflared"):
        assert name in str(info.value)
    assert set(PROVIDERS) == {"none", "gradio", "ngrok", "localtunnel", "cloudflared"}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"port": 0}, "port 0"),
        ({"port": 70000}, "port 70000"),
        ({"port": "7860"}, "port '7860'"),
        ({"port": PORT, "timeout": 0}, "timeout 0"),
        ({"port": PORT, "binary": "x"}, "no option binary: its options are timeout, token"),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        open_tunnel("ngrok", **kwargs)


def test_none_has_no_link_and_no_error():
    tunnel = open_tunnel("none", PORT, auth="u:secret-pass")
    assert tunnel.provider == "none"
    assert tunnel.public_url is None and tunnel.error is None and not tunnel.alive
    assert tunnel.reopen() is None and tunnel.error is None
    tunnel.close()
    assert "only at http://127.0.0.1:7861" in describe("none", PORT)


def test_provider_names_are_case_insensitive():
    assert open_tunnel(" None ", PORT).provider == "none"


# -- what each provider would run -------------------------------------------------------------


def test_cloudflared_command():
    assert make_tunnel("cloudflared", PORT).command() == [
        "cloudflared", "tunnel", "--no-autoupdate", "--url", "http://127.0.0.1:7861",
    ]  # fmt: skip
    # a server bound to every interface is reached on loopback; an explicit binary is used as given
    tunnel = make_tunnel("cloudflared", PORT, host="0.0.0.0", binary="/opt/cf/cloudflared")
    assert tunnel.command() == [
        "/opt/cf/cloudflared",
        "tunnel",
        "--no-autoupdate",
        "--url",
        "http://127.0.0.1:7861",
    ]
    assert make_tunnel("cloudflared", PORT, host="::1").command()[-1] == "http://[::1]:7861"
    assert "cloudflared tunnel --no-autoupdate --url http://127.0.0.1:7861" in describe("cloudflared", PORT)


def test_localtunnel_command():
    assert make_tunnel("localtunnel", PORT).command() == [
        "npx", "--yes", "localtunnel", "--port", "7861", "--local-host", "127.0.0.1",
    ]  # fmt: skip
    tunnel = make_tunnel("localtunnel", PORT, host="0.0.0.0", subdomain="my-sd-ui")
    assert tunnel.command()[-4:] == ["--local-host", "127.0.0.1", "--subdomain", "my-sd-ui"]
    with pytest.raises(ValueError, match="subdomain 'Bad Name'"):
        make_tunnel("localtunnel", PORT, subdomain="Bad Name")
    text = describe("localtunnel", PORT)
    assert "npx --yes localtunnel --port 7861" in text and "tunnel password" in text and "public IP" in text


def test_gradio_and_ngrok_settings(monkeypatch):
    text = describe("gradio", PORT)
    assert "frpc" in text and "http://127.0.0.1:7861" in text and "gradio.live" in text
    assert str(Path("gradio") / "frpc") in text
    assert "frp.example.org:7000" in describe("gradio", PORT, share_server_address="frp.example.org:7000")

    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    monkeypatch.delenv("NGROK_TOKEN", raising=False)
    text = describe("ngrok", PORT, region="eu", domain="me.ngrok-free.app")
    assert "http://127.0.0.1:7861" in text and "region eu" in text and "https://me.ngrok-free.app" in text
    assert "not in the environment now" in text
    monkeypatch.setenv("NGROK_TOKEN", "tok-env-123")
    text = describe("ngrok", PORT)
    assert "from the environment" in text and "tok-env-123" not in text
    assert "tok-given-456" not in describe("ngrok", PORT, token="tok-given-456")


# -- URL parsing from real-looking output -----------------------------------------------------


def test_cloudflared_url_parsing():
    parse = CloudflaredTunnel(PORT).parse_url
    found = [url for line in CLOUDFLARED_ONLINE.splitlines() if (url := parse(line))]
    assert found == ["https://lazy-river-calm-beach.trycloudflare.com"]
    # the offline error names api.trycloudflare.com: that is not a link
    assert [parse(line) for line in CLOUDFLARED_OFFLINE.splitlines()] == [None, None, None]


def test_localtunnel_url_parsing():
    parse = LocaltunnelTunnel(PORT).parse_url
    assert parse("your url is: https://fuzzy-cat-42.loca.lt\n") == "https://fuzzy-cat-42.loca.lt"
    assert parse("Your URL is: https://x1.loca.lt") == "https://x1.loca.lt"
    assert [parse(line) for line in NPM_OFFLINE.splitlines()] == [None] * 4
    assert (
        parse("npm warn exec The following package was not found and will be installed: localtunnel@2.0.2")
        is None
    )


# -- the subprocess machinery, end to end with a fake cloudflared -----------------------------


def test_process_tunnel_captures_url_and_close_kills_the_group(tmp_path):
    pids = tmp_path / "pids"
    # like npx -> node: the program starts a child; lots of output before the URL must not stall it
    program = fake_program(
        tmp_path,
        "cloudflared",
        f"""
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(pids)!r}, "w").write(f"{{os.getpid()}}\\n{{child.pid}}\\n")
json.dump(sys.argv[1:], open({str(tmp_path / "argv")!r}, "w"))
for i in range(3000):
    print(f"2024-05-01T10:00:00Z DBG filler line {{i}} " + "x" * 60, file=sys.stderr)
sys.stderr.write({CLOUDFLARED_ONLINE!r})
sys.stderr.flush()
time.sleep(60)
""",
    )
    started = time.monotonic()
    tunnel = open_tunnel("cloudflared", PORT, binary=program, timeout=20)
    assert tunnel.error is None, tunnel.error
    assert tunnel.public_url == "https://lazy-river-calm-beach.trycloudflare.com"
    assert tunnel.alive and time.monotonic() - started < 10
    assert json.loads((tmp_path / "argv").read_text()) == [
        "tunnel",
        "--no-autoupdate",
        "--url",
        "http://127.0.0.1:7861",
    ]
    leader, child = read_pids(pids)
    assert running(leader) and running(child)

    tunnel.close()
    assert tunnel.public_url is None and not tunnel.alive
    assert wait_for(lambda: not running(leader) and not running(child))
    tunnel.close()  # twice is fine
    assert tunnel.error is None  # a close is not a drop


def test_a_dropped_link_is_noticed_and_reopen_gets_a_new_one(tmp_path):
    count = tmp_path / "count"
    program = fake_program(
        tmp_path,
        "cloudflared",
        f"""
n = int(open({str(count)!r}).read()) + 1 if os.path.exists({str(count)!r}) else 1
open({str(count)!r}, "w").write(str(n))
print(f"INF |  https://link-number-{{n}}.trycloudflare.com   |", file=sys.stderr, flush=True)
if n == 1:
    time.sleep(0.5)
    print("ERR connection lost", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(60)
""",
    )
    tunnel = open_tunnel("cloudflared", PORT, binary=program, timeout=20)
    assert tunnel.public_url == "https://link-number-1.trycloudflare.com"
    assert wait_for(lambda: not tunnel.alive)  # polling `alive` notices the exit, with its details
    assert tunnel.public_url is None and not tunnel.alive
    assert tunnel.error.startswith("cloudflared: the public link dropped")
    assert "exited with code 3" in tunnel.error and "connection lost" in tunnel.error
    assert "ui.reopen_tunnel()" in render(tunnel.error) and "http://127.0.0.1:7861" in tunnel.error

    assert tunnel.reopen() == "https://link-number-2.trycloudflare.com"
    assert tunnel.error is None and tunnel.alive
    tunnel.close()


def test_a_slow_provider_hits_the_startup_timeout_and_is_killed(tmp_path):
    pids = tmp_path / "pids"
    program = fake_program(
        tmp_path,
        "cloudflared",
        f"""
open({str(pids)!r}, "w").write(str(os.getpid()))
print("INF Requesting new quick Tunnel on trycloudflare.com...", file=sys.stderr, flush=True)
time.sleep(60)
""",
    )
    started = time.monotonic()
    tunnel = open_tunnel("cloudflared", PORT, binary=program, timeout=1)
    assert time.monotonic() - started < 8
    assert tunnel.public_url is None
    assert tunnel.error.startswith("cloudflared: no public link after 1 s, so it was stopped")
    assert "Requesting new quick Tunnel" in tunnel.error and "ui.reopen_tunnel()" in render(tunnel.error)
    assert "--tunnel gradio" in render(tunnel.error, "cli")
    (pid,) = read_pids(pids)
    assert wait_for(lambda: not running(pid))


def test_cloudflared_offline_exit(tmp_path):
    program = fake_program(
        tmp_path, "cloudflared", f"sys.stderr.write({CLOUDFLARED_OFFLINE!r}); sys.exit(1)\n"
    )
    tunnel = open_tunnel("cloudflared", PORT, binary=program, timeout=20)
    assert tunnel.public_url is None
    assert tunnel.error.startswith("cloudflared: could not reach api.trycloudflare.com, no internet?")
    assert "exited with code 1" in tunnel.error and "no such host" in tunnel.error
    assert "internet connection" in tunnel.error and "ui.reopen_tunnel()" in render(tunnel.error)


def test_cloudflared_binary_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    tunnel = open_tunnel("cloudflared", PORT)
    assert tunnel.public_url is None
    assert tunnel.error.startswith("cloudflared: the cloudflared binary was not found")
    assert "https://github.com/cloudflare/cloudflared/releases" in tunnel.error
    assert "binary=/path/to/cloudflared" in tunnel.error and "--tunnel gradio" in render(tunnel.error, "cli")


# -- localtunnel ------------------------------------------------------------------------------


def test_localtunnel_npx_missing(tmp_path):
    tunnel = open_tunnel("localtunnel", PORT, npx=str(tmp_path / "no-such-npx"))
    assert tunnel.public_url is None
    assert tunnel.error.startswith("localtunnel: npx (Node.js) was not found")
    assert "apt-get install -y nodejs npm" in tunnel.error and "--tunnel cloudflared" in render(
        tunnel.error, "cli"
    )


def test_localtunnel_offline_npm_failure(tmp_path):
    npx = fake_program(tmp_path, "npx", f"sys.stderr.write({NPM_OFFLINE!r}); sys.exit(1)\n")
    tunnel = open_tunnel("localtunnel", PORT, npx=npx, timeout=20)
    assert tunnel.public_url is None
    assert tunnel.error.startswith(
        "localtunnel: could not download the localtunnel package from npm, no internet? (exit code 1"
    )
    assert "EAI_AGAIN registry.npmjs.org" in tunnel.error and "ui.reopen_tunnel()" in render(tunnel.error)


def test_localtunnel_server_unreachable(tmp_path):
    npx = fake_program(
        tmp_path,
        "npx",
        'print("Error: connect ECONNREFUSED 193.34.76.44:443", file=sys.stderr); sys.exit(1)\n',
    )
    tunnel = open_tunnel("localtunnel", PORT, npx=npx, timeout=20)
    assert tunnel.error.startswith("localtunnel: could not reach the localtunnel server (localtunnel.me)")


@pytest.mark.parametrize("password", ["203.0.113.7", None])
def test_localtunnel_link_and_tunnel_password(tmp_path, monkeypatch, password):
    monkeypatch.setattr(localtunnel_module, "fetch_tunnel_password", lambda: password)
    npx = fake_program(
        tmp_path,
        "npx",
        f"""
json.dump(sys.argv[1:], open({str(tmp_path / "argv")!r}, "w"))
print("npm warn exec The following package was not found and will be installed: localtunnel@2.0.2", flush=True)
print("your url is: https://fuzzy-cat-42.loca.lt", flush=True)
time.sleep(60)
""",
    )
    with open_tunnel("localtunnel", PORT, host="0.0.0.0", npx=npx, timeout=20) as tunnel:
        assert tunnel.error is None, tunnel.error
        assert tunnel.public_url == "https://fuzzy-cat-42.loca.lt"
        assert json.loads((tmp_path / "argv").read_text()) == [
            "--yes", "localtunnel", "--port", "7861", "--local-host", "127.0.0.1",
        ]  # fmt: skip
        assert "tunnel password" in tunnel.note and "bypass-tunnel-reminder" in tunnel.note
        if password:
            assert "enter 203.0.113.7" in tunnel.note
        else:
            assert "https://loca.lt/mytunnelpassword" in tunnel.note
    assert tunnel.public_url is None


def test_localtunnel_password_lookup_rejects_error_pages(monkeypatch):
    class Page:
        def __init__(self, body: bytes):
            self.body = body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            return self.body[:size]

    monkeypatch.setattr(
        localtunnel_module.urllib.request, "urlopen", lambda url, timeout: Page(b"198.51.100.9\n")
    )
    assert localtunnel_module.fetch_tunnel_password() == "198.51.100.9"
    monkeypatch.setattr(
        localtunnel_module.urllib.request, "urlopen", lambda url, timeout: Page(b"<html>503</html>")
    )
    assert localtunnel_module.fetch_tunnel_password() is None

    def offline(url, timeout):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(localtunnel_module.urllib.request, "urlopen", offline)
    assert localtunnel_module.fetch_tunnel_password() is None


# -- ngrok ------------------------------------------------------------------------------------

TOKEN = "2abcDEFghiJKLmnoPQRstu_1VWxyZ0123456789abcdef"


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)
    monkeypatch.delenv("NGROK_TOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not in Colab: the import fails


def test_ngrok_without_a_token(no_token):
    tunnel = open_tunnel("ngrok", PORT)
    assert tunnel.public_url is None
    assert tunnel.error.startswith("ngrok: no auth token")
    assert "NGROK_AUTHTOKEN" in tunnel.error and "Colab secrets" in tunnel.error
    assert "--tunnel cloudflared" in render(tunnel.error, "cli")


def fake_colab(monkeypatch, secrets: dict[str, str], error: type[Exception] = KeyError):
    userdata = types.ModuleType("google.colab.userdata")

    def get(key):
        if key not in secrets:
            raise error(key)
        return secrets[key]

    userdata.get = get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


def test_ngrok_token_from_the_environment_or_colab_secrets(no_token, monkeypatch):
    from nbkit.tunnel.ngrok import find_token

    fake_colab(monkeypatch, {"NGROK_AUTHTOKEN": " colab-token \n"})
    assert find_token() == ("colab-token", "the Colab secret NGROK_AUTHTOKEN")
    monkeypatch.setenv("NGROK_TOKEN", "env-token")
    assert find_token() == ("env-token", "the environment variable NGROK_TOKEN")

    class NotebookAccessError(Exception):
        pass

    monkeypatch.delenv("NGROK_TOKEN")
    fake_colab(monkeypatch, {}, NotebookAccessError)
    token, why = find_token()
    assert token is None and "Notebook access" in why
    assert "Notebook access" in open_tunnel("ngrok", PORT).error


@pytest.fixture
def pyngrok_calls(no_token, monkeypatch):
    """pyngrok's connect/kill recorded (and connect made to answer as a callable says)."""
    from pyngrok import ngrok

    calls: dict[str, list] = {"connect": [], "kill": []}

    def use(answer):
        def connect(addr=None, proto=None, name=None, pyngrok_config=None, **options):
            calls["connect"].append(
                {"addr": addr, "proto": proto, "name": name, "config": pyngrok_config, **options}
            )
            return answer(len(calls["connect"]))

        monkeypatch.setattr(ngrok, "connect", connect)

    monkeypatch.setattr(ngrok, "kill", lambda config=None: calls["kill"].append(config))
    calls["use"] = use
    return calls


def test_ngrok_agent_download_fails_offline(no_token, monkeypatch, tmp_path):
    """pyngrok's own code path: no ngrok binary yet, and its download cannot reach the CDN."""
    from urllib.error import URLError

    from pyngrok import installer

    def offline(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(installer, "urlopen", offline)
    monkeypatch.setattr(installer, "_print_progress", lambda line: None)
    agent = tmp_path / "ngrok-bin" / "ngrok"
    monkeypatch.setenv("NGROK_AUTHTOKEN", TOKEN)
    tunnel = open_tunnel("ngrok", PORT, ngrok_path=str(agent))
    assert tunnel.public_url is None
    assert tunnel.error.startswith(
        "ngrok: could not download the ngrok agent, which pyngrok fetches on first use"
    )
    assert str(agent) in tunnel.error and "Temporary failure in name resolution" in tunnel.error
    assert "PYNGROK_NGROK_PATH" in tunnel.error and "--tunnel cloudflared" in render(tunnel.error, "cli")
    assert TOKEN not in tunnel.error and not agent.exists()


def test_ngrok_agent_present_but_offline(pyngrok_calls, monkeypatch):
    from pyngrok.exception import PyngrokNgrokError

    def fail(n):
        # what pyngrok raises when the agent starts but cannot reach ngrok's servers
        err = "failed to connect session: dial tcp: lookup connect.ngrok-agent.com: no such host"
        # a command line in an error would carry the token (`ngrok start --authtoken ...`)
        message = f"The ngrok process errored on start: {err}.\nngrok start --none --authtoken {TOKEN}"
        raise PyngrokNgrokError(message, [], err)

    pyngrok_calls["use"](fail)
    tunnel = open_tunnel("ngrok", PORT, token=TOKEN)
    assert tunnel.error.startswith(
        "ngrok: the ngrok agent could not open a tunnel (The ngrok process errored"
    )
    assert "no such host" in tunnel.error and "internet connection" in tunnel.error
    assert TOKEN not in tunnel.error and "--authtoken ***" in tunnel.error
    assert pyngrok_calls["kill"]  # the half-started agent is stopped


def test_ngrok_rejected_token_is_not_shown(pyngrok_calls, monkeypatch):
    from pyngrok.exception import PyngrokNgrokError

    def fail(n):
        err = f"authentication failed: The authtoken you specified does not look like a proper ngrok tunnel authtoken.\nYour authtoken: {TOKEN}\nERR_NGROK_105"
        raise PyngrokNgrokError(f"The ngrok process errored on start: {err}.", [], err)

    pyngrok_calls["use"](fail)
    monkeypatch.setenv("NGROK_AUTHTOKEN", TOKEN)
    tunnel = open_tunnel("ngrok", PORT)
    assert tunnel.error.startswith(
        "ngrok: ngrok rejected the auth token from the environment variable NGROK_AUTHTOKEN"
    )
    assert "ERR_NGROK_105" in tunnel.error and TOKEN not in tunnel.error and TOKEN not in repr(tunnel)


def test_ngrok_link_settings_drop_and_reopen(pyngrok_calls, monkeypatch, capsys):
    from pyngrok import process

    pyngrok_calls["use"](lambda n: types.SimpleNamespace(public_url=f"https://link-{n}.ngrok-free.app"))
    agent_up = {"value": True}
    monkeypatch.setattr(process, "is_process_running", lambda path: agent_up["value"])
    monkeypatch.setenv("NGROK_AUTHTOKEN", TOKEN)

    tunnel = open_tunnel("ngrok", PORT, host="0.0.0.0", region="eu", domain="me.ngrok-free.app", timeout=12)
    assert tunnel.error is None and tunnel.public_url == "https://link-1.ngrok-free.app" and tunnel.alive
    call = pyngrok_calls["connect"][0]
    assert call["addr"] == "http://127.0.0.1:7861" and call["proto"] == "http"
    assert call["url"] == "https://me.ngrok-free.app" and call["name"].startswith("nbkit-7861-")
    assert call["config"].auth_token == TOKEN and call["config"].region == "eu"
    assert call["config"].startup_timeout == 12

    agent_up["value"] = False  # the agent died
    assert not tunnel.alive and tunnel.public_url is None
    assert tunnel.error.startswith("ngrok: the public link dropped") and "ui.reopen_tunnel()" in render(
        tunnel.error
    )
    agent_up["value"] = True
    assert tunnel.reopen() == "https://link-2.ngrok-free.app" and tunnel.error is None
    tunnel.close()
    assert len(pyngrok_calls["kill"]) == 2 and tunnel.public_url is None
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_ngrok_timeout(pyngrok_calls):
    pyngrok_calls["use"](lambda n: time.sleep(1.5))
    started = time.monotonic()
    tunnel = open_tunnel("ngrok", PORT, token=TOKEN, timeout=0.5)
    assert time.monotonic() - started < 2
    assert tunnel.error.startswith("ngrok: no link after 0.5 s, so the agent was stopped")
    # the call that finishes after the timeout stops the agent it started
    assert wait_for(lambda: len(pyngrok_calls["kill"]) >= 2)


# -- gradio -----------------------------------------------------------------------------------


@pytest.fixture
def frpc(tmp_path, monkeypatch):
    """gradio's frpc location pointed into tmp_path; returns it (absent until a test makes it)."""
    from gradio import tunneling

    folder = tmp_path / "frpc"
    path = folder / tunneling.BINARY_FILENAME
    monkeypatch.setattr(tunneling, "BINARY_FOLDER", folder)
    monkeypatch.setattr(tunneling, "BINARY_PATH", str(path))
    monkeypatch.chdir(tmp_path)  # gradio writes .gradio/certificate.pem under the current folder
    return path


def offline_httpx(monkeypatch):
    import httpx

    def get(url, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(httpx, "get", get)


def test_gradio_offline_api_server(frpc, monkeypatch):
    offline_httpx(monkeypatch)
    tunnel = open_tunnel("gradio", PORT)
    assert tunnel.public_url is None
    assert tunnel.error.startswith(
        "gradio: could not set up a share link (Could not get share link from Gradio API"
    )
    assert "Temporary failure in name resolution" in tunnel.error
    assert "frpc helper on first use and it is not there yet" in tunnel.error and str(frpc) in tunnel.error
    assert (
        "https://cdn-media.huggingface.co/frpc-gradio-" in tunnel.error
        and "--tunnel cloudflared" in render(tunnel.error, "cli")
    )


def test_gradio_frpc_download_fails(frpc, monkeypatch):
    offline_httpx(monkeypatch)
    # a custom share server skips api.gradio.app: the frpc download is the first network call
    tunnel = open_tunnel("gradio", PORT, share_server_address="127.0.0.1:7000")
    assert tunnel.error.startswith(
        "gradio: could not set up a share link ([Errno -3] Temporary failure in name resolution); "
        "gradio downloads its frpc helper on first use"
    )
    assert "not there yet" in tunnel.error and "rename it to frpc_" in tunnel.error
    assert not frpc.exists()

    frpc.parent.mkdir(parents=True, exist_ok=True)
    frpc.write_text("#!/bin/sh\nexit 1\n")
    frpc.chmod(0o755)
    offline_httpx(monkeypatch)  # with frpc present, a share server that does not answer
    tunnel = open_tunnel("gradio", PORT)
    assert tunnel.error.startswith("gradio: could not create a share link")
    assert "https://status.gradio.app" in tunnel.error


def test_gradio_share_link_with_a_fake_frpc(frpc, monkeypatch, tmp_path):
    import httpx

    # api.gradio.app's answer, then frpc's success line
    answer = types.SimpleNamespace(json=lambda: [{"host": "127.0.0.1", "port": 7000, "root_ca": "CERT"}])
    monkeypatch.setattr(httpx, "get", lambda url, **kwargs: answer)
    frpc.parent.mkdir(parents=True)
    count = tmp_path / "count"
    fake_program(
        frpc.parent,
        frpc.name,
        f"""
n = int(open({str(count)!r}).read()) + 1 if os.path.exists({str(count)!r}) else 1
open({str(count)!r}, "w").write(str(n))
json.dump(sys.argv[1:], open({str(tmp_path / "argv")!r}, "w"))
print("2024/05/01 10:00:00 [I] [service.go:301] login to server success", flush=True)
print(f"2024/05/01 10:00:00 [I] [proxy_manager.go:144] start proxy success: http://share{{n}}.gradio.live", flush=True)
if n == 1:
    time.sleep(0.5)
    sys.exit(1)
time.sleep(60)
""",
    )
    tunnel = open_tunnel("gradio", PORT, host="0.0.0.0", timeout=20)
    assert tunnel.error is None, tunnel.error
    assert tunnel.public_url == "https://share1.gradio.live"  # gradio's servers serve https
    argv = json.loads((tmp_path / "argv").read_text())
    assert argv[argv.index("-l") + 1] == "7861" and argv[argv.index("-i") + 1] == "127.0.0.1"
    assert argv[argv.index("--server_addr") + 1] == "127.0.0.1:7000"
    assert (tmp_path / ".gradio" / "certificate.pem").read_text() == "CERT"

    assert wait_for(lambda: tunnel.error is not None)  # frpc exited: the link dropped
    assert tunnel.error.startswith(
        "gradio: the public link dropped (gradio's frpc helper exited with code 1)"
    )
    assert tunnel.reopen() == "https://share2.gradio.live" and tunnel.alive
    from gradio import tunneling

    frpc_proc = tunnel._frpc.proc
    tunnel.close()
    assert frpc_proc.poll() is not None and not tunnel.alive
    assert all(t.local_port != PORT for t in tunneling.CURRENT_TUNNELS)


def test_gradio_frpc_that_dies_silently(frpc, monkeypatch, tmp_path):
    import httpx

    answer = types.SimpleNamespace(json=lambda: [{"host": "127.0.0.1", "port": 7000, "root_ca": "CERT"}])
    monkeypatch.setattr(httpx, "get", lambda url, **kwargs: answer)
    frpc.parent.mkdir(parents=True)
    fake_program(frpc.parent, frpc.name, "sys.exit(2)\n")
    started = time.monotonic()
    tunnel = open_tunnel("gradio", PORT, timeout=20)
    assert time.monotonic() - started < 5  # not gradio's 30 s wait on a dead process
    assert tunnel.error.startswith("gradio: gradio's frpc helper exited with code 2 before giving a link")


def test_gradio_timeout_stops_frpc(frpc, monkeypatch, tmp_path):
    import httpx

    answer = types.SimpleNamespace(json=lambda: [{"host": "127.0.0.1", "port": 7000, "root_ca": "CERT"}])
    monkeypatch.setattr(httpx, "get", lambda url, **kwargs: answer)
    frpc.parent.mkdir(parents=True)
    pids = tmp_path / "pids"
    fake_program(
        frpc.parent, frpc.name, f"open({str(pids)!r}, 'w').write(str(os.getpid())); time.sleep(60)\n"
    )
    tunnel = open_tunnel("gradio", PORT, timeout=1)
    assert tunnel.error.startswith("gradio: no share link after 1 s, so it was stopped")
    assert "https://status.gradio.app" in tunnel.error
    (pid,) = read_pids(pids)
    assert wait_for(lambda: not running(pid))


def test_every_provider_fails_softly_offline(no_token, tmp_path, monkeypatch, frpc):
    """The promise the web UI relies on: whatever is missing, open_tunnel returns with a reason."""
    offline_httpx(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cloudflared, no npx
    for name in PROVIDERS:
        tunnel = open_tunnel(name, PORT, timeout=5)
        assert tunnel.public_url is None
        if name == "none":
            assert tunnel.error is None
        else:
            assert tunnel.error.startswith(f"{name}: ") and "--tunnel " in render(tunnel.error, "cli")
