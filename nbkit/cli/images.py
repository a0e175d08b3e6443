"""`nbkit images ...`: add, list, crop, caption (by hand or with a captioning model), mask (with
CLIPSeg) and remove a session's instance images."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.images.autocaption import CAPTIONERS, DEFAULT_BATCH_SIZE, DEFAULT_CAPTIONER
from nbkit.images.automask import DEFAULT_BATCH_SIZE as MASK_BATCH_SIZE
from nbkit.images.automask import DEFAULT_SEGMENTER, SEGMENTERS, THRESHOLD
from nbkit.images.captions import CAPTION_MODES
from nbkit.images.crop import CROP_MODES


def _session(args: argparse.Namespace):
    from nbkit.session.core import Session

    return Session.open(args.session, root=args.root)


def _tokenizer(args: argparse.Namespace):
    if not args.tokenizer:
        return None
    from transformers import CLIPTokenizer

    if not Path(args.tokenizer).is_dir():
        raise NbkitError("no such tokenizer folder", path=args.tokenizer, fix="give a folder with vocab.json")
    return CLIPTokenizer.from_pretrained(args.tokenizer)


def _box(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().lstrip("-").isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not LEFT,TOP,RIGHT,BOTTOM in whole pixels")
    left, top, right, bottom = (int(part) for part in parts)
    return left, top, right, bottom


def add(args: argparse.Namespace) -> int:
    from nbkit.images import check_captions, import_images

    session = _session(args)
    report = import_images(
        session,
        [str(source) for source in args.sources],
        crop=args.crop,
        captions=args.captions,
        resolution=args.resolution,
        tokenizer=_tokenizer(args),
        recursive=args.recursive,
        max_bytes=int(args.max_mb * 2**20),
        timeout=args.timeout,
        token=args.token,
        concept=args.concept,
    )
    print(report)
    check_captions(session)
    return 1 if report.failed else 0


def concept(args: argparse.Namespace) -> int:
    from nbkit.errors import NbkitError
    from nbkit.session.concepts import concepts, remove_concept, set_concept

    session = _session(args)
    changes = {"class_word": args.class_word, "class_images": args.class_images, "repeats": args.repeats}
    if args.name is None and (args.remove or any(value is not None for value in changes.values())):
        raise NbkitError(
            "which concept? the settings were given without a concept's name",
            fix="name it: `nbkit images concept SESSION NAME --repeats 2` (`first` for the first concept)",
        )
    if args.name is not None:
        with session.lock("changing a concept"):
            if args.remove:
                remove_concept(session.manifest, args.name)
            else:
                set_concept(session.manifest, args.name, **changes)
            session.save()
    for view in concepts(session.manifest):
        print(
            f"{view.label}: {len(view.images)} photo(s), token {view.token or '-'!r}, class word "
            f"{view.class_prompt or '-'!r}, {view.class_images} class image(s), repeats {view.repeats}"
        )
    return 0


def list_(args: argparse.Namespace) -> int:
    from nbkit.images import list_images

    report = list_images(_session(args), tokenizer=_tokenizer(args))
    print(report)
    return 1 if report.failed else 0


def crop(args: argparse.Namespace) -> int:
    from nbkit.images import recrop_images

    report = recrop_images(
        _session(args), args.images or None, crop=args.crop, resolution=args.resolution, box=args.box
    )
    print(report)
    return 1 if report.failed else 0


def captions(args: argparse.Namespace) -> int:
    from nbkit.images import apply_caption_files, list_images, set_caption

    session = _session(args)
    if args.set:
        name, text = args.set
        record = set_caption(session, name, text)
        print(f'{record.file}: "{record.caption}"')
        return 0
    if args.apply is not None:
        folder = None if args.apply == "" else args.apply
        report = apply_caption_files(session, folder, mode=args.mode, tokenizer=_tokenizer(args))
    else:
        report = list_images(session, tokenizer=_tokenizer(args))
    print(report)
    return 1 if report.failed else 0


def caption(args: argparse.Namespace) -> int:
    from nbkit.images import auto_caption

    report = auto_caption(
        _session(args),
        args.model,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        class_word=args.class_word,
        device=args.device,
        tokenizer=_tokenizer(args),
    )
    print(report)
    return 1 if report.failed else 0


def mask(args: argparse.Namespace) -> int:
    from nbkit.images import auto_mask

    report = auto_mask(
        _session(args),
        args.model,
        prompt=args.prompt,
        threshold=args.threshold,
        overwrite=args.overwrite,
        device=args.device,
        batch_size=args.batch_size,
    )
    print(report)
    return 1 if report.failed else 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def remove(args: argparse.Namespace) -> int:
    from nbkit.images import remove_images

    if not args.images and not args.all:
        raise NbkitError("name the images to remove, or pass --all")
    report = remove_images(_session(args), None if args.all else args.images)
    print(report)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "images", help="add, list, crop, caption and mask a session's instance images"
    )
    parser.set_defaults(func=lambda _: parser.print_help() or 1)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("session", help="the session name")
    common.add_argument(
        "--root", type=Path, default=None, help="storage root (default: Drive on Colab, else ~/nbkit)"
    )
    common.add_argument("--tokenizer", type=Path, help="a CLIP tokenizer folder, to check the instance token")

    def action(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    sub = action("add", add, "import photos from files, folders, .zip files or http(s) links")
    sub.add_argument("sources", nargs="+", help="files, folders, .zip files or URLs; .txt files are captions")
    sub.add_argument(
        "--crop", choices=CROP_MODES, default="smart", help="how to square the photos (default: smart)"
    )
    sub.add_argument(
        "--captions",
        choices=CAPTION_MODES,
        default="extend",
        help="what a .txt caption does to the file-name token",
    )
    sub.add_argument("--resolution", type=int, help="processed size (default: the session's)")
    sub.add_argument(
        "--token", default="", help="the instance token of these photos (default: from each file name)"
    )
    sub.add_argument(
        "--concept",
        default="",
        help="the concept these photos show, e.g. dog (default: the session's first; a new name adds one)",
    )
    sub.add_argument("--recursive", action="store_true", help="look into sub-folders")
    sub.add_argument(
        "--max-mb", type=float, default=50.0, help="the largest file accepted, in MB (default: 50)"
    )
    sub.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a download's server")

    action("list", list_, "show the session's images, captions and warnings")

    sub = action(
        "concept", concept, "show the session's concepts, or set one's class word, class images, repeats"
    )
    sub.add_argument(
        "name", nargs="?", help="the concept to set ('first' for the first; default: show them all)"
    )
    sub.add_argument("--class-word", help="what the concept is (dog, woman): its class images' prompt")
    sub.add_argument("--class-images", type=int, help="class images for prior preservation (0: none)")
    sub.add_argument("--repeats", type=int, help="draws of each photo per epoch, relative to the first's 1")
    sub.add_argument("--remove", action="store_true", help="remove the concept (it must have no photos left)")

    sub = action("crop", crop, "crop images again from their originals")
    sub.add_argument("images", nargs="*", help="the images (default: all)")
    sub.add_argument("--crop", choices=CROP_MODES, default="smart", help="crop mode (default: smart)")
    sub.add_argument("--resolution", type=int, help="processed size (default: the session's)")
    sub.add_argument(
        "--box", type=_box, help="LEFT,TOP,RIGHT,BOTTOM of a hand-picked crop, for the named images"
    )

    sub = action("captions", captions, "show, set, or read captions from .txt files")
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--set", nargs=2, metavar=("IMAGE", "CAPTION"), help="set one image's caption")
    group.add_argument(
        "--apply",
        nargs="?",
        const="",
        metavar="FOLDER",
        help="read <stem>.txt files (default folder: captions/)",
    )
    sub.add_argument("--mode", choices=CAPTION_MODES, default="extend", help="for --apply (default: extend)")

    sub = action("caption", caption, "caption the images with a model, the token and class word in each")
    sub.add_argument(
        "--model",
        default=DEFAULT_CAPTIONER,
        help=f"{', '.join(CAPTIONERS)}, a hub id, a model folder, or tiny:florence2|tiny:blip "
        f"(default: {DEFAULT_CAPTIONER})",
    )
    sub.add_argument(
        "--overwrite", action="store_true", help="also replace captions written by hand or from .txt files"
    )
    sub.add_argument(
        "--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="images per model call (default: 8)"
    )
    sub.add_argument(
        "--class-word", help="the subject's class, e.g. dog (default: the last word of the class prompt)"
    )
    sub.add_argument("--device", help="cuda or cpu (default: the GPU when there is one)")

    sub = action("mask", mask, "make subject masks from the class word with CLIPSeg, for photos without one")
    sub.add_argument(
        "--model",
        default=DEFAULT_SEGMENTER,
        help=f"{', '.join(SEGMENTERS)}, a hub id, a model folder, or tiny:clipseg "
        f"(default: {DEFAULT_SEGMENTER})",
    )
    sub.add_argument(
        "--prompt", help="what the subject is, e.g. dog (default: the last word of the class prompt)"
    )
    sub.add_argument(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help=f"CLIPSeg's probability up to which a pixel is background (default: {THRESHOLD}; "
        "higher: a tighter mask)",
    )
    sub.add_argument("--overwrite", action="store_true", help="also replace masks given as files")
    sub.add_argument(
        "--batch-size",
        type=_positive,
        default=MASK_BATCH_SIZE,
        help=f"images per model call (default: {MASK_BATCH_SIZE})",
    )
    sub.add_argument("--device", help="cuda or cpu (default: the GPU when there is one)")

    sub = action("remove", remove, "remove images (their processed copy, original and caption)")
    sub.add_argument("images", nargs="*", help="the images to remove")
    sub.add_argument("--all", action="store_true", help="remove every image")
