"""session.json as dataclasses: strict loading and schema upgrades."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbkit.errors import NbkitError
from nbkit.session.manifest import (
    SCHEMA_VERSION,
    BaseModelRef,
    ExportedModel,
    ImageRecord,
    Manifest,
    RunRecord,
    TrainingState,
    load_manifest,
    upgrade,
)
from nbkit.session.settings import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures"


def schema1() -> dict:
    return json.loads((FIXTURES / "session_schema1.json").read_text())


def test_schema1_fixture_upgrades_to_the_current_schema():
    manifest = load_manifest(schema1(), where="session_schema1.json")
    assert manifest.schema_version == SCHEMA_VERSION == 5
    assert manifest.name == "old-dog"
    assert manifest.created == "2024-03-02T10:15:00+00:00"
    assert manifest.updated == "2024-03-02T11:40:12+00:00"
    assert manifest.base_model == BaseModelRef(
        source="runwayml/stable-diffusion-v1-5", family="sd1", prediction_type="epsilon"
    )
    assert manifest.training == TrainConfig(
        resolution=512, unet_steps=1200, unet_lr=2e-6, text_encoder_steps=300, text_encoder_lr=1e-6, seed=42
    )
    assert manifest.state == TrainingState(stage="unet", step=800)
    assert manifest.images == [] and manifest.history == []


def test_schema1_v_prediction_flag_becomes_the_prediction_type():
    data = {**schema1(), "v_prediction": True, "family": "sd2-v", "resolution": 768}
    manifest = load_manifest(data)
    assert manifest.base_model.prediction_type == "v_prediction"
    assert manifest.base_model.family == "sd2-v"
    assert manifest.training.resolution == 768


def test_schema1_unknown_key_is_rejected():
    with pytest.raises(NbkitError, match=r"unknown key 'colour' in a schema 1 session\.json"):
        load_manifest({**schema1(), "colour": "blue"})


def test_schema2_keeps_one_resolution_and_one_seed():
    data = {
        "schema_version": 2,
        "name": "dog",
        "base_model": {"source": "sd15", "family": "sd1", "prediction_type": "epsilon", "resolution": 512},
        "training": {"resolution": 640, "seed": None, "external_captions": True},
        "state": {"stage": "unet", "step": 30, "last_checkpoint": "checkpoints/unet-000030", "seed": 77},
    }
    manifest = load_manifest(data)
    assert manifest.base_model == BaseModelRef("sd15", "sd1", "epsilon")
    assert (manifest.training.resolution, manifest.training.seed) == (640, 77)
    assert manifest.state == TrainingState("unet", 30, "checkpoints/unet-000030")
    assert manifest.models == []


def test_stale_running_records_close_as_interrupted():
    manifest = Manifest(name="x", history=[RunRecord("train", "2024-01-01T00:00:00+00:00")])
    manifest.record_run("images", "ok")
    closed = manifest.close_stale_runs()
    assert [record.kind for record in closed] == ["train"]
    assert [record.status for record in manifest.history] == ["interrupted", "ok"]
    assert manifest.history[0].finished is not None


def test_newer_schema_asks_for_a_newer_nbkit():
    with pytest.raises(NbkitError, match="newer than this nbkit") as caught:
        upgrade({"schema_version": SCHEMA_VERSION + 1, "name": "x"}, where="/s/session.json")
    assert "/s/session.json" in str(caught.value)
    assert "pip install -U nbkit" in str(caught.value)


def test_missing_schema_version_is_an_error():
    with pytest.raises(NbkitError, match="no integer schema_version"):
        load_manifest({"name": "x"})


def test_unknown_key_names_the_file_the_key_and_a_close_match():
    data = {"schema_version": 2, "name": "x", "training": {"unet_stepz": 10}}
    with pytest.raises(NbkitError) as caught:
        load_manifest(data, where="/drive/Sessions/x/session.json")
    message = str(caught.value)
    assert "unknown key 'unet_stepz' in /drive/Sessions/x/session.json.training" in message
    assert "did you mean 'unet_steps'" in message


def test_wrong_type_names_the_key():
    data = {"schema_version": 2, "name": "x", "state": {"step": "800"}}
    with pytest.raises(NbkitError, match=r"session.json.state.step must be int, got '800'"):
        load_manifest(data)


def test_bad_literal_lists_the_allowed_values():
    data = {"schema_version": 2, "name": "x", "state": {"stage": "training"}}
    with pytest.raises(NbkitError, match="allowed values are 'idle', 'text_encoder', 'unet', 'done'"):
        load_manifest(data)


def test_full_manifest_round_trips_through_json():
    manifest = Manifest(
        name="dog",
        base_model=BaseModelRef("sdxl", "sdxl", revision="abc123"),
        training=TrainConfig(unet_steps=10, sample_prompts=["photo of sks dog"]),
        state=TrainingState(stage="done", step=10, last_checkpoint="checkpoints/step-10"),
        images=[
            ImageRecord("instance_images/a.png", "IMG_1.jpg", "ab" * 32, "sks dog", 512, 512, ["rotated"])
        ],
        history=[RunRecord("train", "2024-01-01T00:00:00+00:00", None, "interrupted", {"step": 5})],
        models=[
            ExportedModel(
                name="dog",
                kind="full",
                files={"folder": "models/dog", "single_file": "models/dog.safetensors"},
                family="sdxl",
                resolution=1024,
                base_model="sdxl",
                step=10,
                sha256={"models/dog.safetensors": "ab" * 32},
                versions={"nbkit": "0.1.0"},
            )
        ],
    )
    text = json.dumps(manifest.to_dict())
    assert load_manifest(json.loads(text)) == manifest
