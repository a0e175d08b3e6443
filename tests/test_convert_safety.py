"""Bad and hostile files: pickles that try to run code, truncated, empty and misnamed files, corrupted
writes. Each fails with one clear NbkitError naming the file, runs nothing, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbkit.convert import convert_to_single_file, detect_family, load_single_file, verify_single_file
from nbkit.convert.safetensors_stream import read_header
from nbkit.errors import NbkitError


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for a payload that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_file(tiny_model_dir, tmp_path_factory):
    """A tiny sd1 .safetensors (fp32) and its conversion report."""
    out = tmp_path_factory.mktemp("safety") / "tiny.safetensors"
    return convert_to_single_file(tiny_model_dir("sd1"), out, dtype="fp32")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, tiny_file, legacy):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": load_file(tiny_file.output), "callbacks": _CreatesMarker(marker)}
    if legacy:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    else:
        torch.save(payload, path)
    for attempt in (
        lambda: load_single_file(path),
        lambda: convert_to_single_file(path, tmp_path / "out.safetensors"),
        lambda: detect_family(path),
    ):
        with pytest.raises(NbkitError, match="refused to load") as caught:
            attempt()
        assert str(path) in str(caught.value)
        assert not marker.exists()
    assert "run code" in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_files_fail_cleanly(tmp_path, tiny_file):
    data = Path(tiny_file.output).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(NbkitError, match="truncated") as caught:
        load_single_file(truncated)
    assert str(truncated) in str(caught.value)
    with pytest.raises(NbkitError, match="truncated"):
        convert_to_single_file(truncated, tmp_path / "out.safetensors")

    torch.save({"state_dict": load_file(tiny_file.output)}, tmp_path / "whole.ckpt")
    ckpt = (tmp_path / "whole.ckpt").read_bytes()
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(ckpt[: len(ckpt) // 2])
    with pytest.raises(NbkitError, match="truncated or damaged") as caught:
        load_single_file(cut)
    assert str(cut) in str(caught.value)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html>login</html>", "web page"),
        (os.urandom(4096), "neither .safetensors nor a PyTorch checkpoint"),
    ],
    ids=["empty", "lfs-pointer", "html", "garbage"],
)
def test_non_model_files_fail_cleanly(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(NbkitError, match=message) as caught:
        load_single_file(path)
    assert str(path) in str(caught.value)


def test_misnamed_files_are_read_by_their_bytes(tmp_path, tiny_file):
    tensors = load_file(tiny_file.output)
    safetensors_named_ckpt = tmp_path / "actually-safetensors.ckpt"
    shutil.copyfile(tiny_file.output, safetensors_named_ckpt)
    ckpt_named_safetensors = tmp_path / "actually-pickle.safetensors"
    torch.save({"state_dict": tensors}, ckpt_named_safetensors)
    for path in (safetensors_named_ckpt, ckpt_named_safetensors):
        pipeline = load_single_file(path, family="sd1", config=tiny_file.source)
        assert torch.equal(
            pipeline.unet.conv_in.weight, tensors["model.diffusion_model.input_blocks.0.0.weight"]
        ), path
        report = convert_to_single_file(path, tmp_path / f"{path.stem}.out.safetensors", dtype="fp32")
        assert load_file(report.output).keys() == tensors.keys()


def test_verification_catches_a_corrupted_file(tmp_path, tiny_file):
    from nbkit.convert.single_file import _write_safetensors, open_plan

    path = tmp_path / "written.safetensors"
    with open_plan(tiny_file.source) as plan:
        records, _ = _write_safetensors(plan, torch.float32, {}, path)
    verify_single_file(path, records)  # intact: passes
    entry = next(iter(read_header(path).tensors.items()))
    with open(path, "r+b") as handle:
        handle.seek(entry[1].start + 3)
        byte = handle.read(1)
        handle.seek(entry[1].start + 3)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(NbkitError, match=f"verification failed: the bytes of tensor '{entry[0]}'"):
        verify_single_file(path, records)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, tiny_file, monkeypatch):
    import nbkit.convert.single_file as single_file

    def corrupted(path, expected):
        raise NbkitError("verification failed: simulated", path=path)

    monkeypatch.setattr(single_file, "verify_single_file", corrupted)
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(NbkitError, match="simulated"):
        convert_to_single_file(tiny_file.source, out)
    assert list(out.parent.iterdir()) == []


def test_fp16_overflow_is_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.full((8, 4, 3, 3), 1e6)}, path)
    with pytest.raises(NbkitError, match="beyond fp16's range"):
        convert_to_single_file(path, tmp_path / "out.safetensors", dtype="fp16", family="sd1")
    report = convert_to_single_file(path, tmp_path / "out.safetensors", dtype="bf16", family="sd1")
    assert report.dtype == "bf16"


def test_not_enough_space_fails_before_writing(tmp_path, tiny_file, monkeypatch):
    import collections

    import nbkit.convert.single_file as single_file

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(single_file.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out" / "model.safetensors"
    with pytest.raises(NbkitError, match="not enough space"):
        convert_to_single_file(tiny_file.source, out)
    assert not out.exists()


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The low byte of the header length can equal pickle's PROTO opcode (0x80); bytes 8.. decide."""
    from nbkit.convert.checkpoint_io import sniff_format

    tensor = torch.arange(4, dtype=torch.float32)
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"pad": ""}}
    length = len(json.dumps(header).encode())
    header["__metadata__"]["pad"] = "x" * ((0x180 - length) % 256 + 256)
    encoded = json.dumps(header).encode()
    assert len(encoded) % 256 == 0x80
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + tensor.numpy().tobytes())

    assert sniff_format(path) == "safetensors"
    assert torch.equal(load_file(path)["w"], tensor)


