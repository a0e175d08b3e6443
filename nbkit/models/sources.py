"""Turn what a user typed into a model on local disk.

A source is one of: a registry key (`sd15`, `tiny-sdxl`), a Hugging Face hub repo id (`owner/name`,
optionally `owner/name@revision`), a local diffusers folder, a single checkpoint file
(`.safetensors`/`.ckpt`, handed on to the converter) or an http(s) URL of such a file. Everything
downloaded lands under `<storage_root>/models-cache/` (on Drive, on Colab), so the next session finds
it again: `hub/` is a normal huggingface_hub cache, `downloads/` holds URL downloads and `tiny/` the
tiny models nbkit builds itself.

Tokens come from the environment (HF_TOKEN, CIVITAI_TOKEN) or Colab's Secrets and go straight to the
library or header that needs them; nbkit never writes or prints them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Literal

import nbkit
from nbkit.errors import NbkitError
from nbkit.families import Family
from nbkit.fsio import atomic_write_json, read_json
from nbkit.models.download import download_url, token_for_url
from nbkit.models.registry import MODELS, ModelSpec, close_models, find_model

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-/]+)?")
TINY_STAMP = "nbkit-tiny.json"

# Components whose files nbkit leaves out (the safety checker alone is 1.2 GB): the loader passes None.
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A model on local disk.

    Args:
        kind: `diffusers` (a pipeline folder) or `single_file` (a .safetensors/.ckpt checkpoint).
        path: the folder or file.
        spec: the registry entry, when the source named one.
        variant: the weight variant the folder holds (`fp16`), or None for the plain weights.
    """

    kind: Literal["diffusers", "single_file"]
    path: Path
    spec: ModelSpec | None = None
    variant: str | None = None


def models_cache(cache_root: str | os.PathLike | None = None) -> Path:
    """The model cache folder: `cache_root`, or `<storage_root>/models-cache`."""
    if cache_root is not None:
        return Path(cache_root)
    from nbkit.env import storage_root

    return storage_root() / "models-cache"


def hub_token() -> str | None:
    """The user's Hugging Face token, found as huggingface_hub finds it: HF_TOKEN, Colab's `HF_TOKEN`
    secret, or the file `hf auth login` writes. It goes only to huggingface_hub, never to a file or
    a message."""
    from huggingface_hub import get_token

    return get_token()


def resolve_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    fp16: bool | None = None,
    token: str | None = None,
    expected_sha256: str | None = None,
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> ResolvedSource:
    """Find or fetch `source` and return where it is on disk.

    Args:
        source: a registry key, hub repo id (`owner/name[@revision]`), local folder or file, or URL.
        revision: a hub branch, tag or commit (overrides `@revision` and the registry's pin).
        fp16: download the hub's fp16 weight variant; None takes the registry's hint (fp16 for the
            registry models, full precision for other repos).
        token: an access token for the hub or the URL's site (default: from the environment).
        expected_sha256: for URL downloads, the file's sha256.
        cache_root: the model cache (default `<storage_root>/models-cache`).
        progress: show a progress bar for URL downloads (the hub shows its own).
    """
    text = os.fspath(source).strip()
    if not text:
        raise NbkitError(
            "the model source is empty", fix=f"give a registry key ({', '.join(MODELS)}) or a path"
        )
    local = Path(text).expanduser()
    if isinstance(source, os.PathLike) or local.exists():
        return resolve_local(local)
    if re.match(r"https?://", text, re.IGNORECASE):
        path = download_url(
            text,
            models_cache(cache_root) / "downloads",
            token=token or token_for_url(text),
            expected_sha256=expected_sha256,
            progress=progress,
        )
        return resolve_local(path)
    name, _, pinned = text.partition("@")
    spec = find_model(name)
    if spec is not None and spec.source == "tiny":
        return ResolvedSource("diffusers", tiny_model_path(spec.family, cache_root=cache_root), spec)
    if spec is not None or HUB_ID.fullmatch(text):
        repo_id = spec.repo_id if spec is not None else name
        pinned = pinned or (spec.revision if spec is not None else None)
        want_fp16 = fp16 if fp16 is not None else spec is not None and spec.variant == "fp16"
        path, variant = fetch_hub(
            repo_id,
            revision=revision or pinned or None,
            variant="fp16" if want_fp16 else None,
            fall_back_to_full=fp16 is None,
            token=token or hub_token(),
            cache_dir=models_cache(cache_root) / "hub",
        )
        return ResolvedSource("diffusers", path, spec, variant)
    raise _unknown_source(text)


