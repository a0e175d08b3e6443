"""Several concepts in one session: photos, tokens, class words, class images and repeats per concept;
a run draws each concept at its repeats and scores each against its own photos; a resume keeps the
concepts' settings; captions and the CLI work per concept."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_train_support import make_session
from test_vision import PixelEmbedder

from nbkit.errors import NbkitError
from nbkit.images import auto_caption, import_images
from nbkit.session.concepts import (
    check_concepts,
    concept_for_prompt,
    concept_prompts,
    concepts,
    counting_class_images,
    remove_concept,
    repeats_per_image,
    set_concept,
)
from nbkit.session.core import Session
from nbkit.session.manifest import ImageRecord, load_manifest
from nbkit.train import stages
from nbkit.train.data import STREAM_CLASS_ORDER, STREAM_INSTANCE_ORDER, draw_indices
from nbkit.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


def _png(colour: tuple[int, int, int], index: int, size: int = 96) -> bytes:
    """A disc of `colour` on grey, its place moved by `index` (so no two photos are duplicates)."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.full((size, size, 3), 120, np.uint8)
    pixels[(x - 30 - 12 * index) ** 2 + (y - 40) ** 2 < 20**2] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _two_concepts(name: str, model_dir, **training) -> Session:
    """Two photos of `zwx` (the first concept, class "person") and two of `qrt` (concept `dog`,
    class "dog", repeats 3), each concept with two class images."""
    session = make_session(name, model_dir, "sd1", images=0, **training)
    import_images(session, {f"zwx ({i}).png": _png((220, 30, 30), i) for i in range(2)}, crop="center")
    import_images(
        session, {f"qrt ({i}).png": _png((30, 200, 30), i) for i in range(2)}, crop="center", concept="dog"
    )
    set_concept(session.manifest, "", class_word="person", class_images=2)
    set_concept(session.manifest, "dog", class_word="dog", class_images=2, repeats=3)
    prior = session.manifest.training.prior.replace(generation_steps=2)
    session.manifest.training = session.manifest.training.replace(prior=prior.to_dict())
    session.save()
    return Session.open(name)


class _Latents:
    """What `draw_indices` reads of a latent cache: its length and its buckets."""

    def __init__(self, buckets: list[list[int]]):
        self.buckets = buckets

    def __len__(self) -> int:
        return sum(map(len, self.buckets))


def _batches(latents: _Latents, seed: int, batch_size: int, count: int, repeats=None) -> list[list[int]]:
    """The first `count` batches a stage draws."""
    return [
        draw_indices(
            latents,
            seed=seed,
            stream=1,
            stage_index=2,
            first_position=number * batch_size,
            batch_size=batch_size,
            repeats=repeats,
        )
        for number in range(count)
    ]


