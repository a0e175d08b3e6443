"""Uploading a session's model to the Hugging Face Hub, offline: a stand-in API records what would go up."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest

from nbkit.cli import main
from nbkit.errors import NbkitError
from nbkit.session.core import Session
from nbkit.session.hub_upload import find_token, model_card, upload_to_hub
from nbkit.session.manifest import BaseModelRef, ExportedModel, ImageRecord

TOKEN = "hf_SECRETtoken0123456789abcdefXYZ"


class FakeApi:
    """Records `create_repo` and `create_commit` calls as `huggingface_hub.HfApi` would receive them."""

    def __init__(self):
        self.repos: list[dict] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        contents = {}
        for operation in operations:
            source = operation.path_or_fileobj
            contents[operation.path_in_repo] = (
                source if isinstance(source, bytes) else Path(source).read_bytes()
            )
        self.commits.append({"repo_id": repo_id, "files": contents, **kwargs})


def _session(kind: str = "full", *, with_model: bool = True) -> Session:
    session = Session.create("zwx_dog", base_model=BaseModelRef("sd15", "sd1"))
    manifest = session.manifest
    manifest.images = [
        ImageRecord(
            file=f"instance_images/zwx_{index}.png",
            original=f"zwx ({index}).png",
            sha256="0" * 64,
            caption="photo of zwx dog",
            width=512,
            height=512,
            token="zwx",
        )
        for index in range(3)
    ]
    manifest.training = manifest.training.replace(
        unet_steps=1200,
        unet_lr=2e-6,
        text_encoder_steps=300,
        seed=42,
        lora_rank=16 if kind == "lora" else 0,
        prior={"class_prompt": "photo of a dog", "num_images": 50},
    )
    models = session.dir("models")
    if with_model and kind == "full":
        (models / "zwx_dog.safetensors").write_bytes(b"full model bytes")
        files = {"folder": "models/zwx_dog", "single_file": "models/zwx_dog.safetensors"}
    elif with_model:
        (models / "zwx_dog-lora").mkdir()
        (models / "zwx_dog-lora" / "zwx_dog.safetensors").write_bytes(b"kohya bytes")
        (models / "zwx_dog-lora" / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers bytes")
        files = {
            "kohya": "models/zwx_dog-lora/zwx_dog.safetensors",
            "diffusers": "models/zwx_dog-lora/pytorch_lora_weights.safetensors",
        }
    if with_model:
        manifest.add_model(
            ExportedModel(
                name="zwx_dog",
                kind=kind,
                files=files,
                family="sd1",
                resolution=512,
                base_model="sd15",
                step=1200,
            )
        )
    samples = session.dir("outputs") / "samples"
    samples.mkdir(parents=True)
    for index in range(6):
        (samples / f"unet-{index:06d}.png").write_bytes(b"png %d" % index)
    session.save()
    return session


def test_upload_sends_the_model_samples_and_card_privately(monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    session = _session()
    api = FakeApi()
    url = upload_to_hub(session, "me/zwx-dog", api=api, max_samples=3)
    assert url == "https://huggingface.co/me/zwx-dog"
    assert api.repos == [{"repo_id": "me/zwx-dog", "repo_type": "model", "private": True, "exist_ok": True}]
    (commit,) = api.commits
    assert sorted(commit["files"]) == [
        "README.md",
        "samples/unet-000003.png",
        "samples/unet-000004.png",
        "samples/unet-000005.png",
        "zwx_dog.safetensors",
    ]
    assert commit["files"]["zwx_dog.safetensors"] == b"full model bytes"
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n")
    for expected in (
        "license: creativeml-openrail-m",
        "library_name: diffusers",
        "- dreambooth",
        "instance_prompt: 'photo of zwx dog'",
        "A DreamBooth fine-tune of stable-diffusion-v1-5/stable-diffusion-v1-5 (SD 1.x)",
        "- prompt: `photo of zwx dog`",
        "- instance token: `zwx`",
        "- class word: `dog` (class prompt `photo of a dog`)",
        "| resolution | 512 px |",
        "| unet steps | 1200 |",
        "| unet learning rate | 2e-06 |",
        "| text encoder steps | 300 |",
        "| prior preservation | 50 class images |",
        "![unet-000005](samples/unet-000005.png)",
    ):
        assert expected in card, expected
    assert "- lora" not in card
    out = capsys.readouterr()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in out.out + out.err + logged + card


def test_a_lora_session_uploads_both_lora_files_and_says_how_to_call_it(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeApi()
    upload_to_hub(_session("lora"), "me/zwx-lora", api=api, max_samples=0, private=False)
    assert api.repos[0]["private"] is False
    files = api.commits[0]["files"]
    assert sorted(files) == ["README.md", "pytorch_lora_weights.safetensors", "zwx_dog.safetensors"]
    card = files["README.md"].decode()
    assert "- lora" in card and "A LoRA (rank 16) for" in card
    assert "add `<lora:zwx_dog:1>` to the prompt" in card


def test_the_token_comes_from_the_argument_then_the_environment_then_colab(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)  # not on Colab
    with pytest.raises(NbkitError, match="HF_TOKEN") as caught:
        find_token()
    assert "write access" in caught.value.fix and "Colab" in caught.value.fix
    assert find_token(" given ") == "given"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert find_token() == "from-env"
    monkeypatch.delenv("HF_TOKEN")
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: {"HF_TOKEN": "from-colab"}[name])
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert find_token() == "from-colab"


def test_a_session_without_a_model_or_a_token_is_refused_before_the_hub(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)
    api = FakeApi()
    with pytest.raises(NbkitError, match="no exported model") as caught:
        upload_to_hub(_session(with_model=False), "me/zwx-dog", api=api)
    assert "train" in caught.value.fix
    with pytest.raises(NbkitError, match="not a valid Hugging Face repository id"):
        upload_to_hub("zwx_dog", "me/bad/id", api=api)
    assert api.repos == api.commits == []


def test_model_card_of_a_local_base_model_has_no_hub_base_model(tmp_path):
    session = _session()
    session.manifest.models[0].base_model = str(tmp_path / "my-model")
    card = model_card(session)
    assert "base_model:" not in card and "license:" not in card
    assert "A DreamBooth fine-tune of my-model (SD 1.x)" in card and str(tmp_path) not in card


def test_model_card_of_two_concepts_lists_each_trigger():
    from nbkit.session.concepts import set_concept

    session = _session()
    assert "## Concepts" not in model_card(session)  # one concept: its trigger alone
    manifest = session.manifest
    manifest.images[2].token, manifest.images[2].concept = "qrt", "cat"
    set_concept(manifest, "cat", class_word="cat", repeats=2)
    card = model_card(session)
    assert "| first | zwx | photo of a dog | 2 | 1 |" in card
    assert "| cat | qrt | cat | 1 | 2 |" in card


def test_cli_upload_uses_hf_token_and_prints_the_url_not_the_token(monkeypatch, capsys):
    _session()
    api = FakeApi()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the API below is a stand-in
    tokens = []

    def fake_init(self, *args, token=None, **kwargs):
        tokens.append(token)

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", fake_init)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: api.create_repo(*a, **k))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: api.create_commit(*a, **k)
    )
    assert main(["session", "upload", "zwx_dog", "me/zwx-dog", "--public"]) == 0
    out = capsys.readouterr()
    assert "https://huggingface.co/me/zwx-dog" in out.out
    assert TOKEN not in out.out + out.err
    assert tokens == [TOKEN] and api.repos[0]["private"] is False
    assert "zwx_dog.safetensors" in api.commits[0]["files"]

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setitem(sys.modules, "google.colab", None)
    assert main(["session", "upload", "zwx_dog", "me/zwx-dog"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
