"""A CLIP-style byte-level BPE tokenizer that nbkit builds itself, offline and deterministically.

The tiny offline models need a tokenizer with the same format and behaviour as the real CLIP one
(vocab.json + merges.txt, 256 byte characters and the same with `</w>`, merges, then
`<|startoftext|>` and `<|endoftext|>` last) without downloading it. Its merges are learnt here from a
short list of common prompt words, so those words are single tokens while rare instance tokens such as
"zwx" or "sks" split into several pieces, as they do in the real CLIP vocabulary.

The T5 tokenizer (FLUX.1's second) is a Unigram model over the same prompt words, letters and digits,
built with the `tokenizers` library: `</s>` ends every sequence and `<pad>` pads, as in T5; rare
instance tokens ("zwx") split into letters, as they do in the real SentencePiece vocabulary.

The Qwen tokenizer (Z-Image's and FLUX.2's text encoder is Qwen3) is a byte-level BPE as Qwen2's: the
prompt words, each with its leading space, are single tokens, other text splits into shorter pieces
down to bytes; it has Qwen's chat markers and a chat template that renders a user message as Qwen3's
own template does, since both pipelines wrap each prompt in it.

Tiny models, the caption checks and the tiny vision backbones all use these, so the module sits low and
imports nothing from nbkit but `nbkit.errors` and `nbkit.fsio`.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_write_text

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer, T5TokenizerFast

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Common prompt and class words. Rare tokens ("zwx", "sks", "phtmejhn", "ohwx") are deliberately absent.
_PROMPT_WORDS_TEXT = """
a an the of and in on with by at for from to is as or it its this that his her their my your
photo photograph picture image portrait painting drawing sketch illustration render art artwork style
closeup close up full body face head shot selfie headshot profile front side view background
person people man woman men women boy girl child kid baby toddler teen adult old young lady gentleman
guy human character model actor actress king queen prince princess warrior knight wizard witch
dog cat puppy kitten animal bird horse cow sheep pig lion tiger bear wolf fox rabbit mouse fish
monkey elephant deer duck owl eagle dragon unicorn creature pet toy doll robot car truck bike
bicycle motorcycle train plane boat ship house building castle city street road bridge room
kitchen garden park forest tree trees flower flowers grass field mountain mountains river lake
sea ocean beach sky cloud clouds sun moon star stars night day morning evening sunset sunrise
rain snow winter summer spring autumn fall water fire light shadow dark bright colorful color
red blue green yellow orange purple pink black white gray grey brown gold golden silver
high quality detailed highly intricate sharp focus masterpiece best realistic photorealistic
hyperrealistic cinematic lighting dramatic soft studio natural volumetric hdr uhd resolution
digital oil watercolor acrylic pencil charcoal ink anime cartoon comic manga pixel vector
concept fantasy science fiction sci fi cyberpunk steampunk vintage retro modern classic
abstract surreal minimalist beautiful cute pretty handsome happy sad smiling smile angry serious
wearing dress shirt suit hat glasses jacket coat hair eyes long short curly blonde
standing sitting walking running looking camera lens bokeh depth film analog kodak canon nikon
sony mm trending artstation by greg rutkowski van gogh monet picasso rembrandt da vinci
wallpaper poster cover magazine fashion editorial street food cake coffee cup table chair
window door wall floor book phone computer guitar piano sword shield armor helmet crown
texture pattern material wood metal stone glass paper fabric leather plastic
ugly blurry bad worst low lowres deformed extra missing fingers hands hand arm arms legs leg
cropped watermark text signature jpeg artifacts noise grainy duplicate mutated disfigured
"""
PROMPT_WORDS = tuple(_PROMPT_WORDS_TEXT.split())


def byte_to_unicode() -> dict[int, str]:
    """Return the byte -> printable character table of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+00FF so that every byte has
    a visible, whitespace-free character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


