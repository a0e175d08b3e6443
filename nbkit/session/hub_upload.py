"""Upload a session's trained model to the Hugging Face Hub, with a model card written from the session.

What goes up, in one commit: the model files `session.json` records in `models` (a full fine-tune's
single `.safetensors`, a LoRA's kohya/A1111 file and its diffusers `pytorch_lora_weights.safetensors`),
the newest few sample grids from `outputs/samples/`, and a `README.md` model card (base model, family,
trigger words, training settings; YAML front matter the hub reads). The repository is private unless
asked otherwise.

The token comes from the `token` argument, else the `HF_TOKEN` environment variable, else Colab's
secrets (`HF_TOKEN`). It is handed to `huggingface_hub` only (which sends it in a header): it is never
printed, logged, written to a file or put in a URL.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from nbkit.errors import NbkitError
from nbkit.families import get_family
from nbkit.models.registry import find_model
from nbkit.secrets import find_secret
from nbkit.session.concepts import concepts
from nbkit.session.core import Session
from nbkit.session.manifest import ExportedModel

if TYPE_CHECKING:
    from huggingface_hub import HfApi

TOKEN_NAME = "HF_TOKEN"
SAMPLES_DIR = "samples"
# The licence of each base model nbkit offers, as the hub's `license` (and, for `other`, `license_name`
# and `license_link`) metadata; a base model not listed gets no licence line.
BASE_LICENSES: dict[str, dict[str, str]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"license": "creativeml-openrail-m"},
    "stabilityai/stable-diffusion-2-1-base": {"license": "openrail++"},
    "stabilityai/stable-diffusion-2-1": {"license": "openrail++"},
    "stabilityai/stable-diffusion-xl-base-1.0": {"license": "openrail++"},
    "black-forest-labs/FLUX.1-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
    "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
    "Tongyi-MAI/Z-Image-Turbo": {"license": "apache-2.0"},
    "Tongyi-MAI/Z-Image": {"license": "apache-2.0"},
    "black-forest-labs/FLUX.2-klein-4B": {"license": "apache-2.0"},
    "black-forest-labs/FLUX.2-klein-base-4B": {"license": "apache-2.0"},
    "black-forest-labs/FLUX.2-klein-9B": {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md",
    },
    "black-forest-labs/FLUX.2-klein-base-9B": {
        "license": "other",
        "license_name": "flux-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.2-klein-base-9B/blob/main/LICENSE.md",
    },
}
_TOKEN_FIX = (
    "create a token with write access at https://huggingface.co/settings/tokens, then add it as the Colab "
    f"secret {TOKEN_NAME} (the key icon in Colab's left bar, with 'Notebook access' on) or set the "
    f"environment variable {TOKEN_NAME}"
)


def find_token(token: str | None = None) -> str:
    """The Hugging Face token to upload with: `token`, else `$HF_TOKEN`, else the Colab secret `HF_TOKEN`.

    Args:
        token: a token given directly (takes precedence).

    Raises:
        NbkitError: when none is found (naming where to put one); the token itself is never in a message.
    """
    if token and token.strip():
        return token.strip()
    value, why = find_secret((TOKEN_NAME,))
    if value is None:
        raise NbkitError(f"no Hugging Face token was given, nor found: {why}", fix=_TOKEN_FIX)
    return value


def _base_repo_id(source: str) -> str | None:
    """The hub repository of a base model source (registry key, alias or repo id), None for local ones."""
    spec = find_model(source)
    if spec is not None:
        return spec.repo_id
    if Path(source).expanduser().exists() or "://" in source:
        return None
    parts = source.split("/")
    return source if len(parts) == 2 and all(parts) else None


def _trigger(session: Session) -> tuple[str, str, str]:
    """(instance token, class word, a prompt that calls up the subject) from the session's photos and settings."""
    manifest = session.manifest
    tokens = collections.Counter(record.token for record in manifest.images if record.token)
    token = tokens.most_common(1)[0][0] if tokens else ""
    class_prompt = manifest.training.prior.class_prompt.strip()
    class_word = class_prompt.split()[-1] if class_prompt else ""
    if manifest.training.sample_prompts:
        prompt = manifest.training.sample_prompts[0]
    elif manifest.images:
        prompt = collections.Counter(record.caption for record in manifest.images).most_common(1)[0][0]
    else:
        prompt = " ".join(part for part in ("photo of", token, class_word) if part)
    return token, class_word, prompt