def test_checksum_is_plain_crc32_whichever_implementation_computes_it():
    """zlib-ng's CRC-32 is used when installed; verification relies on it matching zlib's."""
    from nbkit.convert.safetensors_stream import checksum

    data = bytes(range(256)) * 4099
    assert checksum(data) == zlib.crc32(data)
    assert checksum(memoryview(data)[7:]) == zlib.crc32(data[7:])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_plain_tensors_in_a_newer_pickle_protocol_say_what_they_are_and_how_to_resave(tmp_path, legacy):
    path = tmp_path / "model v2.ckpt"
    tensors = {"model.diffusion_model.out.2.bias": torch.arange(4, dtype=torch.float16)}
    torch.save({"state_dict": tensors}, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=4)
    with pytest.raises(
        NbkitError, match="holds only plain tensors, but they were pickled with protocol 4"
    ) as caught:
        load_single_file(path)
    assert str(path) in str(caught.value) and "not plain tensors" not in str(caught.value)
    command = caught.value.fix.split("trust the file: ", 1)[1]
    assert "weights_only=False" in command and '"' + str(tmp_path / "model v2.safetensors") + '"' in command
    # The one-liner does what it says (here, where the file is trusted: we just wrote it).
    argv = shlex.split(command)
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], check=True, timeout=120)
    assert load_file(tmp_path / "model v2.safetensors")["model.diffusion_model.out.2.bias"].tolist() == [
        0,
        1,
        2,
        3,
    ]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_code_in_a_newer_pickle_protocol_is_refused_by_name(tmp_path, legacy):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"a": torch.zeros(2)}, "x": _CreatesMarker(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
        pickle_protocol=4,
    )
    with pytest.raises(NbkitError, match=r"unpickling it would call (builtins|io)\.open, i\.e\. run code"):
        load_single_file(path)
    assert not marker.exists()


def test_model_info_runs_the_loading_safety_check(tmp_path, capsys):
    from nbkit.cli import main

    marker = tmp_path / "MARKER"
    evil, plain = tmp_path / "evil.ckpt", tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "x": _CreatesMarker(marker)}, evil)
    torch.save({"state_dict": {"a": torch.zeros(2)}}, plain)
    assert main(["model", "info", str(evil)]) == 2
    err = capsys.readouterr().err
    assert (
        f"nbkit: error: {evil}: refused to load: unpickling it would call" in err
        and ".open, i.e. run code" in err
    )
    assert not marker.exists()
    assert main(["model", "info", str(plain)]) == 0
    out = capsys.readouterr().out
    assert (
        "single file, PyTorch pickle of plain tensors" in out
        and "contents:   not a full Stable Diffusion" in out
    )
