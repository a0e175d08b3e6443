"""Where instance images come from: uploads, files, a Drive folder, a zip, or http(s) links.

Every source is turned into a list of `Candidate`s (a safe file name, where it came from, and a
function that reads its bytes with a size cap) plus the `.txt` caption files that came with them.
Nothing is read until the import asks, so a folder of thirty 10 MB photos is never all in memory,
and a source that cannot be read becomes a row in the report instead of an exception.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePath, PurePosixPath

from nbkit.errors import NbkitError
from nbkit.models.download import filename_from_response, iter_body, open_url, safe_filename, safe_url

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
CAPTION_SUFFIX = ".txt"
MASK_SUFFIX = ".mask"  # `zwx (1).mask.png` is the subject mask of `zwx (1).jpg`
# Left behind by operating systems and archivers; never the user's photos.
JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store", "__macosx", ".picasa.ini"}
ZIP_UTF8_FLAG = 0x800
PAGE_FIX = "open it, right-click the picture, choose 'Copy image address' and use that link"

Source = str | os.PathLike | tuple[str, bytes]


@dataclasses.dataclass
class Candidate:
    """One file to import.

    Args:
        name: a safe file name for the session, e.g. `zwx (1).jpg`.
        source: where it came from, for the report: a path, `archive.zip:member`, or a URL.
        read: returns the file's bytes, or raises `NbkitError` saying why it cannot.
        label: how the report names it, when shorter than `source` (`photos/zwx (1).jpg`).
    """

    name: str
    source: str
    read: Callable[[], bytes]
    label: str = ""

    @property
    def display(self) -> str:
        return self.label or self.source


@dataclasses.dataclass
class Gathered:
    """What the sources hold: images to import, caption files and subject masks (`<stem>.mask.png`),
    and sources that failed."""

    images: list[Candidate] = dataclasses.field(default_factory=list)
    captions: list[Candidate] = dataclasses.field(default_factory=list)
    masks: list[Candidate] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, NbkitError]] = dataclasses.field(default_factory=list)


def natural_key(name: str) -> tuple[list, list]:
    """Sort `zwx (2)` before `zwx (10)`, and `zwx (1).jpg` before `zwx (1) - Copy.jpg`."""
    stem, suffix = os.path.splitext(name)
    return _natural(stem), _natural(suffix)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", text)]


def gather(
    sources: Iterable[Source] | Mapping[str, bytes],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
    recursive: bool = False,
) -> Gathered:
    """Expand sources into candidates.

    Args:
        sources: paths of files, folders or .zip files; http(s) URLs; `(name, bytes)` pairs; or a
            mapping of name to bytes (what Colab's `files.upload()` returns).
        max_bytes: the largest file accepted.
        timeout: seconds a download may wait for the server.
        recursive: look into sub-folders of folders.
    """
    gathered = Gathered()
    items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
    for item in items:
        if isinstance(item, tuple):
            name, data = item
            _add(
                gathered,
                Candidate(safe_filename(name), name, _reader_for_bytes(bytes(data), name, max_bytes)),
            )
        elif isinstance(item, str) and re.match(r"^[a-z][a-z0-9+.-]*://", item, re.IGNORECASE):
            _add_url(gathered, item, max_bytes, timeout)
        else:
            _add_path(gathered, Path(item), max_bytes, recursive)
    return gathered


def _add(gathered: Gathered, candidate: Candidate) -> None:
    if PurePath(candidate.name).suffix.lower() == CAPTION_SUFFIX:
        gathered.captions.append(candidate)
    elif PurePath(candidate.name).stem.lower().endswith(MASK_SUFFIX):
        gathered.masks.append(candidate)
    else:
        gathered.images.append(candidate)


def _add_path(gathered: Gathered, path: Path, max_bytes: int, recursive: bool) -> None:
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        files = [
            file for file in path.glob(pattern) if file.is_file() and not _is_junk(file.relative_to(path))
        ]
        if not files:
            where = "in it or its sub-folders" if recursive else "in it (sub-folders are not looked into)"
            gathered.failures.append(
                (
                    f"{path.name}/",
                    NbkitError(
                        f"the folder is empty: no files {where}",
                        fix="put your photos (JPEG, PNG or WebP) in it, or give the folder they are in",
                    ),
                )
            )
        inside = path.resolve()
        for file in sorted(files, key=lambda file: natural_key(str(file.relative_to(path)))):
            label = f"{path.name}/{file.relative_to(path)}"
            # A link (or a file in a linked folder) may point anywhere; only what lies in the folder
            # the user chose is imported, so a stray link cannot pull /etc/passwd into a session.
            if not file.resolve().is_relative_to(inside):
                gathered.failures.append(
                    (
                        label,
                        NbkitError(
                            "a symbolic link to a file outside the imported folder; not followed",
                            fix="copy the picture itself into the folder",
                        ),
                    )
                )
                continue
            _add(
                gathered,
                Candidate(safe_filename(file.name), str(file), _reader_for_file(file, max_bytes), label),
            )
    elif path.is_file() and path.suffix.lower() == ".zip":
        _add_zip(gathered, path, max_bytes)
    elif path.is_file():
        _add(gathered, Candidate(safe_filename(path.name), str(path), _reader_for_file(path, max_bytes)))
    else:
        gathered.failures.append((str(path), NbkitError("no such file or folder", fix="check the path")))


def _add_zip(gathered: Gathered, path: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as error:
        gathered.failures.append(
            (
                str(path),
                NbkitError(f"not a readable zip archive: {error}", fix="create or download the zip again"),
            )
        )
        return
    named = [(_member_name(info), info) for info in members]
    for name, info in sorted(named, key=lambda pair: natural_key(pair[0])):
        refused = _refused_member(name, info)
        if refused is not None:
            gathered.failures.append((f"{path.name}:{name}", refused))
            continue
        if _is_junk(PurePath(name)):
            continue
        reader = _reader_for_member(path, info, max_bytes)
        _add(gathered, Candidate(safe_filename(name), f"{path}:{name}", reader, f"{path.name}:{name}"))


def _add_url(gathered: Gathered, url: str, max_bytes: int, timeout: float) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        gathered.failures.append(
            (
                url,
                NbkitError(f"{scheme}:// links are not supported", fix="use an http(s) link or a file path"),
            )
        )
        return
    url = drive_download_url(url)
    candidate = Candidate(safe_filename(urllib.parse.unquote(urllib.parse.urlsplit(url).path)), url, bytes)

    def read() -> bytes:
        # The server's name (Content-Disposition, or the URL after redirects) beats the link's.
        candidate.name, data = download(url, max_bytes=max_bytes, timeout=timeout)
        return data

    candidate.read = read
    gathered.images.append(candidate)


def drive_download_url(url: str) -> str:
    """Turn a Google Drive "share" link, which opens a web page, into its direct download link."""
    match = re.match(r"^https://drive\.google\.com/file/d/([\w-]+)", url)
    return f"https://drive.google.com/uc?export=download&id={match.group(1)}" if match else url


def download(
    url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT
) -> tuple[str, bytes]:
    """Fetch an http(s) URL, streamed, refusing more than `max_bytes` and web pages.

    Args:
        url: the link.
        max_bytes: the largest download accepted.
        timeout: seconds to wait for each answer from the server; the whole download gets ten times that.

    Returns:
        The file name the server gives (or the URL's last path part) and the bytes.
    """
    deadline = time.monotonic() + 10 * timeout
    response = open_url(url, timeout=timeout, accept="image/*", what="an image", page_fix=PAGE_FIX)
    with response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _too_big(max_bytes)
        where = safe_url(url)
        data = b"".join(
            iter_body(
                response, where=where, max_bytes=max_bytes, deadline=deadline, too_big=_too_big(max_bytes)
            )
        )
        name = filename_from_response(
            response.url or url, response.headers.get("Content-Disposition"), default="image"
        )
    return name, data


def _too_big(max_bytes: int) -> NbkitError:
    return NbkitError(
        f"larger than the {max_bytes / 2**20:.0f} MB limit for one image",
        fix="downscale or re-export it (a few megapixels is plenty for training)",
    )


def _reader_for_bytes(data: bytes, name: str, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        if len(data) > max_bytes:
            raise _too_big(max_bytes)
        return data

    return read


def _reader_for_file(path: Path, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        from nbkit.fsio import retry_io

        def read_capped() -> bytes:
            with open(path, "rb") as handle:
                return handle.read(max_bytes + 1)

        try:
            data = retry_io(read_capped, what=f"reading {path.name}")
        except OSError as error:
            raise NbkitError(
                f"cannot read it: {error.strerror}", fix="check the file is there and readable"
            ) from None
        if len(data) > max_bytes:
            raise _too_big(max_bytes)
        return data

    return read


def _reader_for_member(path: Path, info: zipfile.ZipInfo, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        if info.file_size > max_bytes:
            raise _too_big(max_bytes)
        try:
            with zipfile.ZipFile(path) as archive, archive.open(info) as member:
                # Read past the declared size by one byte: a lying header must not bypass the cap.
                data = member.read(max_bytes + 1)
        except RuntimeError as error:  # zipfile's way of saying "encrypted"
            raise NbkitError(f"cannot unpack it: {error}", fix="zip it again without a password") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise NbkitError(
                f"damaged inside the zip: {error}", fix="create or download the zip again"
            ) from None
        if len(data) > max_bytes:
            raise _too_big(max_bytes)
        return data

    return read


def _refused_member(name: str, info: zipfile.ZipInfo) -> NbkitError | None:
    """Why a zip entry is refused: a path that climbs out (`../`) or is absolute, or a link."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in PurePosixPath(posix).parts:
        return NbkitError(
            "its path points outside the zip's folder (absolute or with ../); not imported",
            fix="zip the pictures again from their own folder",
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        return NbkitError("a symbolic link, not a picture; not followed", fix="zip the pictures themselves")
    return None


def _member_name(info: zipfile.ZipInfo) -> str:
    """The member's name; zips from Windows store UTF-8 names without saying so (cp437 by default)."""
    if info.flag_bits & ZIP_UTF8_FLAG:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _is_junk(relative: PurePath) -> bool:
    return any(part.startswith(".") or part.casefold() in JUNK_NAMES for part in relative.parts)
