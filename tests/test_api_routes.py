"""A1111's other routes against a real `nbkit ui` (tiny SD 1.x model, CPU): embeddings, styles,
interrogate, unload/reload, the lists, cmd-flags and /internal; and the rules behind them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from webui_support import PASSWORD, USER, decode, png_b64, start_server

from nbkit.families import get_family
from nbkit.webui.embeddings import EmbeddingDatabase, fits, read_embedding
from nbkit.webui.prompt_tools import add_to_prompt
from nbkit.webui.styles import StyleDatabase, apply_style_texts

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}
SECRETS = {"HF_TOKEN": "hf_secret_token_xyz", "NGROK_AUTHTOKEN": "ngrok-secret-abc"}
STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    'Painterly,"oil painting, {prompt}, masterpiece",blurry\n'
    "Sharp,sharp focus,lowres\n"
    "# comment,not a style,\n"
)


class _Payload:
    """Unpickling this creates a file: what a hostile `.pt` would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _width(model) -> int:
    return json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("routes-root")
    model = tiny_model_dir("sd1")
    width = _width(model)
    folder = root / "embeddings"
    (folder / "more").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(1, width, generator=generator) * 8}, folder / "tinyemb.safetensors")
    save_file({"emb_params": torch.randn(2, width // 2, generator=generator)}, folder / "narrow.safetensors")
    torch.save(  # A1111's own format, with its training facts, in a sub-folder
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(3, width, generator=generator) * 8},
            "name": "multi",
            "step": 500,
            "sd_checkpoint": "abcdef1234",
            "sd_checkpoint_name": "base",
        },
        folder / "more" / "multi.pt",
    )
    marker = root / "pwned"
    torch.save({"emb_params": _Payload(marker)}, folder / "evil.pt")
    (root / "styles.csv").write_text(STYLES_CSV, encoding="utf-8-sig")
    shutil.copytree(model / "vae", root / "vae" / "tiny-vae")
    env = {**SECRETS, "NBKIT_VISION_CLIP": "tiny:clip"}
    process = start_server(root, model, "--auth", f"{USER}:{PASSWORD}", env=env)
    process.marker = marker
    process.width = width
    yield process
    process.stop()


@pytest.fixture(scope="module")
def http(server):
    return server.session()


def _txt2img(http, server, **fields):
    response = http.post(server.api + "/txt2img", json={**SMALL, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    return body, json.loads(body["info"])


def _pixels(body) -> np.ndarray:
    return np.asarray(decode(body["images"][0]).convert("RGB"), dtype=np.int16)


def _sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# --- routes against the server ------------------------------------------------------------------------


def test_lists_flags_and_ping_answer_a1111_shapes(server, http):
    get = lambda path: http.get(server.api + path, timeout=30)  # noqa: E731
    for path in ("/face-restorers", "/hypernetworks", "/extensions"):
        assert get(path).status_code == 200 and get(path).json() == []
    vae = server.root / "vae" / "tiny-vae"
    assert get("/sd-vae").json() == [{"model_name": "tiny-vae", "filename": str(vae)}]
    assert get("/sd-modules").json() == get("/sd-vae").json()
    assert http.post(server.api + "/refresh-vae", timeout=30).json() is None
    flags = get("/cmd-flags").json()
    assert flags["embeddings_dir"] == str(server.root / "embeddings")
    assert flags["lowvram"] is False and flags["use_cpu"] == ["all"] and flags["api"] is True
    assert flags["api_auth"] is None and PASSWORD not in json.dumps(flags)
    assert http.get(server.url + "internal/ping", timeout=30).json() == {}
    assert server.session(auth=False).get(server.url + "internal/ping", timeout=30).status_code == 401
    # A listed VAE may be named by its model_name, as A1111 clients send it.
    _, info = _txt2img(http, server, prompt="a dog", override_settings={"sd_vae": "tiny-vae"})
    assert "VAE: tiny-vae" in info["infotexts"][0]
    # A1111's textual-inversion/hypernetwork training routes say what nbkit trains instead.
    created = http.post(server.api + "/create/embedding", json={"name": "x"}, timeout=30)
    assert created.status_code == 501 and "nbkit train" in created.json()["detail"]


def test_sysinfo_has_a1111_keys_and_no_secret(server, http):
    response = http.get(server.url + "internal/sysinfo", timeout=60)
    assert response.status_code == 200 and "inline" in response.headers["content-disposition"]
    text = response.text
    info = json.loads(text)
    for key in ("Platform", "Python", "Version", "Checksum", "Commandline", "CPU", "RAM", "Environment"):
        assert key in info
    for secret in (*SECRETS.values(), PASSWORD):
        assert secret not in text
    assert "<hidden>" in info["Commandline"]
    # A1111's checksum: the sha256 of the text with the placeholder in the checksum's place.
    placeholder = text.replace(info["Checksum"], "nbkit-sysinfo-checksum")
    assert hashlib.sha256(placeholder.encode()).hexdigest() == info["Checksum"]


def test_embeddings_listed_loaded_or_skipped_and_a_pickle_payload_refused(server, http):
    listing = http.get(server.api + "/embeddings", timeout=60).json()
    loaded, skipped = listing["loaded"], listing["skipped"]
    assert set(loaded) == {"tinyemb", "multi"} and set(skipped) == {"narrow"}
    assert loaded["tinyemb"] == {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": server.width,
        "vectors": 1,
    }
    assert loaded["multi"]["step"] == 500 and loaded["multi"]["vectors"] == 3
    assert loaded["multi"]["sd_checkpoint_name"] == "base"
    assert skipped["narrow"]["shape"] == server.width // 2
    assert not server.marker.exists()  # evil.pt was refused before anything of it ran
    assert any("evil.pt" in line and "refused" in line for line in server.output)
    # A file added to the folder is found at the next use, as A1111 finds it.
    save_file({"emb_params": torch.zeros(1, server.width)}, server.root / "embeddings" / "later.safetensors")
    assert "later" in http.get(server.api + "/embeddings", timeout=60).json()["loaded"]


def test_an_embedding_named_in_a_prompt_changes_the_image_and_is_hashed(server, http):
    path = server.root / "embeddings" / "tinyemb.safetensors"
    first, info = _txt2img(http, server, prompt="a photo of TinyEmb", negative_prompt="multi")
    text = info["infotexts"][0]
    assert text.splitlines()[0] == "a photo of TinyEmb"  # the prompt as typed, not the token
    assert text.splitlines()[1] == "Negative prompt: multi"
    sha_multi = _sha12(server.root / "embeddings" / "more" / "multi.pt")
    assert f'TI hashes: "tinyemb: {_sha12(path)}, multi: {sha_multi}"' in text
    # Other vectors under the same name: a different image (the vectors drive it) and a new hash.
    save_file({"emb_params": -8 * torch.ones(1, server.width)}, path)
    assert http.post(server.api + "/refresh-embeddings", timeout=60).json() is None
    second, info = _txt2img(http, server, prompt="a photo of TinyEmb", negative_prompt="multi")
    assert np.abs(_pixels(first) - _pixels(second)).max() > 0
    assert f"tinyemb: {_sha12(path)}" in info["infotexts"][0]
    # A name inside a longer word is not the embedding (A1111 matches whole tokens).
    _, info = _txt2img(http, server, prompt="a photo of tinyembx")
    assert "TI hashes" not in info["infotexts"][0]


def test_styles_listed_and_applied_with_the_prompt_placeholder(server, http):
    styles = http.get(server.api + "/prompt-styles", timeout=30).json()
    assert styles == [
        {"name": "Painterly", "prompt": "oil painting, {prompt}, masterpiece", "negative_prompt": "blurry"},
        {"name": "Sharp", "prompt": "sharp focus", "negative_prompt": "lowres"},
    ]
    body, info = _txt2img(
        http, server, prompt="a cat", negative_prompt="ugly", styles=["Painterly", "Sharp", "NoSuchStyle"]
    )
    assert info["prompt"] == "oil painting, a cat, masterpiece, sharp focus"
    assert info["negative_prompt"] == "ugly, blurry, lowres"
    lines = info["infotexts"][0].splitlines()
    assert lines[0] == info["prompt"] and lines[1] == "Negative prompt: ugly, blurry, lowres"
    assert body["parameters"]["prompt"] == "a cat" and info["styles"] == ["Painterly", "Sharp", "NoSuchStyle"]
    # Reading the infotext finds the styles again (A1111's png-info, "Apply if any").
    read = http.post(server.api + "/png-info", json={"image": body["images"][0]}, timeout=30).json()
    assert read["parameters"]["Styles array"] == ["Painterly", "Sharp"]
    assert read["parameters"]["Prompt"] == "a cat" and read["parameters"]["Negative prompt"] == "ugly"


def test_unload_then_generate_and_reload(server, http):
    before, _ = _txt2img(http, server, prompt="a house, multi")
    assert http.post(server.api + "/unload-checkpoint", timeout=60).json() == {}
    assert http.get(server.api + "/options", timeout=30).json()["sd_model_checkpoint"]
    # With no model loaded, no width to compare with: every readable embedding is listed as loaded.
    assert "narrow" in http.get(server.api + "/embeddings", timeout=30).json()["loaded"]
    after, info = _txt2img(http, server, prompt="a house, multi")  # loads the same model again
    assert np.array_equal(_pixels(before), _pixels(after)) and "TI hashes" in info["infotexts"][0]
    assert http.post(server.api + "/unload-checkpoint", timeout=60).json() == {}
    assert http.post(server.api + "/reload-checkpoint", timeout=120).json() == {}
    assert http.get(server.api + "/embeddings", timeout=30).json()["skipped"].keys() == {"narrow"}


def test_interrogate_clip_and_a1111_answers_for_other_models(server, http):
    image = png_b64(Image.new("RGB", (48, 48), (200, 40, 40)))
    response = http.post(server.api + "/interrogate", json={"image": image, "model": "clip"}, timeout=120)
    assert response.status_code == 200, response.text
    caption = response.json()["caption"]
    assert isinstance(caption, str) and len(caption.split(", ")) >= 4
    for body in ({"image": image, "model": "deepdanbooru"}, {"image": ""}):
        response = http.post(server.api + "/interrogate", json=body, timeout=30)
        assert response.status_code == 404
    response = http.post(server.api + "/interrogate", json={"image": "bm90IGFuIGltYWdl"}, timeout=30)
    assert response.status_code == 422


# --- the rules, in process --------------------------------------------------------------------------


def test_sdxl_embeddings_load_into_both_text_encoders(tmp_path):
    pipeline = get_family("sdxl").build_tiny_pipeline()
    widths = [
        getattr(pipeline, name).get_input_embeddings().weight.shape[-1]
        for name in ("text_encoder", "text_encoder_2")
    ]
    save_file(
        {"clip_l": torch.randn(2, widths[0]), "clip_g": torch.randn(2, widths[1])},
        tmp_path / "xl.safetensors",
    )
    save_file({"emb_params": torch.randn(1, widths[0])}, tmp_path / "sd1style.safetensors")
    database = EmbeddingDatabase(tmp_path)
    listing = database.listing(pipeline, get_family("sdxl"))
    assert set(listing["loaded"]) == {"xl"} and listing["loaded"]["xl"]["shape"] == sum(widths)
    assert set(listing["skipped"]) == {"sd1style"}
    sizes = [len(pipeline.tokenizer), len(pipeline.tokenizer_2)]
    embedded = database.apply(pipeline, get_family("sdxl"), "a XL photo", "")
    assert embedded.loaded and [e.name for e in embedded.used] == ["xl"]
    assert [len(pipeline.tokenizer), len(pipeline.tokenizer_2)] == [size + 2 for size in sizes]
    assert "xl" not in embedded.prompt.lower().split()
    # Kept for the next request, not loaded twice.
    assert not database.apply(pipeline, get_family("sdxl"), "xl", "").loaded
    # A family without textual inversion takes none.
    embedding = read_embedding(tmp_path / "xl.safetensors")
    assert not fits(embedding, pipeline, get_family("flux"))


@given(
    prompt=st.text(alphabet="abc xyz", min_size=1, max_size=20).map(str.strip).filter(bool),
    style=st.text(alphabet="klm ,", max_size=12).map(str.strip).filter(lambda text: not text.endswith(",")),
    wrap=st.booleans(),
)
def test_styles_placeholder_and_append_rules_round_trip(tmp_path_factory, prompt, style, wrap):
    text = f"[{style}] {{prompt}} !" if wrap else style
    applied = apply_style_texts(prompt, [text])
    if wrap:
        assert applied == f"[{style}] {prompt} !"
    else:
        assert applied == (f"{prompt}, {style}" if style else prompt)
    root = tmp_path_factory.mktemp("styles")
    (root / "styles.csv").write_text(f'name,prompt,negative_prompt\nS,"{text}",\n', encoding="utf-8")
    found, stripped, _ = StyleDatabase(root).extract_styles(applied, "")
    if text:
        assert found == ["S"] and stripped == prompt


def test_more_styles_files_and_old_two_column_form(tmp_path):
    (tmp_path / "styles.csv").write_text("name,text\nOld,old text\nTwice,first\n", encoding="utf-8")
    (tmp_path / "styles-more.csv").write_text("name,prompt,negative_prompt\nTwice,second,neg\n")
    database = StyleDatabase(tmp_path)
    assert database.names() == ["Old", "Twice"]
    assert database.apply("p", "n", ["Twice", "Old"]) == ("p, second, old text", "n, neg")


def test_the_ui_sends_its_styles_and_adds_embeddings_to_the_prompt():
    from nbkit.webui.security import Limits
    from nbkit.webui.ui import build_request

    values = dict(prompt="a", negative_prompt="", seed=1, batch_size=1, n_iter=1, steps=2, cfg_scale=7)
    values.update(width=64, height=64, sampler_name="Euler", scheduler="Automatic", styles=["S", "T"])
    assert build_request("txt2img", values, Limits()).styles == ["S", "T"]
    assert add_to_prompt("", "emb") == "emb"
    assert add_to_prompt("a cat ", "emb") == "a cat emb"


def test_prompt_names_match_whole_tokens():
    from nbkit.webui.embeddings import _name_pattern

    def finds(name: str, text: str) -> list[str]:
        return re.findall(_name_pattern(name), text, re.IGNORECASE)

    assert finds("bad-hands-5", "x, Bad-Hands-5, y") == ["Bad-Hands-5"]
    assert finds("bad-hands-5", "verybad-hands-5") == []
    assert finds("emb", "emb2 emb_x (emb:1.2) embx xemb") == ["emb", "emb", "emb"]