def learn_merges(words: Sequence[str], *, end_of_word: str = END_OF_WORD) -> list[tuple[str, str]]:
    """Learn BPE merges until every word in `words` is a single symbol.

    Ties between equally frequent pairs are broken by the pair itself, so the result never depends on
    dict or set order.

    Args:
        words: lower-case words; each becomes a sequence of byte characters, the last with `end_of_word`.
        end_of_word: CLIP's `</w>`; byte-level BPEs without one (Qwen's) pass "".
    """
    to_char = byte_to_unicode()
    word_counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in words:
        chars = [to_char[byte] for byte in word.encode("utf-8")]
        chars[-1] += end_of_word
        word_counts[tuple(chars)] += 1
    corpus = list(word_counts.items())
    pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for symbols, count in corpus:
        for pair in itertools.pairwise(symbols):
            pair_counts[pair] += count
    merges: list[tuple[str, str]] = []
    while pair_counts:
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        # Only the words holding `best` change; update their pair counts instead of recounting all.
        for index, (symbols, count) in enumerate(corpus):
            if best[0] not in symbols:
                continue
            merged = _merge_pair(symbols, best)
            if merged == symbols:
                continue
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] -= count
            for pair in itertools.pairwise(merged):
                pair_counts[pair] += count
            corpus[index] = (merged, count)
        pair_counts = +pair_counts  # drop pairs that no longer occur
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_vocab_and_merges(words: Sequence[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Return CLIP-format `(vocab, merges)`: vocab.json's mapping and merges.txt's lines (no header).

    Args:
        words: the words to make single tokens; defaults to `PROMPT_WORDS`.
    """
    words = sorted({word.lower() for word in (PROMPT_WORDS if words is None else words)})
    merges = learn_merges(words)
    chars = list(byte_to_unicode().values())
    tokens = chars + [char + END_OF_WORD for char in chars] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, [f"{left} {right}" for left, right in merges]


def write_clip_vocab_files(out_dir: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Write vocab.json and merges.txt of the tiny CLIP tokenizer into `out_dir` (which must exist).

    Args:
        out_dir: the tokenizer folder.

    Returns:
        The `(vocab, merges)` written, as `build_vocab_and_merges` returns them.
    """
    out_dir = Path(out_dir)
    vocab, merges = build_vocab_and_merges()
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, merges


def make_clip_tokenizer(*, pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
    """Build the tiny CLIP tokenizer in memory.

    Args:
        pad_token: `<|endoftext|>` like OpenAI's CLIP (SD1, SDXL's first tokenizer) or `!` like the
            OpenCLIP tokenizers (SD2, SDXL's second tokenizer).
        model_max_length: sequence length prompts are padded or truncated to.

    Returns:
        A `transformers.CLIPTokenizer`.
    """
    from transformers import CLIPTokenizer

    if pad_token not in (EOS_TOKEN, "!"):
        raise NbkitError(f"pad_token {pad_token!r} is not one CLIP uses.", fix=f"Use {EOS_TOKEN!r} or '!'.")
    if model_max_length < 2:
        raise NbkitError(
            f"model_max_length {model_max_length} leaves no room for the start and end tokens.",
            fix="Use 77, CLIP's length.",
        )
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(line.split(" ")) for line in merges],
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


def build_clip_tokenizer(
    out_dir: str | os.PathLike,
    *,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """Build the tiny CLIP tokenizer and save it into `out_dir`, as a diffusers `tokenizer/` folder.

    `out_dir` gets vocab.json and merges.txt in CLIP's format (for any transformers version) and
    everything `CLIPTokenizer.save_pretrained` writes (tokenizer.json, tokenizer_config.json).

    Args:
        out_dir: folder to write; created if missing.
        pad_token: see `make_clip_tokenizer`.
        model_max_length: see `make_clip_tokenizer`.

    Returns:
        The `transformers.CLIPTokenizer` that was saved.
    """
    tokenizer = make_clip_tokenizer(pad_token=pad_token, model_max_length=model_max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    write_clip_vocab_files(out_dir)
    return tokenizer


def is_known_word(tokenizer: PreTrainedTokenizerBase, word: str) -> bool:
    """Return True when `word` is a single token of `tokenizer`, i.e. a word the model already knows.

    An instance token that is a known word ("dog", "photo") fights the meaning the model already has
    for it; a rare one ("zwx", "sks") splits into pieces and is safe to re-purpose.

    Args:
        tokenizer: a CLIP tokenizer (nbkit's tiny one or a real one).
        word: the word to check, without spaces.
    """
    if not word.strip() or len(word.split()) != 1:
        raise NbkitError(f"{word!r} is not a single word.", fix="Pass one word without spaces.")
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return len(ids) == 1


T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5
METASPACE = "\u2581"  # SentencePiece's word-start mark
T5_MAX_LENGTH = 512  # FLUX.1 [dev]'s max_sequence_length (schnell: 256)


def t5_vocab() -> list[tuple[str, float]]:
    """The Unigram vocabulary: specials, whole prompt words, then single characters.

    Whole words score higher than the letters that spell them, so a known word is one token.
    """
    vocab = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    vocab.append((METASPACE, -2.0))
    seen = {token for token, _ in vocab}
    for word in sorted(set(PROMPT_WORDS)):
        vocab.append((METASPACE + word, -3.0))
        seen.add(METASPACE + word)
    for char in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        for piece in (char, METASPACE + char):
            if piece not in seen:
                vocab.append((piece, -10.0))
                seen.add(piece)
    return vocab


def make_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """Build the tiny T5 tokenizer in memory (a `transformers.T5TokenizerFast`).

    Args:
        model_max_length: the longest sequence; FLUX.1 pads T5 prompts to its `max_sequence_length`.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    vocab = t5_vocab()
    tokenizer = Tokenizer(Unigram(vocab, unk_id=T5_SPECIAL_TOKENS.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    eos_id = T5_SPECIAL_TOKENS.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=model_max_length,
    )


QWEN_PAD_TOKEN = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (QWEN_PAD_TOKEN, "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_MAX_LENGTH = 512  # Z-Image's and FLUX.2's default max_sequence_length
# Qwen3's template for plain text messages: ChatML turns, then the assistant's turn; with
# `enable_thinking=False` an empty thinking block, as Qwen3's own template writes it.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges: the 256 byte characters, then merges learnt until each
    prompt word, with and without its leading space, is one token."""
    words = sorted({form for word in PROMPT_WORDS for form in (" " + word, word)})
    merges = learn_merges(words, end_of_word="")
    vocab = {char: index for index, char in enumerate(byte_to_unicode().values())}
    for pair in merges:
        vocab.setdefault("".join(pair), len(vocab))
    return vocab, merges


def make_qwen_tokenizer(model_max_length: int = QWEN_MAX_LENGTH) -> Qwen2Tokenizer:
    """Build the tiny Qwen tokenizer in memory (a `transformers.Qwen2Tokenizer`, fast).

    Args:
        model_max_length: the longest sequence; the pipelines pad prompts to their `max_sequence_length`.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    qwen = Qwen2Tokenizer(
        tokenizer_object=tokenizer,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token=QWEN_PAD_TOKEN,
        model_max_length=model_max_length,
    )
    qwen.chat_template = QWEN_CHAT_TEMPLATE
    return qwen
