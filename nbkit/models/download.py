"""Downloads over http(s): resumable model files (Civitai and the like), and the one request and file
name cleaner that image links (`nbkit.images.sources`) use too.

Each URL gets its own folder under the cache, named by a hash of the URL, holding `download.part`
while bytes arrive, the finished file under its real name, and `download.json` recording that name,
its size and its sha256. An interrupted download resumes with an HTTP Range request; a finished one
is checked against the announced size and an optional sha256 and then renamed into place in one step,
so a half-written file never carries the real name.

Access tokens travel only in the Authorization header: they are never put into a URL, a file or a
message, and `requests` drops the header when a download redirects to another host (Civitai sends
files from a storage service).
"""

from __future__ import annotations

import email.message
import hashlib
import os
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nbkit import __version__
from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_json, fsync_dir, read_json

PART_NAME = "download.part"
RECORD_NAME = "download.json"
CHUNK_SIZE = 1 << 20
TIMEOUT_S = (15.0, 60.0)  # connect, and between bytes
MAX_STEM_BYTES = 150  # room for " (12)", the extension and Drive's 255-byte name limit
WEB_PAGE_TYPES = ("text/html", "application/xhtml+xml")
MODEL_PAGE_FIX = (
    "use the file's direct download link (Civitai: the Download button's URL); the site "
    "may also want an access token (CIVITAI_TOKEN)"
)


def safe_url(url: str) -> str:
    """The URL without credentials, query or fragment, for messages and records."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    suffix = "?…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + suffix


def token_for_url(url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The token the user set up for the URL's host: CIVITAI_TOKEN for Civitai, the Hugging Face token
    (HF_TOKEN, the Colab secret or `hf auth login`, as huggingface_hub finds it) for the hub."""
    environ = os.environ if environ is None else environ
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "civitai.com" or host.endswith(".civitai.com"):
        return environ.get("CIVITAI_TOKEN") or environ.get("CIVITAI_API_TOKEN") or None
    if host == "huggingface.co" or host.endswith(".huggingface.co"):
        from huggingface_hub import get_token

        return get_token()
    return None


def safe_filename(name: str, *, default: str = "image") -> str:
    """A file name safe on Linux, Drive and Windows that keeps what users typed.

    Unicode (NFC-normalised, as macOS zips store it decomposed), spaces and parentheses stay, so
    `zwx (1).jpg` and `Zoë am Strand.jpg` survive; any directory part is dropped (a server or a zip
    must not pick where nbkit writes), control and invisible format characters go, characters Windows
    forbids become `_`, leading dots go (no hidden files), and long names are shortened.

    Args:
        name: the name as given.
        default: the stem to use when nothing is left.
    """
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(char for char in name if unicodedata.category(char) not in ("Cc", "Cf", "Zl", "Zp"))
    name = re.sub(r'[<>:"|?*]', "_", name).strip().lstrip(".").strip()
    stem, suffix = os.path.splitext(name)
    suffix = suffix if re.fullmatch(r"\.\w{1,12}", suffix) else ""
    stem = stem.strip() or default
    while len(stem.encode("utf-8")) > MAX_STEM_BYTES:
        stem = stem[:-1]
    return stem.rstrip() + suffix.lower()


def filename_from_response(url: str, content_disposition: str | None, *, default: str = "model") -> str:
    """Pick a safe file name: the server's Content-Disposition name, else the URL's last segment."""
    name = None
    if content_disposition:
        message = email.message.Message()
        message["content-disposition"] = content_disposition
        name = message.get_filename()  # handles RFC 2231 `filename*=UTF-8''...` too
    if not name:
        name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    return safe_filename(name, default=default)