def check_source(source: str) -> None:
    """Raise `resolve_source`'s error for a source that names nothing, without fetching anything: an
    existing path, a URL, a registry name and a hub repo id pass (whether the repo exists is told when
    it is fetched).

    Args:
        source: what the user typed.
    """
    text = source.strip()
    if not text or Path(text).expanduser().exists() or re.match(r"https?://", text, re.IGNORECASE):
        return
    name = text.partition("@")[0]
    if find_model(name) is None and not HUB_ID.fullmatch(text):
        raise _unknown_source(text)


def _unknown_source(text: str) -> NbkitError:
    close = close_models(text)
    looks_like_path = any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~"))
    if looks_like_path or Path(text).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return NbkitError(
            "no such file or folder", path=Path(text).expanduser().absolute(), fix="check the path"
        )
    guess = f"did you mean {' or '.join(repr(key) for key in close)}? " if close else ""
    return NbkitError(
        f"{text!r} is not a model nbkit knows, a hub repo id, a path or a URL",
        fix=f"{guess}use one of: {', '.join(MODELS)}; or owner/name from huggingface.co",
    )


def resolve_local(path: Path) -> ResolvedSource:
    """Classify and check a local file or folder."""
    path = path.expanduser()
    if not path.exists():
        raise NbkitError("no such file or folder", path=path.absolute(), fix="check the path")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise NbkitError(
                f"{path.suffix or 'a file without a suffix'} is not a checkpoint format nbkit reads",
                path=path,
                fix="give a .safetensors or .ckpt checkpoint, or a diffusers folder",
            )
        return ResolvedSource("single_file", path)
    return ResolvedSource("diffusers", path, None, check_diffusers_folder(path))


def required_components(index: dict) -> list[str]:
    """The components a pipeline's model_index.json lists that must be on disk to load it."""
    return [
        name
        for name, entry in index.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and None not in entry
        and name not in OPTIONAL_COMPONENTS
    ]


def check_diffusers_folder(folder: Path) -> str | None:
    """Check `folder` holds a loadable diffusers pipeline and return its weight variant.

    Raises:
        NbkitError: naming everything that is missing.
    """
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        checkpoints = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in SINGLE_FILE_SUFFIXES)
        hint = (
            f"it holds {', '.join(checkpoints)}: pass that file itself, it is a single-file checkpoint"
            if checkpoints
            else "give the folder that contains model_index.json (a diffusers save_pretrained folder)"
        )
        raise NbkitError("not a diffusers model folder: model_index.json is missing", path=folder, fix=hint)
    try:
        index = read_json(index_file)
    except ValueError as error:
        raise NbkitError(f"model_index.json is not valid JSON ({error})", path=index_file) from error
    missing, variants = [], set()
    for name in required_components(index):
        component = folder / name
        configs = list(component.glob("*.json")) if component.is_dir() else []
        if not configs:
            missing.append(f"{name}/ (with its config)")
        elif (component / "config.json").is_file():  # a model, so it needs weights
            weights = [p.name for p in component.iterdir() if p.suffix in (".safetensors", ".bin")]
            if not weights:
                missing.append(f"{name}/ weights (.safetensors)")
            else:
                plain = [w for w in weights if ".fp16." not in w and ".fp16-" not in w]
                variants.add(None if plain else "fp16")
    if missing:
        raise NbkitError(
            f"the diffusers folder is incomplete: missing {', '.join(missing)}",
            path=folder,
            fix="download or save the pipeline again (an interrupted download leaves folders like this)",
        )
    # A folder holding only fp16 files must be loaded with variant="fp16"; plain weights win otherwise.
    return "fp16" if variants == {"fp16"} else None


def fetch_hub(
    repo_id: str,
    *,
    revision: str | None,
    variant: str | None,
    fall_back_to_full: bool,
    token: str | None,
    cache_dir: Path,
) -> tuple[Path, str | None]:
    """Download (or find in the cache) the files of a diffusers repo; return (folder, variant).

    Args:
        repo_id: `owner/name` on the hub.
        revision: a branch, tag or commit, or None for the default branch.
        variant: `fp16` for the fp16 weight files, None for the full-precision ones.
        fall_back_to_full: when the repo has no fp16 files, fetch the full-precision ones instead.
        token: the hub token, or None for the hub's own lookup.
        cache_dir: the huggingface_hub cache folder.
    """
    # model_index.json first, to fetch exactly the components the pipeline lists (no training
    # checkpoints, spare VAEs or single-file copies), at the commit that index came from.
    index_folder = Path(_snapshot(repo_id, revision, ["model_index.json"], [], token, cache_dir))
    index_file = index_folder / "model_index.json"
    if not index_file.is_file():
        raise NbkitError(
            f"{repo_id} is not a diffusers pipeline (it has no model_index.json)",
            fix="for a repo that only holds a .safetensors checkpoint, pass the file's download URL",
        )
    allow, ignore = hub_patterns(read_json(index_file), variant)
    folder = Path(_snapshot(repo_id, index_folder.name, allow, ignore, token, cache_dir))
    try:
        return folder, check_diffusers_folder(folder)
    except NbkitError:
        if variant == "fp16" and fall_back_to_full:
            return fetch_hub(
                repo_id,
                revision=revision,
                variant=None,
                fall_back_to_full=False,
                token=token,
                cache_dir=cache_dir,
            )
        raise NbkitError(
            f"{repo_id} has no complete diffusers pipeline in .safetensors"
            + (" fp16 files" if variant == "fp16" else ""),
            path=folder,
            fix="nbkit does not load pickled .bin weights from the hub; pick a repo with safetensors, "
            "or download a single .safetensors checkpoint and pass its path",
        ) from None


