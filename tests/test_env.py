"""Runtime detection, storage root and scratch folders, with every platform marker faked."""

from __future__ import annotations

import errno
import types
from pathlib import Path

import pytest

from nbkit import env
from nbkit.errors import DriveDisconnectedError, NbkitError


def _no(_):
    return False


def _shell(kernel):
    shell = types.SimpleNamespace(kernel=kernel)
    return {"IPython": types.SimpleNamespace(get_ipython=lambda: shell)}


@pytest.mark.parametrize(
    ("environ", "modules_importable", "paths", "modules", "expected"),
    [
        ({"COLAB_RELEASE_TAG": "release-colab_20240601"}, set(), set(), {}, "colab"),
        ({}, {"google.colab"}, set(), {}, "colab"),
        ({}, set(), {"/content/sample_data"}, {}, "colab"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, set(), set(), {}, "kaggle"),
        ({}, set(), {"/kaggle/working"}, {}, "kaggle"),
        ({}, set(), set(), _shell(kernel=object()), "jupyter"),
        ({}, set(), set(), _shell(kernel=None), "python"),  # terminal IPython, no kernel
        ({}, set(), {"/content"}, {}, "python"),  # a bare /content is not Colab
        ({}, set(), set(), {}, "python"),
        ({"NBKIT_RUNTIME": "kaggle", "COLAB_RELEASE_TAG": "x"}, set(), set(), {}, "kaggle"),
    ],
)
def test_detect_kind_from_markers(environ, modules_importable, paths, modules, expected):
    kind = env.detect_kind(
        environ=environ,
        module_importable=lambda name: name in modules_importable,
        path_exists=lambda path: str(path) in paths,
        modules=modules,
    )
    assert kind == expected


def test_unknown_forced_runtime_is_refused():
    with pytest.raises(NbkitError, match="NBKIT_RUNTIME='laptop'"):
        env.detect_kind(environ={"NBKIT_RUNTIME": "laptop"})


class _FakeTorch:
    """Just the torch attributes detect_runtime reads."""

    def __init__(self, *, gpu: tuple[str, int, int, int] | None, cuda: str | None = "12.4"):
        self.__version__ = "2.5.1+cu124"
        self.version = types.SimpleNamespace(cuda=cuda)
        name, memory, major, minor = gpu or ("", 0, 0, 0)
        props = types.SimpleNamespace(name=name, total_memory=memory, major=major, minor=minor)
        self.cuda = types.SimpleNamespace(
            is_available=lambda: gpu is not None, get_device_properties=lambda i: props
        )


def _runtime(torch_module):
    return env.detect_runtime(
        environ={}, module_importable=_no, path_exists=_no, modules={}, torch_module=torch_module
    )


def test_runtime_reads_gpu_facts_from_torch():
    t4 = _runtime(_FakeTorch(gpu=("Tesla T4", 15 * 2**30, 7, 5)))
    assert (t4.gpu_name, t4.gpu_memory_gib, t4.compute_capability) == ("Tesla T4", 15.0, (7, 5))
    assert t4.cuda_version == "12.4" and t4.torch_version == "2.5.1+cu124"
    assert t4.bf16_supported is False  # T4 only emulates bf16
    a100 = _runtime(_FakeTorch(gpu=("NVIDIA A100-SXM4-40GB", 40 * 2**30, 8, 0)))
    assert a100.bf16_supported is True
    summary = env.describe_runtime(t4)
    assert "Tesla T4" in summary and "15.0 GiB" in summary and "7.5" in summary and "no bf16" in summary


def test_runtime_on_cpu_and_without_torch():
    cpu = _runtime(_FakeTorch(gpu=None, cuda=None))
    assert cpu.torch_version == "2.5.1+cu124" and cpu.gpu_name is None and cpu.gpu_memory_bytes is None
    assert cpu.compute_capability is None and not cpu.bf16_supported and not cpu.has_gpu
    bare = _runtime(False)
    assert bare == env.Runtime(kind="python")
    assert "torch not installed" in env.describe_runtime(bare)


def test_runtime_with_the_real_torch():
    import torch

    runtime = env.detect_runtime()
    assert runtime.torch_version == torch.__version__
    assert runtime.has_gpu == torch.cuda.is_available()


class _FakeDrive:
    """Stands in for google.colab.drive: mounting creates MyDrive under the (test) mount point."""

    def __init__(self, fail: Exception | None = None):
        self.calls = []
        self.fail = fail

    def mount(self, path):
        self.calls.append(path)
        if self.fail:
            raise self.fail
        (Path(path) / "MyDrive").mkdir(parents=True)


@pytest.fixture
def drive_root(tmp_path, monkeypatch):
    mount_point = tmp_path / "drive"
    monkeypatch.setattr(env, "COLAB_DRIVE_MOUNT", mount_point)
    return mount_point


COLAB = env.Runtime(kind="colab")


