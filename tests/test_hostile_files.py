"""Hostile model files: zip bombs, pickles that call code or declare storages they do not hold, lying
safetensors headers. Each is refused with one NbkitError naming the file, before anything of it is
unpickled, inflated or allocated; good files still load bit for bit. And the model check `nbkit ui`
runs before it listens."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from nbkit.convert import convert_to_single_file
from nbkit.convert.checkpoint_io import check_pickled_checkpoint, load_pickled_checkpoint
from nbkit.convert.safetensors_stream import read_header
from nbkit.convert.tensor_sources import SafetensorsSource
from nbkit.errors import NbkitError
from nbkit.webui.loading import check_model_source

REPO = Path(__file__).resolve().parent.parent
# The refusing process's peak memory, libraries included (torch and diffusers take about 350 MB).
MAX_REFUSING_RSS_BYTES = 500 * 2**20


def _write_zip_bomb(path: Path, inflated_bytes: int) -> None:
    """A torch-zip layout whose data.pkl is a valid pickle start (a BINBYTES8 of `inflated_bytes` zeros),
    deflated: a few MB on disk. Written streaming, so building it takes no memory."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data.pkl", "w", force_zip64=True) as entry:
            entry.write(b"\x80\x04\x8e" + struct.pack("<Q", inflated_bytes))
            chunk = bytes(2**20)
            for start in range(0, inflated_bytes, len(chunk)):
                entry.write(chunk[: min(len(chunk), inflated_bytes - start)])
            entry.write(b".")


def _run_measured(argv: list[str]) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of `nbkit ARGV` in a child process that reports its own
    peak. It reads VmHWM, the peak of its own address space: `ru_maxrss` would not do, since Linux
    carries the parent's peak across the fork and exec that start the child (a test run that loaded a
    big model before would count)."""
    code = textwrap.dedent(
        f"""
        import re, sys
        from nbkit.cli import main
        try:
            status = main({argv!r})
        finally:
            with open("/proc/self/status") as status_file:
                peak_kb = re.search(r"VmHWM:\\s*(\\d+) kB", status_file.read()).group(1)
            print("PEAK_RSS_KB", peak_kb, file=sys.stderr)
        sys.exit(status)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    peak = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024
    return done.returncode, done.stderr, peak


def test_a_zip_bomb_is_refused_by_convert_at_low_memory(tmp_path):
    bomb = tmp_path / "bomb.ckpt"
    _write_zip_bomb(bomb, 600 * 10**6)  # inflates to 600 MB; before the check, reading it took 2-3x that
    assert bomb.stat().st_size < 10 * 2**20
    status, stderr, peak = _run_measured(["convert", str(bomb), str(tmp_path / "out.safetensors")])
    assert status == 2, stderr
    assert f"nbkit: error: {bomb}: refused to open" in stderr and "zip bomb" in stderr
    assert "'archive/data.pkl' would inflate to 600.0 MB" in stderr
    assert "weights_only=False" not in stderr and "Traceback" not in stderr
    assert peak < MAX_REFUSING_RSS_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    assert not (tmp_path / "out.safetensors").exists()


def test_a_pickle_that_claims_a_huge_argument_is_refused_before_reading_it(tmp_path):
    # A legacy (non-zip) file whose pickle starts a 1 TB bytes object: read whole, it would be allocated.
    path = tmp_path / "huge.ckpt"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + bytes(100))
    with pytest.raises(NbkitError, match=r"its pickle is larger than 67\.1 MB") as caught:
        check_pickled_checkpoint(path)
    assert caught.value.path == str(path)


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"model.diffusion_model.out.2.bias": torch.arange(1000, dtype=torch.float32)}