@settings(max_examples=40, deadline=None)
@given(
    repeats=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    batch_size=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_an_epoch_of_square_draws_holds_each_image_its_repeats(repeats, batch_size, seed):
    latents = _Latents([list(range(len(repeats)))])
    # sum(repeats) batches are batch_size epochs: whole batches end on an epoch's end.
    drawn = [index for batch in _batches(latents, seed, batch_size, sum(repeats), repeats) for index in batch]
    assert Counter(drawn) == {index: times * batch_size for index, times in enumerate(repeats)}
    # Every repeat 1 draws exactly what a run without repeats draws.
    ones = [1] * len(repeats)
    assert _batches(latents, seed, batch_size, 4) == _batches(latents, seed, batch_size, 4, ones)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_bucketed_draws_keep_one_bucket_per_batch_and_weigh_by_repeats(sizes, data, seed):
    buckets, start = [], 0
    for size in sizes:
        buckets.append(list(range(start, start + size)))
        start += size
    repeats = data.draw(st.lists(st.integers(1, 3), min_size=start, max_size=start))
    latents, batch_size = _Latents(buckets), 2
    per_epoch = sum(-(-sum(repeats[i] for i in bucket) // batch_size) for bucket in buckets)
    counts: Counter[int] = Counter()
    for batch in _batches(latents, seed, batch_size, per_epoch, repeats):
        assert len(batch) == batch_size
        assert sum(any(index in bucket for index in batch) for bucket in buckets) == 1
        counts.update(batch)
    # An epoch holds each image at least its repeats (a bucket's last batch is topped up from its start).
    assert all(counts[index] >= times for index, times in enumerate(repeats))


def test_concepts_are_listed_with_their_tokens_class_words_and_repeats(tiny_model_dir):
    session = _two_concepts("listed", tiny_model_dir("sd1"))
    views = concepts(session.manifest)
    assert [(v.label, v.token, v.class_prompt, v.class_images, v.repeats, len(v.images)) for v in views] == [
        ("first", "zwx", "person", 2, 1, 2),
        ("dog", "qrt", "dog", 2, 3, 2),
    ]
    assert repeats_per_image(session.manifest) == [1, 1, 3, 3]
    assert concept_prompts(session.manifest) == ["zwx", "qrt"]
    assert concept_for_prompt(views, "a photo of qrt on a sofa").name == "dog"
    assert concept_for_prompt(views, "zwx and qrt") is None
    assert concept_for_prompt(views, "zwxy") is None
    assert session.manifest.history[-1].detail["concept"] == "dog"
    with pytest.raises(NbkitError, match="first concept's repeats are 1"):
        set_concept(session.manifest, "", repeats=2)
    with pytest.raises(NbkitError, match="not a concept name"):
        set_concept(session.manifest, "../dog")
    with pytest.raises(NbkitError, match="repeats is 0"):
        set_concept(session.manifest, "dog", repeats=0)
    with pytest.raises(NbkitError, match="asks for 3 class images but has no class word"):
        set_concept(session.manifest, "cat", class_images=3)
    assert [view.name for view in concepts(session.manifest)] == ["", "dog"]  # refused: nothing added
    # `first`, as listings name it, is the first concept, not a new one.
    assert set_concept(session.manifest, "First", class_word="woman").name == ""
    assert session.manifest.training.prior.class_prompt == "woman"
    with pytest.raises(NbkitError, match="still has 2 photo"):
        remove_concept(session.manifest, "dog")
    set_concept(session.manifest, "cat", class_word="cat")
    remove_concept(session.manifest, "cat")
    assert [view.name for view in concepts(session.manifest)] == ["", "dog"]
    # Two concepts with one token cannot be told apart by a prompt: refused before training.
    session.manifest.images[2].token = session.manifest.images[3].token = "zwx"
    with pytest.raises(NbkitError, match="share the instance token 'zwx'"):
        check_concepts(session.manifest)
    session.manifest.images[2].token = session.manifest.images[3].token = "qrt"
    # Another concept's class images double the batch the memory figures count, as the first's do.
    from nbkit.families import get_family
    from nbkit.models.memory import training_run

    set_concept(session.manifest, "", class_images=0)
    counted = counting_class_images(session.manifest, session.manifest.training)
    assert training_run(get_family("sd1"), counted).batch == 2 * session.manifest.training.batch_size
    set_concept(session.manifest, "dog", class_images=0)
    assert counting_class_images(session.manifest, session.manifest.training).prior.num_images == 0
    stray = ImageRecord(
        file="x.png", original="x.png", sha256="0", caption="x", width=8, height=8, concept="cat"
    )
    session.manifest.images.append(stray)
    with pytest.raises(NbkitError, match="concept 'cat'"):
        check_concepts(session.manifest)


def test_a_schema_4_session_is_one_concept():
    manifest = load_manifest(
        {"schema_version": 4, "name": "old", "images": [], "training": {"prior": {"class_prompt": "dog"}}}
    )
    assert manifest.schema_version == 5 and manifest.concepts == []
    assert [(view.name, view.class_prompt) for view in concepts(manifest)] == [("", "dog")]


def test_two_concepts_train_at_their_repeats_with_their_class_images_and_scores(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("NBKIT_VISION_DINO", "none")
    monkeypatch.setenv("NBKIT_VISION_CLIP", "tiny:clip")
    session = _two_concepts(
        "duo", tiny_model_dir("sd1"), text_encoder_steps=0, unet_steps=4, checkpoint_every=2, buckets=False
    )
    session.manifest.training = session.manifest.training.replace(
        sample_prompts=concept_prompts(session.manifest), score=True
    )
    session.save()
    draws = []
    draw = stages.draw_indices

    def recording(latents, **order):
        drawn = draw(latents, **order)
        draws.append((order["stream"], drawn))
        return drawn

    monkeypatch.setattr(stages, "draw_indices", recording)
    result = train("duo")
    assert result.finished
    # 4 steps of batch 2 are one epoch of the instance draws: the dog's photos 3 times each.
    instance = Counter(i for stream, drawn in draws if stream == STREAM_INSTANCE_ORDER for i in drawn)
    assert instance == {0: 1, 1: 1, 2: 3, 3: 3}
    # Each concept's class images, in its own folder, drawn as one set (8 draws of 4 images).
    assert len(list((session.path / "class_images").glob("class-*.png"))) == 2
    assert len(list((session.path / "class_images" / "dog").glob("class-*.png"))) == 2
    prior = Counter(i for stream, drawn in draws if stream == STREAM_CLASS_ORDER for i in drawn)
    assert prior == {0: 2, 1: 2, 2: 2, 3: 2}
    table = json.loads((session.path / "logs" / "vision_scores.json").read_text())
    rows = [(row["checkpoint"], row["concept"], row["samples"]) for row in table["scores"]]
    assert rows == [
        ("unet-000002", "first", 1),
        ("unet-000002", "dog", 1),
        ("unet-000004", "first", 1),
        ("unet-000004", "dog", 1),
    ]
    assert "suggested_checkpoint" in table
    assert (session.path / "logs" / "vision_scores.csv").read_text().startswith("checkpoint,concept,")


def test_a_resume_refuses_changed_concept_settings_and_ignores_what_trains_nothing(tiny_model_dir):
    _two_concepts("changed", tiny_model_dir("sd1"), text_encoder_steps=0, unet_steps=4, checkpoint_every=2)
    session = Session.open("changed")
    set_concept(session.manifest, "cat", class_word="cat", repeats=5)  # no photos: trains nothing
    session.save()
    assert not train("changed", max_steps_this_run=2).finished
    assert not (session.path / "class_images" / "cat").exists()  # no class images for it either
    session = Session.open("changed")
    set_concept(session.manifest, "cat", class_word="kitten", repeats=2)  # still nothing to train
    set_concept(session.manifest, "dog", repeats=2)
    session.save()
    with pytest.raises(
        NbkitError, match="concept 'dog' repeats was 3 in the checkpoint but is 2 now"
    ) as caught:
        train("changed", resume=True)
    assert "set concept 'dog' repeats back to 3" in caught.value.fix and "restart" in caught.value.fix
    set_concept(session.manifest, "dog", repeats=3)
    session.save()
    assert train("changed", resume=True).finished


def test_scores_without_a_token_in_any_prompt_compare_with_all_photos(tiny_model_dir, monkeypatch):
    from nbkit.vision.scoring import CheckpointScore, score_session, suggest_checkpoint

    monkeypatch.setenv("NBKIT_VISION_DINO", "none")
    monkeypatch.setenv("NBKIT_VISION_CLIP", "tiny:clip")
    _two_concepts(
        "untokened", tiny_model_dir("sd1"), text_encoder_steps=0, unet_steps=2, checkpoint_every=2,
        sample_prompts=["a photo of a person"], score=True,
    )  # fmt: skip
    assert train("untokened").finished  # scoring at the checkpoint did not stop the run
    scores, _ = score_session(Session.open("untokened"), clip=None, dino=PixelEmbedder())
    assert [(row.checkpoint, row.concept) for row in scores] == [("unet-000002", "")]

    # A checkpoint scored for one concept only is not compared with those scored for both.
    def row(name, concept, fidelity):
        return CheckpointScore(name, 1, fidelity, None, None, None, 0.5, False, concept)

    rows = [row("a", "first", 0.9), row("b", "first", 0.5), row("b", "dog", 0.5)]
    assert suggest_checkpoint(rows) == "b"


def test_automatic_captions_use_each_concepts_class_word(tiny_model_dir):
    session = _two_concepts("captioned", tiny_model_dir("sd1"))
    auto_caption(session, "tiny:florence2")
    captions = {record.concept: record.caption for record in Session.open("captioned").manifest.images}
    assert "zwx person" in captions[""] and "qrt dog" in captions["dog"]


def test_cli_adds_a_concept_and_sets_its_repeats(tmp_path, tiny_model_dir):
    session = make_session("cli", tiny_model_dir("sd1"), "sd1", images=0)
    root = str(session.path.parent.parent)
    folder = tmp_path / "dog"
    folder.mkdir()
    for index in range(2):
        (folder / f"qrt ({index}).png").write_bytes(_png((30, 200, 30), index))

    def nbkit(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "nbkit", "images", *args, "--root", root],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    nbkit("add", "cli", str(folder), "--concept", "dog", "--crop", "center")
    refused = subprocess.run(
        [sys.executable, "-m", "nbkit", "images", "concept", "cli", "--repeats", "2", "--root", root],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "without a concept's name" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
    shown = nbkit("concept", "cli", "dog", "--class-word", "dog", "--class-images", "4", "--repeats", "2")
    assert "dog: 2 photo(s), token 'qrt', class word 'dog', 4 class image(s), repeats 2" in shown
    stored = Session.open("cli", root=root).manifest
    assert [(c.name, c.class_prompt, c.class_images, c.repeats) for c in stored.concepts] == [
        ("dog", "dog", 4, 2)
    ]
    assert {record.concept for record in stored.images} == {"dog"}
