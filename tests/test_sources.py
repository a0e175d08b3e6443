"""Model sources: local folders and files, the hub cache, URL downloads, tiny models, loading and families."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from nbkit.cli import main
from nbkit.errors import NbkitError
from nbkit.models import download, sources
from nbkit.models.loading import detect_family_from_config, load_pipeline
from nbkit.models.sources import ResolvedSource, check_diffusers_folder, hub_token, resolve_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_NeverPrintThisToken123"


# ---------------------------------------------------------------- local folders and files


def test_local_diffusers_folder(tiny_model_dir):
    folder = Path(tiny_model_dir("sd1"))
    resolved = resolve_source(folder)
    assert resolved == ResolvedSource("diffusers", folder, None, None)
    assert resolve_source(str(folder)).path == folder


def test_incomplete_folder_lists_what_is_missing(tiny_model_dir, tmp_path):
    broken = Path(shutil.copytree(tiny_model_dir("sd1"), tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(NbkitError) as caught:
        resolve_source(broken)
    message = str(caught.value)
    assert "missing" in message and "unet/ weights" in message and "tokenizer/" in message
    assert str(broken) in message


def test_folder_without_model_index(tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "mine.safetensors").write_bytes(b"x")
    with pytest.raises(
        NbkitError, match=r"model_index.json is missing[\s\S]*mine.safetensors: pass that file"
    ):
        resolve_source(tmp_path / "ckpts")


def test_single_file_passes_through(tmp_path):
    for name in ("model.safetensors", "old.CKPT"):
        (tmp_path / name).write_bytes(b"not parsed here")
        assert resolve_source(tmp_path / name) == ResolvedSource("single_file", tmp_path / name)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(NbkitError, match=r"\.txt is not a checkpoint format"):
        resolve_source(tmp_path / "notes.txt")


def test_missing_paths_and_nonsense(tmp_path):
    with pytest.raises(NbkitError, match="no such file or folder"):
        resolve_source(tmp_path / "nope.safetensors")
    with pytest.raises(NbkitError, match="no such file or folder"):
        resolve_source("./models/nope")
    with pytest.raises(NbkitError, match="'sd-one-five' is not a model nbkit knows"):
        resolve_source("sd-one-five")


def test_fp16_only_folder_loads_with_the_variant(tiny_model_dir, tmp_path):
    import torch

    folder = Path(shutil.copytree(tiny_model_dir("sd1"), tmp_path / "half"))
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert check_diffusers_folder(folder) == "fp16"
    pipeline = load_pipeline(folder, torch_dtype=torch.float16)
    assert pipeline.unet.dtype == torch.float16


# ---------------------------------------------------------------- the hub cache


def _fake_hub_cache(cache_root: Path, repo_id: str, model: Path, *, fp16: bool = False) -> Path:
    """Lay `model` out as huggingface_hub caches a download: models--owner--name/{refs,snapshots}."""
    storage = cache_root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = Path(shutil.copytree(model, storage / "snapshots" / COMMIT))
    if fp16:
        for weights in snapshot.glob("*/*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_snapshot_download_offline_finds_the_fake_cache(tiny_model_dir, tmp_path):
    from huggingface_hub import snapshot_download

    snapshot = _fake_hub_cache(tmp_path, "owner/name", Path(tiny_model_dir("sd1")))
    found = snapshot_download("owner/name", cache_dir=tmp_path / "hub", allow_patterns=["model_index.json"])
    assert Path(found) == snapshot


def test_load_hub_repo_from_the_cache(tiny_model_dir, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_TOKEN", SECRET)
    model = Path(tiny_model_dir("sd1"))
    cache_root = sources.models_cache()  # <NBKIT_HOME>/models-cache, as a user gets it
    snapshot = _fake_hub_cache(cache_root, "owner/name", model)
    resolved = resolve_source("owner/name")
    assert resolved == ResolvedSource("diffusers", snapshot, None, None)
    pipeline = load_pipeline("owner/name", family="sd1")
    assert isinstance(pipeline, StableDiffusionPipeline)
    reference = StableDiffusionPipeline.from_pretrained(model)
    assert torch.equal(pipeline.unet.conv_in.weight, reference.unet.conv_in.weight)
    with pytest.raises(NbkitError, match=r"this model is sd1 .* not the expected sdxl"):
        load_pipeline("owner/name", family="sdxl")


def test_registry_key_resolves_to_its_hub_repo(tiny_model_dir, tmp_path):
    snapshot = _fake_hub_cache(
        tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_model_dir("sd1"), fp16=True
    )
    resolved = resolve_source("sd15", cache_root=tmp_path)
    assert (resolved.kind, resolved.path, resolved.spec.key, resolved.variant) == (
        "diffusers",
        snapshot,
        "sd15",
        "fp16",
    )
    assert resolve_source("runwayml/stable-diffusion-v1-5", cache_root=tmp_path).path == snapshot


def test_uncached_repo_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(NbkitError) as caught:
        resolve_source("someone/not-cached", cache_root=tmp_path)
    message = str(caught.value)
    assert "someone/not-cached is not in the model cache and HF_HUB_OFFLINE is set" in message
    assert "nbkit model fetch someone/not-cached" in message
    assert main(["model", "fetch", "stabilityai/stable-diffusion-2-1@main"]) == 2
    output = capsys.readouterr()
    assert "stabilityai/stable-diffusion-2-1 is not in the model cache" in output.err
    assert SECRET not in message + output.out + output.err


def test_hub_token_is_huggingface_hubs_own_lookup(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Never the login of whoever runs the tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token() == "hf_from_env"
    assert download.token_for_url("https://huggingface.co/a/b/resolve/main/x.safetensors") == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    assert hub_token() is None
    assert download.token_for_url("https://huggingface.co/a/b/resolve/main/x.safetensors") is None


# ---------------------------------------------------------------- tiny models and family detection


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_family_detection_on_every_tiny_family(tiny_model_dir, family):
    from nbkit.families import FAMILIES

    detected = detect_family_from_config(tiny_model_dir(family))
    prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    assert detected == (family, prediction, FAMILIES[family].tiny_native_resolution)


def test_family_detection_on_real_configs(tiny_model_dir, tmp_path):
    # The real SD 2.1 (768-v) configs: 1024-wide cross attention, sample_size 96, v-prediction.
    folder = Path(shutil.copytree(tiny_model_dir("sd1"), tmp_path / "sd21"))
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet.update(cross_attention_dim=1024, use_linear_projection=False, sample_size=96)
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    text_encoder = json.loads((folder / "text_encoder" / "config.json").read_text())
    text_encoder.update(hidden_act="quick_gelu")
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_encoder))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(prediction_type="v_prediction")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    assert detect_family_from_config(folder) == ("sd2-v", "v_prediction", 768)


def test_tiny_key_is_built_once_and_loaded(monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from nbkit.models import tiny

    builds = []
    real_save = tiny.save_tiny_pipeline
    monkeypatch.setattr(
        tiny, "save_tiny_pipeline", lambda family, out: builds.append(family) or real_save(family, out)
    )
    pipeline = load_pipeline("tiny-sdxl")
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    again = resolve_source("tiny-sdxl")
    assert builds == ["sdxl"]
    assert again.path == sources.models_cache() / "tiny" / "sdxl" and again.spec.key == "tiny-sdxl"


def test_single_file_goes_to_the_converter(tmp_path, monkeypatch):
    import nbkit.models.loading as loading

    checkpoint = tmp_path / "mine.safetensors"
    checkpoint.write_bytes(b"x")
    calls = []

    class Loaded:
        def to(self, device=None, dtype=None):
            calls.append(("to", device, dtype))
            return self

    def load_single_file(path, *, family=None, torch_dtype=None):
        calls.append((Path(path), family, torch_dtype))
        return Loaded()

    monkeypatch.setattr(loading, "load_single_file", load_single_file)
    load_pipeline(checkpoint, family="sd2", device="cpu")
    assert calls == [(checkpoint, "sd2", None), ("to", "cpu", None)]


def test_cli_info_and_fetch(tiny_model_dir, capsys):
    assert main(["model", "info", str(tiny_model_dir("sd2-v"))]) == 0
    out = capsys.readouterr().out
    assert "family:     sd2-v" in out and "prediction: v_prediction" in out and "resolution: 128" in out
    assert main(["model", "fetch", str(tiny_model_dir("sd2-v"))]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_dir("sd2-v"))


# ---------------------------------------------------------------- URL downloads


BODY = bytes(range(256)) * 1200  # 300 KiB, several chunks


class _Server:
    """A local file server that does Range requests and can misbehave on demand."""

    def __init__(self):
        self.mode = "ok"  # ok | short | no-range | html | auth
        self.body = BODY
        self.disposition = 'attachment; filename="my model.safetensors"'
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, dict(self.headers)))
                server.respond(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path="/files/model"):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def respond(self, handler):
        body, start = self.body, 0
        if self.mode == "auth" and handler.headers.get("Authorization") != f"Bearer {SECRET}":
            handler.send_response(401)
            handler.end_headers()
            return
        if self.mode == "html":
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.end_headers()
            handler.wfile.write(b"<html>log in</html>")
            return
        ranged = handler.headers.get("Range")
        if ranged and self.mode != "no-range":
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(body)}")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        if self.disposition:
            handler.send_header("Content-Disposition", self.disposition)
        handler.send_header("Content-Length", str(len(body) - start))
        handler.end_headers()
        sent = body[start:]
        if self.mode == "short":  # the connection drops two thirds of the way through
            sent = sent[: len(sent) * 2 // 3]
        handler.wfile.write(sent)
        handler.wfile.flush()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download, "CHUNK_SIZE", 32 * 1024)  # several chunks per test body
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = _Server()
    yield served
    served.close()


def _folder(url: str, cache_root: Path) -> Path:
    return cache_root / "downloads" / download._url_key(url)


def test_full_download_then_cache_hit(server, tmp_path):
    url = server.url()
    resolved = resolve_source(url, cache_root=tmp_path, progress=False)
    assert resolved.kind == "single_file" and resolved.path.name == "my model.safetensors"
    assert resolved.path.read_bytes() == BODY
    record = json.loads((resolved.path.parent / download.RECORD_NAME).read_text())
    assert record["sha256"] == hashlib.sha256(BODY).hexdigest() and record["size"] == len(BODY)
    assert not (resolved.path.parent / download.PART_NAME).exists()
    assert resolve_source(url, cache_root=tmp_path, progress=False).path == resolved.path
    assert len(server.requests) == 1, "a finished download is not fetched again"


def test_resume_from_a_partial_file(server, tmp_path):
    url = server.url()
    folder = _folder(url, tmp_path)
    folder.mkdir(parents=True)
    (folder / download.PART_NAME).write_bytes(BODY[:100_000])
    path = resolve_source(
        url, cache_root=tmp_path, progress=False, expected_sha256=hashlib.sha256(BODY).hexdigest()
    ).path
    assert path.read_bytes() == BODY
    assert server.requests[0][1]["Range"] == "bytes=100000-"


def test_resume_when_the_server_ignores_range(server, tmp_path):
    server.mode = "no-range"
    url = server.url()
    folder = _folder(url, tmp_path)
    folder.mkdir(parents=True)
    (folder / download.PART_NAME).write_bytes(b"stale bytes from another file")
    assert resolve_source(url, cache_root=tmp_path, progress=False).path.read_bytes() == BODY


def test_complete_part_is_finished_without_refetching(server, tmp_path):
    url = server.url()
    folder = _folder(url, tmp_path)
    folder.mkdir(parents=True)
    (folder / download.PART_NAME).write_bytes(BODY)
    (folder / download.RECORD_NAME).write_text(
        json.dumps({"filename": "my model.safetensors", "complete": False})
    )
    assert resolve_source(url, cache_root=tmp_path, progress=False).path.read_bytes() == BODY


def test_short_download_keeps_the_part_and_resumes(server, tmp_path):
    server.mode = "short"
    url = server.url()
    with pytest.raises(
        NbkitError, match=r"broke off after \d+ of 307200 bytes|has \d+ bytes but the server announced"
    ) as caught:
        resolve_source(url, cache_root=tmp_path, progress=False)
    assert "run the same command again" in str(caught.value)
    part = _folder(url, tmp_path) / download.PART_NAME
    kept = part.stat().st_size
    assert 0 < kept < len(BODY) and BODY.startswith(part.read_bytes())
    server.mode = "ok"
    assert resolve_source(url, cache_root=tmp_path, progress=False).path.read_bytes() == BODY
    assert server.requests[-1][1]["Range"] == f"bytes={kept}-"


def test_sha256_mismatch_removes_the_download(server, tmp_path):
    url = server.url()
    with pytest.raises(NbkitError, match="not the expected 000000") as caught:
        resolve_source(url, cache_root=tmp_path, progress=False, expected_sha256="0" * 64)
    assert "deleted" in str(caught.value)
    assert list(_folder(url, tmp_path).glob("*.part")) == []
    assert list(_folder(url, tmp_path).glob("*.safetensors")) == []


def test_token_goes_in_the_header_never_the_url(server, tmp_path, capsys):
    server.mode = "auth"
    url = server.url()
    with pytest.raises(NbkitError, match="HTTP 401") as caught:
        resolve_source(url, cache_root=tmp_path, progress=False)
    assert "CIVITAI_TOKEN" in caught.value.fix
    path = resolve_source(url, cache_root=tmp_path, progress=False, token=SECRET).path
    assert path.read_bytes() == BODY
    request_path, headers = server.requests[-1]
    assert headers["Authorization"] == f"Bearer {SECRET}" and SECRET not in request_path
    on_disk = b"".join(p.read_bytes() for p in _folder(url, tmp_path).iterdir() if p.suffix == ".json")
    assert SECRET.encode() not in on_disk
    assert SECRET not in capsys.readouterr().err


def test_web_page_instead_of_a_file(server, tmp_path):
    server.mode = "html"
    with pytest.raises(NbkitError, match="sent a web page, not a model file"):
        resolve_source(server.url(), cache_root=tmp_path, progress=False)


def test_civitai_style_url_without_a_name(server, tmp_path):
    server.disposition = None
    header = json.dumps({"__metadata__": {}}).encode()
    server.body = len(header).to_bytes(8, "little") + header
    path = resolve_source(
        server.url("/api/download/models/12345?type=Model"), cache_root=tmp_path, progress=False
    ).path
    assert path.name == "12345.safetensors" and path.read_bytes() == server.body


@pytest.mark.parametrize(
    ("disposition", "url", "expected"),
    [
        ('attachment; filename="a.safetensors"', "http://h/x", "a.safetensors"),
        ("attachment; filename*=UTF-8''caf%C3%A9%20v2.safetensors", "http://h/x", "café v2.safetensors"),
        ('attachment; filename="../../etc/passwd"', "http://h/x", "passwd"),
        (None, "http://h/models/dream%20shaper.ckpt?download=1", "dream shaper.ckpt"),
        (None, "http://h/", "model"),
    ],
)
def test_filenames(disposition, url, expected):
    assert download.filename_from_response(url, disposition) == expected


def test_urls_and_tokens_are_kept_out_of_messages():
    assert download.safe_url("https://user:pw@civitai.com/api/download/models/1?token=abc") == (
        "https://civitai.com/api/download/models/1?…"
    )
    environ = {"CIVITAI_TOKEN": "c", "HF_TOKEN": "h"}
    assert download.token_for_url("https://civitai.com/api/download/models/1", environ) == "c"
    assert download.token_for_url("https://example.com/x.safetensors", environ) is None


SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-inference.yaml",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.safetensors",
]
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
CONFIGS = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
}


@pytest.mark.parametrize(
    ("variant", "weights"),
    [
        ("fp16", ["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"]),
        (None, ["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"]),
    ],
)
def test_hub_patterns_fetch_one_pipeline_and_nothing_else(variant, weights):
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = sources.hub_patterns(SD15_INDEX, variant)
    chosen = set(filter_repo_objects(SD15_FILES, allow_patterns=allow, ignore_patterns=ignore))
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert chosen == CONFIGS | {name + suffix for name in weights}


def test_folder_without_the_safety_checker_loads(tiny_model_dir, tmp_path):
    # What a hub download of SD 1.5 leaves: the index lists the checker, its files are not there.
    folder = Path(shutil.copytree(tiny_model_dir("sd1"), tmp_path / "sd15-like"))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        safety_checker=SD15_INDEX["safety_checker"], feature_extractor=SD15_INDEX["feature_extractor"]
    )
    (folder / "model_index.json").write_text(json.dumps(index))
    pipeline = load_pipeline(folder)
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None


def test_cli_tiny_builds_the_family(tmp_path, monkeypatch, capsys):
    from nbkit.models import tiny

    calls = []
    monkeypatch.setattr(tiny, "save_tiny_pipeline", lambda family, out: calls.append((family, out)) or out)
    assert main(["model", "tiny", "tiny-sd2-v", str(tmp_path / "out")]) == 0
    assert calls == [("sd2-v", tmp_path / "out")]
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
