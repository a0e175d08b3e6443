"""The command line: every listed subcommand exists, `--help` stays light, library chatter is quiet
unless `--verbose`, and nbkit's own warnings are one clean line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import nbkit.cli
from nbkit.errors import NbkitWarning
from nbkit.quiet import quiet_libraries

REPO = Path(__file__).resolve().parent.parent
# Its sitecustomize makes bitsandbytes see a CPU with AVX512-BF16, where bitsandbytes logs a notice at
# import. It is first on every run's PYTHONPATH, so what a run prints does not depend on this CPU.
AVX512BF16_CPU = Path(__file__).resolve().parent / "avx512bf16_cpu"
BITSANDBYTES_CPU_NOTICE = "Failed to load CPU gemm_4bit_forward"


def run_nbkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(AVX512BF16_CPU), str(REPO)])
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # the user's own settings are not under test
    return subprocess.run(
        [sys.executable, "-m", "nbkit", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_subcommand_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    monkeypatch.setattr(nbkit.cli, "SUBCOMMANDS", [*nbkit.cli.SUBCOMMANDS, "not_written_yet"])
    with pytest.raises(ModuleNotFoundError, match=r"nbkit\.cli\.not_written_yet"):
        nbkit.cli.build_parser()


def test_every_listed_subcommand_is_in_the_help():
    actions = nbkit.cli.build_parser()._subparsers._group_actions[0].choices
    assert list(actions) == nbkit.cli.SUBCOMMANDS


def test_help_imports_no_ml_library():
    code = (
        "import sys; from nbkit.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_library_chatter_is_quiet_unless_verbose(tmp_path):
    quiet = run_nbkit("model", "tiny", "sd1", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    converted = run_nbkit("convert", str(tmp_path / "quiet"), str(tmp_path / "tiny.safetensors"))
    assert converted.returncode == 0, converted.stderr
    assert converted.stderr == "", converted.stderr

    verbose = run_nbkit("--verbose", "model", "tiny", "sd1", str(tmp_path / "verbose"))
    assert verbose.returncode == 0, verbose.stderr
    # transformers' notices (torchvision missing) and its save progress bar get through.
    assert "[transformers]" in verbose.stderr or "Writing model shards" in verbose.stderr, verbose.stderr
    if importlib.util.find_spec("bitsandbytes") is not None:  # diffusers imports it where installed
        assert BITSANDBYTES_CPU_NOTICE in verbose.stderr, verbose.stderr


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bitsandbytes_notice_on_an_avx512bf16_cpu_is_quiet_unless_verbose():
    # diffusers and peft import bitsandbytes at their own import where it is installed: its logger is
    # quieted before, whichever library imports it.
    def stderr(verbose: bool) -> str:
        code = f"from nbkit.quiet import quiet_libraries; quiet_libraries({verbose}); import bitsandbytes"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(AVX512BF16_CPU), str(REPO)])}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert stderr(verbose=False) == ""
    assert BITSANDBYTES_CPU_NOTICE in stderr(verbose=True)


def test_quiet_libraries_keeps_nbkit_warnings_as_one_line():
    def shown(**options) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # Python's defaults show each warning once per place
            quiet_libraries(**options)
            warnings.warn_explicit(
                "`torch_dtype` is deprecated", FutureWarning, "/x/diffusers/p.py", 1, module="diffusers"
            )
            warnings.warn_explicit("an optional package is missing", UserWarning, "/x/transformers/a.py", 2)
            warnings.warn("taking over a stale lock\n  held by pid 1", NbkitWarning, stacklevel=1)
            return [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught]

    assert shown(import_libraries=False) == ["nbkit: warning: taking over a stale lock held by pid 1\n"]
    verbose = shown(verbose=True)
    assert verbose[-1] == "nbkit: warning: taking over a stale lock held by pid 1\n"
    assert "/x/transformers/a.py:2: UserWarning: an optional package is missing\n" in verbose
    assert any("FutureWarning: `torch_dtype` is deprecated" in text for text in verbose)
