"""Shared test set-up: no network, few threads, and tiny models built once per test run."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub: a test that reaches the network is a bug.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own storage root, never the user's ~/nbkit."""
    monkeypatch.setenv("NBKIT_HOME", str(tmp_path / "nbkit-home"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)` -> a diffusers folder of that tiny family, built once per run."""
    from nbkit.models.tiny import save_tiny_pipeline

    built: dict[str, os.PathLike] = {}

    def get(family: str):
        if family not in built:
            built[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


def pytest_terminal_summary(terminalreporter):
    """Print the timings tests record (`record_property("timing: ...", seconds)`), e.g. the notebooks'."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in report.user_properties:
            if name.startswith("timing: "):
                terminalreporter.write_line(f"{name.removeprefix('timing: ')} {value}")


@pytest.fixture
def one_thread_local_scratch(tmp_path, monkeypatch):
    """One torch thread (several test processes share two cores; subprocesses, through OMP_NUM_THREADS,
    sum floats in the same order) and the session's scratch under `tmp_path`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))
    yield
    torch.set_num_threads(threads)
