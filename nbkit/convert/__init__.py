"""Checkpoint conversion: diffusers folders <-> single-file checkpoints (SD 1.x, 2.x, SDXL).

- `convert_to_single_file`: diffusers folder (or another checkpoint) -> one .safetensors/.ckpt in the
  original LDM/SGM layout that AUTOMATIC1111, ComfyUI and diffusers load, streamed tensor by tensor.
- `load_single_file`: single file -> diffusers pipeline, offline, with diffusers' own converters.
- `detect_family`: a checkpoint's family and prediction type from its keys, shapes and metadata.
- `model_hashes`: the hashes AUTOMATIC1111 shows.
"""

from nbkit.convert.detect import FamilyGuess, detect_family, resolve_family
from nbkit.convert.from_single_file import load_single_file
from nbkit.convert.hashes import model_hashes, modelspec_hash
from nbkit.convert.report import ConversionReport
from nbkit.convert.single_file import convert_to_single_file
from nbkit.convert.verify import verify_single_file

__all__ = [
    "ConversionReport",
    "FamilyGuess",
    "convert_to_single_file",
    "detect_family",
    "load_single_file",
    "model_hashes",
    "modelspec_hash",
    "resolve_family",
    "verify_single_file",
]
