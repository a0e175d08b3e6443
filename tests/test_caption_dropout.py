"""Caption dropout: a share of the instance draws trains on the empty prompt, seeded per step."""

from __future__ import annotations

import types

import pytest
import torch
from test_train_support import PROMPT, make_session

from nbkit.errors import NbkitError
from nbkit.train import stages
from nbkit.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread_local_scratch")


def _images(count: int, rate: float):
    return types.SimpleNamespace(count=count, caption_dropout=rate)


def test_the_empty_prompt_is_drawn_at_the_set_rate():
    generator = torch.Generator().manual_seed(0)
    rows = [row for _ in range(2000) for row in stages.prompt_rows(_images(5, 0.2), [1, 3], generator)]
    empty = rows.count(5)
    assert 0.17 < empty / len(rows) < 0.23
    assert {row for row in rows if row != 5} == {1, 3}  # the others keep their own caption


def test_without_dropout_nothing_is_drawn_so_older_runs_are_unchanged():
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    assert stages.prompt_rows(_images(5, 0.0), [4, 0], generator) == [4, 0]
    assert torch.equal(generator.get_state(), before)


def test_a_run_trains_on_the_empty_prompt_at_the_rate_and_draws_the_same_each_time(
    tiny_model_dir, monkeypatch
):
    drawn: list[list[str]] = []
    real = stages.prompt_rows

    def counting(images, indices, generator):
        rows = real(images, indices, generator)
        drawn.append([images.captions[row] for row in rows])
        return rows

    monkeypatch.setattr(stages, "prompt_rows", counting)
    runs = []
    for name in ("dropout_a", "dropout_b"):
        make_session(
            name, tiny_model_dir("sd1"), "sd1", text_encoder_steps=4, unet_steps=16, caption_dropout=0.25
        )
        drawn.clear()
        train(name)
        runs.append([caption for batch in drawn for caption in batch])
    first, second = runs
    assert len(first) == 40  # 20 steps of batch 2
    assert 4 <= first.count("") <= 18  # 25% of 40 is 10; a binomial draw lands well inside this
    assert set(first) - {""} == {PROMPT}
    assert first == second  # the step's seeded generator decides: a resume draws the same


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_a_rate_outside_0_to_1_is_refused(tiny_model_dir, rate):
    make_session("bad_rate", tiny_model_dir("sd1"), "sd1")
    with pytest.raises(NbkitError, match=f"caption_dropout is {rate}"):
        train("bad_rate", {"caption_dropout": rate})


def test_a_resume_with_another_rate_is_refused_but_older_checkpoints_resume(tmp_path):
    from nbkit.session.manifest import BaseModelRef
    from nbkit.session.settings import TrainConfig
    from nbkit.train.inputs import check_resume

    base = BaseModelRef(source="tiny-sd1", family="sd1", prediction_type="epsilon")
    config = TrainConfig(caption_dropout=0.1)
    saved = {"config": config.to_dict(), "base_model": base.to_dict()}
    check_resume(config, base, saved, tmp_path, quantization=None)
    with pytest.raises(
        NbkitError, match=r"cannot resume: caption_dropout was 0\.1 in the checkpoint but is 0\.2"
    ):
        check_resume(config.replace(caption_dropout=0.2), base, saved, tmp_path, quantization=None)
    older = {
        "config": {k: v for k, v in config.to_dict().items() if k != "caption_dropout"},
        "base_model": saved["base_model"],
    }
    check_resume(TrainConfig(), base, older, tmp_path, quantization=None)  # written before the setting
