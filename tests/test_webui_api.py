"""A1111's REST API against a real `nbkit ui` server process on a loopback port (tiny model, CPU)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image
from webui_support import decode, png_b64, shared_server

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _txt2img(http, server, **fields):
    response = http.post(server.api + "/txt2img", json={**SMALL, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_txt2img_images_parameters_info_and_png_info_round_trip(server, http):
    body = _txt2img(
        http,
        server,
        prompt="a photo of sks dog",
        negative_prompt="blurry",
        seed=1234,
        batch_size=2,
        n_iter=2,
        width=64,
        height=96,
        sampler_name="DPM++ 2M Karras",
        some_a1111_only_field=True,
    )
    assert len(body["images"]) == 4
    info = json.loads(body["info"])  # a JSON *string*, as A1111 sends it
    assert info["all_seeds"] == [1234, 1235, 1236, 1237] and info["seed"] == 1234
    assert info["sampler_name"] == "DPM++ 2M" and info["width"] == 64 and info["height"] == 96
    assert len(info["infotexts"]) == 4 and info["sd_model_name"] == server.models["a"].name
    for key in (
        "prompt",
        "all_prompts",
        "negative_prompt",
        "subseed",
        "all_subseeds",
        "cfg_scale",
        "steps",
        "batch_size",
        "sd_model_hash",
        "denoising_strength",
        "job_timestamp",
        "clip_skip",
        "version",
    ):
        assert key in info
    # parameters echoes the request with A1111's defaults filled in and unknown fields dropped
    assert body["parameters"]["prompt"] == "a photo of sks dog" and body["parameters"]["cfg_scale"] == 7.0
    assert body["parameters"]["send_images"] is True and "some_a1111_only_field" not in body["parameters"]
    for index, encoded in enumerate(body["images"]):
        assert not encoded.startswith("data:")
        image = decode(encoded)
        assert image.size == (64, 96)
        assert image.info["parameters"] == info["infotexts"][index]
        read = http.post(
            server.api + "/png-info", json={"image": "data:image/png;base64," + encoded}, timeout=30
        ).json()
        assert read["info"] == info["infotexts"][index]
        parameters = read["parameters"]
        assert parameters["Prompt"] == "a photo of sks dog" and parameters["Negative prompt"] == "blurry"
        assert (
            parameters["Seed"] == str(1234 + index)
            and parameters["Size-1"] == "64"
            and parameters["Size-2"] == "96"
        )
        assert parameters["Sampler"] == "DPM++ 2M" and parameters["Schedule type"] == "Karras"


def test_same_seed_same_image_through_api_and_service(server, http, tiny_model_dir, tmp_path):
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.service import GenerationRequest, GenerationService

    body = _txt2img(http, server, prompt="a cat", seed=77, steps=3, sampler_name="Euler a")
    service = GenerationService(
        ModelCatalog(None, tmp_path, include_base_models=False),
        None,
        model=str(tiny_model_dir("sd1")),
        device="cpu",
    )
    direct = service.generate(
        GenerationRequest(prompt="a cat", seed=77, steps=3, width=64, height=64, save_images=False)
    )
    api_pixels = np.asarray(decode(body["images"][0]).convert("RGB"))
    assert np.array_equal(api_pixels, np.asarray(direct.images[0].convert("RGB")))
    again = _txt2img(http, server, prompt="a cat", seed=77, steps=3, sampler_name="Euler a")
    assert again["images"] == body["images"]


def test_lists_and_errors_have_a1111_shapes(server, http):
    samplers = http.get(server.api + "/samplers", timeout=10).json()
    assert {"Euler a", "DPM++ 2M", "UniPC"} <= {sampler["name"] for sampler in samplers}
    schedulers = http.get(server.api + "/schedulers", timeout=10).json()
    assert {"automatic", "karras"} <= {schedule["name"] for schedule in schedulers}
    assert http.get(server.api + "/loras", timeout=10).json() == []
    memory = http.get(server.api + "/memory", timeout=10).json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert http.post(server.api + "/refresh-checkpoints", timeout=10).json() is None
    malformed = http.post(server.api + "/txt2img", json={**SMALL, "steps": "many"}, timeout=10)
    assert malformed.status_code == 422  # FastAPI's own body, as A1111 answers a malformed field
    assert [(item["loc"], item["input"]) for item in malformed.json()["detail"]] == [
        (["body", "steps"], "many")
    ]
    unknown = http.post(
        server.api + "/options", json={"sd_model_checkpoint": "nope [0000000000]"}, timeout=10
    )
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


def test_model_switching_through_options(server, http):
    first_title = server.models["a"].name  # a folder's title is its name
    options = http.get(server.api + "/options", timeout=10).json()
    assert options["sd_model_checkpoint"] == first_title
    titles = [model["title"] for model in http.get(server.api + "/sd-models", timeout=10).json()]
    assert {first_title, "tiny-other"} <= set(titles)
    first = _txt2img(http, server, prompt="x", seed=3)
    # A1111 switches by title, name or hash, never by a path a client makes up
    refused = http.post(server.api + "/options", json={"sd_model_checkpoint": "/etc/passwd"}, timeout=10)
    assert refused.status_code == 404 and "no checkpoint is called" in refused.json()["detail"]
    assert (
        http.post(server.api + "/options", json={"sd_model_checkpoint": "tiny-other"}, timeout=120).json()
        is None
    )
    assert http.get(server.api + "/options", timeout=10).json()["sd_model_checkpoint"] == "tiny-other"
    switched = _txt2img(http, server, prompt="x", seed=3)
    assert json.loads(switched["info"])["sd_model_name"] == "tiny-other"
    assert switched["images"] != first["images"]
    # a per-request override switches for that request only (A1111's override_settings)
    back = _txt2img(http, server, prompt="x", seed=3, override_settings={"sd_model_checkpoint": first_title})
    assert back["images"] == first["images"]
    assert http.get(server.api + "/options", timeout=10).json()["sd_model_checkpoint"] == "tiny-other"
    assert (
        http.post(server.api + "/options", json={"sd_model_checkpoint": first_title}, timeout=120).json()
        is None
    )
    assert _txt2img(http, server, prompt="x", seed=3)["images"] == first["images"]


def _start_long(http, server, result: dict, steps: int = 150):
    def run():
        started = time.monotonic()
        response = http.post(server.api + "/txt2img", json={**SMALL, "steps": steps, "seed": 9}, timeout=300)
        result["response"], result["seconds"] = response, time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_running(http, server, min_step: int = 2) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = http.get(server.api + "/progress", timeout=10).json()
        if progress["state"]["sampling_step"] >= min_step:
            return progress
        time.sleep(0.05)
    raise AssertionError("the long request never started sampling")


def test_progress_while_running_and_interrupt_ends_it_early(server, http):
    result: dict = {}
    thread = _start_long(http, server, result)
    progress = _wait_running(http, server)
    assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 1
    assert progress["state"]["sampling_steps"] >= 150 and progress["eta_relative"] > 0
    interrupted_at = time.monotonic()
    assert http.post(server.api + "/interrupt", timeout=10).json() == {}
    thread.join(120)
    assert time.monotonic() - interrupted_at < 10
    response = result["response"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 1
    idle = http.get(server.api + "/progress", timeout=10).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_twenty_concurrent_requests_in_order_with_flat_memory(server, http):
    process = psutil.Process(server.process.pid)
    finished: list[int] = []
    errors: list[str] = []
    rss: dict[int, int] = {}
    lock = threading.Lock()

    def one(index: int):
        response = server.session().post(
            server.api + "/txt2img", json={**SMALL, "seed": 1000 + index}, timeout=300
        )
        with lock:
            if response.status_code != 200:
                errors.append(response.text)
                return
            assert json.loads(response.json()["info"])["seed"] == 1000 + index
            finished.append(index)
            rss[len(finished)] = process.memory_info().rss

    threads = []
    for index in range(20):
        threads.append(threading.Thread(target=one, args=(index,)))
        threads[-1].start()
        time.sleep(0.03)  # submission order is the order they are started in
    for thread in threads:
        thread.join(300)
    assert not errors
    assert finished == list(range(20))
    growth = rss[20] - rss[5]
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB between request 5 and 20"


def test_full_queue_answers_503(server, http):
    # The shared server allows 24 waiting requests: one long one runs, 24 short ones wait, one more is refused.
    result: dict = {}
    thread = _start_long(http, server, result)
    _wait_running(http, server)
    waiting = []
    responses: list = []
    for index in range(24):
        waiting.append(
            threading.Thread(
                target=lambda i=index: responses.append(
                    server.session().post(server.api + "/txt2img", json={**SMALL, "seed": i}, timeout=300)
                )
            )
        )
        waiting[-1].start()
    deadline = time.monotonic() + 30
    while http.get(server.api + "/progress", timeout=10).json()["state"]["queue_pending"] < 24:
        assert time.monotonic() < deadline, "the 24 requests did not all reach the queue"
        time.sleep(0.05)
    refused = http.post(server.api + "/txt2img", json=SMALL, timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"] == "QueueFull" and "busy" in refused.json()["detail"]
    http.post(server.api + "/interrupt", timeout=10)
    thread.join(120)
    for waiter in waiting:
        waiter.join(300)
    assert [response.status_code for response in responses] == [200] * 24


def test_training_in_progress_answers_503_in_process(tmp_path):
    """The API refuses at once while a training run holds the GPU lease (same process, as in a notebook)."""
    from fastapi.testclient import TestClient

    from nbkit import gpu
    from nbkit.webui.models import ModelCatalog
    from nbkit.webui.queue import GpuQueue
    from nbkit.webui.server import create_app
    from nbkit.webui.service import GenerationService

    service = GenerationService(ModelCatalog(None, tmp_path, include_base_models=False), None, device="cpu")
    queue = GpuQueue(4)
    client = TestClient(create_app(service, queue, with_ui=False))
    with gpu.lease(gpu.TRAINING):
        response = client.post("/sdapi/v1/txt2img", json=SMALL)
    queue.close()
    assert response.status_code == 503
    assert "training in progress" in response.json()["detail"]


def test_img2img_and_inpaint(server, http):
    picture = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    raw = png_b64(picture)
    body = http.post(
        server.api + "/img2img",
        json={
            **SMALL,
            "init_images": ["data:image/png;base64," + raw],
            "denoising_strength": 0.6,
            "seed": 5,
            "batch_size": 2,
        },
        timeout=120,
    ).json()
    assert len(body["images"]) == 2 and body["parameters"]["init_images"] is None
    assert all(decode(item).size == (64, 64) for item in body["images"])
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.6
    read = http.post(server.api + "/png-info", json={"image": body["images"][0]}, timeout=30).json()
    assert read["info"] == info["infotexts"][0] and read["parameters"]["Denoising strength"] == "0.6"
    inpainted = http.post(
        server.api + "/img2img",
        json={**SMALL, "init_images": [raw], "mask": png_b64(mask), "inpainting_fill": 1, "seed": 5},
        timeout=120,
    ).json()
    result = np.asarray(decode(inpainted["images"][0]).convert("RGB")).astype(int)
    # outside the mask the picture is kept (nearly: the VAE round trip), inside it is repainted
    assert (
        np.abs(result[:8, :8] - np.asarray(picture)[:8, :8]).mean()
        < np.abs(result[24:40, 24:40] - np.asarray(picture)[24:40, 24:40]).mean()
    )
