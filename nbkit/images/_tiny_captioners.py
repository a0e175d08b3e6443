"""Tiny random-weight captioners of the real topologies, built offline for tests and demos.

`florence2` is a `Florence2ForConditionalGeneration` laid out like florence-community/Florence-2-base
(DaViT vision tower in four stages, BART encoder-decoder, tied embeddings) with a BART byte-level BPE
tokenizer that carries Florence's `<image>` token; `blip` a `BlipForConditionalGeneration` like
Salesforce/blip-image-captioning-large (ViT, BERT decoder) with a WordPiece tokenizer whose `[DEC]`
starts a caption. Both tokenizers are learnt from nbkit's own prompt words (`nbkit.tokenizers`), so
nothing is downloaded.

Random weights write random text. So that a tiny caption still reads as words (what the caption checks
and the subject insertion act on), neither model can emit a word piece: Florence-2's generation config
suppresses them, and BLIP's decoder, which `generate` drives with its own config, has them ruled out
by its output bias. Both are saved with their processor, so the ordinary `from_pretrained` loaders are
what the tests exercise.
"""

from __future__ import annotations

import functools
import os
import string
from pathlib import Path
from typing import Any

from nbkit.errors import NbkitError
from nbkit.fsio import atomic_directory
from nbkit.tokenizers import PROMPT_WORDS, qwen_vocab_and_merges

TINY_CAPTIONERS = ("florence2", "blip")
# Florence-2 takes 768 px and reduces by 32 (576 patch tokens and one pooled); the tiny one takes 64.
FLORENCE2_RESOLUTION = 64
FLORENCE2_IMAGE_TOKENS = (FLORENCE2_RESOLUTION // 32) ** 2 + 1
BLIP_RESOLUTION = 32
# Random weights rarely end a caption; a tiny one stops here, a dozen words being enough to check.
TINY_MAX_NEW_TOKENS = 12
# Far below any logit a random model reaches, and still finite in fp16.
_RULED_OUT = -1e4


@functools.cache
def _bart_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    # Learning the merges takes most of a second; every tiny Florence-2 in a process shares them.
    words, merges = qwen_vocab_and_merges()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # BART's first four ids
    for piece in words:
        vocab.setdefault(piece, len(vocab))
    vocab["<mask>"] = len(vocab)
    return tuple(vocab.items()), tuple(merges)


def _bart_tokenizer():
    from transformers import BartTokenizer

    vocab, merges = _bart_vocab()
    # `image_token` becomes a named special token, which Florence2Processor reads.
    return BartTokenizer(vocab=dict(vocab), merges=list(merges), image_token="<image>")


def _wordpiece_tokenizer():
    from transformers import BertTokenizer

    characters = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [
        *("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
        *sorted(set(PROMPT_WORDS)),
        *characters,
        *(f"##{char}" for char in string.ascii_lowercase + string.digits),
    ]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["[DEC]"] = len(vocab)  # BLIP's caption start, after BERT's vocabulary as in the real one
    return BertTokenizer(vocab=vocab, bos_token="[DEC]")


def _is_word(piece: str) -> bool:
    return piece.isalpha() and len(piece) > 1


def _florence2():
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    tokenizer = _bart_tokenizer()
    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1),
        embed_dim=(8, 16, 16, 32),
        num_heads=(1, 1, 2, 2),
        num_groups=(1, 1, 2, 2),
        window_size=2,
        projection_dim=32,
        max_position_embeddings=8,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
    )
    config = Florence2Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=tokenizer.image_token_id
    )
    model = Florence2ForConditionalGeneration(config)
    _pytorch_init(model, torch)
    keep = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    # Byte-level pieces of a word start with "Ġ" (a space); the rest would glue words into nonsense.
    model.generation_config.suppress_tokens = [
        index
        for piece, index in tokenizer.get_vocab().items()
        if index not in keep and not (piece.startswith("Ġ") and _is_word(piece[1:]))
    ]
    image_processor = CLIPImageProcessor(
        size={"height": FLORENCE2_RESOLUTION, "width": FLORENCE2_RESOLUTION},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=FLORENCE2_IMAGE_TOKENS,
    )
    return model, Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


def _blip():
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _wordpiece_tokenizer()
    width = 32
    config = BlipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "encoder_hidden_size": width,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": BLIP_RESOLUTION,
            "patch_size": 8,
            "hidden_size": width,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    model = BlipForConditionalGeneration(config)
    _pytorch_init(model, torch)
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        for piece, index in tokenizer.get_vocab().items():
            if index != tokenizer.sep_token_id and not _is_word(piece):
                bias[index] = _RULED_OUT
    image_processor = BlipImageProcessor(size={"height": BLIP_RESOLUTION, "width": BLIP_RESOLUTION})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _pytorch_init(model: Any, torch: Any) -> None:
    # transformers draws weights around 0.02, so every random caption would be one token repeated;
    # PyTorch's own initialisation spreads the logits and a caption varies from word to word.
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
            module.reset_parameters()


def build_tiny_captioner(kind: str, *, seed: int = 0) -> tuple[Any, Any]:
    """Build a tiny captioner and its processor in memory (bit-identical for the same seed).

    Args:
        kind: one of `TINY_CAPTIONERS`.
        seed: seed for the weight initialisation; the global torch RNG is left as it was.

    Returns:
        `(model, processor)`, the model in eval mode, fp32 on the CPU.
    """
    import torch

    if kind not in TINY_CAPTIONERS:
        raise NbkitError(
            f"Unknown tiny captioner {kind!r}.", fix=f"Use one of: {', '.join(TINY_CAPTIONERS)}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _florence2() if kind == "florence2" else _blip()
    return model.eval(), processor


def save_tiny_captioner(kind: str, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny captioner and save it, with its processor, as an ordinary transformers folder.

    Args:
        kind: one of `TINY_CAPTIONERS`.
        out_dir: new, empty or earlier saved model folder; replaced atomically.
        seed: seed for the weight initialisation.

    Returns:
        `out_dir` as a Path.
    """
    # Imported here: it brings in every model family, which captioning never needs.
    from nbkit.models.tiny import check_replaceable

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "config.json")
    model, processor = build_tiny_captioner(kind, seed=seed)
    with atomic_directory(out_dir) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        processor.save_pretrained(temporary)
    return out_dir
