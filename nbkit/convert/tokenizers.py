"""The CLIP tokenizers a pipeline loaded from a single file needs.

Single files carry no tokenizer. nbkit does not ship CLIP's 1.5 MB vocabulary; it takes, in order: the
config folder's own tokenizer (a diffusers folder given by the caller), nbkit's offline tiny tokenizer
when the text encoder's vocabulary is that size (the tiny test models), and otherwise the real model's
tokenizer from the Hugging Face hub (or its local cache), which is what the real families use.
"""

from __future__ import annotations

from pathlib import Path

from nbkit.errors import NbkitError
from nbkit.families import get_family

# OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!", OpenAI's with <|endoftext|>.
OPEN_CLIP_PAD_TOKEN = "!"


def _hub_repo(family: str) -> str:
    hub_models = get_family(family).hub_models
    if hub_models:
        return hub_models[0].repo_id
    raise NbkitError(f"no hub model is registered for family {family!r}")


def load_tokenizer(name: str, family: str, folder: Path, vocab_size: int):
    """Return the tokenizer `name` (`tokenizer` or `tokenizer_2`) for a pipeline of `family`.

    Args:
        name: the pipeline component name.
        family: a family with a single-file layout.
        folder: the config folder the pipeline is built from.
        vocab_size: the matching text encoder's vocabulary size.

    Raises:
        NbkitError: when no tokenizer is available offline.
    """
    from transformers import CLIPTokenizer

    from nbkit.tokenizers import EOS_TOKEN, make_clip_tokenizer

    local = folder / name
    if (local / "vocab.json").is_file() or (local / "tokenizer.json").is_file():
        return _checked(CLIPTokenizer.from_pretrained(local), vocab_size, str(local))
    open_clip = get_family(family).open_clip_tokenizer(name)
    tiny = make_clip_tokenizer(pad_token=OPEN_CLIP_PAD_TOKEN if open_clip else EOS_TOKEN)
    if len(tiny) == vocab_size:
        return tiny
    repo = _hub_repo(family)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=name)
    except Exception as error:  # hub and cache errors come in many types
        raise _unavailable(name, family, repo) from error
    # Offline with nothing cached, transformers may build an empty tokenizer instead of failing.
    if len(tokenizer) != vocab_size:
        raise _unavailable(name, family, repo)
    return tokenizer


def _checked(tokenizer, vocab_size: int, where: str):
    if len(tokenizer) != vocab_size:
        raise NbkitError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder expects {vocab_size}",
            path=where,
            fix="use a config folder whose tokenizer belongs to this model",
        )
    return tokenizer


def _unavailable(name: str, family: str, repo: str) -> NbkitError:
    return NbkitError(
        f"the {name} for {family} is not available: it comes from the hub repository {repo}, "
        "which cannot be reached and is not in the local cache",
        fix="connect to the internet once (the tokenizer is then cached), or pass config=<a diffusers "
        "folder of this family with its tokenizer>",
    )
