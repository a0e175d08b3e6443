"""The notebooks: committed clean and thin, forms Colab parses, and both executed end to end on a kernel."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_CELL_LINES = 30

# Colab's form syntax: `NAME = VALUE  #@param SPEC` where SPEC is a {type:...} object or a list of choices,
# optionally followed by {allow-input: true}.
_VALUE = r"""(?:"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?(?:e-?\d+)?|True|False|\[[^\]]*\])"""
_CHOICE = r"""(?:"[^"]*"|'[^']*'|-?\d+(?:\.\d+)?)"""
_LIST = rf"\[\s*{_CHOICE}(?:\s*,\s*{_CHOICE})*\s*\]"
_TYPE = r'\{\s*type\s*:\s*"(?:string|integer|number|boolean|date|raw)"\s*\}'
_NUM = r"-?\d+(?:\.\d+)?"
_SLIDER = (
    rf'\{{\s*type\s*:\s*"slider"\s*,\s*min\s*:\s*{_NUM}\s*,\s*max\s*:\s*{_NUM}\s*,\s*step\s*:\s*{_NUM}\s*\}}'
)
PARAM_LINE = re.compile(
    rf"^[A-Za-z_]\w*\s*=\s*{_VALUE}\s*#@param\s*(?:{_TYPE}|{_SLIDER}|{_LIST}(?:\s*\{{allow-input:\s*true\s*\}})?)\s*$"
)


def colab_form_errors(source: str) -> list[str]:
    """Lines with `#@param` that Colab's form parser would not accept."""
    return [line for line in source.splitlines() if "#@param" in line and not PARAM_LINE.match(line.strip())]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_the_form_checker_rejects_what_colab_rejects():
    good = [
        'A = "x"  #@param {type:"string"}',
        'B = 3  #@param {type:"slider", min:1, max:10, step:1}',
        'C = "a"  #@param ["a", "b"]',
        'D = "a"  #@param ["a", "b"] {allow-input: true}',
        "E = True  #@param {type:'boolean'}".replace("'", '"'),
    ]
    bad = [
        "A = x  #@param {type:'string'}",
        'B = 3  #@param {type:"slider", min:1}',
        'C = "a"  #@param ["a", b]',
        'D = "a"  #@param {type:"text"}',
        'if A: B = 1  #@param {type:"integer"}',
    ]
    assert colab_form_errors("\n".join(good)) == []
    assert colab_form_errors("\n".join(bad)) == bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean_thin_forms(path):
    cells = _cells(path)
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code[0]["metadata"].get("tags") == ["parameters"]
    for cell in code:
        source = "".join(cell["source"])
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, source[:60]
        assert len(source.splitlines()) <= MAX_CELL_LINES, source[:60]
        assert colab_form_errors(source) == []
        assert source.startswith("#@title")
        assert "input(" not in source
    shell = [c for c in code if re.search(r"^\s*[!%]", "".join(c["source"]), re.M)]
    assert len(shell) == 1 and "nb.setup(" in "".join(shell[0]["source"])


def _execute(path: Path, parameters: dict, cwd: Path) -> tuple[float, object]:
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected))
    probe = 'import json\nprint(json.dumps({"url": ui.local_url, "running": ui.running}))'
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return time.perf_counter() - start, notebook


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    # The kernel is a subprocess of this interpreter: it sees this checkout, offline, on one thread.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NBKIT_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))


def _assert_ui_closed(notebook) -> None:
    import requests

    # The probe cell appended by `_execute` reads the notebook's own `ui` back.
    probe = json.loads(notebook.cells[-1].outputs[0]["text"])
    assert probe["running"] is False
    with pytest.raises(requests.ConnectionError):
        requests.get(probe["url"].rstrip("/") + "/sdapi/v1/sd-models", timeout=5)


def _photos(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        image = Image.new("RGB", (96, 96), color)
        image.paste((255, 255, 255), (20 + 8 * i, 20, 60 + 8 * i, 70))
        image.save(folder / f"zwx ({i + 1}).png")
    return folder


def test_both_notebooks_run_top_to_bottom(kernel_env, tmp_path):
    from nbkit.convert import load_single_file
    from nbkit.session import Session

    home = tmp_path / "home"
    common = {
        "NBKIT_SOURCE": "",
        "INSTALL_WHEELS": False,
        "STORAGE_FOLDER": str(home),
        "UI_HOST": "127.0.0.1",
        "UI_TUNNEL": "none",
        "UI_TEST_PROMPT": "photo of zwx",
        "STOP_UI_AT_END": True,
    }
    took_db, notebook = _execute(
        ROOT / "notebooks" / "fast-DreamBooth.ipynb",
        {
            **common,
            "MODEL": "tiny-sd1",
            "SESSION_NAME": "ci_subject",
            "IMAGES": str(_photos(tmp_path / "photos")),
            "RESOLUTION": 64,
            "TEXT_ENCODER_STEPS": 2,
            "UNET_STEPS": 4,
            "CHECKPOINT_EVERY": 2,
            "SAMPLE_STEPS": 2,
            "VISION_MODELS": "tiny",
        },
        tmp_path,
    )
    session = Session.open("ci_subject", root=home)
    assert len(session.manifest.images) == 4
    assert all((session.path / image.file).is_file() for image in session.manifest.images)
    assert session.manifest.state.stage == "done"
    single = session.path / "models" / "ci_subject.safetensors"
    assert single.is_file()
    pipeline = load_single_file(single)
    assert pipeline.unet is not None
    scores = json.loads((session.dir("logs") / "vision_scores.json").read_text())
    assert scores  # one row per checkpoint, with the suggested one
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 1  # the one txt2img request the UI answered, saved as A1111 does
    _assert_ui_closed(notebook)

    took_ui, notebook = _execute(
        ROOT / "notebooks" / "fast-UI.ipynb",
        {**common, "SESSION_NAME": "ci_subject", "MODEL": "", "UI_TEST_STEPS": 2, "UI_TEST_SIZE": 64},
        tmp_path,
    )
    outputs = [p for p in session.dir("outputs").glob("*/*.png") if p.parent.name != "samples"]
    assert len(outputs) == 2
    _assert_ui_closed(notebook)
    print(f"\nfast-DreamBooth: {took_db:.1f} s, fast-UI: {took_ui:.1f} s")
