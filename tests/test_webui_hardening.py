"""Hostile requests to the A1111 API: non-finite numbers, malformed ControlNet units, unknown options,
oversized chunked bodies, clients that leave while queued, a full queue and unexpected errors.

The request tests run against the shared `nbkit ui` server process (tiny model, CPU); the queue and
error tests against an in-process uvicorn server whose generation is a counted fake.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from http import client as http_client
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from webui_support import png_b64, shared_server

from nbkit.webui.api_models import OPTION_TYPES, Img2ImgRequest, Options, Txt2ImgRequest
from nbkit.webui.controlnet_units import ControlNetUnitArgs

SMALL = {"width": 64, "height": 64, "steps": 1}
NaN = float("nan")
PIXEL = png_b64(Image.new("RGB", (8, 8), (10, 20, 30)))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _post_raw(http, url: str, raw: str):
    """POST a JSON text as written (Python's json reads NaN and Infinity; a client may send them)."""
    return http.post(url, data=raw.encode(), headers={"Content-Type": "application/json"}, timeout=60)


# --- non-finite numbers and ranges -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "loc"),
    [
        ("/txt2img", '"enable_hr": true, "hr_scale": Infinity', ["body", "hr_scale"]),
        ("/txt2img", '"cfg_scale": NaN', ["body", "cfg_scale"]),
        ("/txt2img", '"distilled_cfg_scale": -Infinity', ["body", "distilled_cfg_scale"]),
        ("/txt2img", '"denoising_strength": 1e999', ["body", "denoising_strength"]),
        ("/txt2img", '"subseed_strength": 2', ["body", "subseed_strength"]),
        ("/txt2img", '"seed": 18446744073709551616', ["body", "seed"]),
        ("/txt2img", '"comments": {"a": [NaN]}', ["body", "comments"]),
        ("/txt2img", '"override_settings": {"CLIP_stop_at_last_layers": NaN}', None),
        (
            "/img2img",
            f'"init_images": ["{PIXEL}"], "denoising_strength": NaN',
            ["body", "denoising_strength"],
        ),
        ("/img2img", f'"init_images": ["{PIXEL}"], "image_cfg_scale": Infinity', ["body", "image_cfg_scale"]),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_a_422_naming_the_field(server, http, path, fields, loc):
    response = _post_raw(http, server.api + path, '{"width": 64, "height": 64, "steps": 1, ' + fields + "}")
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail"}  # FastAPI's validation body
    if loc is not None:
        assert [item["loc"] for item in body["detail"]] == [loc]
    else:
        assert body["detail"][0]["loc"][:2] == ["body", "override_settings"]


def test_hires_scale_below_one_is_refused_before_generating(server, http):
    response = http.post(
        server.api + "/txt2img", json={**SMALL, "enable_hr": True, "hr_scale": 0}, timeout=30
    )
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "hr_scale"]
    # ignored without enable_hr, as in A1111
    assert http.post(server.api + "/txt2img", json={**SMALL, "hr_scale": 0}, timeout=60).status_code == 200


# --- always-on scripts -----------------------------------------------------------------------------------

CANNY = "control_v11p_sd15_canny"


@pytest.mark.parametrize(
    ("scripts", "loc"),
    [
        ({"controlnet": "yes"}, ["alwayson_scripts", "controlnet"]),
        ({"controlnet": {"args": "unit"}}, ["alwayson_scripts", "controlnet", "args"]),
        ({"controlnet": {"args": [5]}}, ["alwayson_scripts", "controlnet", "args", 0]),
        ({"controlnet": {"args": [[CANNY, PIXEL]]}}, ["alwayson_scripts", "controlnet", "args", 0]),
        (
            {"ControlNet": {"args": [{"model": CANNY, "input_image": PIXEL, "weight": "heavy"}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "weight"],
        ),
        (
            {"controlnet": {"args": [{"model": CANNY, "input_image": PIXEL, "guidance_end": NaN}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "guidance_end"],
        ),
        (
            {"controlnet": {"args": [{"model": CANNY, "input_image": 7}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "image"],  # input_image: the older name
        ),
        (
            {"controlnet": {"args": [{"input_image": PIXEL}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "model"],
        ),
        (
            {"controlnet": {"args": [{"model": CANNY}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "image"],
        ),
        (
            {"controlnet": {"args": [{"model": CANNY, "input_image": PIXEL, "module": "openpose_full"}]}},
            ["alwayson_scripts", "controlnet", "args", 0, "module"],
        ),
        ({"ADetailer": {"args": [False]}}, ["alwayson_scripts", "ADetailer"]),
        # two spellings of one script: one would silently win
        (
            {"controlnet": {"args": [{"model": CANNY, "input_image": PIXEL}]}, "CONTROLNET": {"args": []}},
            ["alwayson_scripts"],
        ),
    ],
)
def test_malformed_controlnet_and_unknown_scripts_are_a_422_naming_the_field(server, http, scripts, loc):
    response = _post_raw(
        http, server.api + "/txt2img", _json({**SMALL, "alwayson_scripts": scripts}).decode()
    )
    assert response.status_code == 422, response.text
    # a union (a string or an object) lists one error per form, each under the field's path
    assert {tuple(item["loc"][: len(loc) + 1]) for item in response.json()["detail"]} == {("body", *loc)}


@pytest.mark.parametrize("image", ["!!not base64!!", "data:image/png,rawbytes", "aGVsbG8gd29ybGQ="])
def test_a_bad_controlnet_image_is_a_422_naming_the_unit(server, http, image):
    unit = {"model": CANNY, "input_image": image}
    response = http.post(
        server.api + "/txt2img",
        json={**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "alwayson_scripts", "controlnet", "args", 0, "image"]
    assert "image" in item["msg"] and len(str(item["input"])) <= 70


def test_disabled_units_and_an_empty_script_still_generate(server, http):
    scripts = {"controlnet": {"args": [{"enabled": False, "model": "None"}, {"enabled": False}]}}
    response = http.post(server.api + "/txt2img", json={**SMALL, "alwayson_scripts": scripts}, timeout=60)
    assert response.status_code == 200, response.text


# --- options -----------------------------------------------------------------------------------------------


def test_options_refuse_unknown_names_with_close_ones_and_keep_known_ones(server, http):
    unknown = http.post(server.api + "/options", json={"sd_modle_checkpoint": "x"}, timeout=10)
    assert unknown.status_code == 422
    [item] = unknown.json()["detail"]
    assert item["loc"] == ["body", "sd_modle_checkpoint"] and "sd_model_checkpoint" in item["msg"]
    wrong_type = http.post(server.api + "/options", json={"CLIP_stop_at_last_layers": "two"}, timeout=10)
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"][0]["loc"] == ["body", "CLIP_stop_at_last_layers"]
    assert http.post(server.api + "/options", json={"CLIP_stop_at_last_layers": 2}, timeout=10).json() is None
    options = http.get(server.api + "/options", timeout=10).json()
    assert options["CLIP_stop_at_last_layers"] == 2 and "sd_modle_checkpoint" not in options
    # what GET lists can be posted back unchanged (clients round-trip the whole dict)
    assert http.post(server.api + "/options", json=options, timeout=120).status_code == 200
    assert http.post(server.api + "/options", json={"CLIP_stop_at_last_layers": 1}, timeout=10).json() is None
    # override_settings: an option nbkit does not have is ignored and named in the info (clients send
    # their extensions' options there); a known one of the wrong type is a 422
    override = http.post(
        server.api + "/txt2img", json={**SMALL, "override_settings": {"sd_vea": "x"}}, timeout=60
    )
    assert override.status_code == 200, override.text
    assert "sd_vea" in " ".join(json.loads(override.json()["info"])["warnings"])
    assert override.json()["parameters"]["override_settings"] == {}
    wrong = http.post(
        server.api + "/txt2img", json={**SMALL, "override_settings": {"jpeg_quality": 0}}, timeout=10
    )
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"][:3] == [
        "body",
        "override_settings",
        "jpeg_quality",
    ]


# --- body caps on the bytes received -----------------------------------------------------------------------


def _rss_mib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _chunked_post(server, path: str, mib: int) -> tuple[int, dict]:
    """POST `mib` MiB as a chunked body (no Content-Length), written as it is generated."""

    def body():
        yield b'{"samples_format": "'
        for _ in range(mib):
            yield b"a" * 2**20
        yield b'"}'

    connection = http_client.HTTPConnection(
        "127.0.0.1", int(server.url.rsplit(":", 1)[1].strip("/")), timeout=120
    )
    headers = {"Content-Type": "application/json", **_basic(server)}
    # The server may answer and stop reading before the body ends; its answer is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        connection.request("POST", "/sdapi/v1" + path, body=body(), headers=headers, encode_chunked=True)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def _basic(server) -> dict:
    session = server.session()
    prepared = requests.Request("GET", server.url, auth=session.auth).prepare()
    return {"Authorization": prepared.headers["Authorization"]}


class _PeakRss:
    """The server's peak RSS growth over a block: VmHWM after resetting it, else sampled VmRSS."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.before = _rss_mib(self.pid, "VmRSS")
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
            self.sampler = None
        except OSError:
            self.peak, self.stop = self.before, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib(self.pid, "VmRSS"))

    def __exit__(self, *_):
        if self.sampler is None:
            self.growth = _rss_mib(self.pid, "VmHWM") - self.before
        else:
            self.stop.set()
            self.sampler.join()
            self.growth = self.peak - self.before


def test_a_chunked_70_mib_body_is_cut_at_the_cap_with_413_without_holding_it(server, http):
    with _PeakRss(server.process.pid) as rss:
        status, answer = _chunked_post(server, "/options", 70)
    assert status == 413 and answer["error"] == "PayloadTooLarge"
    assert rss.growth < 32, f"the server's RSS grew by {rss.growth} MiB for a refused body"
    assert "a" * 100 not in http.get(server.api + "/options", timeout=10).text
    # the generation routes' cap (64 MiB) holds for chunked bodies too
    status, answer = _chunked_post(server, "/txt2img", 70)
    assert status == 413 and "67108864" in answer["detail"]
    assert http.get(server.api + "/progress", timeout=10).status_code == 200


# --- fuzzing the request models ------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.integers(min_value=70_000, max_value=300_000).map(lambda size: "x" * size),  # huge strings
)
GARBAGE = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _invalid_for(model: type, base: dict, name: str):
    """Values of `name` the model refuses in `base` (so no fuzzed body ever reaches the pipeline)."""

    def refused(value: Any) -> bool:
        try:
            model.model_validate({**base, name: value})
        except ValidationError:
            return True
        return False

    return GARBAGE.filter(refused).map(lambda value: (name, value))


def _bodies(model: type, base: dict):
    field = st.sampled_from(sorted(model.model_fields)).flatmap(lambda name: _invalid_for(model, base, name))
    return st.lists(field, min_size=1, max_size=3, unique_by=lambda item: item[0]).map(
        lambda items: {**base, **dict(items)}
    )


UNIT = {"model": CANNY, "input_image": PIXEL}
CONTROLNET = _bodies(ControlNetUnitArgs, UNIT).map(
    lambda unit: {**SMALL, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
)
OPTIONS = st.one_of(
    _bodies(Options, {}),
    st.dictionaries(
        st.text(min_size=1, max_size=30).filter(lambda key: key not in OPTION_TYPES),
        GARBAGE,
        min_size=1,
        max_size=3,
    ),
)
TXT2IMG = _bodies(Txt2ImgRequest, SMALL)
IMG2IMG = _bodies(Img2ImgRequest, {**SMALL, "init_images": [PIXEL]})


def _json(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as the literals a client may send


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    case=st.one_of(
        st.tuples(st.just("/txt2img"), TXT2IMG),
        st.tuples(st.just("/img2img"), IMG2IMG),
        st.tuples(st.just("/txt2img"), CONTROLNET),
        st.tuples(st.just("/options"), OPTIONS),
    )
)
def test_fuzzed_bodies_get_4xx_never_5xx_and_never_run(server, http, case):
    path, body = case
    response = http.post(
        server.api + path, data=_json(body), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code in (400, 413, 422), (response.status_code, response.text[:500])
    if response.status_code == 422:  # FastAPI's validation body, each item naming its field
        assert set(response.json()) == {"detail"}
        assert all(item["loc"][0] == "body" and item["msg"] for item in response.json()["detail"])
    else:
        assert set(response.json()) == {"error", "detail", "body", "errors"}


def test_the_server_answers_a_good_request_after_the_fuzzing(server, http):
    assert http.post(server.api + "/txt2img", json=SMALL, timeout=60).status_code == 200


# --- the queue and unexpected errors, on an in-process server with a counted fake generation -------------


class _FakeGeneration:
    """`GenerationService.generate` stand-in: counts the seeds it runs; seed 1 waits for `release`."""

    def __init__(self):
        self.seeds: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.error: Exception | None = None

    def __call__(self, request):
        from nbkit.webui.requests import GenerationOutput

        self.seeds.append(request.seed)
        if self.error is not None:
            raise self.error
        if request.seed == 1:
            self.started.set()
            assert self.release.wait(60), "the test never released the first job"
        return GenerationOutput(
            images=[Image.new("RGB", (8, 8))],
            infotexts=[f"x\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: {request.seed}, Size: 64x64"],
            seeds=[request.seed],
            paths=[],
            request=request,
            model=None,
        )


@pytest.fixture()
def fake_server(tmp_path):
    """A real uvicorn server on loopback (so clients really disconnect), API only, queue depth 1."""
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.queue import GpuQueue
    from nbkit.webui.server import Server, create_app
    from nbkit.webui.service import GenerationService

    service = GenerationService(ModelCatalog(None, tmp_path, include_base_models=False), None, device="cpu")
    fake = service.generate = _FakeGeneration()
    queue = GpuQueue(1)
    server = Server(create_app(service, queue, with_ui=False))
    server.start()
    yield server, service, queue, fake
    fake.release.set()
    server.close()
    queue.close()


def _wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _start(url: str, seed: int, results: dict) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: results.__setitem__(
            seed, requests.post(url, json={**SMALL, "seed": seed}, timeout=120)
        )
    )
    thread.start()
    return thread


def test_a_queued_request_whose_client_left_never_reaches_the_pipeline(fake_server):
    server, _service, queue, fake = fake_server
    url = server.url + "sdapi/v1/txt2img"
    results: dict = {}
    first = _start(url, 1, results)
    assert fake.started.wait(30)
    body = json.dumps({**SMALL, "seed": 2}).encode()
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    _wait_for(lambda: queue.pending == 1, "the second request to queue")
    client.close()
    _wait_for(lambda: queue.pending == 0, "the server to withdraw the request of the client that left")
    fake.release.set()
    first.join(60)
    assert results[1].status_code == 200
    third: dict = {}
    _start(url, 3, third).join(60)
    assert third[3].status_code == 200
    assert fake.seeds == [1, 3], "the request of the client that left ran"


def test_a_full_queue_answers_503_with_retry_after_and_interrupt_still_answers(fake_server):
    server, _service, queue, fake = fake_server
    url = server.url + "sdapi/v1/txt2img"
    results: dict = {}
    threads = [_start(url, 1, results)]
    assert fake.started.wait(30)
    threads.append(_start(url, 2, results))
    _wait_for(lambda: queue.pending == 1, "the second request to queue")
    refused = requests.post(url, json={**SMALL, "seed": 3}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"] == "QueueFull"
    assert int(refused.headers["Retry-After"]) > 0
    assert requests.post(server.url + "sdapi/v1/interrupt", timeout=10).json() == {}
    fake.release.set()
    for thread in threads:
        thread.join(60)
    assert [results[seed].status_code for seed in (1, 2)] == [200, 200] and fake.seeds == [1, 2]


def test_unexpected_errors_are_a_json_500_with_a_request_id_and_a_logged_traceback(fake_server, caplog):
    server, service, _queue, fake = fake_server
    fake.error = RuntimeError("internal detail /secret/path")

    def broken_refresh():
        raise KeyError("another internal detail")

    service.catalog.refresh = broken_refresh
    with caplog.at_level(logging.ERROR, logger="nbkit.webui.api"):
        queued = requests.post(server.url + "sdapi/v1/txt2img", json=SMALL, timeout=60)  # in the queue's job
        sync = requests.post(server.url + "sdapi/v1/refresh-checkpoints", timeout=10)  # in a sync route
    for response, kind in ((queued, "RuntimeError"), (sync, "KeyError")):
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        request_id = response.headers["X-Request-ID"]
        body = response.json()
        assert set(body) == {"error", "detail", "body", "errors"} and request_id in body["detail"]
        assert kind in body["detail"] and "internal detail" not in response.text
        assert "Traceback" not in response.text
        logged = [record for record in caplog.records if request_id in record.getMessage()]
        assert logged and logged[0].exc_info is not None and logged[0].exc_info[0].__name__ == kind
    assert requests.get(server.url + "sdapi/v1/progress", timeout=10).status_code == 200


def _png_declaring(width: int, height: int) -> str:
    """A PNG whose header declares `width` x `height` (a few bytes on the wire, its pixels never sent)."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


def test_an_image_declaring_a_huge_size_is_refused_as_over_the_limit(server, http):
    body = {**SMALL, "init_images": [_png_declaring(60000, 60000)]}
    response = http.post(server.api + "/img2img", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "above this server's limit" in response.json()["detail"]


def test_png_info_of_junk_names_the_problem_not_a_memory_address(server, http):
    response = http.post(server.api + "/png-info", json={"image": "aGVsbG8gd29ybGQ="}, timeout=30)
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert (
        item["loc"] == ["body", "image"] and "not a readable image" in item["msg"] and "0x" not in item["msg"]
    )


def test_a_vae_outside_the_storage_root_is_refused_before_anything_is_opened(server, http):
    for path in ("/etc/passwd", "/etc/no-such-file", str(server.root.parent)):
        body = {**SMALL, "override_settings": {"sd_vae": path}}
        response = http.post(server.api + "/txt2img", json=body, timeout=30)
        assert response.status_code == 400, response.text
        assert "only inside" in response.json()["detail"]
    # inside the root, the path is looked at (and here found missing)
    body = {**SMALL, "override_settings": {"sd_vae": str(server.root / "vae" / "none.safetensors")}}
    response = http.post(server.api + "/txt2img", json=body, timeout=60)
    assert response.status_code == 400 and "only inside" not in response.json()["detail"]
