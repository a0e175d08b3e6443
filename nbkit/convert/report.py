"""What a conversion did, for code (a dataclass) and for people (its text)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConversionReport:
    """The result of `convert_to_single_file`.

    Args:
        source: the diffusers folder or checkpoint converted.
        output: the file written.
        format: `safetensors` or `ckpt`.
        dtype: `fp16`, `bf16` or `fp32` (floating tensors; integer buffers keep theirs).
        family: the model family's name (a key of `nbkit.families.FAMILIES`).
        prediction_type: `epsilon` or `v_prediction`.
        native_resolution: the square size it was trained at, in pixels.
        tensor_count: tensors written.
        parameter_count: their total number of elements.
        file_size: bytes written.
        sha256: sha256 of the whole file.
        short_hash: A1111's `Model hash` (first 10 hex of the sha256).
        legacy_hash: A1111's old 8-hex hash.
        verified: whether every tensor was read back and checked.
        seconds: wall time of the conversion, verification included.
        metadata: the metadata written (the safetensors header; beside the state dict in a .ckpt),
            `modelspec.hash_sha256` included.
        config_file: the original config written beside the file for A1111 (`<stem>.yaml`, for a
            family with an `original_config`), or None.
    """

    source: str
    output: str
    format: str
    dtype: str
    family: str
    prediction_type: str
    native_resolution: int
    tensor_count: int
    parameter_count: int
    file_size: int
    sha256: str
    short_hash: str
    legacy_hash: str
    verified: bool
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None

    def __str__(self) -> str:
        verified = (
            "every tensor's shape, dtype and checksum checked"
            if self.verified
            else "not verified (--no-verify)"
        )
        lines = [
            f"Converted {self.source}",
            f"       -> {self.output}",
            f"  family:      {self.family} ({self.prediction_type}, {self.native_resolution} px)",
            f"  format:      {self.format}, {self.dtype}, {self.tensor_count} tensors, "
            f"{self.parameter_count / 1e6:.1f} M parameters, {self.file_size / 2**20:.1f} MiB",
            f"  model hash:  {self.short_hash} (sha256 {self.sha256})",
            f"  legacy hash: {self.legacy_hash}",
            f"  verified:    {verified}",
            f"  time:        {self.seconds:.1f} s",
        ]
        if self.config_file:
            lines.insert(-1, f"  config:      {self.config_file} (A1111 reads it: v-prediction)")
        return "\n".join(lines)