def open_url(
    url: str,
    *,
    session: Any | None = None,
    token: str | None = None,
    offset: int = 0,
    timeout: float | tuple[float, float] = TIMEOUT_S,
    accept: str = "*/*",
    what: str = "a model file",
    page_fix: str = MODEL_PAGE_FIX,
) -> Any:
    """Send a streamed GET and check the answer; the caller reads the body (and closes the response).

    Args:
        url: an http(s) URL.
        session: a `requests.Session` or stand-in (default: a new one).
        token: a bearer token, sent only as a header (requests drops it on a redirect to another host).
        offset: ask for the bytes from here on (a Range request); 0 for the whole file.
        timeout: seconds to connect and to wait between bytes (one number for both, or a pair).
        accept: the Accept header.
        what: what the link should give, for the message when it gives a web page instead.
        page_fix: the fix for that message.

    Returns:
        The response; a 416 (nothing past `offset`) is returned for the caller to judge.

    Raises:
        NbkitError: for another scheme, no answer, an HTTP error or a web page. Messages show the URL
            without its query, which may hold a token.
    """
    import requests

    where = safe_url(url)
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise NbkitError(f"only http(s) links can be downloaded, not {where}", fix="use an http(s) link")
    # identity: a gzip-encoded body would not match Content-Length or resume by byte offset.
    headers = {"User-Agent": f"nbkit/{__version__}", "Accept": accept, "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if offset:
        headers["Range"] = f"bytes={offset}-"
    session = session if session is not None else requests.Session()
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.Timeout:
        wait = timeout[1] if isinstance(timeout, tuple) else timeout
        raise NbkitError(f"{where} did not answer within {wait:g} s", fix="try again later") from None
    except requests.RequestException as error:
        raise NbkitError(
            f"cannot reach {where} ({error.__class__.__name__})",
            fix="check the URL and the internet connection, then run the same command again",
        ) from None  # the original text may echo the URL's query, which can hold a token
    status = response.status_code
    try:
        if status in (401, 403):
            raise NbkitError(
                f"{where} refused the download (HTTP {status}): it needs an access token or a login",
                fix="create an API token on the site and set it in the environment (CIVITAI_TOKEN for "
                "Civitai, HF_TOKEN for Hugging Face; on Colab add it under Secrets), then run again",
            )
        if status == 404:
            raise NbkitError(f"{where} does not exist (HTTP 404)", fix="check the URL")
        if status >= 400 and status != 416:
            raise NbkitError(f"{where} answered HTTP {status}", fix="try again later, or check the URL")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if status != 416 and content_type in WEB_PAGE_TYPES:
            raise NbkitError(f"{where} sent a web page, not {what}", fix=page_fix)
    except NbkitError:
        response.close()
        raise
    return response


def _sniff_suffix(path: Path) -> str:
    # A Civitai id URL without Content-Disposition gives a name like "12345"; the loaders need a suffix.
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return ".safetensors"  # 8-byte header length, then the JSON header
    if head.startswith(b"PK"):
        return ".ckpt"  # torch's zip format
    return ""


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def _read_record(folder: Path) -> dict[str, Any]:
    try:
        record = read_json(folder / RECORD_NAME)
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def download_url(
    url: str,
    cache_dir: str | os.PathLike,
    *,
    token: str | None = None,
    expected_sha256: str | None = None,
    session: Any | None = None,
    progress: bool = True,
) -> Path:
    """Download `url` into `cache_dir` (resuming a partial download) and return the file's path.

    Args:
        url: an http(s) URL of one model file.
        cache_dir: the downloads cache; each URL gets a sub-folder.
        token: a bearer token, sent only as a header.
        expected_sha256: the file's sha256 in hex; a mismatch deletes the download.
        session: a `requests.Session` or stand-in (default: a new one).
        progress: show a progress bar.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise NbkitError(f"{safe_url(url)} is not an http(s) URL")
    expected = expected_sha256.strip().lower() if expected_sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise NbkitError(f"expected sha256 {expected_sha256!r} is not 64 hex digits")
    folder = Path(cache_dir) / _url_key(url)
    folder.mkdir(parents=True, exist_ok=True)
    record = _read_record(folder)
    if record.get("complete") and (folder / record["filename"]).is_file():
        if expected is not None and record.get("sha256") != expected:
            raise NbkitError(
                f"the copy downloaded earlier from {safe_url(url)} has sha256 {record.get('sha256')}, "
                f"not the expected {expected}",
                path=folder / record["filename"],
                fix="check the expected hash; to download the file again, delete this folder",
            )
        return folder / record["filename"]
    if session is None:
        import requests

        session = requests.Session()
    return _fetch(url, folder, record, token=token, expected=expected, session=session, progress=progress)


def _fetch(
    url: str,
    folder: Path,
    record: dict,
    *,
    token: str | None,
    expected: str | None,
    session: Any,
    progress: bool,
) -> Path:
    part = folder / PART_NAME
    offset = part.stat().st_size if part.exists() else 0
    where = safe_url(url)
    response = open_url(url, session=session, token=token, offset=offset)
    with response:
        total, offset = _check_response(response, where, offset, part)
        if offset == 0 or not record.get("filename"):
            name = filename_from_response(response.url or url, response.headers.get("Content-Disposition"))
            record = {"url": where, "filename": name, "complete": False}
            atomic_write_json(folder / RECORD_NAME, record)
        digest = hashlib.sha256()
        if offset:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
                    digest.update(block)
        if response.status_code != 416:  # 416 here means the part already holds every byte
            _stream_body(response, part, digest, offset=offset, total=total, where=where, progress=progress)
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise NbkitError(
            f"the download from {where} has {size} bytes but the server announced {total}",
            path=part,
            fix="run the same command again to resume the download"
            if size < total
            else "the partial file was removed; run the same command again",
        )
    sha256 = digest.hexdigest()
    if expected is not None and sha256 != expected:
        part.unlink()
        raise NbkitError(
            f"the file from {where} has sha256 {sha256}, not the expected {expected}; it was deleted",
            fix="check the expected hash (Civitai shows it under the file's details) and the URL",
        )
    name = record["filename"]
    if not Path(name).suffix:
        name += _sniff_suffix(part)
    final = folder / name
    os.replace(part, final)
    fsync_dir(folder)
    atomic_write_json(
        folder / RECORD_NAME, {**record, "filename": name, "complete": True, "size": size, "sha256": sha256}
    )
    return final


def _check_response(response: Any, where: str, offset: int, part: Path) -> tuple[int | None, int]:
    """Judge a resumed answer (`open_url` checked the rest): (total size or None, offset the body starts at)."""
    status = response.status_code
    if status == 416 and offset:
        # Nothing left past our offset: the part is complete if the server's total agrees.
        total = _content_range_total(response.headers.get("Content-Range"))
        if total == offset:
            return total, offset
        part.unlink()
        raise NbkitError(
            f"the server for {where} refused to resume the partial download; it was removed",
            fix="run the same command again to download from the start",
        )
    if status == 206:
        start = _content_range_start(response.headers.get("Content-Range"))
        if start != offset:
            raise NbkitError(
                f"{where} resumed at byte {start}, not {offset}", fix="run the same command again"
            )
        return _content_range_total(response.headers.get("Content-Range")), offset
    # 200: the whole file, even if we asked for a range (the server does not do ranges).
    length = response.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), 0


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def iter_body(
    response: Any,
    *,
    where: str,
    written: int = 0,
    total: int | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    too_big: NbkitError | None = None,
):
    """Yield the response body in chunks, refusing more than `max_bytes` or a download past `deadline`
    (a `time.monotonic()` value); a connection that breaks off is an NbkitError saying how far it got."""
    import requests

    try:
        for chunk in response.iter_content(CHUNK_SIZE):
            written += len(chunk)
            if max_bytes is not None and written > max_bytes:
                raise too_big or NbkitError(f"{where} sends more than {max_bytes} bytes")
            if deadline is not None and time.monotonic() > deadline:
                raise NbkitError(
                    f"the download from {where} took too long", fix="download it yourself and upload the file"
                )
            yield chunk
    except requests.RequestException as error:
        of_total = f" of {total}" if total is not None else ""
        raise NbkitError(
            f"the download from {where} broke off after {written}{of_total} bytes ({error.__class__.__name__})",
            fix="run the same command again: it resumes where it stopped",
        ) from None


def _stream_body(
    response: Any, part: Path, digest: Any, *, offset: int, total: int | None, where: str, progress: bool
) -> None:
    from tqdm.auto import tqdm

    written = offset
    bar = tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, desc=part.parent.name, disable=not progress
    )
    try:
        with bar, open(part, "ab" if offset else "wb") as handle:
            for chunk in iter_body(response, where=where, written=offset, total=total):
                handle.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    except NbkitError as error:
        raise NbkitError(error.message, path=part, fix=error.fix) from None
    except OSError as error:  # the cache is on Drive on Colab, and Drive drops out now and then
        raise NbkitError(
            f"writing the download failed after {written} bytes: {error.strerror}",
            path=part,
            fix="if Google Drive disconnected, remount it (drive.mount('/content/drive', force_remount=True)); "
            "then run the same command again: it resumes where it stopped",
        ) from error
