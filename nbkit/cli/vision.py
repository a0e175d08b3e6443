"""`nbkit vision classify|check|score|grid|export SESSION`: class word, dataset checks, checkpoint
scores, the checkpoint comparison grid and the export of a chosen checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbkit.errors import NbkitError


def _session(args: argparse.Namespace):
    from nbkit.session.core import Session

    session = Session.open(args.session, root=args.root)
    if not session.manifest.images and args.action in ("classify", "check"):
        raise NbkitError(
            f"session '{session.name}' has no instance images.",
            path=session.path,
            fix="add photos with `nbkit images add SESSION FILES`.",
        )
    return session


def classify(args: argparse.Namespace) -> int:
    from nbkit.vision.backbones import load_backbone
    from nbkit.vision.classword import apply_suggestion, suggest_class_word
    from nbkit.vision.scoring import instance_photos

    session = _session(args)
    files, images, _ = instance_photos(session, concept="")  # the class word it sets is the first's
    suggestion = suggest_class_word(load_backbone(args.model, device=args.device), images, files)
    print(suggestion)
    if args.accept:
        prompt = apply_suggestion(session, args.class_prompt or suggestion)
        print(f"training.prior.class_prompt is now {prompt!r}")
    else:
        print("nothing changed: add --accept (or --accept --class-prompt TEXT) to use it for training")
    return 0


def check(args: argparse.Namespace) -> int:
    from nbkit.vision.backbones import load_backbone
    from nbkit.vision.checks import check_dataset, write_dataset_report
    from nbkit.vision.embeddings import embed_cached
    from nbkit.vision.scoring import instance_photos

    session = _session(args)
    files, images, keys = instance_photos(session)
    backbone = load_backbone(args.model, device=args.device)
    cache = session.dir("logs") / "vision_cache"
    report = check_dataset(
        files,
        images,
        embed_cached(backbone, images, keys, cache),
        embed_cached(backbone, images, keys, cache, flip=True),
        duplicate=args.duplicate,
        outlier_z=args.outlier_z,
    )
    paths = write_dataset_report(session.dir("logs"), report)
    from nbkit.images.contact_sheet import write_contact_sheet

    write_contact_sheet(session)  # now with the flags
    print(report)
    print(f"report: {paths['html']}")
    return 0


def score(args: argparse.Namespace) -> int:
    from nbkit.vision.backbones import load_backbone
    from nbkit.vision.scoring import format_table, kept_checkpoints, score_session

    session = _session(args)
    dino = load_backbone(args.dino, device=args.device) if args.dino != "none" else None
    clip = load_backbone(args.clip, device=args.device) if args.clip != "none" else None
    if dino is None and clip is None:
        raise NbkitError(
            "--dino none and --clip none leave nothing to score with.", fix="Keep at least one model."
        )
    scores, paths = score_session(session, dino=dino, clip=clip, memorised=args.memorised)
    print(format_table(scores, kept_checkpoints(session)))
    print(f"table: {paths['csv']}\nplot: {paths['plot']}")
    return 0


def grid(args: argparse.Namespace) -> int:
    from nbkit.train.grid import render_checkpoint_grid

    session = _session(args)
    path = render_checkpoint_grid(
        session,
        args.prompt,
        seeds=args.seeds,
        steps=args.steps,
        resolution=args.resolution,
        guidance_scale=args.cfg_scale,
        negative_prompt=args.negative_prompt,
        checkpoints=args.checkpoints,
        device=args.device,
    )
    print(f"grid (rows: checkpoints, columns: seeds): {path}")
    return 0


def export(args: argparse.Namespace) -> int:
    from nbkit.train.export_checkpoint import export_checkpoint

    session = _session(args)
    record = export_checkpoint(session, args.checkpoint, device=args.device)
    print(f"exported {record.stage}-{record.step:06d} as model {record.name!r} ({record.kind}):")
    for role, path in record.files.items():
        print(f"  {role}: {session.path / path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nbkit.vision.backbones import DEFAULT_CLASSIFIER, DEFAULT_CLIP, DEFAULT_DINO
    from nbkit.vision.checks import DUPLICATE_COSINE, OUTLIER_Z
    from nbkit.vision.scoring import MEMORISED_COSINE

    parser = subparsers.add_parser(
        "vision", help="class word, duplicate/off-subject photos, checkpoint scores"
    )
    parser.set_defaults(func=lambda _: parser.print_help() or 1, loads_models=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("session", help="the session name")
    common.add_argument(
        "--root", type=Path, default=None, help="storage root (default: Drive on Colab, else ~/nbkit)"
    )
    common.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    def action(name: str, func, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    sub = action("classify", classify, "suggest the class word and class prompt from the instance photos")
    sub.add_argument("--model", default=DEFAULT_CLASSIFIER, help="classifier: hub id, folder or tiny:vit")
    sub.add_argument(
        "--accept", action="store_true", help="write the suggestion into training.prior.class_prompt"
    )
    sub.add_argument("--class-prompt", help="with --accept: use this class prompt instead")
    sub = action("check", check, "find near-duplicate and off-subject photos (removes nothing)")
    sub.add_argument("--model", default=DEFAULT_DINO, help="embedder: hub id, folder or tiny:dino")
    sub.add_argument("--duplicate", type=float, default=DUPLICATE_COSINE, help="near-duplicate cosine")
    sub.add_argument(
        "--outlier-z", type=float, default=OUTLIER_Z, help="robust deviations that make an outlier"
    )
    sub = action("score", score, "score each checkpoint's samples and suggest one")
    sub.add_argument("--dino", default=DEFAULT_DINO, help="DINO model, or none")
    sub.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP model, or none")
    sub.add_argument("--memorised", type=float, default=MEMORISED_COSINE, help="cosine that counts as a copy")
    sub = action("grid", grid, "render one prompt with fixed seeds from every checkpoint, as one image")
    sub.add_argument("--prompt", required=True, help="the prompt, with the instance token")
    sub.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="one column per seed (default: 1 2 3)"
    )
    sub.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    sub.add_argument("--resolution", type=int, default=None, help="image size (default: the training size)")
    sub.add_argument("--cfg-scale", type=float, default=7.5, help="guidance scale (default: 7.5)")
    sub.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    sub.add_argument(
        "--checkpoints", nargs="+", default=None, help="checkpoint names (default: every kept one)"
    )
    sub = action("export", export, "export a checkpoint as the model SESSION-CHECKPOINT")
    sub.add_argument(
        "--checkpoint",
        default="suggested",
        help="a checkpoint name (unet-000500) or suggested: the pick of logs/vision_scores.json (default)",
    )
