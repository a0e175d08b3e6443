"""Training scratch is keyed by the session's identity (its folder and creation), not its name, and the
scratch of deleted or finished sessions is cleaned, never that of a session training elsewhere."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from test_train_support import make_session

from nbkit.session.core import Session
from nbkit.train.scratch import OWNER_NAME, clean_stale_scratch, scratch_root, session_scratch


@pytest.fixture(autouse=True)
def _local_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))


def _with_file(folder):
    (folder / "instance").mkdir(parents=True, exist_ok=True)
    (folder / "instance" / "00000-zwx.png").write_bytes(b"png")
    return folder


def test_same_named_sessions_under_two_roots_get_their_own_scratch(tmp_path):
    first = Session.create("twin", root=tmp_path / "drive")
    second = Session.create("twin", root=tmp_path / "local")
    one, two = session_scratch(first), session_scratch(second)
    assert one != two and one.parent == two.parent == scratch_root()
    assert one.name.startswith("twin-") and two.name.startswith("twin-")
    owner = json.loads((one / OWNER_NAME).read_text(encoding="utf-8"))
    assert owner == {"session": str(first.path.resolve()), "created": first.manifest.created}
    assert session_scratch(first) == one  # stable

    _with_file(one), _with_file(two)
    shutil.rmtree(first.path)  # the first one is deleted: its scratch goes, the twin's stays
    assert clean_stale_scratch() == [one]
    assert (two / "instance" / "00000-zwx.png").is_file()


def test_a_session_made_again_under_the_same_name_does_not_inherit_scratch(tmp_path):
    old = Session.create("again", root=tmp_path)
    old_scratch = _with_file(session_scratch(old))
    shutil.rmtree(old.path)
    new = Session.create("again", root=tmp_path)
    new.manifest.created = "2099-01-01T00:00:00+00:00"  # a later creation (the clock may not have moved)
    new.save()
    assert session_scratch(new) != old_scratch
    assert clean_stale_scratch(current=new) == [old_scratch]


def test_finished_sessions_are_cleaned_unless_a_kernel_holds_them(tmp_path):
    done = Session.create("done", root=tmp_path)
    busy = Session.create("busy", root=tmp_path)
    going = Session.create("going", root=tmp_path)
    for session in (done, busy):
        session.manifest.state = dataclasses.replace(session.manifest.state, stage="done")
        session.save()
    folders = {session.name: _with_file(session_scratch(session)) for session in (done, busy, going)}
    with busy.lock("training"):  # training again in another kernel: its scratch is in use
        assert clean_stale_scratch() == [folders["done"]]
    assert folders["busy"].is_dir() and folders["going"].is_dir()
    assert clean_stale_scratch() == [folders["busy"]]


def test_the_current_session_keeps_its_scratch_and_loses_the_old_name_only_one(tmp_path):
    current = Session.create("mine", root=tmp_path)
    current.manifest.state = dataclasses.replace(current.manifest.state, stage="done")  # trained again
    current.save()
    keyed = _with_file(session_scratch(current))
    legacy = _with_file(scratch_root() / "mine")
    unknown = _with_file(scratch_root() / "someone-else")  # no owner.json, not this session's name
    assert clean_stale_scratch(current=current) == [legacy]
    assert keyed.is_dir() and unknown.is_dir()


def test_training_uses_the_keyed_scratch_and_leaves_a_twins_alone(tiny_model_dir, tmp_path):
    from nbkit.train.trainer import train

    twin = make_session("twin", tiny_model_dir("sd1"), "sd1", root=tmp_path / "other-root")
    twin_scratch = _with_file(session_scratch(twin))
    make_session("twin", tiny_model_dir("sd1"), "sd1", text_encoder_steps=1, unet_steps=0)
    with twin.lock("training"):  # the twin is training in another kernel meanwhile
        result = train("twin")
    assert result.finished
    mine = session_scratch(Session.open("twin"), create=False)
    assert mine != twin_scratch and (mine / "instance").is_dir()
    assert (twin_scratch / "instance" / "00000-zwx.png").read_bytes() == b"png"
    assert not (scratch_root() / "twin").exists()
