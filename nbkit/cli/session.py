"""`nbkit session ...`: create, open, list, show, rename, delete, export, import, upload and unlock sessions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.families import FAMILIES
from nbkit.session.core import Session, session_path
from nbkit.session.lock import force_unlock, live_holder
from nbkit.session.manifest import BaseModelRef
from nbkit.session.store import (
    delete_session,
    export_session,
    format_size,
    import_session,
    list_sessions,
    rename_session,
)


def _base_model(source: str, family: str | None) -> BaseModelRef:
    from nbkit.families import get_family
    from nbkit.models.registry import find_model

    spec = find_model(source)
    if spec is not None:
        if family is not None and family != spec.family:
            raise NbkitError(f"{spec.key} is a {spec.family} model, not {family}", fix="leave out --family")
        return BaseModelRef(spec.key, spec.family, spec.prediction_type, spec.revision)
    if family is None and Path(source).expanduser().is_dir():
        from nbkit.session.base_model import base_model_ref

        return base_model_ref(str(Path(source).expanduser()))  # a diffusers folder's configs tell its family
    if family is None:
        raise NbkitError(
            f"{source!r} is not a model nbkit knows, so its family is needed",
            fix=f"add --family ({', '.join(FAMILIES)})",
        )
    return BaseModelRef(source, family, get_family(family).prediction_type)


def create(args: argparse.Namespace) -> int:
    base = _base_model(args.base_model, args.family) if args.base_model else None
    session = Session.create(
        args.name, root=args.root, base_model=base, resolution=args.resolution, exist_ok=args.exist_ok
    )
    print(f"Session {session.name} is at {session.path}")
    return 0


def open_(args: argparse.Namespace) -> int:
    print(Session.open(args.name, root=args.root).path)
    return 0


def list_(args: argparse.Namespace) -> int:
    rows = list_sessions(args.root)
    if args.json:
        print(json.dumps([{**vars(row), "path": str(row.path)} for row in rows], indent=2))
        return 0
    if not rows:
        print("No sessions yet; create one with `nbkit session create NAME`.")
        return 0
    header = ("NAME", "UPDATED", "SIZE", "IMAGES", "STAGE", "STEP", "BASE MODEL", "NOTE")
    table = [
        (
            row.name,
            (row.updated or "-")[:16].replace("T", " "),
            format_size(row.size),
            str(row.images),
            row.stage or "-",
            "-" if row.step is None else str(row.step),
            row.base_model or "-",
            f"UNREADABLE: {row.problem}"
            if row.problem
            else (f"locked by {row.locked_by}" if row.locked_by else ""),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header) - 1)]
    for line in [header, *table]:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())
    return 0


def show(args: argparse.Namespace) -> int:
    session = Session.open(args.name, root=args.root)
    manifest = session.manifest
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
        return 0
    base = manifest.base_model
    holder = live_holder(session.path)
    print(f"Session     {session.name}")
    print(f"Folder      {session.path}")
    print(f"Created     {manifest.created}   updated {manifest.updated}")
    print(f"Base model  {f'{base.source} ({base.family})' if base else '-'}")
    print(f"Resolution  {manifest.training.resolution} px")
    print(f"Images      {len(manifest.images)} in the manifest")
    print(f"Training    stage {manifest.state.stage}, step {manifest.state.step}")
    print(f"Checkpoint  {manifest.state.last_checkpoint or '-'}")
    for model in manifest.models or ():
        main_file = model.files.get("single_file") or model.files.get("kohya") or model.name
        print(f"Model       {model.name} ({model.kind}, {model.family}, {model.resolution} px): {main_file}")
    print(f"Lock        {holder.describe() if holder else 'free'}")
    for record in manifest.history[-5:]:
        print(f"  {record.started}  {record.kind:<10} {record.status}")
    return 0


def rename(args: argparse.Namespace) -> int:
    session = rename_session(args.old, args.new, root=args.root)
    print(f"Renamed to {session.name} ({session.path})")
    return 0


def delete(args: argparse.Namespace) -> int:
    path = session_path(args.name, args.root)
    delete_session(args.name, root=args.root, confirm=args.yes)
    print(f"Deleted {path}")
    return 0


def export(args: argparse.Namespace) -> int:
    exported = export_session(
        args.name,
        args.out,
        root=args.root,
        overwrite=args.overwrite,
        include_checkpoints=args.checkpoints,
    )
    print(exported.summary())
    return 0


def import_(args: argparse.Namespace) -> int:
    session = import_session(args.src, name=args.name, root=args.root)
    print(f"Imported as {session.name} ({session.path})")
    return 0


def unlock(args: argparse.Namespace) -> int:
    path = session_path(args.name, args.root)
    if not path.is_dir():
        raise NbkitError(f"there is no session named '{path.name}'", path=path.parent)
    removed = force_unlock(path)
    print(f"Removed the lock of {removed.describe()}" if removed else f"{args.name} was not locked")
    return 0


def upload(args: argparse.Namespace) -> int:
    from nbkit.session.hub_upload import upload_to_hub

    url = upload_to_hub(args.name, args.repo_id, private=not args.public, root=args.root)
    print(f"Uploaded {args.name} to {url}" + ("" if args.public else " (private)"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "session", help="create, list, rename, delete, export, import and upload sessions"
    )
    parser.set_defaults(func=lambda _: parser.print_help() or 1)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root",
        type=Path,
        default=None,
        help="storage root (default: Drive on Colab, else NBKIT_HOME or ~/nbkit)",
    )

    def action(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    sub = action("create", create, "make a new session (spaces in NAME become '_')")
    sub.add_argument("name")
    sub.add_argument(
        "--base-model", help="a registry key (sd15, sdxl, ...), hub repo id, folder, file or URL"
    )
    sub.add_argument("--family", choices=list(FAMILIES), help="needed for models nbkit does not know")
    sub.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    sub.add_argument("--exist-ok", action="store_true", help="open the session if it already exists")
    action("open", open_, "check a session, tidy interrupted writes, print its folder").add_argument("name")
    action("list", list_, "list sessions as a table").add_argument("--json", action="store_true")
    sub = action("show", show, "describe one session")
    sub.add_argument("name")
    sub.add_argument("--json", action="store_true", help="print the whole session.json")
    sub = action("rename", rename, "rename a session")
    sub.add_argument("old")
    sub.add_argument("new")
    sub = action("delete", delete, "delete a session and everything in it")
    sub.add_argument("name")
    sub.add_argument("--yes", action="store_true", help="really delete (required)")
    sub = action("export", export, "write a session to a zip file")
    sub.add_argument("name")
    sub.add_argument("out", type=Path, help="the zip file, or a folder to write NAME.zip into")
    sub.add_argument("--overwrite", action="store_true", help="replace the zip if it already exists")
    sub.add_argument(
        "--no-checkpoints",
        dest="checkpoints",
        action="store_false",
        help="leave out checkpoints/ (training states with optimizer, often most of the size); "
        "the copy cannot resume an unfinished run",
    )
    sub = action("import", import_, "make a session from an exported zip or a session folder")
    sub.add_argument("src", type=Path)
    sub.add_argument("--name", help="import under this name (needed if the session already exists)")
    sub = action(
        "upload",
        upload,
        "upload the session's exported model, sample images and a model card to the Hugging Face Hub",
    )
    sub.add_argument("name")
    sub.add_argument("repo_id", metavar="REPO_ID", help="the hub repository, user/name (created if missing)")
    sub.add_argument(
        "--public",
        action="store_true",
        help="create the repository public (default: private); the token (write access) comes from HF_TOKEN "
        "or the Colab secret HF_TOKEN, never from the command line",
    )
    action("unlock", unlock, "remove a session's lock when its holder is gone for sure").add_argument("name")