def test_a_legacy_pickle_declaring_more_tensor_bytes_than_the_file_holds_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save(_tiny_state_dict(), buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    # The storage's element count (1000, a BININT2) in its persistent id, the first one in the file.
    declared = b"M" + struct.pack("<H", 1000)
    assert declared in data
    path = tmp_path / "liar.ckpt"
    path.write_bytes(data.replace(declared, b"J" + struct.pack("<i", 2**31 - 1), 1))
    with pytest.raises(NbkitError, match=r"declares 8\.6 GB of tensors in a file of") as caught:
        load_pickled_checkpoint(path)
    assert caught.value.path == str(path)


def _torch_zip(path: Path, pickled: bytes, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_calling_os_system_is_refused_without_running_it(tmp_path, layout, protocol):
    marker = tmp_path / "MARKER"
    command = f"touch {marker}"
    if protocol == 2:
        pickled = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command.encode() + b"\x85R."
    else:
        # STACK_GLOBAL from memoised strings, fetched back with BINGET: the name is never written whole.
        pickled = (
            b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x8c"
            + bytes([len(command)])
            + command.encode()
            + b"\x85R."
        )
    path = tmp_path / "evil.ckpt"
    if layout == "zip":
        _torch_zip(path, pickled)
    else:
        path.write_bytes(pickled)
    for attempt in (check_pickled_checkpoint, load_pickled_checkpoint, check_model_source):
        with pytest.raises(
            NbkitError, match=r"unpickling it would call os\.system, i\.e\. run code"
        ) as caught:
            attempt(path)
        assert caught.value.path == str(path)
    assert not marker.exists()


def test_a_checkpoint_without_tensors_gets_no_resave_advice(tmp_path):
    path = tmp_path / "nothing.ckpt"
    torch.save({"epoch": 3, "names": ["a", "b"]}, path, pickle_protocol=4)
    with pytest.raises(NbkitError, match="holds no tensors") as caught:
        load_pickled_checkpoint(path)
    assert "weights_only=False" not in str(caught.value)


def test_zip_layouts_torch_would_read_otherwise_are_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save(_tiny_state_dict(), buffer)
    good = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    entries = {info.filename: good.read(info) for info in good.infolist()}
    pickled = next(name for name in entries if name.endswith("/data.pkl"))

    twice = tmp_path / "twice.ckpt"
    with zipfile.ZipFile(twice, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        archive.writestr(pickled.upper().replace("DATA.PKL", "data.PKL"), b"\x80\x02cos\nsystem\n.")
    with pytest.raises(NbkitError, match=r"holds .* twice"):
        check_pickled_checkpoint(twice)

    # torch memory-maps storages, so it cannot read a deflated one: say so, not "damaged"
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(NbkitError, match="stored compressed"):
        load_pickled_checkpoint(deflated)

    missing = tmp_path / "missing.ckpt"
    with zipfile.ZipFile(missing, "w") as archive:
        for name, data in entries.items():
            if "/data/" not in name:
                archive.writestr(name, data)
    with pytest.raises(NbkitError, match="names tensor storage '0', which the zip does not hold"):
        load_pickled_checkpoint(missing)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_good_checkpoints_still_load_bit_for_bit(tmp_path, legacy):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "view": torch.randn(4, 4)[1:, ::2],  # a view: its storage is larger than the tensor
    }
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": tensors, "global_step": 5}, path, _use_new_zipfile_serialization=not legacy)
    loaded, _ = load_pickled_checkpoint(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


# --- safetensors headers ----------------------------------------------------------------------------


def _safetensors_bytes(header: dict, data: bytes, header_length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if header_length is None else header_length) + encoded + data


_GOOD_HEADER = {
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
}


@pytest.mark.parametrize(
    ("change", "data", "header_length", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, 24, None, "do not hold"),
        (
            {"a": {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [0, 2**62]}},
            24,
            None,
            "tensor 'b' overlaps the previous one",
        ),
        (
            {"b": {"dtype": "F16", "shape": [4], "data_offsets": [2**40, 2**40 + 8]}},
            24,
            None,
            "does not start",
        ),
        (
            {"b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}},
            24,
            None,
            "overlaps the previous one",
        ),
        ({"b": {"dtype": "F16", "shape": [-4], "data_offsets": [16, 24]}}, 24, None, "not a list of sizes"),
        ({"b": {"dtype": "F16", "shape": [4.0], "data_offsets": [16, 24]}}, 24, None, "not a list of sizes"),
        ({"b": {"dtype": "Q99", "shape": [4], "data_offsets": [16, 24]}}, 24, None, "dtype 'Q99'"),
        ({"b": {"dtype": "F16", "shape": [4], "data_offsets": [16]}}, 24, None, "not \\[begin, end\\]"),
        ({"__metadata__": ["x"]}, 24, None, "__metadata__ is not a mapping"),
        ({}, 16, None, "truncated"),
        ({}, 24, 2**40, "its header claims 1099511627776 bytes"),
        ({}, 24, 2**63, "its header claims"),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, change, data, header_length, message):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(_safetensors_bytes({**_GOOD_HEADER, **change}, bytes(data), header_length))
    with pytest.raises(NbkitError, match=message) as caught:
        read_header(path)
    assert caught.value.path == str(path)
    with pytest.raises(NbkitError):
        check_model_source(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b' {"a": 1}', "does not start with"),
        (b'{"a": {"dtype": "F32"}, "a": {"dtype": "F32"}}', "'a' appears twice"),
        (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', "NaN"),
        (b'{"\xff": {}}', "not valid JSON"),
        (b"{" + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
        # valid JSON to Python, but past safetensors' own recursion limit (128): it would fail later
        (
            b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "z": '
            + b"[" * 200
            + b"]" * 200
            + b"}}",
            "nests more than 32 levels",
        ),
    ],
)
def test_safetensors_headers_that_are_not_plain_json_are_refused(tmp_path, raw, message):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(NbkitError, match=message):
        read_header(path)


def _valid_file() -> tuple[dict, bytes]:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.arange(4, dtype=torch.float16),
        "c": torch.tensor([7, -1], dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    data = save(tensors, metadata={"k": "v"})
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


_HEADER, _DATA = _valid_file()
_NAMES = sorted(name for name in _HEADER if name != "__metadata__")
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _mutated_files(draw) -> bytes:
    header = json.loads(json.dumps(_HEADER))
    data, length = _DATA, None
    kind = draw(st.sampled_from(["field", "entry", "bytes", "length", "data", "metadata", "benign"]))
    if kind == "benign":  # changes a reader may accept: both must then read the same tensors
        header["a"]["shape"] = draw(st.sampled_from([[2, 3], [6], [3, 2], [1, 6], [6, 1, 1], [0, 6]]))
        header["b"]["dtype"] = draw(st.sampled_from(["F16", "BF16", "I16", "U16", "F32"]))
        header["c"][draw(st.text(max_size=3))] = draw(_JSON_VALUES)
        if draw(st.booleans()):
            header["__metadata__"] = draw(
                st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)
            )
        header = dict(draw(st.permutations(list(header.items()))))
    if kind == "field":
        name = draw(st.sampled_from(_NAMES))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = draw(
            st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "U16", "F8_E4M3", "x"])
            | st.lists(st.integers(-2, 2**66), max_size=4)
            | st.lists(st.sampled_from([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 40, 48, 56, 64]), max_size=3)
            | _JSON_VALUES
        )
        header[name][field] = value
    elif kind == "entry":
        header[draw(st.sampled_from([*_NAMES, "new"]))] = draw(_JSON_VALUES)
    elif kind == "metadata":
        header["__metadata__"] = draw(_JSON_VALUES)
    encoded = json.dumps(header, ensure_ascii=draw(st.booleans())).encode()
    encoded += b" " * draw(st.integers(0, 9))  # writers pad the header with spaces
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(encoded)))
            action = draw(st.sampled_from(["replace", "insert", "delete"]))
            byte = bytes([draw(st.integers(0, 255))])
            cut = at + 1 if action != "insert" else at
            encoded = encoded[:at] + (byte if action != "delete" else b"") + encoded[cut:]
    if kind == "length":
        length = draw(
            st.integers(0, 2**64 - 1)
            | st.integers(len(encoded) - 4, len(encoded) + 4).filter(lambda n: n >= 0)
        )
    if kind == "data":
        change = draw(st.integers(-len(_DATA), 16))
        data = _DATA[:change] if change < 0 else _DATA + bytes(change)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_files())
