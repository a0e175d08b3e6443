"""Sessions: layout, save/open round trips, fallbacks, names, list/rename/delete, export/import, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import pytest

import nbkit.session.core
from nbkit.cli import main
from nbkit.errors import NbkitError, NbkitWarning, SessionLockedError
from nbkit.fsio import TEMP_PREFIX
from nbkit.session.core import (
    BACKUP_NAME,
    KINDS,
    NAME_RULES,
    Session,
    validate_session_name,
)
from nbkit.session.lock import LOCK_NAME
from nbkit.session.manifest import SCHEMA_VERSION, BaseModelRef, ImageRecord
from nbkit.session.settings import TrainConfig
from nbkit.session.store import (
    delete_session,
    export_session,
    import_session,
    list_sessions,
    rename_session,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
SD15 = BaseModelRef("sd15", "sd1", "epsilon")


def make_session(root: Path, name: str = "dog") -> Session:
    """A session with two images, captions, a checkpoint and some history."""
    session = Session.create(name, root=root, base_model=SD15)
    for index in range(2):
        (session.dir("instance_images") / f"img-{index}.png").write_bytes(bytes([index]) * 300)
        (session.dir("captions") / f"img-{index}.txt").write_text(f"photo of sks dog {index}")
        session.manifest.images.append(
            ImageRecord(
                f"instance_images/img-{index}.png", f"IMG_{index}.JPG", "ab" * 32, "sks dog", 512, 512
            )
        )
    (session.dir("checkpoints") / "step-500").mkdir()
    (session.dir("checkpoints") / "step-500" / "unet.safetensors").write_bytes(os.urandom(4096))
    session.manifest.state.stage, session.manifest.state.step = "unet", 500
    session.manifest.state.last_checkpoint = "checkpoints/step-500"
    session.record_run("train", "interrupted", {"step": 500})
    return session


# --- layout and template -------------------------------------------------------------------------


def test_create_builds_the_template_layout_without_keep_files(tmp_path):
    session = Session.create("dog", root=tmp_path)
    assert session.path == tmp_path / "Sessions" / "dog"
    assert sorted(p.name for p in session.path.iterdir()) == sorted([*KINDS, "session.json"])
    assert not list(session.path.rglob(".keep"))
    assert not list(session.path.rglob("__init__.py"))
    assert session.manifest.name == "dog"
    assert session.manifest.base_model is None
    assert session.manifest.created == session.manifest.updated


def test_template_defaults_match_train_config():
    template = json.loads((REPO / "sessions_template" / "session.json").read_text())
    # If this fails, a TrainConfig default changed: update sessions_template/session.json to match.
    assert TrainConfig.from_dict(template["training"]) == TrainConfig()


def test_create_reads_its_defaults_and_folders_from_the_template(tmp_path, monkeypatch):
    template = tmp_path / "template"
    shutil.copytree(REPO / "sessions_template", template)
    data = json.loads((template / "session.json").read_text())
    data["training"]["unet_steps"] = 777
    (template / "session.json").write_text(json.dumps(data))
    (template / "extras").mkdir()
    (template / "extras" / "README.txt").write_text("put extra files here")
    monkeypatch.setattr(nbkit.session.core, "_template", lambda: template)
    session = Session.create("dog", root=tmp_path / "root")
    assert session.manifest.training.unet_steps == 777
    assert (session.path / "extras" / "README.txt").read_text() == "put extra files here"


def test_bad_template_key_is_reported(tmp_path, monkeypatch):
    template = tmp_path / "template"
    template.mkdir()
    (template / "session.json").write_text(json.dumps({"schema_version": 2, "name": "", "colour": 1}))
    monkeypatch.setattr(nbkit.session.core, "_template", lambda: template)
    with pytest.raises(NbkitError, match=r"unknown key 'colour' in session template .*session.json"):
        Session.create("dog", root=tmp_path)


def test_base_model_sets_the_training_resolution(tmp_path):
    base = BaseModelRef("sdxl", "sdxl", "epsilon")
    session = Session.create("xl", root=tmp_path, base_model=base)
    assert session.manifest.base_model == base
    assert session.manifest.training.resolution == 1024
    assert Session.open("xl", root=tmp_path).manifest.base_model == base
    assert (
        Session.create("xl-768", root=tmp_path, base_model=base, resolution=768).manifest.training.resolution
        == 768
    )


def test_create_refuses_an_existing_session_unless_exist_ok(tmp_path):
    Session.create("cat", root=tmp_path)
    xl = BaseModelRef("sdxl", "sdxl", "epsilon")
    cat = Session.create("cat", root=tmp_path, exist_ok=True, base_model=xl)
    assert (cat.manifest.base_model, cat.manifest.training.resolution) == (xl, 1024)
    assert Session.open("cat", root=tmp_path).manifest == cat.manifest
    first = Session.create("dog", root=tmp_path, base_model=SD15)
    with pytest.raises(NbkitError, match="session 'dog' already exists"):
        Session.create("dog", root=tmp_path)
    assert Session.create("dog", root=tmp_path, exist_ok=True, base_model=SD15).manifest == first.manifest
    other = BaseModelRef("sdxl", "sdxl", "epsilon")
    with pytest.raises(NbkitError, match="already exists with base model 'sd15'"):
        Session.create("dog", root=tmp_path, exist_ok=True, base_model=other)


def test_create_refuses_a_folder_that_is_not_a_session(tmp_path):
    (tmp_path / "Sessions" / "holiday photos").mkdir(parents=True)
    (tmp_path / "Sessions" / "holiday_photos").mkdir(parents=True)
    with pytest.raises(NbkitError, match="exists but is not an nbkit session"):
        Session.create("holiday photos", root=tmp_path, exist_ok=True)


def test_default_root_is_the_storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NBKIT_HOME", str(tmp_path / "home"))
    session = Session.create("dog")
    assert session.path == tmp_path / "home" / "Sessions" / "dog"


def test_dir_creates_known_kinds_and_rejects_others(tmp_path):
    session = Session.create("dog", root=tmp_path)
    shutil.rmtree(session.path / "outputs")
    assert session.dir("outputs") == session.path / "outputs"
    assert (session.path / "outputs").is_dir()
    with pytest.raises(
        ValueError, match="unknown session folder 'output'; allowed: instance_images, captions"
    ):
        session.dir("output")


# --- save / open ---------------------------------------------------------------------------------


def test_save_open_round_trip(tmp_path):
    session = make_session(tmp_path)
    session.manifest.training = session.manifest.training.replace(unet_steps=42, sample_prompts=["a", "b"])
    session.save()
    reopened = Session.open("dog", root=tmp_path)
    assert reopened.manifest == session.manifest
    assert reopened.manifest.training.unet_steps == 42
    assert reopened.manifest.history[-1].detail == {"step": 500}


def test_save_keeps_the_previous_copy_as_backup(tmp_path):
    session = Session.create("dog", root=tmp_path)
    before = (session.path / "session.json").read_bytes()
    session.manifest.state.step = 7
    session.save()
    assert (session.path / BACKUP_NAME).read_bytes() == before
    assert json.loads((session.path / "session.json").read_text())["state"]["step"] == 7


def test_save_refuses_invalid_values_and_leaves_the_file_alone(tmp_path):
    session = Session.create("dog", root=tmp_path)
    before = (session.path / "session.json").read_bytes()
    session.manifest.state.stage = "training"
    with pytest.raises(NbkitError, match="allowed values are 'idle'"):
        session.save()
    assert (session.path / "session.json").read_bytes() == before


@pytest.mark.parametrize("damage", [b"", b'{"schema_version": 2, "name": "do', b"\xff\xfe garbage"])
def test_unreadable_session_json_falls_back_to_the_backup(tmp_path, damage):
    session = make_session(tmp_path)
    session.manifest.state.step = 600
    session.save()  # the backup now holds step 500, the manifest step 600
    (session.path / "session.json").write_bytes(damage)
    with pytest.warns(UserWarning, match=r"session.json is (empty|not valid JSON).*using its previous copy"):
        reopened = Session.open("dog", root=tmp_path)
    assert reopened.manifest.state.step == 500
    reopened.manifest.state.step = 650
    reopened.save()
    assert json.loads((session.path / "session.json").read_text())["state"]["step"] == 650
    # The damaged file never becomes the backup.
    assert json.loads((session.path / BACKUP_NAME).read_text())["state"]["step"] == 500


def test_unreadable_session_json_without_backup_says_what_to_do(tmp_path):
    session = Session.create("dog", root=tmp_path)
    (session.path / "session.json").write_text('{"name": ')
    with pytest.raises(NbkitError) as caught:
        Session.open("dog", root=tmp_path)
    message = str(caught.value)
    assert str(session.path / "session.json") in message
    assert "is not valid JSON" in message and "session.json.bak is missing" in message
    assert "Manage versions" in message


def test_unknown_key_in_session_json_names_the_file_and_key(tmp_path):
    session = Session.create("dog", root=tmp_path)
    data = json.loads((session.path / "session.json").read_text())
    data["state"]["stepp"] = 3
    (session.path / "session.json").write_text(json.dumps(data))
    with pytest.raises(NbkitError) as caught:
        Session.open("dog", root=tmp_path)
    assert f"unknown key 'stepp' in {session.path / 'session.json'}.state" in str(caught.value)
    assert "did you mean 'step'" in str(caught.value)


def test_schema1_session_is_upgraded_on_open_and_saved_as_current(tmp_path):
    folder = tmp_path / "Sessions" / "old-dog"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "session_schema1.json", folder / "session.json")
    session = Session.open("old-dog", root=tmp_path)
    assert session.manifest.schema_version == SCHEMA_VERSION
    assert session.manifest.state.step == 800
    assert session.manifest.training.unet_steps == 1200
    session.save()
    assert json.loads((folder / "session.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert (folder / BACKUP_NAME).read_bytes() == (FIXTURES / "session_schema1.json").read_bytes()


def test_a_save_from_a_stale_copy_is_refused(tmp_path):
    first = Session.create("dog", root=tmp_path)
    second = Session.open("dog", root=tmp_path)
    first.manifest.state.step = 100
    first.save()
    second.manifest.state.step = 5
    with pytest.raises(NbkitError, match="changed by another notebook or kernel"):
        second.save()
    assert Session.open("dog", root=tmp_path).manifest.state.step == 100


def test_open_tidies_interrupted_writes_only_when_nobody_holds_the_lock(tmp_path):
    session = Session.create("dog", root=tmp_path)
    leftovers = [
        session.path / f"{TEMP_PREFIX}1234-session.json",
        session.path / "checkpoints" / f"{TEMP_PREFIX}abcd-step-500",
        session.path / "models" / f"{TEMP_PREFIX}9876-dog.safetensors",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    with session.lock("training"):
        Session.open("dog", root=tmp_path)
        assert all(leftover.exists() for leftover in leftovers)
    Session.open("dog", root=tmp_path)
    assert not any(leftover.exists() for leftover in leftovers)


def test_open_unknown_session_suggests_close_names(tmp_path):
    Session.create("my_dog", root=tmp_path)
    with pytest.raises(NbkitError, match=r"(?s)there is no session named 'my_dgo'.*did you mean my_dog\?"):
        Session.open("my_dgo", root=tmp_path)


# --- run records ---------------------------------------------------------------------------------


def test_run_record_marks_ok_failed_and_interrupted(tmp_path):
    session = Session.create("dog", root=tmp_path)
    with session.run_record("train", {"steps": 10}) as record:
        assert Session.open("dog", root=tmp_path).manifest.history[-1].status == "running"
        record.detail["loss"] = 0.1
    with pytest.raises(RuntimeError), session.run_record("convert"):
        raise RuntimeError("out of memory")
    with pytest.raises(KeyboardInterrupt), session.run_record("train"):
        raise KeyboardInterrupt
    history = Session.open("dog", root=tmp_path).manifest.history
    assert [(r.kind, r.status) for r in history] == [
        ("train", "ok"),
        ("convert", "failed"),
        ("train", "interrupted"),
    ]
    assert history[0].detail == {"steps": 10, "loss": 0.1}
    assert history[1].detail["error"] == "RuntimeError: out of memory"
    assert all(record.finished for record in history)


def test_record_run_rejects_unknown_status(tmp_path):
    session = Session.create("dog", root=tmp_path)
    with pytest.raises(NbkitError, match="allowed values are 'running', 'ok', 'failed', 'interrupted'"):
        session.record_run("train", "done")


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("dog", "dog"),
        ("My Dog", "My_Dog"),
        ("  padded  ", "padded"),
        ("two  spaces", "two__spaces"),
        (unicodedata.normalize("NFD", "Café"), "Café"),
        ("日本の犬", "日本の犬"),
        ("dog-v2_(final).b", "dog-v2_(final).b"),
        ("console", "console"),
        ("x" * 64, "x" * 64),
        ("犬" * 64, "犬" * 64),
    ],
)
def test_good_session_names(typed, stored):
    assert validate_session_name(typed) == stored


@pytest.mark.parametrize(
    ("typed", "why"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("a/b", "it contains '/'"),
        ("a\\b", "it contains '\\\\'"),
        ("../escape", "it contains '/'"),
        ("..", "it starts with '.'"),
        (".hidden", "it starts with '.'"),
        ("dog.", "it ends with '.'"),
        ("a..b", "it contains '..'"),
        ("a:b", "it contains ':'"),
        ("what?", "it contains '?'"),
        ("a*b", "it contains '*'"),
        ('say "hi"', "it contains '\"'"),
        ("a<b>", "it contains '<'"),
        ("a|b", "it contains '|'"),
        ("tab\there", "it contains the invisible or control character U+0009"),
        ("nul\x00", "it contains the invisible or control character U+0000"),
        ("zero\u200bwidth", "it contains the invisible or control character U+200B"),
        ("CON", "'CON' is a reserved device name"),
        ("nul.txt", "'nul' is a reserved device name"),
        ("lpt1", "'lpt1' is a reserved device name"),
        ("x" * 65, "it is 65 characters long"),
        ("🐶" * 51, "it is 204 bytes long as UTF-8"),
    ],
)
def test_bad_session_names(typed, why):
    with pytest.raises(NbkitError) as caught:
        validate_session_name(typed)
    assert f"invalid session name {typed!r}: {why}" in str(caught.value)
    assert caught.value.fix == NAME_RULES


def test_name_rules_say_what_is_allowed():
    for part in ("1 to 64 characters", "spaces (stored as '_')", '< > : " / \\ | ? *', "'..'", "CON"):
        assert part in NAME_RULES


def test_non_text_name_is_refused():
    with pytest.raises(NbkitError, match="must be text, got int"):
        validate_session_name(5)  # type: ignore[arg-type]


def test_open_refuses_a_name_that_escapes_sessions(tmp_path):
    (tmp_path / "outside").mkdir()
    with pytest.raises(NbkitError, match="invalid session name"):
        Session.open("../outside", root=tmp_path)


# --- list / rename / delete ----------------------------------------------------------------------


def test_list_sessions_reports_size_images_stage_and_problems(tmp_path):
    make_session(tmp_path, "dog")
    Session.create("Cat", root=tmp_path)
    broken = Session.create("broken", root=tmp_path)
    (broken.path / "session.json").write_text("{")
    (tmp_path / "Sessions" / f"{TEMP_PREFIX}deleted-1234-old").mkdir()
    rows = list_sessions(tmp_path)
    assert [row.name for row in rows] == ["broken", "Cat", "dog"]
    broken_row, cat, dog = rows
    assert (dog.images, dog.stage, dog.step, dog.base_model) == (2, "unet", 500, "sd15")
    assert dog.size > 4096 + 600
    assert dog.updated == Session.open("dog", root=tmp_path).manifest.updated
    assert (cat.images, cat.stage, cat.step, cat.problem) == (0, "idle", 0, None)
    assert "is not valid JSON" in broken_row.problem and broken_row.stage is None
    assert not (tmp_path / "Sessions" / f"{TEMP_PREFIX}deleted-1234-old").exists()
    with Session.open("dog", root=tmp_path).lock("training"):
        assert f"pid {os.getpid()}" in list_sessions(tmp_path)[2].locked_by


def test_list_sessions_of_an_empty_root(tmp_path):
    assert list_sessions(tmp_path) == []


def test_rename_moves_the_folder_and_the_manifest_name(tmp_path):
    original = make_session(tmp_path, "dog")
    renamed = rename_session("dog", "good boy", root=tmp_path)
    assert renamed.name == "good_boy"
    assert renamed.path == tmp_path / "Sessions" / "good_boy"
    assert not original.path.exists()
    reopened = Session.open("good_boy", root=tmp_path)
    assert reopened.manifest.name == "good_boy"
    assert reopened.manifest.images == original.manifest.images


def test_rename_refuses_an_existing_target_and_a_locked_session(tmp_path):
    Session.create("dog", root=tmp_path)
    cat = Session.create("cat", root=tmp_path)
    with pytest.raises(NbkitError, match="that session already exists"):
        rename_session("dog", "cat", root=tmp_path)
    with cat.lock("training"), pytest.raises(SessionLockedError, match="cannot rename session 'cat'"):
        rename_session("cat", "kitten", root=tmp_path)
    assert cat.path.exists()


def test_delete_needs_confirmation_and_an_unlocked_session(tmp_path):
    session = make_session(tmp_path)
    with pytest.raises(NbkitError, match="without confirmation"):
        delete_session("dog", root=tmp_path, confirm=False)
    with session.lock("training"), pytest.raises(SessionLockedError, match="cannot delete session 'dog'"):
        delete_session("dog", root=tmp_path, confirm=True)
    assert session.path.exists()
    delete_session("dog", root=tmp_path, confirm=True)
    assert list((tmp_path / "Sessions").iterdir()) == []
    with pytest.raises(NbkitError, match="there is no session named 'dog'"):
        delete_session("dog", root=tmp_path, confirm=True)


# --- export / import -----------------------------------------------------------------------------


def tree(folder: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
        if p.name not in ("session.json", BACKUP_NAME)
    }


def test_export_import_round_trip(tmp_path):
    session = make_session(tmp_path)
    session.save()  # so that a session.json.bak exists
    (session.path / f"{TEMP_PREFIX}1234-session.json").write_text("{")
    (session.path / LOCK_NAME).write_text(  # left behind by a kernel on a VM that is gone
        json.dumps(
            {
                "pid": 1,
                "host": "gone",
                "purpose": "training",
                "started": "2020-01-01",
                "heartbeat": "2020-01-01",
            }
        )
    )
    (tmp_path / "exports").mkdir()
    with pytest.warns(UserWarning, match=r"taking over a stale lock .* last heartbeat was \d+ s ago"):
        out = export_session("dog", tmp_path / "exports", root=tmp_path)
    assert out.path == tmp_path / "exports" / "dog.zip" and out.size == out.path.stat().st_size
    assert out.left_out == {}
    names = zipfile.ZipFile(out).namelist()
    assert "dog/session.json" in names and "dog/checkpoints/step-500/unet.safetensors" in names
    assert not [n for n in names if LOCK_NAME in n or BACKUP_NAME in n or TEMP_PREFIX in n]
    assert not [p.name for p in (tmp_path / "exports").iterdir() if p.name != "dog.zip"]

    imported = import_session(out, name="dog copy", root=tmp_path)
    assert imported.name == "dog_copy"
    expected = {k: v for k, v in tree(session.path).items() if LOCK_NAME not in k and TEMP_PREFIX not in k}
    assert tree(imported.path) == expected
    original = Session.open("dog", root=tmp_path).manifest
    copy = imported.manifest
    assert (copy.images, copy.state, copy.training, copy.base_model) == (
        original.images,
        original.state,
        original.training,
        original.base_model,
    )
    assert copy.history[:-1] == original.history
    assert (copy.history[-1].kind, copy.history[-1].detail) == ("import", {"source": str(out)})


def test_import_never_overwrites_an_existing_session(tmp_path):
    make_session(tmp_path)
    out = export_session("dog", tmp_path / "dog.zip", root=tmp_path)
    before = tree(tmp_path / "Sessions" / "dog")
    with pytest.raises(NbkitError, match="a session named 'dog' already exists; not overwriting it"):
        import_session(out, root=tmp_path)
    assert tree(tmp_path / "Sessions" / "dog") == before
    delete_session("dog", root=tmp_path, confirm=True)
    assert import_session(out, root=tmp_path).manifest.state.step == 500


def test_import_from_a_folder_and_from_a_zip_of_the_contents(tmp_path):
    session = make_session(tmp_path)
    from_folder = import_session(session.path, name="from-folder", root=tmp_path)
    assert tree(from_folder.path) == tree(session.path)
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as archive:
        for path in session.path.rglob("*"):
            archive.write(path, path.relative_to(session.path).as_posix())
    assert tree(import_session(flat, name="from-flat", root=tmp_path).path) == tree(session.path)


def test_import_upgrades_a_schema1_zip(tmp_path):
    archive_path = tmp_path / "old.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.write(FIXTURES / "session_schema1.json", "old-dog/session.json")
        archive.writestr("old-dog/instance_images/a.png", b"png")
    session = import_session(archive_path, root=tmp_path)
    assert session.name == "old-dog"
    assert session.manifest.schema_version == SCHEMA_VERSION
    assert session.manifest.state.step == 800
    assert (session.path / "instance_images" / "a.png").read_bytes() == b"png"


@pytest.mark.parametrize(
    "evil", ["../evil.txt", "dog/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "dog\\..\\..\\evil.txt"]
)
def test_import_refuses_zip_slip(tmp_path, evil):
    archive_path = tmp_path / "evil.zip"
    manifest = json.dumps({"schema_version": 2, "name": "dog"})
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("dog/session.json", manifest)
        archive.writestr(evil, b"owned")
    with pytest.raises(NbkitError, match=re.escape(f"zip entry {evil!r} points outside the session folder")):
        import_session(archive_path, root=tmp_path / "root")
    assert not (tmp_path / "root" / "Sessions" / "dog").exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_import_refuses_symlink_entries(tmp_path):
    archive_path = tmp_path / "link.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("dog/session.json", json.dumps({"schema_version": 2, "name": "dog"}))
        link = zipfile.ZipInfo("dog/instance_images/a.png")
        link.external_attr = (0o120777 << 16) | 0
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(NbkitError, match="is a symbolic link"):
        import_session(archive_path, root=tmp_path)


def test_import_checks_the_manifest(tmp_path):
    archive_path = tmp_path / "bad.zip"
    image = {
        "file": "instance_images/a.png",
        "original": "a.png",
        "sha256": "0",
        "caption": "",
        "width": 1,
        "height": 1,
    }
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr(
            "dog/session.json", json.dumps({"schema_version": 2, "name": "dog", "images": [image]})
        )
    with pytest.raises(
        NbkitError, match=r"images\[0\]\.file = 'instance_images/a\.png' is listed .* but missing"
    ):
        import_session(archive_path, root=tmp_path)
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("dog/session.json", json.dumps({"schema_version": 2, "name": "dog", "colour": 1}))
    with pytest.raises(NbkitError, match=r"unknown key 'colour' in .*bad.zip!dog/session.json"):
        import_session(archive_path, root=tmp_path)
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("dog/readme.txt", "no manifest")
    with pytest.raises(NbkitError, match=r"no session\.json at the top"):
        import_session(archive_path, root=tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NbkitError, match="neither a session folder nor a zip"):
        import_session(tmp_path / "notes.txt", root=tmp_path)
    assert not (tmp_path / "Sessions").exists() or list((tmp_path / "Sessions").iterdir()) == []


def test_export_refuses_a_locked_session_and_a_zip_inside_the_session(tmp_path):
    session = make_session(tmp_path)
    with session.lock("training"), pytest.raises(SessionLockedError):
        export_session("dog", tmp_path / "dog.zip", root=tmp_path)
    with pytest.raises(NbkitError, match="inside the session it exports"):
        export_session("dog", session.path / "outputs" / "dog.zip", root=tmp_path)
    assert not (tmp_path / "dog.zip").exists()
    assert not (session.path / LOCK_NAME).exists()


# --- command line --------------------------------------------------------------------------------


def test_export_never_overwrites_a_zip_unless_asked(tmp_path, capsys):
    make_session(tmp_path)
    out = tmp_path / "dog.zip"
    out.write_bytes(b"my other backup")
    with pytest.raises(NbkitError, match="already exists; not overwriting it") as caught:
        export_session("dog", out, root=tmp_path)
    assert str(out) in str(caught.value) and "--overwrite" in caught.value.render("cli")
    assert out.read_bytes() == b"my other backup"
    root = ["--root", str(tmp_path)]
    assert main(["session", "export", "dog", str(out), *root]) == 2
    assert "not overwriting it" in capsys.readouterr().err and out.read_bytes() == b"my other backup"
    assert main(["session", "export", "dog", str(out), "--overwrite", *root]) == 0
    assert "dog/session.json" in zipfile.ZipFile(out).namelist()
    assert export_session("dog", tmp_path, root=tmp_path, overwrite=True).path == out


def test_export_without_checkpoints_imports_cleanly_and_says_what_it_left_out(tmp_path, capsys):
    session = make_session(tmp_path)
    full = export_session("dog", tmp_path / "full.zip", root=tmp_path)
    light = export_session("dog", tmp_path / "light.zip", root=tmp_path, include_checkpoints=False)
    names = zipfile.ZipFile(light).namelist()
    assert not [name for name in names if "checkpoints" in name]
    assert "dog/instance_images/img-0.png" in names
    assert light.left_out == {"checkpoints": 4096} and light.size < full.size
    assert (
        light.summary()
        == f"Exported to {light.path} ({light.size / 1024:.1f} KB); left out checkpoints/ (4.0 KB)"
    )

    copy = import_session(light, name="light", root=tmp_path)
    state = copy.manifest.state
    assert (state.stage, state.step, state.last_checkpoint) == ("idle", 0, None)
    assert not (copy.path / "checkpoints").exists() or not any((copy.path / "checkpoints").iterdir())
    assert copy.manifest.images == session.manifest.images
    assert Session.open("dog", root=tmp_path).manifest.state.last_checkpoint == "checkpoints/step-500"

    capsys.readouterr()
    root = ["--root", str(tmp_path)]
    assert main(["session", "export", "dog", str(tmp_path / "cli.zip"), "--no-checkpoints", *root]) == 0
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"Exported to {re.escape(str(tmp_path / 'cli.zip'))} \(\d+\.\d KB\); left out checkpoints/ \(4\.0 KB\)",
        printed,
    )
    assert main(["session", "import", str(tmp_path / "cli.zip"), "--name", "cli", *root]) == 0


def test_import_of_a_zip_without_the_checkpoint_its_manifest_names(tmp_path):
    session = make_session(tmp_path)
    session.manifest.state.stage = "done"
    session.save()
    archive_path = tmp_path / "hand-made.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for path in session.path.rglob("*"):
            if "checkpoints" not in path.parts and path.is_file():
                archive.write(path, path.relative_to(session.path.parent).as_posix())
    copy = import_session(archive_path, name="copy", root=tmp_path)
    assert (copy.manifest.state.stage, copy.manifest.state.last_checkpoint) == ("done", None)
    assert copy.manifest.history[-1].detail == {
        "source": str(archive_path),
        "checkpoint_not_included": "checkpoints/step-500",
    }


def test_cli_shows_nbkit_warnings_as_one_clean_line(tmp_path):
    make_session(tmp_path)
    (tmp_path / "Sessions" / "dog" / LOCK_NAME).write_text(
        json.dumps(
            {"pid": 1, "host": "gone", "purpose": "training", "started": "x", "heartbeat": "2020-01-01"}
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbkit",
            "session",
            "export",
            "dog",
            str(tmp_path / "dog.zip"),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbkit: warning: "), result.stderr
    assert "taking over a stale lock" in lines[0]
    assert ".py:" not in result.stderr and "UserWarning" not in result.stderr


def test_cli_session_commands(tmp_path, capsys):
    root = ["--root", str(tmp_path)]
    assert main(["session", "create", "My Dog", "--base-model", "sd15", *root]) == 0
    assert "My_Dog" in capsys.readouterr().out
    assert Session.open("My_Dog", root=tmp_path).manifest.base_model.family == "sd1"
    assert main(["session", "create", "custom", "--base-model", "/models/x.safetensors", *root]) == 2
    assert "--family" in capsys.readouterr().err
    assert (
        main(["session", "create", "custom", "--base-model", "/x.safetensors", "--family", "sd2-v", *root])
        == 0
    )
    custom = Session.open("custom", root=tmp_path).manifest
    assert (custom.base_model.prediction_type, custom.training.resolution) == ("v_prediction", 768)
    capsys.readouterr()

    assert main(["session", "list", *root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "UPDATED", "SIZE", "IMAGES"]
    assert [line.split()[0] for line in lines[1:]] == ["custom", "My_Dog"]
    assert main(["session", "list", "--json", *root]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == ["custom", "My_Dog"]

    assert main(["session", "show", "My_Dog", "--json", *root]) == 0
    assert json.loads(capsys.readouterr().out)["base_model"]["source"] == "sd15"
    assert main(["session", "show", "My_Dog", *root]) == 0
    shown = capsys.readouterr().out
    assert "sd15 (sd1)" in shown and "Resolution  512 px" in shown
    assert main(["session", "open", "My_Dog", *root]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "Sessions" / "My_Dog")

    assert main(["session", "rename", "My_Dog", "Rex", *root]) == 0
    assert main(["session", "export", "Rex", str(tmp_path / "rex.zip"), *root]) == 0
    assert main(["session", "import", str(tmp_path / "rex.zip"), *root]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["session", "import", str(tmp_path / "rex.zip"), "--name", "Rex2", *root]) == 0

    (tmp_path / "Sessions" / "Rex" / LOCK_NAME).write_text(
        json.dumps(
            {"pid": 4242, "host": "elsewhere", "purpose": "training", "started": "x", "heartbeat": "x"}
        )
    )
    capsys.readouterr()
    assert main(["session", "unlock", "Rex", *root]) == 0
    assert "pid 4242 on elsewhere" in capsys.readouterr().out
    assert not (tmp_path / "Sessions" / "Rex" / LOCK_NAME).exists()

    assert main(["session", "delete", "Rex", *root]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["session", "delete", "Rex", "--yes", *root]) == 0
    assert sorted(p.name for p in (tmp_path / "Sessions").iterdir()) == ["Rex2", "custom"]
    assert main(["session", "open", "bad/name", *root]) == 2
    assert "invalid session name" in capsys.readouterr().err
    assert main(["session"]) == 1


def test_cli_default_root_is_nbkit_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NBKIT_HOME", str(tmp_path / "home"))
    assert main(["session", "create", "dog"]) == 0
    assert (tmp_path / "home" / "Sessions" / "dog" / "session.json").is_file()


# --- packaging -----------------------------------------------------------------------------------


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    wanted = {"nbkit.sessions_template"}
    for folder in (REPO / "nbkit").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            wanted.add(".".join(folder.relative_to(REPO).parts))
    wanted.add("nbkit")
    for folder in (REPO / "sessions_template").iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            wanted.add(f"nbkit.sessions_template.{folder.name}")
    missing = sorted(wanted - listed)
    assert not missing, (
        f"add {missing} to [tool.setuptools] packages in pyproject.toml, or the wheel lacks them"
    )


def test_built_wheel_ships_the_session_template(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    for name in ("nbkit", "sessions_template", "wheels"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run(
        [*command, "-w", str(tmp_path / "whl"), str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "whl").glob("nbkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nbkit/sessions_template/session.json" in names
    for kind in KINDS:
        assert f"nbkit/sessions_template/{kind}/.keep" in names
    assert "nbkit/wheel_profiles/local-cpu-py311/profile.json" in names  # the wheel cache's profiles


def test_create_checks_the_resolution_step_of_the_model_family(tmp_path):
    flux = BaseModelRef(source="flux1-dev", family="flux", prediction_type="flow")
    sd = BaseModelRef(source="sd15", family="sd1", prediction_type="epsilon")
    with pytest.raises(NbkitError, match="not a multiple of 16") as error:
        Session.create("f", root=tmp_path, base_model=flux, resolution=1000)
    assert "use 992 or 1008" in str(error.value) and not (tmp_path / "Sessions" / "f").exists()
    with pytest.raises(NbkitError, match="not a multiple of 64"):
        Session.create("s", root=tmp_path, base_model=sd, resolution=1040)
    assert (
        Session.create("f", root=tmp_path, base_model=flux, resolution=1040).manifest.training.resolution
        == 1040
    )
    tiny = BaseModelRef(source="tiny-flux", family="flux", prediction_type="flow")
    with pytest.warns(
        NbkitWarning, match=r"resolution 512 is not one of tiny-flux's sizes \(64-256 in steps of 16\)"
    ):
        Session.create("t", root=tmp_path, base_model=tiny, resolution=512)