def _yaml_value(value: Any) -> str:
    text = str(value)
    return text if text.replace("-", "").replace(".", "").replace("+", "").isalnum() else repr(text)


def model_card(session: Session, *, samples: list[str] | None = None) -> str:
    """The `README.md` model card of the session's model: YAML front matter, then what it is and how to use it.

    Args:
        session: the open session (read only).
        samples: the sample images' paths in the repository, shown in the card.
    """
    manifest = session.manifest
    model = _main_model(session)
    family = get_family(model.family)
    config = manifest.training
    base_repo = _base_repo_id(model.base_model)
    token, class_word, prompt = _trigger(session)
    lora = model.kind == "lora"
    tags = [
        "text-to-image",
        "diffusers",
        "dreambooth",
        *(["lora"] if lora else []),
        family.modelspec_architecture,
    ]
    front = ["---"]
    if base_repo:
        front.append(f"base_model: {base_repo}")
    for key, value in BASE_LICENSES.get(base_repo or "", {}).items():
        front.append(f"{key}: {_yaml_value(value)}")
    front += ["library_name: diffusers", "tags:", *(f"- {_yaml_value(tag)}" for tag in [*tags, "nbkit"])]
    front += [f"instance_prompt: {prompt!r}" if prompt else "", "---"]
    base_name = base_repo or Path(model.base_model).name
    what = f"A LoRA (rank {config.lora_rank}) for" if lora else "A DreamBooth fine-tune of"
    lines = [
        *(line for line in front if line),
        "",
        f"# {session.name}",
        "",
        f"{what} {base_name} ({family.title}), trained with [nbkit](https://github.com/nbkit-dev/nbkit).",
        "",
        "## Trigger",
        "",
        f"- prompt: `{prompt}`" if prompt else "- prompt: (none recorded)",
    ]
    if token:
        lines.append(f"- instance token: `{token}`")
    if class_word:
        lines.append(f"- class word: `{class_word}` (class prompt `{config.prior.class_prompt}`)")
    if model.prompt_tag():
        lines.append(f"- in AUTOMATIC1111 / Forge: add `{model.prompt_tag()}` to the prompt")
    lines += _concepts_table(manifest)
    lines += ["", "## Training", "", "| setting | value |", "| --- | --- |"]
    rows = [
        ("base model", base_name),
        ("family", family.title),
        ("resolution", f"{config.resolution} px"),
        ("text encoder steps", config.text_encoder_steps),
        ("text encoder learning rate", config.text_encoder_lr),
        (f"{family.denoiser} steps", config.unet_steps),
        (f"{family.denoiser} learning rate", config.unet_lr),
        ("learning-rate schedule", config.lr_schedule),
        ("batch size", config.batch_size),
        ("seed", config.seed),
        ("exported at", f"{model.stage} step {model.step}"),
    ]
    if not family.trains_text_encoders:
        rows = [row for row in rows if not str(row[0]).startswith("text encoder")]
    if lora:
        rows.append(("LoRA rank / alpha", f"{config.lora_rank} / {config.lora_alpha or config.lora_rank}"))
    if config.prior.num_images:
        rows.append(("prior preservation", f"{config.prior.num_images} class images"))
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Files", ""]
    lines += [f"- `{path}`" for path in _repo_files(session)]
    if samples:
        lines += ["", "## Samples", ""]
        lines += [f"![{PurePosixPath(path).stem}]({path})" for path in samples]
    return "\n".join(lines) + "\n"