def hub_patterns(index: dict, variant: str | None) -> tuple[list[str], list[str]]:
    """The (allow, ignore) file patterns that fetch a pipeline's components and one set of weights.

    Args:
        index: the repo's model_index.json.
        variant: `fp16` for the fp16 weight files, None for the full-precision ones.
    """
    allow = ["model_index.json"]
    for name in required_components(index):
        weights = f"{name}/*.fp16*.safetensors" if variant == "fp16" else f"{name}/*.safetensors"
        allow += [f"{name}/*.json", f"{name}/*.txt", weights]
    # Pickled .bin is never fetched (safetensors only); EMA copies are training leftovers.
    ignore = ["*non_ema*", "*ema_only*"] + ([] if variant == "fp16" else ["*.fp16.*", "*.fp16-*"])
    return allow, ignore


def _snapshot(
    repo_id: str, revision: str | None, allow: list, ignore: list, token: str | None, cache_dir: Path
) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    incomplete = tuple(
        getattr(errors, name)
        for name in ("LocalEntryNotFoundError", "IncompleteSnapshotError")
        if hasattr(errors, name)
    )
    where = f"https://huggingface.co/{repo_id}"
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=allow,
            ignore_patterns=ignore,
            token=token,
        )
    except incomplete as error:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        raise NbkitError(
            f"{repo_id} is not in the model cache"
            + (" and HF_HUB_OFFLINE is set" if offline else " and the hub cannot be reached"),
            path=cache_dir,
            fix=("unset HF_HUB_OFFLINE and " if offline else "connect to the internet and ")
            + f"run `nbkit model fetch {repo_id}` once; or pass a local diffusers folder instead",
        ) from error
    except errors.GatedRepoError as error:
        raise NbkitError(
            f"{repo_id} is gated: its licence must be accepted before download",
            fix=f"accept it at {where} while logged in, then set HF_TOKEN (a read token) or the "
            "Colab secret HF_TOKEN",
        ) from error
    except errors.RepositoryNotFoundError as error:
        raise NbkitError(
            f"{repo_id} does not exist on the hub, or is private",
            fix=f"check the name at {where}; for a private repo set HF_TOKEN",
        ) from error
    except errors.RevisionNotFoundError as error:
        raise NbkitError(
            f"{repo_id} has no revision {revision!r}", fix=f"check the branches at {where}"
        ) from error
    except errors.HfHubHTTPError as error:
        raise NbkitError(
            f"the hub refused {repo_id}: {str(error).splitlines()[0]}", fix="try again later"
        ) from error
    except ValueError as error:  # HFValidationError: not a valid repo id
        raise NbkitError(f"{repo_id!r} is not a valid hub repo id: {error}", fix="use owner/name") from error


def _tiny_fingerprint(family: Family) -> str:
    # Rebuild cached tiny models whenever the code that builds them changes: the shared builders and
    # the modules of the family's class and its bases (the builders are the families' `_tiny*` modules).
    from nbkit import tokenizers
    from nbkit.families import _tiny

    modules = {sys.modules[cls.__module__] for cls in type(family).__mro__ if cls is not object}
    builders = Path(_tiny.__file__).parent.glob("_tiny*.py")
    files = sorted({*builders, *(Path(module.__file__) for module in (tokenizers, *modules))})
    digest = hashlib.sha256(nbkit.__version__.encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tiny_model_path(family: str, *, cache_root: str | os.PathLike | None = None) -> Path:
    """Build the tiny model of `family` once into `<models-cache>/tiny/<family>` and return its folder."""
    from nbkit.models.tiny import check_family, save_tiny_pipeline

    target = models_cache(cache_root) / "tiny" / family
    fingerprint = _tiny_fingerprint(check_family(family))
    stamp = target / TINY_STAMP
    if stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint:
        return target
    save_tiny_pipeline(family, target)  # replaces an earlier build atomically
    atomic_write_json(stamp, {"family": family, "fingerprint": fingerprint})
    return target
