"""nbkit's own CLIP-style tokenizer: CLIP's file format and behaviour, built offline."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import CLIPTokenizer

from nbkit.errors import NbkitError
from nbkit.tokenizers import (
    BOS_TOKEN,
    EOS_TOKEN,
    PROMPT_WORDS,
    build_clip_tokenizer,
    build_vocab_and_merges,
    byte_to_unicode,
    is_known_word,
    make_clip_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_clip_tokenizer()


def test_vocab_has_clip_layout():
    vocab, merges = build_vocab_and_merges()
    tokens = sorted(vocab, key=vocab.get)
    chars = list(byte_to_unicode().values())
    assert len(set(chars)) == 256
    assert tokens[:256] == chars
    assert tokens[256:512] == [char + "</w>" for char in chars]
    assert tokens[512:-2] == ["".join(line.split(" ")) for line in merges]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["!"] == 0  # OpenCLIP pads with id 0, as in the real vocabulary
    assert build_vocab_and_merges() == (vocab, merges)


def test_prompt_words_are_single_tokens_and_rare_words_split(tokenizer):
    for word in PROMPT_WORDS:
        assert is_known_word(tokenizer, word), word
    assert is_known_word(tokenizer, "Photo")  # CLIP lower-cases
    for rare in ("zwx", "sks", "phtmejhn", "ohwx"):
        assert not is_known_word(tokenizer, rare), rare
        assert len(tokenizer(rare, add_special_tokens=False)["input_ids"]) >= 2


def test_round_trip_and_padding(tokenizer):
    prompt = "a photo of zwx dog in the style of van gogh"
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length)["input_ids"]
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + len(text_ids)] == text_ids
    assert ids[1 + len(text_ids)] == tokenizer.eos_token_id
    assert set(ids[2 + len(text_ids) :]) == {tokenizer.pad_token_id}
    assert tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_long_prompt_truncates_to_77_with_end_token(tokenizer):
    ids = tokenizer(" ".join(PROMPT_WORDS), truncation=True, max_length=77)["input_ids"]
    assert len(ids) == 77
    assert ids[-1] == tokenizer.eos_token_id


def test_openclip_pad_token():
    tokenizer = make_clip_tokenizer(pad_token="!")
    ids = tokenizer("a dog", padding="max_length", max_length=77)["input_ids"]
    assert tokenizer.pad_token_id == 0
    text_ids = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    assert ids[:4] == [tokenizer.bos_token_id, *text_ids, tokenizer.eos_token_id]
    assert ids[4:] == [0] * 73


def test_saved_files_reload_in_both_formats(tmp_path):
    saved = build_clip_tokenizer(tmp_path / "tokenizer", pad_token="!")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / name).is_file(), name
    vocab, merges = build_vocab_and_merges()
    assert json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8")) == vocab
    merges_text = (tmp_path / "tokenizer" / "merges.txt").read_text(encoding="utf-8")
    assert merges_text.splitlines() == ["#version: 0.2", *merges]
    # Only the CLIP files, as a slow tokenizer of older transformers would read them.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp_path / "tokenizer" / name, legacy / name)
    prompt = "portrait of sks woman, oil painting"
    from_json = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    from_vocab = CLIPTokenizer.from_pretrained(legacy)
    expected = saved(prompt)["input_ids"]
    assert from_json(prompt)["input_ids"] == expected
    assert from_vocab(prompt)["input_ids"] == expected
    assert from_json.pad_token == "!"


def test_bad_inputs_raise_nbkit_error(tokenizer):
    with pytest.raises(NbkitError, match="pad_token"):
        make_clip_tokenizer(pad_token="<pad>")
    with pytest.raises(NbkitError, match="model_max_length"):
        make_clip_tokenizer(model_max_length=1)
    with pytest.raises(NbkitError, match="single word"):
        is_known_word(tokenizer, "two words")
    with pytest.raises(NbkitError, match="single word"):
        is_known_word(tokenizer, " ")