def test_storage_root_mounts_drive_on_colab(drive_root):
    drive = _FakeDrive()
    root = env.storage_root(runtime=COLAB, environ={}, drive_module=drive)
    assert root == drive_root / "MyDrive" / "nbkit" and root.is_dir()
    assert drive.calls == [str(drive_root)]
    env.storage_root(runtime=COLAB, environ={}, drive_module=drive)
    assert len(drive.calls) == 1, "an already mounted Drive is not mounted again"


def test_storage_root_on_a_shared_drive(drive_root):
    (drive_root / "Shareddrives" / "Team Art").mkdir(parents=True)
    root = env.storage_root(runtime=COLAB, environ={}, drive_module=_FakeDrive(), shared_drive="Team Art")
    assert root == drive_root / "Shareddrives" / "Team Art" / "nbkit" and root.is_dir()
    with pytest.raises(NbkitError, match="no shared drive named 'Nope'"):
        env.storage_root(runtime=COLAB, environ={}, shared_drive="Nope")


def test_storage_root_colab_errors(drive_root):
    with pytest.raises(NbkitError, match="not mounted and mount=False"):
        env.storage_root(runtime=COLAB, environ={}, mount=False)
    with pytest.raises(NbkitError, match="mounting Google Drive failed: mount timed out"):
        env.storage_root(
            runtime=COLAB, environ={}, drive_module=_FakeDrive(fail=TimeoutError("mount timed out"))
        )


def test_nbkit_home_wins_on_colab_without_mounting(drive_root, tmp_path):
    drive = _FakeDrive()
    root = env.storage_root(runtime=COLAB, environ={"NBKIT_HOME": str(tmp_path / "home")}, drive_module=drive)
    assert root == tmp_path / "home" and root.is_dir() and drive.calls == []


def test_storage_root_elsewhere(tmp_path, monkeypatch):
    python = env.Runtime(kind="python")
    assert env.storage_root(runtime=python, environ={"NBKIT_HOME": str(tmp_path / "h")}) == tmp_path / "h"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert env.storage_root(runtime=python, environ={}) == tmp_path / "user" / "nbkit"
    assert (tmp_path / "user" / "nbkit").is_dir()
    with pytest.raises(NbkitError, match="only Colab"):
        env.storage_root(runtime=env.Runtime(kind="kaggle"), environ={}, shared_drive="Team")


def _flaky_mkdir(monkeypatch, failures: int):
    """Make Path.mkdir fail with ENOTCONN `failures` times, then work."""
    real_mkdir = Path.mkdir
    calls = []

    def mkdir(self, *args, **kwargs):
        calls.append(self)
        if len(calls) <= failures:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return calls


def test_drive_disconnect_is_retried(drive_root, monkeypatch):
    (drive_root / "MyDrive").mkdir(parents=True)
    calls = _flaky_mkdir(monkeypatch, failures=2)
    sleeps = []
    root = env.storage_root(runtime=COLAB, environ={}, sleep=sleeps.append)
    assert root.is_dir() and len(calls) == 3 and sleeps == [0.5, 1.0]


def test_drive_gone_is_reported_clearly(drive_root, monkeypatch):
    (drive_root / "MyDrive").mkdir(parents=True)
    _flaky_mkdir(monkeypatch, failures=100)
    sleeps = []
    with pytest.raises(DriveDisconnectedError) as caught:
        env.storage_root(runtime=COLAB, environ={}, sleep=sleeps.append)
    message = str(caught.value)
    assert "the Drive mount is gone" in message and "force_remount=True" in message
    assert len(sleeps) == 4  # five tries in all


@pytest.mark.parametrize(
    ("kind", "environ", "expected"),
    [
        ("colab", {}, "/content/nbkit-scratch"),
        ("kaggle", {}, "/kaggle/temp/nbkit"),
        ("python", {"XDG_CACHE_HOME": "/x/cache"}, "/x/cache/nbkit"),
        ("colab", {"NBKIT_SCRATCH": "/fast"}, "/fast"),
    ],
)
def test_local_scratch_locations(kind, environ, expected):
    path = env.local_scratch(runtime=env.Runtime(kind=kind), environ=environ, create=False)
    assert path == Path(expected)


def test_local_scratch_is_created(tmp_path):
    path = env.local_scratch(runtime=env.Runtime(kind="python"), environ={"XDG_CACHE_HOME": str(tmp_path)})
    assert path == tmp_path / "nbkit" and path.is_dir()


@pytest.mark.parametrize(
    ("capability", "native"),
    [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)],
)
def test_one_bf16_rule_for_the_report_and_for_mixed_precision(monkeypatch, capability, native):
    import torch

    from nbkit.train.inputs import resolve_precision

    assert env.has_native_bf16(capability) is native
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    setting, dtype = resolve_precision("auto", torch.device("cuda", 0))
    assert (setting, dtype) == (("bf16", torch.bfloat16) if native else ("fp16", torch.float16))
