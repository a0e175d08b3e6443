"""Instance images: import, check, smart-crop, caption and mask, with a report row for every file.

    from nbkit.images import import_images
    report = import_images(session, ["/content/drive/MyDrive/photos"])   # files, folders, zips, URLs
    report            # a table in a notebook: file, status, reason
    auto_caption(session, model="florence2")   # captions with the token and class word in each
    auto_mask(session)                          # subject masks from the class word, with CLIPSeg
    caption_editor(session)

Modules: `sources` (where files come from), `checks` (decode and convert one file), `crop` (faces,
saliency), `captions` (tokens from file names, .txt captions, token warnings), `autocaption` (captions
from Florence-2 or BLIP, with the subject's words), `masks` (subject masks), `automask` (masks from the
class word, with CLIPSeg), `importing` (the import itself), `manage` (list, re-crop, remove),
`contact_sheet`, `editor` (ipywidgets), `report`.
"""

from nbkit.images.autocaption import auto_caption, insert_subject, load_captioner
from nbkit.images.automask import auto_mask, load_masker
from nbkit.images.captions import (
    apply_caption_files,
    check_token,
    compose_caption,
    find_record,
    set_caption,
    token_from_filename,
    token_warnings,
)
from nbkit.images.checks import BadImageError, CheckedImage, check_image, pixel_sha256
from nbkit.images.contact_sheet import make_contact_sheet, write_contact_sheet
from nbkit.images.crop import CropChoice, FaceDetector, choose_crop, render_crop
from nbkit.images.editor import CaptionEditor, caption_editor
from nbkit.images.importing import check_captions, import_images, session_resolution
from nbkit.images.manage import list_images, recrop_images, remove_images
from nbkit.images.report import ImageReport, ReportRow
from nbkit.images.sources import download, safe_filename

__all__ = [
    "BadImageError",
    "CaptionEditor",
    "CheckedImage",
    "CropChoice",
    "FaceDetector",
    "ImageReport",
    "ReportRow",
    "apply_caption_files",
    "auto_caption",
    "auto_mask",
    "caption_editor",
    "check_captions",
    "check_image",
    "check_token",
    "choose_crop",
    "compose_caption",
    "download",
    "find_record",
    "import_images",
    "insert_subject",
    "list_images",
    "load_captioner",
    "load_masker",
    "make_contact_sheet",
    "pixel_sha256",
    "recrop_images",
    "remove_images",
    "render_crop",
    "safe_filename",
    "session_resolution",
    "set_caption",
    "token_from_filename",
    "token_warnings",
    "write_contact_sheet",
]