def test_a_mutated_safetensors_header_loads_as_safetensors_reads_it_or_is_refused(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.safetensors"
        path.write_bytes(content)
        try:
            with SafetensorsSource(path) as source:
                # Never more than the file holds is allocated for it.
                assert sum(info.nbytes for info in source.infos.values()) <= len(content)
                ours = {name: source.load(name) for name in source.infos}
        except NbkitError as error:
            assert error.path == str(path)
            return
        theirs = load_file(path)  # what safetensors itself reads from a header nbkit accepts
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape
        assert (
            tensor.view(-1).view(torch.uint8).tolist() == theirs[name].reshape(-1).view(torch.uint8).tolist()
        )


# --- the model check before the UI listens ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-models")
    single = convert_to_single_file(tiny_model_dir("sd1"), folder / "tiny.safetensors", dtype="fp32").output
    tensors = load_file(single)
    torch.save({"state_dict": tensors}, folder / "tiny.ckpt")
    save_file(
        {k: v for k, v in tensors.items() if k.startswith("first_stage_model.")}, folder / "vae.safetensors"
    )
    return folder


def test_the_model_check_passes_good_local_and_remote_sources(tiny_model_dir, tiny_files):
    for source in (
        tiny_model_dir("sd1"),
        tiny_files / "tiny.safetensors",
        str(tiny_files / "tiny.ckpt"),
        "runwayml/stable-diffusion-v1-5",  # hub ids, URLs and registry keys are checked when loaded
        "https://example.com/model.safetensors",
        "sd15",
    ):
        check_model_source(source)


def test_the_model_check_refuses_bad_local_sources_naming_them(tiny_model_dir, tiny_files, tmp_path):
    text = tmp_path / "not-a-model.safetensors"
    text.write_text("hello, I am a text file\n")
    bomb = tmp_path / "bomb.ckpt"
    _write_zip_bomb(bomb, 20 * 10**6)
    no_index = tmp_path / "folder"
    no_index.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in Path(tiny_model_dir("sd1")).iterdir():
        (broken / item.name).symlink_to(item)
    (broken / "unet").unlink()
    (broken / "unet").mkdir()
    (broken / "unet" / "config.json").symlink_to(Path(tiny_model_dir("sd1")) / "unet" / "config.json")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + bytes(7) + b"{}")
    cases = {
        text: "not a model file nbkit can read",
        tiny_files / "vae.safetensors": "looks like a VAE",
        bomb: "zip bomb",
        no_index: "model_index.json is missing",
        broken / "unet" / "diffusion_pytorch_model.safetensors": "header claims 16 bytes",
        tmp_path / "missing.safetensors": "no such file",
    }
    for source, message in cases.items():
        with pytest.raises(NbkitError, match=message) as caught:
            check_model_source(source if source.name != "diffusion_pytorch_model.safetensors" else broken)
        assert caught.value.path == str(source)
    with pytest.raises(NbkitError, match="not the expected"):
        check_model_source(tiny_model_dir("sd1"), family="sdxl")


