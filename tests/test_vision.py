"""nbkit.vision: backbones from local folders, dataset checks, class word, sample scoring.

Random tiny models give near-collapsed embeddings (every pair ~0.98 cosine), so cases that need
semantics (a shifted copy is near, an unrelated photo is far) use `PixelEmbedder`, a deterministic
feature model (centred 8x8 grey pixels); cases that hold for any embedding (exact and mirrored
copies) use the tiny models.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from nbkit.generation.infotext import format_infotext, save_image
from nbkit.session.core import Session
from nbkit.session.manifest import ImageRecord
from nbkit.train.samples import make_grid
from nbkit.vision.backbones import BACKBONES, load_backbone
from nbkit.vision.checks import check_dataset
from nbkit.vision.classword import apply_suggestion, suggest_class_word
from nbkit.vision.embeddings import embed_cached
from nbkit.vision.labels import class_noun
from nbkit.vision.scoring import (
    CheckpointScore,
    Sample,
    collect_samples,
    score_checkpoints,
    score_session,
    suggest_checkpoint,
)
from nbkit.vision.tiny import TINY_BACKBONES, save_tiny_backbone


class PixelEmbedder:
    name = "pixels"

    def __init__(self):
        self.calls = 0

    def embed_images(self, images):
        self.calls += 1
        rows = []
        for image in images:
            grey = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
            rows.append(torch.from_numpy((grey - grey.mean()).ravel()))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def smooth(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 6, 3)) * 255).astype("uint8")).resize(
        (size, size), Image.Resampling.BICUBIC
    )


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shifted(image: Image.Image, pixels: int = 3) -> Image.Image:
    """The frame moved right by `pixels` (a slightly different crop of the same shot)."""
    width, height = image.size
    return image.crop((pixels, pixels // 2, width, height)).resize(image.size, Image.Resampling.BICUBIC)


def embed_both(model, images):
    return model.embed_images(images), model.embed_images([ImageOps.mirror(image) for image in images])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {kind: save_tiny_backbone(kind, root / kind) for kind in TINY_BACKBONES}


def test_registry_names_the_issue_models():
    assert BACKBONES["google/vit-base-patch16-224"].role == "classifier"
    assert BACKBONES["amunchet/rorshark-vit-base"].role == "embedder"
    assert {spec.role for spec in BACKBONES.values()} == {"classifier", "embedder", "dino", "clip"}


@pytest.mark.parametrize("kind", TINY_BACKBONES)
def test_each_kind_loads_from_a_local_folder(tiny_folders, kind):
    folder = tiny_folders[kind]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    backbone = load_backbone(folder, device="cpu")
    expected = {"vit": "classifier", "mobilevit": "classifier", "dino": "dino", "clip": "clip"}[kind]
    assert backbone.role == expected
    images = [smooth(1), smooth(2), smooth(1)]
    embedded = backbone.embed_images(images)
    assert torch.allclose(embedded.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(embedded[0] @ embedded[2]) == pytest.approx(1.0, abs=1e-5)  # identical images
    if kind == "clip":
        assert backbone.embed_texts(["photo of a dog", "cat"]).shape == (2, embedded.shape[1])
    if expected == "classifier":
        top = backbone.classify(images, top_k=2)
        assert len(top) == 3 and top[0][0][1] in {"cat", "dog", "person"}


def test_a_folder_without_config_names_it(tmp_path):
    from nbkit.errors import NbkitError

    with pytest.raises(NbkitError, match=r"config\.json") as error:
        load_backbone(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_exact_and_mirrored_copies_are_duplicates_for_any_embedding(tiny_folders):
    dino = load_backbone(tiny_folders["dino"], device="cpu")
    base = smooth(1)
    images = [base, smooth(2), ImageOps.mirror(base)]
    report = check_dataset(
        ["a", "b", "c"], images, *embed_both(dino, images), duplicate=0.9999, hash_duplicate=1.01
    )
    assert [(pair.first, pair.second, pair.flipped) for pair in report.duplicates] == [("a", "c", True)]


def test_shifted_and_reencoded_copies_are_flagged_and_unrelated_is_the_outlier():
    base = smooth(7)
    files = ["base", "jpeg", "shift", "other1", "other2", "mirror"]
    group = [base, jpeg(base), shifted(base), smooth(8), smooth(9), ImageOps.mirror(smooth(8))]
    report = check_dataset(files, group, *embed_both(PixelEmbedder(), group))
    pairs = {(pair.first, pair.second) for pair in report.duplicates}
    assert {("base", "jpeg"), ("base", "shift"), ("jpeg", "shift"), ("other1", "mirror")} <= pairs
    assert ("base", "other2") not in pairs
    assert "near-duplicate of jpeg" in report.flags["base"][0]

    similar = [jpeg(shifted(base, shift)) for shift in range(5)] + [smooth(99)]
    report = check_dataset(list("abcdef"), similar, *embed_both(PixelEmbedder(), similar))
    assert [outlier.file for outlier in report.outliers] == ["f"]
    assert "robust deviations" in str(report) and "nbkit images remove" in str(report)
    assert "<table>" in report._repr_html_()


def test_embedding_cache_makes_reruns_free(tmp_path):
    model = PixelEmbedder()
    images = [smooth(1), smooth(2)]
    first = embed_cached(model, images, ["k1", "k2"], tmp_path)
    again = embed_cached(model, images, ["k1", "k2"], tmp_path)
    assert model.calls == 1 and torch.equal(first, again)
    embed_cached(model, images, ["k1", "k2"], tmp_path, flip=True)
    assert model.calls == 2


def test_label_to_noun_table():
    assert class_noun("golden retriever", 207, 1000) == ("dog", True)
    assert class_noun("tabby, tabby cat", 281, 1000) == ("cat", True)
    assert class_noun("sports car, sport car", 817, 1000) == ("car", True)
    assert class_noun("running shoe", 770, 1000) == ("shoe", True)
    assert class_noun("suit, suit of clothes", 834, 1000) == ("person", True)
    assert class_noun("person", 2, 3) == ("person", True)
    # Ranges only apply to a 1000-label ImageNet head.
    assert class_noun("golden retriever", 207, 21843) == ("golden retriever", False)


def test_class_word_vote_and_accept(tiny_folders, tmp_path):
    classifier = load_backbone(tiny_folders["vit"], device="cpu")
    images = [smooth(seed) for seed in range(3)]
    suggestion = suggest_class_word(classifier, images, ["a.png", "b.png", "c.png"])
    assert suggestion.class_word in {"cat", "dog", "person"}
    assert sum(suggestion.votes.values()) == 3
    assert suggestion.class_prompt == f"photo of a {suggestion.class_word}"
    assert "votes:" in str(suggestion)

    session = Session.create("pet", root=tmp_path)
    assert session.manifest.training.prior.class_prompt == ""  # nothing changes before accepting
    apply_suggestion(session, suggestion)
    assert Session.open("pet", root=tmp_path).manifest.training.prior.class_prompt == suggestion.class_prompt


def _session_with_photos(tmp_path, photos):
    session = Session.create("subject", root=tmp_path)
    folder = session.dir("instance_images")
    for index, photo in enumerate(photos):
        photo.save(folder / f"zwx_{index}.png")
        session.manifest.images.append(
            ImageRecord(
                file=f"instance_images/zwx_{index}.png",
                original=f"instance_images/zwx_{index}.png",
                sha256=str(index),
                caption="zwx",
                width=64,
                height=64,
            )
        )
    session.save()
    return session


def _save_grid(path, images, prompts):
    infotexts = [
        format_infotext(prompt, "", {"Steps": 2, "Seed": index, "Size": "64x64"})
        for index, prompt in enumerate(prompts)
    ]
    save_image(
        make_grid(images, prompts), path, infotexts[0], extra_text={"nbkit-samples": json.dumps(infotexts)}
    )


def test_scores_table_plot_and_suggestion_in_a_session(tmp_path, tiny_folders):
    photos = [smooth(1), smooth(2), smooth(3)]
    session = _session_with_photos(tmp_path, photos)
    samples_dir = session.dir("outputs") / "samples"
    samples_dir.mkdir()
    prompts = ["photo of zwx", "zwx on a beach"]
    _save_grid(samples_dir / "unet-000010.png", [smooth(40), smooth(41)], prompts)
    # The later checkpoint reproduces a training photo: memorised, never suggested.
    _save_grid(samples_dir / "unet-000020.png", [photos[0], smooth(42)], prompts)
    per_image = samples_dir / "unet-000015"
    per_image.mkdir()
    for index, image in enumerate([smooth(43), smooth(44), smooth(45), smooth(46)]):
        save_image(
            image, per_image / f"{index:03d}.png", format_infotext(prompts[index // 2], "", {"Steps": 2})
        )

    collected = collect_samples(samples_dir)
    assert list(collected) == ["unet-000010", "unet-000015", "unet-000020"]
    assert np.array_equal(np.asarray(collected["unet-000020"][0].image), np.asarray(photos[0]))
    assert collected["unet-000010"][1].prompt == "zwx on a beach"

    # Training kept the two newest checkpoints: unet-000010's samples are scored, but it cannot be
    # exported any more, so it is never suggested.
    for kept in ("unet-000015", "unet-000020"):
        (session.path / "checkpoints" / kept).mkdir(parents=True)
    clip = load_backbone(tiny_folders["clip"], device="cpu")
    scores, paths = score_session(session, dino=PixelEmbedder(), clip=clip)
    by_name = {score.checkpoint: score for score in scores}
    assert by_name["unet-000020"].memorised and by_name["unet-000020"].max_similarity == pytest.approx(
        1.0, abs=1e-5
    )
    assert not by_name["unet-000010"].memorised
    assert by_name["unet-000015"].diversity is not None and by_name["unet-000010"].diversity is None
    assert all(score.clip_t is not None for score in scores)
    table = json.loads(paths["json"].read_text())
    assert table["suggested_checkpoint"] == "unet-000015"
    assert [row["checkpoint"] for row in table["scores"]] == ["unet-000010", "unet-000015", "unet-000020"]
    assert paths["csv"].read_text().startswith("checkpoint,samples,dino")
    assert Image.open(paths["plot"]).size[0] > 100
    assert (session.path / "logs" / "vision_cache").is_dir()


def test_identical_sample_scores_one():
    photo = smooth(5)
    scores = score_checkpoints({"c": [Sample("p", photo)]}, [photo], dino=PixelEmbedder())
    assert scores[0].dino == pytest.approx(1.0, abs=1e-5) and scores[0].memorised


def test_suggested_checkpoint_follows_the_scores():
    def row(name, dino, memorised=False):
        return CheckpointScore(name, 4, dino, None, None, None, 0.5, memorised)

    scores = [row("a", 0.5), row("b", 0.7), row("c", 0.9, memorised=True)]
    assert suggest_checkpoint(scores) == "b"
    scores[0] = row("a", 0.8)
    assert suggest_checkpoint(scores) == "a"
    assert suggest_checkpoint([row("c", 0.9, memorised=True)]) is None


def _run_cli(*argv):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nbkit", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_classify_and_check(tmp_path):
    base = smooth(1)
    session = _session_with_photos(tmp_path, [base, ImageOps.mirror(base), smooth(2), smooth(3)])
    root = str(tmp_path)
    shown = _run_cli("vision", "classify", "subject", "--root", root, "--model", "tiny:vit")
    assert shown.returncode == 0, shown.stderr
    assert "suggested class word" in shown.stdout and "nothing changed" in shown.stdout
    assert Session.open("subject", root=tmp_path).manifest.training.prior.class_prompt == ""
    checked = _run_cli(
        "vision", "check", "subject", "--root", root, "--model", "tiny:dino", "--duplicate", "0.9999"
    )
    assert checked.returncode == 0, checked.stderr
    flags = json.loads((session.path / "logs" / "vision_check.json").read_text())["flags"]
    assert flags["instance_images/zwx_0.png"] == ["near-duplicate of instance_images/zwx_1.png"]
    assert len(list((session.path / "logs" / "vision_cache").glob("*.safetensors"))) == 1


# --- flags in the image report and contact sheet -------------------------------------------------


def test_report_and_contact_sheet_show_the_vision_flags(tmp_path):
    from nbkit.images.contact_sheet import WARNING_COLOUR, write_contact_sheet
    from nbkit.images.manage import list_images
    from nbkit.images.vision_flags import read_vision_flags
    from nbkit.vision.checks import write_dataset_report

    base = smooth(7)
    photos = [base, jpeg(base), smooth(8), smooth(9)]
    session = _session_with_photos(tmp_path, photos)
    write_contact_sheet(session)
    listed = list_images(session)
    assert "vision:" not in str(listed)  # no check yet: no flags
    files = [record.file for record in session.manifest.images]
    report = check_dataset(files, photos, *embed_both(PixelEmbedder(), photos))
    write_dataset_report(session.dir("logs"), report)
    assert read_vision_flags(session.path) == {
        "instance_images/zwx_0.png": ["near-duplicate of instance_images/zwx_1.png"],
        "instance_images/zwx_1.png": ["near-duplicate of instance_images/zwx_0.png"],
    }

    listed = list_images(session)
    text = str(listed)
    assert "vision: near-duplicate of instance_images/zwx_1.png" in text
    assert listed.flags(listed.row("zwx_2.png")) == []
    assert "⚑ near-duplicate of instance_images/zwx_0.png" in listed._repr_html_()

    sheet = Image.open(write_contact_sheet(session)).convert("RGB")
    # Flagged thumbnails (the first two) get the amber frame; the others do not.
    thumb, pad = 160, 8
    frames = [sheet.getpixel((pad + index * (thumb + pad) - 2, pad + thumb // 2)) for index in range(2)]
    assert frames == [WARNING_COLOUR] * 2
    assert (
        sheet.getpixel((pad + 2 * (thumb + pad) - 2, pad + thumb // 2 + (thumb + 18 + pad))) != WARNING_COLOUR
    )


# --- checkpoint grid, --score during training, export of a checkpoint ---------------------------


def test_comparison_grid_puts_checkpoints_in_rows_and_seeds_in_columns():
    from nbkit.train.grid import comparison_grid

    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)], [(0, 255, 255), (255, 0, 255)]]
    rows = [[Image.new("RGB", (32, 24), colour) for colour in row] for row in colours]
    grid = comparison_grid(rows, ["unet-000002", "unet-000004", "unet-000006"], ["seed 1", "seed 2"])
    label_width, header = grid.width - 2 * 32, grid.height - 3 * 24
    assert 0 < header < 24 and label_width > 0
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            assert grid.getpixel((label_width + c * 32 + 16, header + r * 24 + 12)) == colour
    with pytest.raises(ValueError, match="one per column"):
        comparison_grid([rows[0][:1]], ["a"], ["seed 1", "seed 2"])


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model_dir):
    """A tiny sd1 run with --score on: checkpoints text_encoder-000002, unet-000002, unet-000004.

    Scored with tiny CLIP only: the random tiny DINO puts every image at ~0.95 cosine to every other,
    which counts as memorised, so no checkpoint would be suggested.
    """
    import os

    from test_train_support import PROMPT, make_session

    from nbkit.train.trainer import train

    root = tmp_path_factory.mktemp("scored")
    saved = {key: os.environ.get(key) for key in ("NBKIT_VISION_DINO", "NBKIT_VISION_CLIP", "NBKIT_SCRATCH")}
    os.environ.update(
        NBKIT_VISION_DINO="none", NBKIT_VISION_CLIP="tiny:clip", NBKIT_SCRATCH=str(root / "scratch")
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_session(
            "scored",
            tiny_model_dir("sd1"),
            "sd1",
            root=root,
            text_encoder_steps=2,
            unet_steps=4,
            checkpoint_every=2,
            sample_prompts=[PROMPT, "zwx toy on a beach"],
            score=True,
        )
        result = train("scored", root=root)
        yield Session.open("scored", root=root), result
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


CHECKPOINTS = ["text_encoder-000002", "unet-000002", "unet-000004"]


def test_training_with_score_writes_the_table_for_every_checkpoint(scored_run):
    session, _ = scored_run
    table = json.loads((session.path / "logs" / "vision_scores.json").read_text())
    assert [row["checkpoint"] for row in table["scores"]] == CHECKPOINTS
    assert all(
        row["samples"] == 2 and row["dino"] is None and row["clip_t"] is not None for row in table["scores"]
    )
    assert table["suggested_checkpoint"] in CHECKPOINTS
    assert (session.path / "logs" / "vision_scores.png").is_file()
    assert session.manifest.training.score is True


def test_checkpoint_grid_from_a_run(scored_run):
    from nbkit.train.grid import render_checkpoint_grid

    session, _ = scored_run
    path = render_checkpoint_grid(
        session, "photo of zwx toy", seeds=[1, 2], steps=2, checkpoints=CHECKPOINTS[1:]
    )
    assert path == session.path / "logs" / "checkpoint_grid.png"
    grid = Image.open(path)
    infotexts = json.loads(grid.info["nbkit-checkpoint-grid"])
    assert len(infotexts) == 4 and "Seed: 2" in infotexts[1] and "unet-000004" in infotexts[3]
    tile = session.manifest.training.resolution
    label_width, header = grid.width - 2 * tile, grid.height - 2 * tile
    assert 0 < header < tile and label_width > 0
    pixels = np.asarray(grid.convert("RGB"), dtype=np.int16)

    def cell(row, column):
        top, left = header + row * tile, label_width + column * tile
        return pixels[top : top + tile, left : left + tile]

    # The seed changes the picture within a row; training changes it within a column.
    assert np.abs(cell(0, 0) - cell(0, 1)).mean() > 1
    assert np.abs(cell(0, 0) - cell(1, 0)).mean() > 0
    from nbkit.errors import NbkitError

    with pytest.raises(NbkitError, match="unet-009999"):
        render_checkpoint_grid(session, "x", checkpoints=["unet-009999"])


def test_export_of_a_checkpoint_records_a_model(scored_run):
    from safetensors.torch import load_file

    from nbkit.train.export_checkpoint import export_checkpoint

    session, _ = scored_run
    record = export_checkpoint(session, "unet-000002", device="cpu")
    assert record.name == "scored-unet-000002" and (record.stage, record.step, record.kind) == (
        "unet",
        2,
        "full",
    )
    reopened = Session.open(session.name, root=session.path.parent.parent)
    models = {model.name: model for model in reopened.manifest.models}
    assert set(models) >= {"scored", "scored-unet-000002"}
    assert (session.path / models["scored-unet-000002"].files["single_file"]).is_file()
    exported = load_file(
        str(session.path / record.files["folder"] / "unet" / "diffusion_pytorch_model.safetensors")
    )
    trained = load_file(str(session.path / "checkpoints" / "unet-000002" / "unet.safetensors"))
    assert all(torch.equal(exported[key], trained[key].to(exported[key].dtype)) for key in trained)
    from nbkit.errors import NbkitError

    with pytest.raises(NbkitError, match="unet-000099") as error:
        export_checkpoint(session, "unet-000099")
    assert "unet-000004" in str(error.value)  # the names it has
    suggested = export_checkpoint(session, device="cpu")
    assert (
        suggested.name
        == f"scored-{json.loads((session.path / 'logs' / 'vision_scores.json').read_text())['suggested_checkpoint']}"
    )


def test_cli_grid(scored_run):
    session, _ = scored_run
    root = str(session.path.parent.parent)
    shown = _run_cli(
        "vision", "grid", "scored", "--root", root, "--prompt", "zwx toy", "--seeds", "3", "4",
        "--steps", "1", "--checkpoints", "unet-000004", "--device", "cpu",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "checkpoint_grid.png" in shown.stdout
    assert Image.open(session.path / "logs" / "checkpoint_grid.png").width > 2 * 64