def _concepts_table(manifest) -> list[str]:
    """The card's table of concepts, when the model learnt more than one (none otherwise)."""
    views = [view for view in concepts(manifest) if view.images]
    if len(views) < 2:
        return []
    lines = ["", "## Concepts", "", "| concept | instance token | class word | photos | repeats |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for view in views:
        row = (view.label, view.token or "-", view.class_prompt or "-", len(view.images), view.repeats)
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def _main_model(session: Session) -> ExportedModel:
    models = session.manifest.models
    if not models:
        raise NbkitError(
            f"session '{session.name}' has no exported model to upload",
            path=session.path,
            fix="train it first (`nbkit train NAME`, or the notebook's training cell): a finished run exports "
            "the model; or export a checkpoint with `nbkit vision export NAME`",
        )
    named = [model for model in models if model.name == session.name]
    return named[0] if named else models[-1]


def _repo_files(session: Session) -> dict[str, Path]:
    """Repository path -> local file of every recorded model file: the session's own model at the top,
    others under a folder of their name."""
    main = _main_model(session)
    files: dict[str, Path] = {}
    for model in session.manifest.models:
        roles = ("single_file",) if model.kind == "full" else ("kohya", "diffusers")
        folder = "" if model is main else f"{model.name}/"
        for role in roles:
            if role not in model.files:
                continue
            local = session.path / model.files[role]
            if not local.is_file():
                raise NbkitError(
                    f"model {model.name}'s {role} file is missing",
                    path=local,
                    fix="train or export the model again, or restore the file from Drive's trash",
                )
            files[f"{folder}{local.name}"] = local
    return files


def _sample_images(session: Session, limit: int) -> list[Path]:
    folder = session.path / "outputs" / SAMPLES_DIR
    found = [path for path in folder.glob("*.png") if path.is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda path: (path.stat().st_mtime, path.name))[-limit:] if limit > 0 else []


def upload_to_hub(
    session: Session | str,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    root: str | os.PathLike | None = None,
    max_samples: int = 4,
    api: HfApi | None = None,
) -> str:
    """Upload the session's exported model, a few sample images and a model card to a hub repository.

    The repository is created if needed (`exist_ok`); everything goes up in one commit.

    Args:
        session: an open `Session` or a session name.
        repo_id: the hub repository, `user/name` (or `name`, under the token's user).
        private: create the repository private (the default); an existing repository keeps its visibility.
        token: a Hugging Face token with write access (default: `$HF_TOKEN`, then the Colab secret `HF_TOKEN`).
        root: the storage root, when `session` is a name.
        max_samples: how many of the newest sample grids to include (0: none).
        api: the `huggingface_hub.HfApi` to use (default: a new one with the token).

    Returns:
        The repository's URL.

    Raises:
        NbkitError: the session has no exported model (or a file of it is missing), no token is found,
            the token is refused, the repository id is invalid, or the hub is unreachable.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    session = session if isinstance(session, Session) else Session.open(session, root=root)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise NbkitError(
            f"{repo_id!r} is not a valid Hugging Face repository id ({error})",
            fix="use `your-user-name/model-name` (letters, digits, '-', '_', '.')",
        ) from None
    files = _repo_files(session)  # no model: the message before any token is asked for
    samples = {f"{SAMPLES_DIR}/{path.name}": path for path in _sample_images(session, max_samples)}
    card = model_card(session, samples=list(samples))
    if api is None:
        if constants.HF_HUB_OFFLINE:
            raise NbkitError(
                "HF_HUB_OFFLINE is set, so nothing can be uploaded",
                fix="unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) in this runtime and run this again",
            )
        api = HfApi(token=find_token(token))
    operations = [
        *(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in files.items()),
        *(
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local))
            for path, local in samples.items()
        ),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
    ]
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.create_commit(
            repo_id,
            operations,
            commit_message=f"Upload {session.name} from nbkit",
            repo_type="model",
        )
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status in (401, 403):
            raise NbkitError(
                f"the Hugging Face Hub refused the token for {repo_id} (HTTP {status}): it is invalid, "
                "read-only, or may not write to that namespace",
                fix=_TOKEN_FIX,
            ) from None
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NbkitError(
            f"uploading to {repo_id} failed: {first_line}", fix="check the repository id and run this again"
        ) from None
    except OSError as error:  # no network
        raise NbkitError(
            f"could not reach the Hugging Face Hub ({type(error).__name__})",
            fix="check the runtime's internet connection and run this again",
        ) from None
    return str(url)