def test_the_model_check_asks_to_convert_a_file_that_does_not_say_its_family(tiny_model_dir, tmp_path):
    single = convert_to_single_file(
        tiny_model_dir("sd2"), tmp_path / "tiny2.safetensors", dtype="fp32"
    ).output
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(single), bare)  # without nbkit's metadata: SD 2.x 512 or 768-v?
    with pytest.raises(NbkitError, match="cannot tell which model family") as caught:
        check_model_source(bare)
    assert f"nbkit convert {bare} FOLDER --family" in caught.value.fix
    check_model_source(bare, family=caught.value.fix.split("--family ")[1].split()[0])


def test_nbkit_ui_refuses_a_bad_model_before_it_listens(tmp_path, monkeypatch, capsys):
    from nbkit.cli import main
    from nbkit.webui import server

    def listen(*_args, **_kwargs):
        raise AssertionError("the server started with a bad --model")

    monkeypatch.setattr(server.Server, "start", listen)
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are my notes, not a model\n")
    argv = ["ui", "--model", str(bad), "--no-base-models", "--root", str(tmp_path / "root")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_a_large_record_beside_the_pickle_is_refused_whatever_its_ratio(tmp_path):
    # torch reads `archive/version` whole: 40 MB that deflate only ~40x pass a ratio bound, so size
    # alone must refuse it (a reviewer's 13 MB file of this kind took 6.6 GB to refuse before).
    good = tmp_path / "good.ckpt"
    torch.save(_tiny_state_dict(), good)
    bomb = tmp_path / "bomb.ckpt"
    noisy_block = os.urandom(25_000) + bytes(2**20 - 25_000)
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            if info.filename.endswith("/version"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with target.open(record, "w", force_zip64=True) as entry:
                    entry.write(b"3\n")
                    for _ in range(40):
                        entry.write(noisy_block)
            else:
                target.writestr(info, source.read(info))
    with zipfile.ZipFile(bomb) as archive:
        version = next(info for info in archive.infolist() if info.filename.endswith("/version"))
    assert 40 * 2**20 < version.file_size < 100 * version.compress_size  # under the ratio bound
    with pytest.raises(NbkitError, match=r"'[^']*/version' would inflate to 41\.9 MB") as caught:
        check_pickled_checkpoint(bomb)
    assert caught.value.path == str(bomb)
